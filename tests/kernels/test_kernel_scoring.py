"""Fused window scoring over paged keys == policy.scoring.window_stats."""

import math
import random

import pytest
import torch
from kernel_testutil import assert_topk_agree, attention_inputs, make_paged

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import scoring

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def tolerances(probs_dtype, fix_bias=False):
    """(rtol for defensive_max, rtol for the means, rtol for the window bias)."""
    if probs_dtype is None or probs_dtype == FP32:
        return 1e-4, 1e-4, 1e-5
    # Rounded probabilities: every element is rounded like the reference (to nearest even) and
    # the row sums m, S and the official bias are sums of the rounded values, so almost every
    # score agrees to fp32 summation order. A probability computed a hair differently (exp2 vs
    # torch's exp, another summation order of the row sum) can still land on the other side of a
    # rounding boundary, and so can its pooled value, which is rounded again: up to one ulp of
    # probs_dtype from each of the two roundings, i.e. 2 x 2^-7 (bf16) or 2 x 2^-10 (fp16) relative
    # just above a power of two. (At 128K keys on the H200 1-2 tokens of a million exceeded one ulp,
    # by 6%.) The means average many rows, but where one row carries a token's mass, that row's
    # flip moves the mean by up to one ulp too (the same run: 1.5e-3 on one token). The strict
    # checks are the ones below: nearly every token to 1e-4, and the keep sets.
    # The fixed ("window") bias is computed from unrounded probabilities (documented).
    ulp = 2.0 ** -7 if probs_dtype == BF16 else 2.0 ** -10
    return 2.01 * ulp, max(1e-3, 1.01 * ulp), (4e-3 if fix_bias else 1e-5)


def check_stats(got, ref, probs_dtype, fix_bias=False, keep_frac=0.2):
    r_max, r_mean, r_bias = tolerances(probs_dtype, fix_bias)
    for name, rtol in (("defensive_max", r_max), ("snapkv", r_mean), ("unpooled_mean", r_mean)):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-9, msg=lambda m: f"{name}: {m}")
        # and nearly every token agrees to float32 accuracy. (Rounded mode: the row that attains a
        # token's max is picked with pass 1's unrounded row scale, then its value is recomputed
        # with the exact rounded sums; rows tied within that scale's error, as every row is when
        # the prefix has a handful of tokens, may give the other row's value: within r_max.)
        # A probability one fp32 ulp off (the interpreter's exp2 is NumPy's, whose accuracy
        # depends on the CPU's vector ISA: AVX2 and AVX-512 builds differ) can round to the other
        # 16-bit neighbour and move the few pooled values around it: some tokens may disagree, up
        # to 1%, or two such flips (10 tokens) in a short prompt.
        if b.shape[1] >= 64:
            off = int(((a - b).abs() > 1e-4 * b.abs() + 1e-9).sum())
            assert off <= max(0.01 * b.numel(), 10), f"{name}: {off} of {b.numel()} tokens differ by over 1e-4"
    bias = float(got.window_bias)
    assert math.isclose(bias, ref.window_bias, rel_tol=r_bias, abs_tol=1e-7), (bias, ref.window_bias)
    # identical keep sets wherever the reference's scores are not tied (within 1e-4) at the cut
    k = max(1, int(ref.defensive_max.shape[1] * keep_frac))
    assert_topk_agree(got.defensive_max, ref.defensive_max, k, 1e-4)
    assert_topk_agree(got.snapkv, ref.snapkv, k, 1e-4)


def check_layers(st, refs, probs_dtype, fix_bias=False):
    """check_stats for each layer of a window_stats_layers result against its reference."""
    for layer, ref in enumerate(refs):
        got = scoring.WindowStats(st.defensive_max[layer], st.snapkv[layer], st.unpooled_mean[layer],
                                  float(st.window_bias[layer]))
        check_stats(got, ref, probs_dtype, fix_bias)


def run_case(device, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = attention_inputs(hq, hkv, w, n, d, dtype, device, gen)
    cache, table = make_paged(k, bs, layout, gen=gen)
    ref = scoring.window_stats(q, k, pool, None, probs_dtype, fix_bias)
    kw = {}
    if split_len is not None:  # small splits exercise the merge of pass-1 partial statistics
        from vllm_defensive.triton_kernels import _scoring
        got = _scoring.window_stats(q, cache, table, n, pool, None, probs_dtype, fix_bias, _split_len=split_len)
    else:
        got = tk.paged_window_stats(q, cache, table, n, pool, None, probs_dtype, fix_bias, impl="triton", **kw)
    check_stats(got, ref, probs_dtype, fix_bias)
    return q, k, cache, table, ref


# hq, hkv, d, block, L, W, dtype, probs_dtype, pool, layout, split_len, fix_window_bias
SMALL = [
    pytest.param(2, 2, 64, 16, 150, 8, BF16, BF16, 5, "NHD", 64, False, id="g1-d64-bs16-bf16probs-3splits"),
    pytest.param(6, 2, 128, 32, 261, 8, BF16, None, 5, "FA", None, False, id="g3-d128-bs32-fp32probs-fa"),
    pytest.param(7, 1, 64, 64, 333, 4, FP16, FP16, 5, "HND", 128, True, id="g7-d64-bs64-fp16-hnd-fixbias"),
    pytest.param(14, 2, 64, 128, 200, 32, BF16, BF16, 5, "NHD", None, False, id="g7-w32-bs128-qwen-like"),
    pytest.param(3, 1, 128, 16, 37, 32, FP32, None, 5, "NHD", 16, False, id="g3-fp32-P5-tinysplits"),
    pytest.param(3, 3, 64, 16, 34, 32, BF16, BF16, 5, "HND", None, True, id="g1-P2-pool-edges"),
    pytest.param(4, 1, 64, 16, 100, 8, BF16, BF16, 1, "NHD", None, False, id="g4-no-pooling"),
    pytest.param(8, 2, 128, 32, 120, 8, FP32, None, 7, "FA", 32, False, id="g4-fp32-pool7"),
]


@pytest.mark.interp
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,split_len,fix_bias", SMALL)
def test_window_stats_matches_reference(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len,
                                        fix_bias):
    run_case(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias,
             seed=hq * 1000 + n)


def _random_cases(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        g, hkv = rng.choice([1, 3, 7]), rng.choice([1, 2])
        w = rng.choice([4, 8, 16, 32])
        out.append(pytest.param(
            g * hkv, hkv, rng.choice([64, 128]), rng.choice([16, 32, 64, 128]), w + rng.randint(1, 260), w,
            rng.choice([BF16, FP16, FP32]), rng.choice([None, BF16, FP16]), 5, rng.choice(["NHD", "HND", "FA"]),
            rng.choice([None, 64]), rng.random() < 0.3, id=f"random{i}"))
    return out


@pytest.mark.interp
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,split_len,fix_bias", _random_cases(6, 2024))
def test_window_stats_random_shapes(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias):
    run_case(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias, seed=n * 7 + hq)


@pytest.mark.interp
@pytest.mark.parametrize("bs,force_off64", [(24, False), (16, True), (48, True)])
def test_block_addressing_paths(kdev, monkeypatch, bs, force_off64):
    """Power-of-two block sizes divide by shifts and most caches address in int32; the other
    paths (a block size like 24, a cache past 2^31 elements, which no test can allocate) are
    forced here and must give the same statistics."""
    from vllm_defensive.triton_kernels import _scoring

    real = _scoring._addressing

    def addressing(cache):
        size, pow2, off32 = real(cache)
        assert pow2 == (bs & (bs - 1) == 0)
        return size, pow2, off32 and not force_off64

    monkeypatch.setattr(_scoring, "_addressing", addressing)
    run_case(kdev, 6, 2, 64, bs, 170, 8, BF16, BF16, 5, "HND", None, False, seed=bs)


@pytest.mark.interp
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,split_len,fix_bias",
                         [SMALL[0], SMALL[2], SMALL[3], SMALL[4], SMALL[5], SMALL[7]])
def test_pass1_small_tiles(kdev, monkeypatch, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len,
                           fix_bias):
    """Pass 1 on 16-key tiles: many of them in the interior loop (no mask or edge code), the rest
    in the general one (splits, pooling edges, bias columns, tiny prompts). This test fails when
    the interior loop skips or repeats a tile."""
    from vllm_defensive.triton_kernels import _scoring

    monkeypatch.setattr(_scoring, "CONFIG_BY_HEAD_DIM", {})
    monkeypatch.setitem(_scoring.CONFIG, "p1_bn", 16)
    run_case(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias, seed=n + 1)


def override_scoring_config(monkeypatch, **settings):
    """Scoring settings over the tuned per-head-dim ones (which a CONFIG entry would not beat)."""
    from vllm_defensive.triton_kernels import _scoring

    cfg = _scoring._cfg
    monkeypatch.setattr(_scoring, "_cfg", lambda d: {**cfg(d), **settings})


def stats_under_settings(monkeypatch, variants, hq, hkv, d, n, probs_dtype, seed):
    """window_stats of one set of paged inputs (window 32, block size 16) under each settings dict
    of `variants` in turn (CUDA): a list of WindowStats, for comparing two code paths."""
    from vllm_defensive.triton_kernels import _scoring

    gen = torch.Generator().manual_seed(seed)
    q, k = attention_inputs(hq, hkv, 32, n, d, BF16, torch.device("cuda"), gen)
    cache, table = make_paged(k, 16, "NHD", gen=gen)
    out = []
    for settings in variants:
        override_scoring_config(monkeypatch, **settings)
        out.append(_scoring.window_stats(q, cache, table, n, 5, None, probs_dtype))
    return out


@pytest.mark.interp
@pytest.mark.parametrize("fixed,npoly", [(1, 0), (1, 1), (0, 0)])
@pytest.mark.parametrize("size", [3.0, 6.0, 30.0])
def test_pass1_fixed_offset_first_tile_far_below(kdev, monkeypatch, fixed, npoly, size):
    """Pass 1's interior tiles against one offset a row, their maximum over the split's first
    interior tile (`p1_fixed_offset`). Here that tile (keys 64-127: split 0's first interior tile;
    tile 0 holds the pooling edge) sits about 11.5 x size octaves below every query's other scores:
    ~35 octaves (size 3): the fixed offset holds; ~70 (6: sums past 2^64) and ~345 (30: exp2
    overflows): the split's interior is summed again with running maxima. Either way the scores are
    the reference's, and so with the running maximum throughout (fixed 0). npoly 1: an eighth of the
    fixed-offset exponentials on the FMA pipe (`p1_npoly`; compiled kernels only: the interpreter
    takes exp2), whose overflow to inf or NaN the range check catches the same way."""
    from vllm_defensive.triton_kernels import _scoring

    override_scoring_config(monkeypatch, p1_fixed_offset=fixed, p1_npoly=npoly)
    gen = torch.Generator().manual_seed(7)
    d, n, w = 64, 64 * 7 + 40, 8
    q, k = attention_inputs(4, 1, w, n, d, BF16, kdev, gen)
    v = torch.randn(d, generator=gen)
    v = (v / v.norm() * d ** 0.5).to(kdev)
    k = k.clone()
    k[:, 64:128] = (-size * v).to(BF16)
    q = (q.float() * 0.1 + v).to(BF16)
    cache, table = make_paged(k, 16, "NHD", gen=gen)
    ref = scoring.window_stats(q, k, 5, None, BF16)
    check_stats(_scoring.window_stats(q, cache, table, n, 5, None, BF16, _split_len=192), ref, BF16)


@pytest.mark.interp
@pytest.mark.parametrize("colsum,rowsum", [(1, 0), (0, 1), (1, 1), (0, 0)])
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,split_len,fix_bias",
                         [SMALL[0], SMALL[2], SMALL[3], SMALL[5], SMALL[6]])
def test_pass2_sums_on_tensor_cores(kdev, monkeypatch, colsum, rowsum, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool,
                                    layout, split_len, fix_bias):
    """Pass 2's sums either way: the unpooled column sums (`p2_colsum_mma`) and the exact row sums
    (`p2_rowsum_mma`, whose last tile takes its pooled values past P back out) as products on the
    tensor cores, or as reductions. Each gives the reference's statistics with 16-bit
    probabilities (a row sum off by more than 1e-4 moves every score of its row)."""
    override_scoring_config(monkeypatch, p2_colsum_mma=colsum, p2_rowsum_mma=rowsum)
    run_case(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias, seed=n + 3)


@pytest.mark.interp
@pytest.mark.parametrize("p2_br", [16, 32])
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,pool,layout,split_len,fix_bias",
                         [SMALL[0], SMALL[1], SMALL[3], SMALL[4], SMALL[5]])
def test_pass2_row_blocks_in_parallel(kdev, monkeypatch, p2_br, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool,
                                      layout, split_len, fix_bias):
    """Pass 2 with a KV head's window rows split over several programs (`p2_br`): each writes its
    share of the column max and unpooled sums and the fixup merges them. The row that attains a
    token's max must survive the merge (its exact sums rescale the value)."""
    override_scoring_config(monkeypatch, p2_br=p2_br)
    run_case(kdev, hq, hkv, d, bs, n, w, dtype, probs_dtype, pool, layout, split_len, fix_bias, seed=n + 5)


@pytest.mark.interp
def test_exact_sums_over_many_pass2_programs(kdev, monkeypatch):
    """40 pass-2 programs a pair (one tile each): `_window_sums` adds their partial row sums in two
    tiles of 32 programs, the second one part masked. (The interpreter otherwise runs 2 programs.)"""
    override_scoring_config(monkeypatch, p2_progs=40)
    run_case(kdev, 2, 1, 64, 16, 1108, 8, BF16, BF16, 5, "NHD", None, False, seed=1108)


@pytest.mark.interp
@pytest.mark.parametrize("probs_dtype", [BF16, None])
def test_fixup_merges_row_blocks_across_its_windows(kdev, probs_dtype):
    """Qwen's shape with its tuned settings: seven 32-row pass-2 blocks, which the fixup merges once
    per key over windows of 256 keys that overlap by the pooling halo; a prompt of three windows
    checks the keys pooled across their edges."""
    run_case(kdev, 14, 2, 64, 16, 700, 32, BF16, probs_dtype, 5, "NHD", None, False, seed=700)


@pytest.mark.parametrize("probs_dtype,bits", [(BF16, 8), (FP16, 11)])
def test_pool_division_by_multiply(probs_dtype, bits):
    """Pass 2 divides the pooled sums by 5 as a product with 0.2f: rounded to probs_dtype, that is
    the IEEE quotient's rounding for every float32 x (`_div_pool`'s argument). The hard cases are
    the rounding midpoints m of probs_dtype (x = 5m exactly: both must tie to even) and their
    neighbours a few ulps away; random x for the rest."""
    exps = torch.arange(-60, 1, dtype=torch.float64)
    k = torch.arange(2 ** (bits - 1), 2 ** bits, dtype=torch.float64)  # significands of one binade
    mids = ((k[None, :] + 0.5) * torch.exp2(exps[:, None] - (bits - 1))).flatten()
    x = (5 * mids).to(torch.float32)
    assert torch.equal(x.double(), 5 * mids)  # exact: 5m has at most bits + 4 significant bits
    xi = x.view(torch.int32)
    near = torch.cat([(xi + j).view(torch.float32) for j in range(-4, 5)])
    gen = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(2_000_000, generator=gen) * -60) * 5
    for xs in (near, rand):
        by_mul = (xs * torch.tensor(0.2, dtype=torch.float32)).to(probs_dtype)
        by_div = (xs / torch.tensor(5.0, dtype=torch.float32)).to(probs_dtype)
        assert torch.equal(by_mul.float(), by_div.float())
    # and the fp32 quotients themselves do differ (so the test could fail): ~1/8 of random x
    q_mul = rand * torch.tensor(0.2, dtype=torch.float32)
    assert (q_mul != rand / torch.tensor(5.0, dtype=torch.float32)).float().mean() > 0.01


@pytest.mark.interp
def test_dense_api_and_bias_tensor(kdev):
    gen = torch.Generator().manual_seed(7)
    q, k = attention_inputs(6, 2, 8, 90, 64, BF16, kdev, gen)
    ref = scoring.window_stats(q, k, 5, 0.1, BF16)
    got = tk.window_stats(q, k, 5, 0.1, BF16, window_bias_as_tensor=True, impl="triton")
    assert isinstance(got.window_bias, torch.Tensor) and got.window_bias.dim() == 0
    check_stats(got, ref, BF16)


@pytest.mark.interp
@pytest.mark.parametrize("n", [41, 42, 43, 44])
def test_outputs_are_aligned_for_every_length(kdev, n):
    """Every output (and so every workspace part the kernels take as a pointer) starts 16-byte
    aligned whatever the prompt length: Triton specialises pointers on alignment, so a length of
    the other parity would otherwise compile new kernel variants inside an engine step."""
    gen = torch.Generator().manual_seed(n)
    q, k = attention_inputs(3, 3, 8, n, 64, BF16, kdev, gen)  # 3 pairs: P * 3 of every parity
    got = tk.window_stats(q, k, 5, None, BF16, window_bias_as_tensor=True, impl="triton")
    for name in ("defensive_max", "snapkv", "unpooled_mean", "window_bias"):
        assert getattr(got, name).data_ptr() % 16 == 0, name
    check_stats(got, scoring.window_stats(q, k, 5, None, BF16), BF16)


def test_torch_path_is_the_reference():
    gen = torch.Generator().manual_seed(3)
    q, k = attention_inputs(6, 2, 8, 70, 64, BF16, "cpu", gen)
    cache, table = make_paged(k, 16, "HND", gen=gen)
    for pd in (None, BF16):
        ref = scoring.window_stats(q, k, 5, None, pd)
        got = tk.paged_window_stats(q, cache, table, 70, probs_dtype=pd, impl="torch")
        for name in ("defensive_max", "snapkv", "unpooled_mean"):
            assert torch.equal(getattr(got, name), getattr(ref, name))
        assert got.window_bias == ref.window_bias


@pytest.mark.interp
def test_many_rows_per_kv_head_fall_back_to_torch(kdev):
    """Over MAX_ROWS window rows per KV head (group x window) the kernel's row packing does not fit:
    the call transparently takes the PyTorch path."""
    from vllm_defensive.triton_kernels import _scoring

    gen = torch.Generator().manual_seed(9)
    w = 32
    hq = _scoring.MAX_ROWS // w + 1  # one KV head
    q, k = attention_inputs(hq, 1, w, 40, 64, BF16, kdev, gen)
    got = tk.window_stats(q, k, probs_dtype=BF16, impl="triton")
    ref = scoring.window_stats(q, k, probs_dtype=BF16)
    assert torch.equal(got.defensive_max, ref.defensive_max)


def test_argument_checks():
    q = torch.randn(4, 8, 64)
    cache = torch.randn(4, 16, 2, 64)
    with pytest.raises(ValueError):
        tk.paged_window_stats(q, cache, torch.zeros(1, dtype=torch.int32), 40)  # table too short
    with pytest.raises(ValueError):
        tk.paged_window_stats(q, cache, torch.arange(4, dtype=torch.int32), 4)  # window > context


# --- real sizes on the GPU ----------------------------------------------------------------------
GPU = [
    pytest.param(32, 8, 128, 16, 131072, 32, BF16, BF16, "FA", id="llama8b-128k-bs16-bf16probs"),
    pytest.param(32, 8, 128, 16, 32768 + 77, 32, BF16, None, "NHD", id="llama8b-32k-ragged-fp32probs"),
    pytest.param(14, 2, 64, 32, 32768, 32, BF16, BF16, "HND", id="qwen05b-32k-bs32-hnd"),
    pytest.param(28, 4, 128, 128, 16000, 32, FP16, FP16, "FA", id="g7-16k-bs128-fp16"),
    pytest.param(12, 4, 64, 64, 4099, 32, FP32, None, "NHD", id="g3-4k-fp32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,bs,n,w,dtype,probs_dtype,layout", GPU)
def test_window_stats_real_sizes(hq, hkv, d, bs, n, w, dtype, probs_dtype, layout):
    run_case(torch.device("cuda"), hq, hkv, d, bs, n, w, dtype, probs_dtype, 5, layout, None, False, seed=n)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("shape,probs_dtype", [((14, 2, 64), BF16), ((32, 8, 128), BF16), ((14, 2, 64), None)])
def test_dependent_launch_changes_no_bits(monkeypatch, shape, probs_dtype):
    """Programmatic dependent launch (`pdl` 1: every kernel after pass 1 launched while its predecessor
    runs, waiting at griddepcontrol.wait before it reads what that one wrote) against plain stream
    order (0): the same bits. The calls go back to back with no sync between them, so a call's pass 1
    may write into memory the previous call's workspace held while that call's last kernels ran.
    (fp32 probabilities: the Triton pass 2, which lets the next kernel launch only at its end.)"""
    from kernel_testutil import layered_paged_inputs

    from vllm_defensive.triton_kernels import _scoring

    if not _scoring._pdl_capable("cuda", None):
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    hq, hkv, d = shape
    gen = torch.Generator().manual_seed(41)
    n = 9000
    qs, caches, _, table = layered_paged_inputs(hq, hkv, 32, n, d, BF16, torch.device("cuda"), gen, 16, "NHD", 4)
    q = torch.stack(qs)
    names = ("defensive_max", "snapkv", "unpooled_mean", "window_bias")
    runs = {}
    for pdl in (0, 1):
        override_scoring_config(monkeypatch, pdl=pdl)
        outs = []
        for _ in range(6):  # each call's workspace freed as the next one starts (the allocator reuses it)
            st = _scoring.window_stats_layers(q, caches, table, n, 5, None, probs_dtype)
            outs.append([getattr(st, f).clone() for f in names])
            del st
        torch.cuda.synchronize()
        runs[pdl] = outs
    for out in runs[1]:
        for name, got, ref in zip(names, out, runs[0][0]):
            assert torch.equal(got, ref), name
