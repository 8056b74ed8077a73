"""The kernels as the policy methods' scoring ops: every method keeps the same tokens."""

import pytest
import torch

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import REFERENCE_OPS, LayerInputs, get_method

METHODS = ["snapkv", "pyramidkv", "adakv", "criticalkv", "defensivekv", "layer_defensivekv"]


def layer(device, seed, hq=8, hkv=2, d=64, n=180, w=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, w, d, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen)
    v = torch.randn(hkv, n, d, generator=gen)
    wo = torch.randn(96, hq * d, generator=gen) / (hq * d) ** 0.5
    return LayerInputs(*(t.to(device=device, dtype=dtype) for t in (q, k, v, wo)))


@pytest.mark.interp
@pytest.mark.parametrize("method", METHODS)
def test_kernel_ops_keep_the_reference_tokens(kdev, method):
    inp = layer(kdev, seed=len(method))
    ref = get_method(method, window=16, probs_fp32=True).compress_uniform(inp, 50)
    got = get_method(method, tk.scoring_ops(impl="triton"), window=16, probs_fp32=True).compress_uniform(inp, 50)
    assert torch.equal(got.cpu(), ref.cpu())


def test_default_ops_are_the_policy_library():
    assert get_method("defensivekv").ops is REFERENCE_OPS
    ops = tk.scoring_ops()  # auto: the PyTorch path on CPU tensors, i.e. the reference itself
    inp = layer(torch.device("cpu"), seed=3)
    a = get_method("defensivekv", window=16).compress_uniform(inp, 40)
    b = get_method("defensivekv", ops, window=16).compress_uniform(inp, 40)
    assert torch.equal(a, b)
