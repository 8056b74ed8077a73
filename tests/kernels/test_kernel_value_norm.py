"""||v W_o^q||_1 value-norm kernel over paged V == policy.scoring.value_norms."""

import pytest
import torch
from kernel_testutil import make_paged

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import scoring

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def run_case(device, hq, hkv, d, dout, bs, n, dtype, layout, seed, w_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(hkv, n, d, generator=gen).to(device=device, dtype=dtype)
    wo = (torch.randn(dout, hq * d, generator=gen) / (hq * d) ** 0.5).to(device=device, dtype=w_dtype or dtype)
    cache, table = make_paged(values, bs, layout, gen=gen)
    ref = scoring.value_norms(values, wo)
    got = tk.paged_value_norms(cache, table, n, wo, impl="triton")
    assert got.dtype == torch.float32 and got.shape == (hkv, n)
    # bf16/fp16 products are exact and both sides accumulate in fp32: only the summation order differs
    torch.testing.assert_close(got, ref, rtol=1e-5 if device.type == "cpu" else 2e-5, atol=1e-6)
    share = tk.value_norm_share(got)
    torch.testing.assert_close(share, scoring.value_norm_share(ref), rtol=2e-5, atol=1e-7)


@pytest.mark.interp
@pytest.mark.parametrize("hq,hkv,d,dout,bs,n,dtype,layout", [
    pytest.param(2, 2, 64, 96, 16, 150, BF16, "NHD", id="g1-d64-bs16-bf16"),
    pytest.param(6, 2, 128, 200, 32, 77, FP16, "FA", id="g3-d128-bs32-fp16-fa-ragged-D"),
    pytest.param(7, 1, 64, 130, 128, 300, FP32, "HND", id="g7-d64-bs128-fp32-hnd"),
    pytest.param(14, 2, 64, 64, 64, 129, BF16, "FA", id="qwen-like-g7"),
])
def test_value_norms_match_reference(kdev, hq, hkv, d, dout, bs, n, dtype, layout):
    run_case(kdev, hq, hkv, d, dout, bs, n, dtype, layout, seed=n + hq)


@pytest.mark.interp
def test_value_norms_mixed_dtypes(kdev):
    """bf16 values with an fp32 o_proj weight: computed in fp32."""
    run_case(kdev, 4, 2, 64, 80, 16, 50, BF16, "NHD", seed=5, w_dtype=FP32)


def test_torch_path_is_the_reference():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2, 40, 64, generator=gen)
    wo = torch.randn(48, 6 * 64, generator=gen)
    cache, table = make_paged(values, 16, "HND", gen=gen)
    assert torch.equal(tk.paged_value_norms(cache, table, 40, wo, impl="torch"), scoring.value_norms(values, wo))


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,dout,bs,n,layout", [
    pytest.param(32, 8, 128, 4096, 16, 32768, "FA", id="llama8b-32k"),
    pytest.param(14, 2, 64, 896, 32, 131072 + 5, "HND", id="qwen05b-128k-ragged"),
])
def test_value_norms_real_sizes(hq, hkv, d, dout, bs, n, layout):
    run_case(torch.device("cuda"), hq, hkv, d, dout, bs, n, BF16, layout, seed=n)
    torch.cuda.empty_cache()
