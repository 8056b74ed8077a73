"""The scoring kernels compile once per model, not once per prompt-length pattern: a JIT compile
inside an engine step stalls every running request for seconds (seen in served bursts)."""

import pytest
import torch

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import EvictionConfig, LayerInputs, get_method


def test_cpu_warms_up_one_length():
    assert tk.warmup_lengths(2, 32, torch.device("cpu")) == [4 * 32 + 67]


def _compiled_variants() -> int:
    from vllm_defensive.triton_kernels import _compact, _scoring, _scoring_gluon, _value_norm

    total = 0
    for fn in (_scoring._window_pass1, _scoring._window_combine, _scoring._window_pass2, _scoring._window_sums,
               _scoring._window_fixup, _scoring_gluon.window_pass2_gluon, _value_norm._value_norm_kernel,
               _compact._compact_kernel):
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton keeps no per-device kernel cache to count")
        total += sum(len(c[0]) for c in caches.values())
    return total


LENGTHS = (193, 1000, 3000, 8191, 8192, 20001, 32768)


def assert_no_compiles_after_warm_up(run, hkv: int) -> None:
    for n in tk.warmup_lengths(hkv, 32, torch.device("cuda")):
        run(n)
    before = _compiled_variants()
    for n in LENGTHS:
        run(n)
    assert _compiled_variants() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 8, 128)])
def test_worker_path_compiles_nothing_after_warm_up(hq, hkv, d):
    """What the worker runs on GPU pages: every layer scored from the paged caches, then one
    compaction launch; after the warm-up lengths, no prompt length compiles anything."""
    from vllm_defensive.integration.scoring import PagedRequest, select_keep_paged

    dev, layers, block = torch.device("cuda"), 3, 16
    blocks = 32768 // block + 8
    caches = [torch.randn(blocks, 2, block, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    keys, values = [c[:, 0] for c in caches], [c[:, 1] for c in caches]
    wos = [torch.randn(hq * d, hq * d, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]

    def serve(n):
        need = -(-n // block)
        table = torch.randperm(blocks - 1, device=dev)[:need].to(torch.int32) + 1
        q = torch.randn(layers, hq, 32, d, device=dev, dtype=torch.bfloat16)
        req = PagedRequest(q, keys, values, table, n, wos, None)
        for method in ("snapkv", "defensivekv"):
            kept = select_keep_paged(EvictionConfig(method=method, window=32, budget=0.2), req, n // 5)
        tk.compact_kv(keys, values, kept.long(), table, table)  # onto the same pages: a no-op copy
        torch.cuda.synchronize()

    assert_no_compiles_after_warm_up(serve, hkv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 8, 128)])
def test_dense_path_compiles_nothing_after_warm_up(hq, hkv, d):
    """The same through the policy methods' dense ops (one block of L keys)."""
    dev = torch.device("cuda")
    ops = tk.scoring_ops()
    wo = torch.randn(hq * d, hq * d, device=dev, dtype=torch.bfloat16) * 0.02

    def score(n):
        q = torch.randn(hq, 32, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(hkv, n, d, device=dev, dtype=torch.bfloat16)
        for method in ("snapkv", "defensivekv"):
            get_method(EvictionConfig(method=method, window=32, budget=0.2), ops).compress_uniform(
                LayerInputs(q, k, k.clone(), wo), n // 5)
        torch.cuda.synchronize()

    assert_no_compiles_after_warm_up(score, hkv)
