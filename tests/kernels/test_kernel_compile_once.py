"""The scoring kernels compile once per model, not once per prompt-length pattern: a JIT compile
inside an engine step stalls every running request for seconds (seen in served bursts)."""

import pytest
import torch

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import EvictionConfig, LayerInputs, get_method


def test_cpu_warms_up_one_length():
    assert tk.warmup_lengths(2, 32, torch.device("cpu")) == [4 * 32 + 67]


def _compiled_variants() -> int:
    from vllm_defensive.triton_kernels import _scoring, _value_norm

    total = 0
    for fn in (_scoring._window_pass1, _scoring._window_combine, _scoring._window_pass2, _scoring._window_fixup,
               _value_norm._value_norm_kernel):
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton keeps no per-device kernel cache to count")
        total += sum(len(c[0]) for c in caches.values())
    return total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 8, 128)])
def test_after_warm_up_no_prompt_length_compiles_again(hq, hkv, d):
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

    for n in tk.warmup_lengths(hkv, 32, dev):
        score(n)
    before = _compiled_variants()
    for n in (193, 1000, 3000, 8191, 8192, 20001, 32768):
        score(n)
    assert _compiled_variants() == before
