"""The Gluon pass 2 (`_scoring_gluon`) == policy.scoring.window_stats, on CUDA.

Gluon kernels do not run in Triton's interpreter, so these are GPU tests; on CUDA the default
settings also route the d = 64 cases of test_kernel_scoring.py through it. The cases here aim at
what the kernel does differently from the Triton pass 2: no halo (outputs lag the keys by the
pooling half-width, the left neighbours carried from the previous tile), the warm-up of a program
that starts mid-prompt, the bias columns inside the last tiles, and prompts shorter than a tile.
"""

import pytest
import torch
from kernel_testutil import layered_paged_inputs
from test_kernel_scoring import BF16, FP16, check_layers, override_scoring_config, stats_under_settings, tolerances

from vllm_defensive.policy import scoring
from vllm_defensive.triton_kernels import _scoring



def test_where_the_gluon_pass2_applies():
    """The selection rule (host code, so it runs everywhere): CUDA, 16-bit queries = keys and
    probabilities, head dim 64 or 128, pooling half-width <= 8, and the setting on."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on = {**_scoring._cfg(64), "p2_gluon": 1}
    pick = _scoring._gluon_pass2
    assert pick(on, cuda, 1, 2, 64, BF16, BF16) is not None
    assert pick(on, cuda, 2, 8, 128, FP16, FP16) is not None
    assert pick(on, cpu, 1, 2, 64, BF16, BF16) is None  # the interpreter runs the Triton kernel
    assert pick({**on, "p2_gluon": 0}, cuda, 1, 2, 64, BF16, BF16) is None
    assert pick(on, cuda, 0, 2, 64, BF16, BF16) is None  # fp32 probabilities
    assert pick(on, cuda, 1, 9, 64, BF16, BF16) is None  # pool kernel 19
    assert pick(on, cuda, 1, 2, 96, BF16, BF16) is None
    assert pick(on, cuda, 1, 2, 64, torch.float32, BF16) is None  # fp32 queries
    assert pick(on, cuda, 1, 2, 64, torch.float32, torch.float32) is None
    # the tuned defaults turn it on for both benchmark shapes
    assert _scoring._cfg(64)["p2_gluon"] and _scoring._cfg(128)["p2_gluon"]


def _run(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias, progs=0, layers=1,
         seed=0):
    override_scoring_config(monkeypatch, p2_gluon=1, p2_progs=progs)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    qs, caches, keys, table = layered_paged_inputs(hq, hkv, w, n, d, dtype, dev, gen, bs, layout, layers)
    refs = [scoring.window_stats(q, k, pool, None, probs_dtype, fix_bias) for q, k in zip(qs, keys)]
    cfg = _scoring._cfg(d)
    assert _scoring._gluon_pass2(cfg, dev, _scoring._ROUND[probs_dtype], pool // 2, d, dtype, dtype) is not None
    st = _scoring.window_stats_layers(torch.stack(qs), caches, table, n, pool, None, probs_dtype, fix_bias)
    check_layers(st, refs, probs_dtype, fix_bias)


CASES = [
    # hq, hkv, d, bs, n, w, dtype, probs, pool, layout, fix_bias, progs
    pytest.param(14, 2, 64, 16, 700, 32, BF16, BF16, 5, "NHD", False, 0, id="qwen-700"),
    pytest.param(14, 2, 64, 16, 4099, 32, BF16, BF16, 5, "HND", False, 7, id="qwen-4k-7progs-warmup"),
    pytest.param(14, 2, 64, 32, 2053, 32, FP16, FP16, 5, "FA", True, 5, id="qwen-fp16-fixbias-5progs"),
    pytest.param(7, 1, 64, 64, 40, 32, BF16, BF16, 5, "NHD", False, 0, id="P8-shorter-than-a-tile"),
    pytest.param(7, 1, 64, 16, 33, 32, BF16, BF16, 5, "NHD", False, 0, id="P1"),
    pytest.param(4, 1, 64, 16, 32 + 64, 8, BF16, BF16, 5, "NHD", False, 0, id="P64-two-tiles-exactly"),
    pytest.param(4, 2, 64, 16, 600, 8, BF16, BF16, 3, "NHD", False, 3, id="pool3"),
    pytest.param(4, 2, 64, 16, 600, 8, BF16, BF16, 9, "NHD", False, 3, id="pool9"),
    pytest.param(4, 2, 64, 16, 600, 8, BF16, BF16, 17, "NHD", False, 3, id="pool17-halo8"),
    pytest.param(4, 1, 64, 16, 300, 8, BF16, BF16, 1, "HND", False, 2, id="no-pooling"),
    pytest.param(8, 2, 128, 16, 3000, 16, BF16, BF16, 5, "FA", False, 4, id="d128-rows32"),
    pytest.param(6, 2, 64, 24, 1500, 16, BF16, BF16, 5, "NHD", False, 3, id="block24-not-pow2-rows-padded"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,fix_bias,progs", CASES)
def test_gluon_pass2_matches_reference(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias,
                                       progs):
    _run(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias, progs, seed=n + hq)


@pytest.mark.gpu
def test_gluon_pass2_layers(monkeypatch):
    """Three layers in one call (the layered path's pair axis), Qwen's shape."""
    _run(monkeypatch, 14, 2, 64, 16, 3001, 32, BF16, BF16, 5, "NHD", False, progs=4, layers=3, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [32768, 131072])
def test_gluon_pass2_real_sizes(monkeypatch, n):
    _run(monkeypatch, 14, 2, 64, 16, n, 32, BF16, BF16, 5, "NHD", False, seed=n)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gluon_and_triton_pass2_agree(monkeypatch):
    """The two pass-2 kernels on the same inputs: the same scores but for 16-bit rounding flips. The
    Gluon kernel takes exp2(s - (m + log2 l)) where the Triton one multiplies exp2(s - m) by 1/l, so a
    probability a few fp32 ulps apart can round to the other 16-bit neighbour and move the scores
    around it by one ulp of that neighbour's share (H200: 0.5% of the tokens by 1e-5 to 2e-4); the
    exact row sums add in another order too (~2e-6)."""
    out = stats_under_settings(monkeypatch, [{"p2_gluon": 0}, {"p2_gluon": 1}], 14, 2, 64, 9000, BF16, seed=11)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        a, b = getattr(out[1], name), getattr(out[0], name)
        # (a flipped probability moves a token's share of it by one bf16 ulp, 2^-8 of that share: the
        # check_stats bound; on the H200 the largest seen was 2.1e-4, on an unpooled mean)
        torch.testing.assert_close(a, b, rtol=tolerances(BF16)[0], atol=1e-12, msg=lambda m: f"{name}: {m}")
        off = int(((a - b).abs() > 1e-5 * b.abs() + 1e-12).sum())
        assert off <= 0.02 * b.numel(), f"{name}: {off} of {b.numel()} tokens differ by over 1e-5"
    assert abs(out[1].window_bias - out[0].window_bias) <= 1e-5 * abs(out[0].window_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14, 2, 64), (32, 8, 128)])
def test_gluon_pass2_atomic_max_merge_is_exact(monkeypatch, shape):
    """The row blocks' column max merged by integer atomic max into one share (`p2_gluon_atomic_max`)
    or written one share a row block and merged by the fixup: the same bits (max is order-free)."""
    out = stats_under_settings(monkeypatch, [{"p2_gluon_atomic_max": 0}, {"p2_gluon_atomic_max": 1}], *shape, 5000,
                               BF16, seed=13)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        assert torch.equal(getattr(out[1], name), getattr(out[0], name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14, 2, 64), (32, 8, 128)])
def test_gluon_pass2_movmatrix_transposes_are_exact(monkeypatch, shape):
    """The unpooled column sums' operand P^T transposed by movmatrix (`p2_gluon_movm`) or by the
    identity product on the tensor cores: the same 16-bit values into the same ones product, so
    every output has the same bits."""
    out = stats_under_settings(monkeypatch, [{"p2_gluon_movm": 0}, {"p2_gluon_movm": 1}], *shape, 5000, BF16,
                               seed=17)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        assert torch.equal(getattr(out[1], name), getattr(out[0], name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14, 2, 64), (32, 8, 128)])
def test_gluon_pass2_queries_from_shared_memory_are_exact(monkeypatch, shape):
    """The queries reloaded from their ring slot every tile (`p2_gluon_q_smem`) or kept in registers:
    the same operands into the same products, so the same bits."""
    out = stats_under_settings(monkeypatch, [{"p2_gluon_q_smem": 0}, {"p2_gluon_q_smem": 1}], *shape, 5000, BF16,
                               seed=29)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        assert torch.equal(getattr(out[1], name), getattr(out[0], name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("progs", [0, 40, 60])
def test_gluon_pass2_unbounded_inner_loop_is_exact(monkeypatch, shape, progs):
    """The interior tiles whose copies run unbounded in a loop of their own (`p2_gluon_inner`) or all
    through the bounded loop: the same tiles through the same arithmetic, so the same bits. 5000 keys
    are 157 tiles: the default split, four tiles a program (one of them in the inner loop) and three
    (none)."""
    out = stats_under_settings(monkeypatch, [{"p2_gluon_inner": 0, "p2_progs": progs},
                                             {"p2_gluon_inner": 1, "p2_progs": progs}], *shape, 5000, BF16, seed=31)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        assert torch.equal(getattr(out[1], name), getattr(out[0], name)), name
    assert out[1].window_bias == out[0].window_bias
