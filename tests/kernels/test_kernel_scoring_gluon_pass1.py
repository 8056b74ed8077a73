"""The Gluon pass 1 (`_scoring_gluon_pass1`) == policy.scoring.window_stats, on a Hopper GPU.

Gluon kernels do not run in Triton's interpreter, and this one needs warpgroup MMA (sm_90), so
these are GPU tests (on an H100/H200 the default settings also route the d = 64 cases of the other
scoring tests through it). The cases aim at what the kernel does differently from the Triton pass 1:
the interior tiles on split programs with one offset per group (the first tile's maximum, not a
running one), its exact recomputation when a later key is far above that offset, the edge tiles on
one program per group, the polynomial exponentials, and groups of 32 rows that span query heads.
"""

import pytest
import torch
from kernel_testutil import layered_paged_inputs
from test_kernel_scoring import BF16, FP16, check_layers, override_scoring_config, stats_under_settings

from vllm_defensive.policy import scoring
from vllm_defensive.triton_kernels import _scoring


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_where_the_gluon_pass1_applies():
    """The selection rule (host code): the setting on, CUDA on sm_90, 16-bit queries = keys, head
    dim 64 or 128, at most 256 window rows a KV head."""
    cpu = torch.device("cpu")
    on = {**_scoring._cfg(64), "p1_gluon": 1}
    pick = _scoring._gluon_pass1
    assert pick(on, cpu, 64, 224, BF16, BF16) is None  # the interpreter runs the Triton kernel
    assert pick({**on, "p1_gluon": 0}, cpu, 64, 224, BF16, BF16) is None
    if not _hopper():
        return
    cuda = torch.device("cuda")
    assert pick(on, cuda, 64, 224, BF16, BF16) is not None
    assert pick(on, cuda, 128, 256, FP16, FP16) is not None
    assert pick({**on, "p1_gluon": 0}, cuda, 64, 224, BF16, BF16) is None
    assert pick(on, cuda, 64, 288, BF16, BF16) is None  # nine groups of 32 rows
    assert pick(on, cuda, 96, 224, BF16, BF16) is None
    assert pick(on, cuda, 64, 224, torch.float32, BF16) is None
    assert pick(on, cuda, 64, 224, torch.float32, torch.float32) is None


def _run(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias, npoly=1, layers=1, seed=0,
         low_tile=None, **settings):
    override_scoring_config(monkeypatch, p1_gluon=1, p1_gluon_npoly=npoly, **settings)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")

    def edit(q, k):  # every query along one direction, the keys of one tile far against it
        tile, size = low_tile
        v = torch.randn(d, generator=gen)
        v = (v / v.norm() * d ** 0.5).to(dev)
        k = k.clone()
        k[:, tile * 64:(tile + 1) * 64] = (-size * v).to(dtype)
        return (q.float() * 0.1 + v).to(dtype), k

    qs, caches, keys, table = layered_paged_inputs(hq, hkv, w, n, d, dtype, dev, gen, bs, layout, layers,
                                                   edit if low_tile is not None else None)
    refs = [scoring.window_stats(q, k, pool, None, probs_dtype, fix_bias) for q, k in zip(qs, keys)]
    assert _scoring._gluon_pass1(_scoring._cfg(d), dev, d, (hq // hkv) * w, dtype, dtype) is not None
    st = _scoring.window_stats_layers(torch.stack(qs), caches, table, n, pool, None, probs_dtype, fix_bias)
    check_layers(st, refs, probs_dtype, fix_bias)


CASES = [
    # hq, hkv, d, bs, n, w, dtype, probs, pool, layout, fix_bias, npoly
    pytest.param(14, 2, 64, 16, 4099, 32, BF16, BF16, 5, "NHD", False, 1, id="qwen-4k"),
    pytest.param(14, 2, 64, 16, 4099, 32, BF16, BF16, 5, "NHD", False, 0, id="qwen-4k-no-poly"),
    pytest.param(14, 2, 64, 16, 4099, 32, BF16, BF16, 5, "HND", False, 7, id="qwen-4k-all-poly"),
    pytest.param(14, 2, 64, 32, 2053, 32, FP16, FP16, 5, "FA", True, 1, id="qwen-fp16-fixbias"),
    pytest.param(14, 2, 64, 16, 2053, 32, BF16, None, 5, "NHD", False, 1, id="qwen-fp32-probs"),
    pytest.param(7, 1, 64, 16, 100, 32, BF16, BF16, 5, "NHD", False, 1, id="no-interior-tile"),
    pytest.param(7, 1, 64, 16, 33, 32, BF16, BF16, 5, "NHD", False, 1, id="P1"),
    pytest.param(4, 1, 64, 16, 64 * 9 + 8, 8, BF16, BF16, 1, "NHD", False, 1, id="no-pooling-tile0-interior"),
    pytest.param(4, 2, 64, 16, 1600, 8, BF16, BF16, 17, "NHD", False, 1, id="pool17-group-spans-heads"),
    pytest.param(6, 2, 64, 24, 1500, 16, BF16, BF16, 5, "NHD", False, 1, id="block24-rows48-padded-group"),
    pytest.param(32, 8, 128, 16, 3000, 32, BF16, BF16, 5, "FA", False, 1, id="llama-d128"),
    pytest.param(8, 1, 128, 64, 5000, 32, FP16, FP16, 5, "NHD", False, 2, id="d128-eight-groups-fp16"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,fix_bias,npoly", CASES)
def test_gluon_pass1_matches_reference(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias,
                                       npoly):
    _run(monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, fix_bias, npoly, seed=n + hq)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
@pytest.mark.parametrize("ahead", [0, 1])
@pytest.mark.parametrize("case", ["qwen-4k", "llama-d128", "block24-rows48-padded-group", "pool17-group-spans-heads",
                                  "d128-eight-groups-fp16"])
def test_gluon_pass1_next_product_in_flight(monkeypatch, case, ahead):
    """The next group's product issued before a group's exponentials (`p1_gluon_ahead`) or after:
    7, 4, 2, 1 and 8 groups of rows."""
    c = next(p.values for p in CASES if p.id == case)
    _run(monkeypatch, *c, seed=c[4] + c[0], p1_gluon_ahead=ahead)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
@pytest.mark.parametrize("size", [6.0, 9.0, 30.0])
def test_gluon_pass1_first_tile_far_below_the_rest(monkeypatch, size):
    """The first tile of a split (tile 1: split 0 of eight tiles) about 11.5 x size octaves below
    every query's other scores: its maximum, the split's offset, is that far below the rest. ~70
    octaves (size 6): the fast path holds (its sums stay below 2^100); ~105 (9: sums past 2^100) and
    ~345 (30: exp2 overflows) the split is recomputed with running maxima. Either way the scores are
    the reference's. (A key as far above everything else would leave the other tokens' probabilities
    below fp32's normal range, where the reference keeps denormals and the GPU flushes them.)"""
    assert _scoring._cfg(64)["p1_gluon_min_tiles"] == 8
    _run(monkeypatch, 14, 2, 64, 16, 4099, 32, BF16, BF16, 5, "NHD", False, seed=5, low_tile=(1, size))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
def test_gluon_pass1_layers(monkeypatch):
    _run(monkeypatch, 14, 2, 64, 16, 3001, 32, BF16, BF16, 5, "NHD", False, layers=3, seed=3)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
@pytest.mark.parametrize("n", [32768, 131072])
def test_gluon_pass1_real_sizes(monkeypatch, n):
    _run(monkeypatch, 14, 2, 64, 16, n, 32, BF16, BF16, 5, "NHD", False, seed=n)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="warpgroup MMA: sm_90")
@pytest.mark.parametrize("d,hq,hkv", [(64, 14, 2), (128, 32, 8)])
def test_gluon_and_triton_pass1_agree(monkeypatch, d, hq, hkv):
    """The two pass-1 kernels on the same inputs: the same scores up to fp32 rounding (other
    offsets and summation orders for the softmax sums)."""
    # (fp32 probabilities: no rounding)
    out = stats_under_settings(monkeypatch, [{"p1_gluon": 0}, {"p1_gluon": 1}], hq, hkv, d, 9000, None, seed=11)
    for name in ("defensive_max", "snapkv", "unpooled_mean"):
        a, b = getattr(out[1], name), getattr(out[0], name)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert abs(out[1].window_bias - out[0].window_bias) <= 1e-5 * abs(out[0].window_bias)
