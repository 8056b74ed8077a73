"""Backend selection and the PyTorch fallback behind the public API."""

import pytest
import torch

import vllm_defensive.triton_kernels as tk
from vllm_defensive.triton_kernels import _backend


def test_cpu_tensors_use_torch_by_default(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert tk.backend("cpu") == "torch"  # never the interpreter unless asked


def test_forcing(monkeypatch):
    monkeypatch.setenv(_backend.ENV, "torch")
    assert tk.backend("cpu") == "torch"
    assert tk.backend("cuda") == "torch"
    monkeypatch.setenv(_backend.ENV, "")
    if _backend.triton_available():
        assert tk.backend("cuda") == "triton"


def test_no_triton_means_torch(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert tk.backend("cuda") == "torch"
    assert tk.backend("cpu") == "torch"


def test_auto_path_on_cpu_is_the_torch_path(monkeypatch):
    """What the CPU vLLM build gets: impl=None on CPU tensors runs the policy reference."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    from vllm_defensive.policy import scoring

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, 64, generator=gen)
    k = torch.randn(2, 50, 64, generator=gen)
    got = tk.window_stats(q, k)
    ref = scoring.window_stats(q, k)
    assert torch.equal(got.defensive_max, ref.defensive_max)


def test_import_name():
    import importlib.util

    assert tk.__name__ == "vllm_defensive.triton_kernels"
    spec = importlib.util.find_spec("triton_kernels")
    # whatever a top-level `triton_kernels` is (OpenAI's, or nothing), it is not this package
    assert spec is None or "vllm_defensive" not in (spec.origin or "")


def test_bad_impl():
    with pytest.raises(ValueError):
        tk.paged_value_norms(torch.zeros(1, 16, 1, 64), torch.zeros(1, dtype=torch.int32), 4, torch.zeros(8, 64),
                             impl="cuda")


def test_the_kernel_tests_run_here(kernels_run):
    """Without CUDA the kernel tests run on Triton's interpreter. A test module elsewhere that
    imports vLLM (which imports Triton) at module level, before tests/kernels/conftest.py sets
    TRITON_INTERPRET, would make every one of them skip without a word: fail instead."""
    assert kernels_run, ("Triton's interpreter is unusable: Triton missing, or imported before "
                         "TRITON_INTERPRET was set (import vLLM inside tests, not at module level)")
