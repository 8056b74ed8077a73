"""Fused window scoring over paged keys (Triton), matching `policy.scoring.window_stats`.

Never materialises the [Hq, W, L] probability matrix. Four launches (five with rounded
probabilities, the default) cover every layer of a request (`window_stats_layers`;
`window_stats` is the one-layer case), one workspace. The kernels' head axis runs over (layer,
KV head) pairs: queries, row statistics and outputs are laid out by pair, and each program loads
its layer's key-cache base from a table of addresses (vLLM keeps one cache tensor per layer; the
layers share the request's block table and one layout).

pass 1   grid (row blocks, key splits, Hkv). Each program streams its split of the keys once and
         keeps, per window row (one row = one (query head, window position) of the KV head's
         group), the online-softmax statistics over ALL L keys with the causal mask inside the
         window: running max and sum of exp; on the few tiles that need them, the prefix share
         (keys < P), the pooled-row-sum deficit at the prefix edges and the window-bias columns.
         The interior tiles take one offset a row instead of the running max (`p1_fixed_offset`:
         the first interior tile's max; a split whose sums leave 2^64 is summed again online).
combine  grid (row blocks, Hkv): merges the splits into per-row (max, 1/sum, pooling scale c,
         bias mass).
pass 2   grid (row blocks x programs, Hkv), each program taking one block of the group's window
         rows (queries and row statistics loaded once) over a contiguous run of prefix tiles (so
         the next tile's keys load while this one computes); a group's row blocks are neighbours
         in launch order, so they read the same key tiles from L2. Tiles of BN keys overlap by
         pool_kernel//2 keys on each side and own their BN - 2*(pool_kernel//2) central keys, so
         pooling needs no separate halo. Interior tiles (all keys in [0, P), no bias column) run
         in a loop of their own compiled without the edge code (`p2_interior_loop`). Per tile:
         the probabilities of the block's rows; pooling along the key axis as a product with a
         banded 0/1 matrix on the tensor cores; rescaling each row by c; reductions over the
         block's rows: max (defensive) and sum of the unpooled rows (stage 1), written as the
         block's share. One read of the keys per row block (plus
         the 2*(pool_kernel//2)/BN overlap).
         On CUDA with 16-bit probabilities pass 2 is `_scoring_gluon.window_pass2_gluon` instead
         (`p2_gluon`, the default for head dims 64 and 128): the same inputs and outputs, 32-row
         blocks, no tile overlap, the reductions over the rows on the cheap axis of the product
         layout (Gluon states layouts; Triton 3.6 moves a transposed operand through shared memory).
         H200, every layer at 32K: Qwen's pass 2 448 -> 382 us, Llama's 1963 -> 1629 us (then 362 for
         Qwen with the row's log-sum folded into the exponent). It merges its row blocks' column max
         itself, by integer atomic max into one share (`p2_gluon_atomic_max`; pass 1 zeroes it).
         The interpreter (CPU) and fp32 probabilities run the Triton kernel.
fixup    merges the row blocks' shares (max; sums in row-block order), rescales the defensive max
         with the exact rounded-row sums (below), pools the unpooled mean into SnapKV's pooled mean
         (pooling is linear; in pass 2 it cost 4% of the hot loop) and writes the window bias (mean
         over rows), so no host-side reduction or sync is needed.
On sm_90+ every kernel after pass 1 is a programmatic dependent launch (`pdl`, `_pdl_wait`): resident
while its predecessor finishes, waiting for that one's writes (pass 2 does its input-only prologue,
the queries and the first key copies, first).

Mass-preserving pooling in closed form: with zero padding and count_include_pad, the pooled row
sums to S = sum_t a_t * cnt(t) / K where cnt(t) = #{outputs j in [0, P) whose window covers t}
(= K inside, fewer within K//2 of either end). That is the doc's S = m - (2a0 + a1 + a_{P-2} +
2a_{P-1})/5 for K = 5, but also right for P < 4 and any odd K. Pass 1 accumulates m and the edge
deficit m - S next to the softmax sums, so each row's scale c = m / (S + eps) is known before pass 2.

`probs_dtype` rounding (the official code casts the fp32 probabilities to the model dtype before
pooling, and pooling casts back to it): pass 2 rounds each probability and each pooled value to
nearest-even like torch. The reference's m and S are then sums of ROUNDED values, which pass 1
cannot know; pass 2 accumulates them exactly (per-program partial sums per row, which
`_window_sums` adds in a fixed order: no atomics, so every run gives the same bits, and so does
the keep set; with `p2_rowsum_mma` they accumulate on the tensor cores, whose fp32 additions
truncate: a relative error of order 1e-7 per tile) and records, per token, which row gave the
max (packed into the low bits of the max itself), and the fixup kernel recomputes that row's
pooled / (S + eps) * m with the exact sums: the reference's formula, up to float32 summation
order. The row is chosen with pass 1's unrounded scale, so where two rows tie within that scale's
error (under one ulp of probs_dtype) the value may be the other row's. The official window bias
is likewise the exact sum of rounded probabilities; the fixed variant (`fix_window_bias`) is
computed from the unrounded ones.

Host cost: ~0.25 ms of Python and launch work per call (H200 machine, Qwen2.5-0.5B's shape, 24
layers; 0.37 ms with every launch through Triton's dispatch, which `_launch.fast` skips once a
kernel is compiled: ~25 us a launch), once per request instead of once per layer (24-32 layers:
6-10 ms of host time that the per-layer calls paid, more than the device work of a short prompt).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from vllm_defensive.policy.scoring import WindowStats

from ._launch import cdiv, fast

EPS = 1e-12
MAX_ROWS = 512  # group size x window per KV head: the row index travels in 9 low bits of the max
LOG2E = 1.4426950408889634
MIN_TILES = 8  # pass-2 tiles per program, at least (see window_stats_layers)
SUMS_TILE = 32  # _window_sums: rows and pass-2 programs per tile, on one warp
COMBINE_ROWS, COMBINE_SPLITS = 16, 128  # _window_combine: rows per program, pass-1 splits per tile
ZERO_TILE = 1024  # _zero_share's words a store (in pass 1 and the combine)
_ZERO_TILE = tl.constexpr(ZERO_TILE)  # (as constexpr: the jit functions read module globals only in that form)

# Tunables (the benchmark sweeps some; tests override split_len to exercise the split merge).
CONFIG = {
    "p1_bn": 64,  # keys per pass-1 tile
    "p1_warps": 8,  # for row blocks of 128 (4 below)
    # Triton 3.6's pipeliner puts the block-table load and the key copy it feeds in successive
    # stages: at 3 or 4 stages the keys got one buffer, and each iteration issued the next tile's
    # copy last and the next one waited for it first (sm_90 SASS `DEPBAR.LE SB0, 0x0`; ncu, H200:
    # a fifth of pass 1's stall samples on that wait). At 5 they are double-buffered two tiles
    # ahead (`0x2`): pass 1 at 32K 195 -> 178 us (Qwen), 770 -> 708 us (Llama). Pass 2 at 5: its
    # extra buffer spills (Qwen 452 -> 476 us, Llama 1969 -> 2583).
    "p1_stages": 5,
    "p1_programs_per_sm": 4,  # pass-1 split count target
    "p1_min_tiles": 8,  # pass-1 key tiles per split, at least (while a program per SM remains)
    # pass 1's interior tiles against one offset a row, no running maximum (H200, every layer at 32K:
    # Qwen's pass 1 178 -> 165 us, Llama's 725 -> 677; benchmarks/results/kernels/h200_2026-12-03/)
    "p1_fixed_offset": 1,
    # with it, the exponentials of that many eighths of each 64-key tile on the FMA pipe: 1 and 2 were
    # slower (Qwen 171 and 175 us against 165: pass 1 is not MUFU-bound)
    "p1_npoly": 0,
    "p2_bn": 64,  # prefix keys per pass-2 tile
    "p2_warps": 4,  # H100 sweep at 32K: 4 warps beat 8 by 25-35% (benchmarks/results/kernels)
    "p2_stages": 2,
    "p2_programs_per_sm": 2,  # pass-2 programs (each a run of tiles) per SM
    "br": 0,  # rows per block (0 = choose from the group size)
    "p2_br": 0,  # pass 2's rows per program (0 = br); a group's row blocks run as parallel programs
    "p1_maxnreg": 0,  # register cap per thread (0: the compiler's choice)
    "p2_maxnreg": 0,
    "p2_progs": 0,  # pass-2 programs per (layer, KV head) pair (0: from p2_programs_per_sm)
    "p2_colsum_mma": 0,  # pass 2's unpooled column sums on the tensor cores (H200: +1% Qwen, +13% Llama: off)
    "p2_rowsum_mma": 1,  # pass 2's exact row sums on the tensor cores (16-bit probabilities, one row block)
    "p2_interior_loop": 1,  # pass 2's interior tiles in a loop of their own, without the edge code
    "p2_gluon": 0,  # pass 2 in Gluon (`_scoring_gluon`) where it applies: CUDA, 16-bit, one-warp row blocks
    # its register cap: 168 (3 programs per scheduler) at d = 64, where ptxas left alone takes 237 and
    # 128 spills (+28%); d = 128's queries need 232 (H200, 32K: 1629 us; 128 with the queries in
    # shared memory 3972)
    "p2_gluon_maxnreg": 168,
    # key tiles in the Gluon pass 2's shared-memory ring (two 32-key tiles a ring step on two stages:
    # 5% fewer instructions, pass 2 +17 us; commit 571e6c2)
    "p2_gluon_stages": 3,
    # its queries reloaded from shared memory every tile: no fewer registers at 168 (the tile's own values
    # fill them), and the lower caps it would allow spill: Qwen's pass 2 341 -> 424 us at 144, 531 at 128
    # (H200, every layer at 32K; h200_2026-12-03e/sweep_q_smem_regcap.json)
    "p2_gluon_q_smem": 0,
    # its row blocks' column max merged by integer atomic max into one share (deterministic: max is
    # order-free), so the fixup reads one share of it instead of one per row block (H200, Qwen, every
    # layer at 32K: fixup 34 -> 24 us, pass 2 unchanged; pass 1 zeroes the share, the combine 6.7 -> 5.9 us
    # since it no longer does)
    "p2_gluon_atomic_max": 1,
    # (the row blocks' unpooled means merged likewise, by int64 fixed-point atomics, were no faster:
    # the fixup 22.7 -> 13.7 us, pass 2 +11 us; H200, Qwen, every layer at 32K; commit 571e6c2)
    "p2_gluon_programs_per_sm": 0,  # its programs per SM (0: p2_programs_per_sm)
    # its unpooled column sums' transposed probabilities by movmatrix (eight 8x8 transposes a half
    # tile) instead of an identity product on the tensor cores, 8 of the tile's 64 HMMA (H200, every
    # layer at 32K: Qwen's pass 2 366 -> 344 us, Llama's 1592 -> 1500; h200_2026-12-03b/)
    "p2_gluon_movm": 1,
    # its interior tiles whose copies STAGES - 1 tiles ahead are interior too in a loop of their own,
    # the copies and block-id loads there without bounds (offline sm_90 SASS, Qwen: 24 instructions a
    # tile fewer). With the stores' per-tile bases, H200 every layer at 32K: Qwen 0.535 -> 0.514 ms,
    # of which the loop 19 us; Llama 2.39 -> 2.32 (h200_2026-12-04b/)
    "p2_gluon_inner": 1,
    # pass 1 in Gluon (`_scoring_gluon_pass1`) where it applies (sm_90, 16-bit, <= 256 window rows):
    # off, slower than the Triton kernel so far (H200, Qwen, every layer at 32K: 190 us at the settings
    # below against 175; benchmarks/results/kernels/h200_2026-12-02h/). One-warp mma.sync programs of
    # 32 rows, without the Triton kernel's padded rows (224 -> 256 for Qwen), were slower still: 185 us
    # against 161 (commit b656572, reverted; h200_2026-12-03d/)
    "p1_gluon": 0,
    "p1_gluon_npoly": 0,  # its row groups whose exponentials run on the FMA pipe (a polynomial): 1 was slower
    "p1_gluon_stages": 3,  # key tiles in its shared-memory ring
    "p1_gluon_ahead": 0,  # the next group's product issued before a group's exponentials (16 registers)
    "p1_gluon_maxnreg": 168,  # three programs per SM (without a cap: 255 registers, two; 128 spills)
    "p1_gluon_programs_per_sm": 3,  # its interior splits: programs per SM
    "p1_gluon_min_tiles": 8,  # key tiles per interior split, at least
    # programmatic dependent launch of the kernels after pass 1 (sm_90+; see _pdl_wait): 1 with each
    # kernel letting its dependant launch once its own programs have all started, 2 at its end, 0 off
    # (H200, every layer at 32K, four interleaved runs each: Qwen 0.538 ms at 1 against 0.545 at 0 and
    # 0.546 at 2; Llama 2.43 / 2.51 / 2.42 ms, within its run-to-run spread; h200_2026-12-04/)
    "pdl": 1,
    # the fixup's keys per program (with several row blocks: its window, outputs 2 * halo fewer) and warps
    # (H200, every layer at 32K, against 256 on 4: Qwen 23.6 -> 22.5 us, Llama 89.7 -> 80.3;
    # h200_2026-12-03c/sweep_programs_fixup.json)
    "fix_bn": 1024,
    "fix_warps": 8,
}
# Per head-dim overrides of CONFIG: the best of the H200 runs on the layered path at 32K
# (benchmarks/results/kernels/h200_2026-12-01b/, h200_2026-12-02/, h200_2026-12-02b/, h200_2026-12-02c/,
# h200_2026-12-02d/: the interior-tile loop, 527 -> 451 us for Qwen's pass 2, 5% slower for d = 128;
# h200_2026-12-02e/: pass 1's pipeline depth, above).
# Both passes are latency-bound (ncu: 40-60% of issue slots used at 2-4 warps per scheduler), so
# capping registers for more resident programs wins even with a few spills: d = 128 pass 1 at 168
# registers (3 programs per SM by registers; 2 by shared memory at five stages, still faster), pass 2
# on 32-key tiles at 128 (4 per SM). Qwen's d = 64 group
# (7 x 32 = 224 window rows) runs pass 1 as two 128-row blocks of 4 warps, pass 2 as seven 32-row
# programs of one warp each: no padded rows (224, not 256), no cross-warp reductions, no barriers
# (2026-12-02c: pass 2 612 -> 528 us; all layers 0.84 -> 0.77 ms with the fixup merging the seven
# row blocks once per key). The program counts follow so that the grids fill whole waves.
CONFIG_BY_HEAD_DIM: dict[int, dict] = {
    128: {"p1_warps": 4, "p1_maxnreg": 168, "p1_programs_per_sm": 6,
          "p2_bn": 32, "p2_maxnreg": 128, "p2_programs_per_sm": 8, "p2_rowsum_mma": 0, "p2_interior_loop": 0,
          "p2_gluon": 1, "p2_gluon_maxnreg": 232, "p2_gluon_programs_per_sm": 48},
    64: {"p1_bn": 64, "p1_maxnreg": 128, "p2_bn": 32, "p2_maxnreg": 128, "br": 128, "p1_warps": 4,
         "p1_programs_per_sm": 8, "p2_br": 32, "p2_warps": 1, "p2_programs_per_sm": 64, "p2_gluon": 1},
}


def _cfg(d: int) -> dict:
    c = dict(CONFIG)
    c.update(CONFIG_BY_HEAD_DIM.get(d, {}))
    return c


@triton.jit
def _load_key_tile(K, BT, t, tmask, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                   BS_POW2: tl.constexpr, OFF32: tl.constexpr):
    """Keys t (one per tile row) of head h from the paged cache: block_table[t // block_size] at
    offset t % block_size. A power-of-two block size divides by shifts (a runtime divisor costs
    ~10 integer instructions per key and thread, half of pass 1's issue slots before); OFF32 (the
    host checked every element offset of the cache fits in int32) keeps the address arithmetic
    32-bit, one multiply-add per term, until the final pointer add."""
    if BS_POW2:
        bi = t >> bs_shift
        off = t & (block_size - 1)
    else:
        bi = t // block_size
        off = t % block_size
    blk = tl.load(BT + bi, mask=tmask, other=0)
    if OFF32:
        o = blk.to(tl.int32) * skb + off * skt + h.to(tl.int32) * skh
        ptr = K + o[:, None] + dd[None, :] * skd
    else:
        ptr = (K + blk.to(tl.int64)[:, None] * skb + off.to(tl.int64)[:, None] * skt + h * skh
               + dd[None, :] * skd)
    return tl.load(ptr, mask=tmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _layer_keys(KPTRS, hg, HKV, KDT: tl.constexpr, ALIGNED: tl.constexpr):
    """Base of the key cache of pair hg's layer (a table entry per layer) and hg's head in it."""
    K = tl.load(KPTRS + hg // HKV).to(tl.pointer_type(KDT))
    if ALIGNED:  # checked on the host: keeps the vectorised loads a tensor argument would get
        K = tl.multiple_of(K, 16)
    return K, hg % HKV


# fp32 pairs -> probs_dtype, round-to-nearest-even, in one packed cvt (a plain .to() converts one
# element per instruction); the fp32 values come straight from the packed register (bf16: the
# halves shifted into place), so the 16-bit pairs never leave it (extracting them and packing
# them again for the dot cost three instructions a pair).
# (as constexpr: the jit functions read module globals only in that form)
# $0: the packed 16-bit pair; $1, $2: their fp32 values; $3, $4: the inputs
_ROUND16_BF16 = tl.constexpr("cvt.rn.bf16x2.f32 $0, $4, $3; shl.b32 $1, $0, 16; and.b32 $2, $0, 0xffff0000;")
_ROUND16_F16 = tl.constexpr(
    "{ .reg .b16 l, h; cvt.rn.f16x2.f32 $0, $4, $3; mov.b32 {l, h}, $0; cvt.f32.f16 $1, l; cvt.f32.f16 $2, h; }")
_PACK16_BF16 = tl.constexpr("cvt.rn.bf16x2.f32 $0, $2, $1;")
_PACK16_F16 = tl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")


@triton.jit
def _round(x, ROUND: tl.constexpr, INTERP: tl.constexpr):
    """Round fp32 to probs_dtype and back, round-to-nearest-even like torch's .to()."""
    if ROUND == 1:
        if INTERP:
            # Triton 3.6's interpreter truncates fp32 -> bf16; round by hand (x >= 0, finite).
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = _round16(x, ROUND, INTERP)[1]  # the 16-bit pair is unused: its register is the cvt's
    elif ROUND == 2:
        if INTERP:
            x = x.to(tl.float16).to(tl.float32)
        else:
            x = _round16(x, ROUND, INTERP)[1]
    return x


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    if INTERP:
        # The interpreter multiplies bf16 operands as raw integers; fp32 products of 16-bit
        # values are exact, which is what the tensor cores compute.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _round16(x, ROUND: tl.constexpr, INTERP: tl.constexpr):
    """x rounded to probs_dtype: (the 16-bit tensor, its fp32 value); fp32 probabilities: (x, x).

    One conversion serves both the band dot's operand and the fp32 sums."""
    if ROUND == 0:
        return x, x
    else:
        if INTERP:
            xr = _round(x, ROUND, INTERP)
            return xr.to(tl.bfloat16 if ROUND == 1 else tl.float16), xr  # exact: xr is on the grid
        else:
            if ROUND == 1:
                return tl.inline_asm_elementwise(_ROUND16_BF16, "=r,=r,=r,r,r", [x], dtype=(tl.bfloat16, tl.float32),
                                                 is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_ROUND16_F16, "=r,=r,=r,r,r", [x], dtype=(tl.float16, tl.float32),
                                                 is_pure=True, pack=2)


@triton.jit
def _pack16(x, ROUND: tl.constexpr, INTERP: tl.constexpr):
    """x rounded to probs_dtype (ROUND > 0), the 16-bit tensor alone: one packed cvt per pair."""
    if INTERP:
        return _round16(x, ROUND, INTERP)[0]
    elif ROUND == 1:
        return tl.inline_asm_elementwise(_PACK16_BF16, "=r,r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_PACK16_F16, "=r,r,r", [x], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _band_dot(p16, p, band, ROUND: tl.constexpr, INTERP: tl.constexpr):
    """p @ band for a 0/1 band matrix: exact products on the tensor cores.

    Rounded probabilities are exact in their 16-bit type (p16, band in the same type); fp32 ones
    are split in three bf16 parts (24 significant bits), so the pooled sums carry fp32 accuracy
    either way."""
    if INTERP:
        acc = tl.dot(p.to(tl.float32), band.to(tl.float32), input_precision="ieee")
    elif ROUND > 0:
        acc = tl.dot(p16, band)
    else:
        b = band.to(tl.bfloat16)
        hi = p.to(tl.bfloat16)
        r1 = p - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, b)
        acc = tl.dot(mid, b, acc)
        acc = tl.dot(lo, b, acc)
    return acc


@triton.jit
def _div_const(x, KPOOL: tl.constexpr):
    """x / KPOOL rounded like IEEE division (avg_pool divides), via one fma correction step."""
    q = x * (1.0 / KPOOL)
    r = tl.fma(-q, tl.full(x.shape, KPOOL, tl.float32), x)
    return tl.fma(r, tl.full(x.shape, 1.0 / KPOOL, tl.float32), q)


@triton.jit
def _div_pool(x, KPOOL: tl.constexpr, ROUND: tl.constexpr):
    """x / KPOOL for a value rounded to probs_dtype next: for KPOOL = 5 one multiply by 0.2f gives
    the same 16-bit result as the IEEE quotient. (0.2f is 0.2 (1 + 1.5e-8), so x * 0.2f is within
    0.25 ulp of x/5; a 16-bit rounding midpoint m has at most 12 significant bits, so a quotient
    x/5 != m differs from it by |x - 5m|/5 >= ulp(x)/5 >= 0.8 ulp: both roundings stay on its side,
    and an exact midpoint x/5 = m comes out as m both ways. `test_pool_division_by_multiply`
    checks the midpoints and their neighbours.) Other sizes and fp32 probabilities divide."""
    if KPOOL == 5 and ROUND > 0:
        return x * 0.2
    else:
        return _div_const(x, KPOOL)


# Prompt-length arguments are not specialised (Triton would otherwise compile a variant per
# "divisible by 16" / "== 1" pattern of them, i.e. a fresh multi-second JIT inside an engine step
# for the first prompt of an unseen pattern); they only bound loops and masks. Strides stay
# specialised: they are fixed per model and drive vectorised loads.
# block_size too: the dense entry points (`window_stats` on [Hkv, L, d] keys) pass one block of L.
_PASS1_LENGTHS = ["L", "P", "bias_lo", "bias_hi", "split_len", "num_splits", "block_size", "bs_shift"]
_PASS2_LENGTHS = ["P", "num_row_blocks", "part_stride", "tiles_per_prog", "num_progs", "bias_lo", "bias_hi",
                  "block_size", "bs_shift"]


@triton.jit
def _p1_tile(q, K, BT, start, k_hi, P, lim, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
             scale_log2, bias_lo, bias_hi, m, l_all, l_pre, s_def, l_b,
             HALF: tl.constexpr, KPOOL: tl.constexpr, BN: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
             INTERP: tl.constexpr, BS_POW2: tl.constexpr, OFF32: tl.constexpr, EDGES: tl.constexpr):
    """One pass-1 key tile: the online-softmax update of one block of rows. EDGES=False: a tile the
    caller knows to be interior (every key real and below P - HALF, no bias column), compiled
    without the masks and edge code."""
    t = start + tl.arange(0, BN)
    if EDGES:
        tmask = t < k_hi
    else:
        tmask = tl.full([BN], 1, tl.int1)
    k = _load_key_tile(K, BT, t, tmask, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                       BS_POW2, OFF32).to(CDT)
    s = _dot(q, tl.trans(k), DOT_PREC, INTERP)  # unscaled: the scale rides in the exp2's FMA
    if EDGES:
        if start + BN > tl.minimum(P, k_hi):  # causal mask / ragged end: only the last tiles
            s = tl.where(tmask[None, :] & (t[None, :] <= lim[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * scale_log2)  # rounding is monotone: = max of s * scale
    if EDGES:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # finite: every key is real
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s * scale_log2 - m_safe[:, None])
    tile_sum = tl.sum(p, 1)
    l_all = l_all * alpha + tile_sum
    if EDGES:
        if start + BN <= P:
            pre_sum = tile_sum
        else:
            pre_sum = tl.sum(tl.where((t < P)[None, :], p, 0.0), 1)
    else:
        pre_sum = tile_sum
    l_pre = l_pre * alpha + pre_sum
    s_def = s_def * alpha
    l_b = l_b * alpha
    if EDGES:
        if HALF > 0:
            if (start < HALF) | (start + BN > P - HALF):  # pooling edges
                cnt = tl.minimum(t + HALF, P - 1) - tl.maximum(t - HALF, 0) + 1
                deficit = tl.where(t < P, 1.0 - cnt.to(tl.float32) / KPOOL, 0.0)
                s_def += tl.sum(p * deficit[None, :], 1)
        if (start < bias_hi) & (start + BN > bias_lo):
            l_b += tl.sum(tl.where(((t >= bias_lo) & (t < bias_hi))[None, :], p, 0.0), 1)
    return m_new, l_all, l_pre, s_def, l_b


# exp2 on the FMA pipe: 2^j * p(f) for x = j + f, j = rint(x), |f| <= 1/2, p a degree-5 fit (max
# relative error 2.1e-7, fp32 Horner included; MUFU.EX2's is 2^-22.5). Inputs below -126 give about
# 2^-126, above 127.5 inf or NaN (the exponent field is 255): either fails a caller's range check.
EXP2_POLY_ASM = tl.constexpr(
    "{ .reg .f32 x, t, j, f, p; .reg .b32 ti, pi;\n"
    "max.f32 x, $1, 0fC2FC0000;\n"  # -126 ..
    "min.f32 x, x, 0f43000000;\n"  # .. 128: 2^128 overflows to inf / NaN (as MUFU.EX2's inf, caught)
    "add.rn.f32 t, x, 0f4B400000;\n"  # + 1.5 * 2^23: rint(x) in the low mantissa bits
    "sub.rn.f32 j, t, 0f4B400000;\n"
    "sub.rn.f32 f, x, j;\n"
    "fma.rn.f32 p, f, 0f3AAE0400, 0f3C1E8584;\n"  # c5 = 1.3276422e-3, c4 = 9.6755410e-3
    "fma.rn.f32 p, p, f, 0f3D635A0E;\n"  # c3 = 5.5507135e-2
    "fma.rn.f32 p, p, f, 0f3E75FDAF;\n"  # c2 = 0.24022120
    "fma.rn.f32 p, p, f, 0f3F317218;\n"  # c1 = 0.69314694
    "fma.rn.f32 p, p, f, 0f3F800001;\n"  # c0 = 1.0000001
    "mov.b32 ti, t;\n mov.b32 pi, p;\n"
    "mad.lo.u32 pi, ti, 8388608, pi;\n"  # + (j << 23): the exponent (t's bits << 23 are j << 23)
    "mov.b32 $0, pi; }")


@triton.jit
def _exp2_mixed(x, NPOLY: tl.constexpr, INTERP: tl.constexpr):
    """exp2 of a [rows, keys] tile, the keys with (key % 64) < 8 * NPOLY on the FMA pipe (EXP2_POLY_ASM),
    the rest on MUFU.EX2. In the warpgroup MMA's accumulator layout a thread's keys are 8j + (lane-
    dependent 0..7), so the choice is a whole register's, known at compile time: the other branch of
    each element is dead code."""
    if NPOLY == 0 or INTERP:
        return tl.exp2(x)
    else:
        key = tl.arange(0, x.shape[1]) % 64
        poly = tl.inline_asm_elementwise(EXP2_POLY_ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        return tl.where((key < 8 * NPOLY)[None, :], poly, tl.exp2(x))


@triton.jit
def _p1_tile_fixed(q, K, BT, start, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift, scale_log2, m,
                   BN: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
                   BS_POW2: tl.constexpr, OFF32: tl.constexpr, NPOLY: tl.constexpr):
    """An interior tile's sums of exp2(s - m) against a fixed offset m (no running max: no max, no
    rescale and no cross-lane max reduction a tile)."""
    t = start + tl.arange(0, BN)
    k = _load_key_tile(K, BT, t, tl.full([BN], 1, tl.int1), h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                       BS_POW2, OFF32).to(CDT)
    s = _dot(q, tl.trans(k), DOT_PREC, INTERP)
    return tl.sum(_exp2_mixed(s * scale_log2 - m[:, None], NPOLY, INTERP), 1)


# Programmatic dependent launch (sm_90+, `pdl`): each kernel after pass 1 is launched while its
# predecessor runs (`launch_pdl`), its programs resident and waiting at `_pdl_wait` (griddepcontrol.wait:
# until the predecessor has finished and its writes are visible) before they read what it wrote; each
# kernel lets its dependant launch once all its own programs have started (`_pdl_launch`). What a
# program does before the wait only reads the call's inputs. Pass 1 waits for nothing: it is the
# first, and the workspace may reuse the memory of a previous call's that a kernel still reads.
# (the PTX, shared with the Gluon pass 2's own two helpers)
PDL_WAIT_ASM = tl.constexpr("griddepcontrol.wait; // $0")
PDL_LAUNCH_ASM = tl.constexpr("griddepcontrol.launch_dependents; // $0")


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL > 0:
        tl.inline_asm_elementwise(PDL_WAIT_ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pdl_launch(PDL: tl.constexpr):
    if PDL == 1:
        tl.inline_asm_elementwise(PDL_LAUNCH_ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _zero_share(ZERO, zero_len, pid, nprogs, BZ: tl.constexpr):
    """Program pid of nprogs zeroes its slice of ZERO[:zero_len] (int32 words): pass 2's atomic-max
    share, which starts at zero (values >= 0, whose bits order like them). The Triton pass 1 does it
    (compute-bound programs, whose DRAM is idle: the stores come almost free), the combine behind the
    Gluon pass 1; no memset launch."""
    chunk = tl.cdiv(tl.cdiv(zero_len, nprogs), BZ) * BZ
    for z0 in range(pid * chunk, tl.minimum((pid + 1) * chunk, zero_len), BZ):
        z = z0 + tl.arange(0, BZ)
        tl.store(ZERO + z, tl.zeros([BZ], tl.int32), mask=z < zero_len)


@triton.jit(do_not_specialize=_PASS1_LENGTHS + ["zero_len"])
def _window_pass1(
    Q, KPTRS, BT, PART, ZERO,
    sqh, sqw, sqd, skb, skt, skh, skd, block_size, bs_shift, HKV,
    L, P, W, G, R, RP, HEAD_D, bias_lo, bias_hi, split_len, num_splits, scale_log2, zero_len,
    HALF: tl.constexpr, KPOOL: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CDT: tl.constexpr, KDT: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BS_POW2: tl.constexpr, OFF32: tl.constexpr, FIXED: tl.constexpr, NPOLY: tl.constexpr, PDL: tl.constexpr = 0,
):
    _pdl_launch(PDL)
    rb = tl.program_id(0)
    sp = tl.program_id(1)
    hg = tl.program_id(2).to(tl.int64)  # (layer, KV head) pair: rows, queries and outputs
    if zero_len > 0:  # (issued first: the stores drain while the keys stream)
        nrb = tl.num_programs(0)
        _zero_share(ZERO, zero_len, (hg.to(tl.int32) * num_splits + sp) * nrb + rb,
                    nrb * num_splits * tl.num_programs(2), _ZERO_TILE)
    K, h = _layer_keys(KPTRS, hg, HKV, KDT, ALIGNED)  # h: the head within its layer's cache
    r = rb * BR + tl.arange(0, BR)
    rmask = r < R
    g = r // W
    i = r % W
    dd = tl.arange(0, BD)
    dmask = dd < HEAD_D
    qh = (hg * G + g).to(tl.int64)
    q = tl.load(Q + qh[:, None] * sqh + i[:, None] * sqw + dd[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    lim = P + i  # window row i sits at position P + i and sees keys <= P + i

    m = tl.full([BR], float("-inf"), tl.float32)
    l_all = tl.zeros([BR], tl.float32)  # every visible key
    l_pre = tl.zeros([BR], tl.float32)  # keys < P (prefix mass m)
    s_def = tl.zeros([BR], tl.float32)  # sum_t (1 - cnt(t)/K) p_t: m - S (pooled-row sum)
    l_b = tl.zeros([BR], tl.float32)  # window-bias columns
    k_lo = sp * split_len
    k_hi = tl.minimum(k_lo + split_len, L)
    # Tiles with no mask, no causal edge, no pooling edge and no bias column first, in a loop of
    # their own compiled without that code (sm_90 SASS: 29% fewer hot-loop instructions; H200,
    # all layers at 32K: -2% Llama, -4% Qwen); then the general loop over the rest.
    first = k_lo
    if first < HALF:
        first = k_lo + BN
    last_end = tl.minimum(tl.minimum(k_hi, P - HALF), bias_lo)
    int_end = first + tl.maximum(0, (last_end - first) // BN) * BN
    exact_from = first  # the interior tiles from here on take the online update
    if FIXED:
        # The interior against one offset a row, its maximum over the first interior tile: a sum is
        # right whatever offset it is taken against (the combine and pass 2 need exp2(s - m) finite and
        # the sum not lost to underflow: it holds the first tile's maximum, 1). If a later key sits
        # far above (a sum past 2^64, or inf / NaN), the split's interior is summed again, online.
        if int_end > first:
            m, l_all, l_pre, s_def, l_b = _p1_tile(
                q, K, BT, first, k_hi, P, lim, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                scale_log2, bias_lo, bias_hi, m, l_all, l_pre, s_def, l_b,
                HALF, KPOOL, BN, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, False)
            l_fix = tl.zeros([BR], tl.float32)
            for start in range(first + BN, int_end, BN):
                l_fix += _p1_tile_fixed(q, K, BT, start, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                                        scale_log2, m, BN, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, NPOLY)
            out_of_range = rmask & ~(l_fix <= 18446744073709551616.0)  # (true for NaN)
            if tl.max(out_of_range.to(tl.int32), 0) > 0:
                m = tl.full([BR], float("-inf"), tl.float32)
                l_all = tl.zeros([BR], tl.float32)
                l_pre = tl.zeros([BR], tl.float32)
                s_def = tl.zeros([BR], tl.float32)
                l_b = tl.zeros([BR], tl.float32)
            else:
                l_all += l_fix
                l_pre += l_fix
                exact_from = int_end
    for start in range(exact_from, int_end, BN):
        m, l_all, l_pre, s_def, l_b = _p1_tile(
            q, K, BT, start, k_hi, P, lim, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
            scale_log2, bias_lo, bias_hi, m, l_all, l_pre, s_def, l_b,
            HALF, KPOOL, BN, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, False)
    for start in range(k_lo, k_hi, BN):
        if (start < first) | (start >= int_end):
            m, l_all, l_pre, s_def, l_b = _p1_tile(
                q, K, BT, start, k_hi, P, lim, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                scale_log2, bias_lo, bias_hi, m, l_all, l_pre, s_def, l_b,
                HALF, KPOOL, BN, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, True)

    base = PART + ((hg * num_splits + sp) * 5) * RP
    tl.store(base + r, m, mask=rmask)
    tl.store(base + RP + r, l_all, mask=rmask)
    tl.store(base + 2 * RP + r, l_pre, mask=rmask)
    tl.store(base + 3 * RP + r, s_def, mask=rmask)
    tl.store(base + 4 * RP + r, l_b, mask=rmask)


@triton.jit(do_not_specialize=["num_splits", "zero_len"])
def _window_combine(PART, ROW, ZERO, R, RP, num_splits, zero_len, BR: tl.constexpr, BS: tl.constexpr,
                    BZ: tl.constexpr, PDL: tl.constexpr = 0):
    """Merge the pass-1 splits: [BS splits x BR rows] tiles, so the loads are not a serial chain; the
    five fields of a tile loaded at once and merged online across tiles (one tile for up to BS
    splits: one round of loads, where a max pass before the sums took two). Behind the Gluon pass 1
    it also zeroes ZERO[:zero_len], pass 2's atomic-max share (zero_len 0: nothing; `_zero_share`)."""
    _pdl_launch(PDL)
    _pdl_wait(PDL)
    rb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    r = rb * BR + tl.arange(0, BR)
    rmask = r < R
    sp = tl.arange(0, BS)
    mx = tl.full([BR], float("-inf"), tl.float32)
    l_all = tl.zeros([BR], tl.float32)
    l_pre = tl.zeros([BR], tl.float32)
    s_def = tl.zeros([BR], tl.float32)
    l_b = tl.zeros([BR], tl.float32)
    for s0 in range(0, num_splits, BS):
        spm = (s0 + sp) < num_splits
        msk = spm[:, None] & rmask[None, :]
        ptr = PART + ((h * num_splits + s0 + sp[:, None]) * 5) * RP + r[None, :]
        m_t = tl.load(ptr, mask=msk, other=float("-inf"))
        f_all = tl.load(ptr + RP, mask=msk, other=0.0)
        f_pre = tl.load(ptr + 2 * RP, mask=msk, other=0.0)
        f_def = tl.load(ptr + 3 * RP, mask=msk, other=0.0)
        f_b = tl.load(ptr + 4 * RP, mask=msk, other=0.0)
        m_new = tl.maximum(mx, tl.max(m_t, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (only padded rows, or no split yet)
        alpha = tl.exp2(mx - m_safe)
        a = tl.exp2(m_t - m_safe[None, :])
        l_all = l_all * alpha + tl.sum(a * f_all, 0)
        l_pre = l_pre * alpha + tl.sum(a * f_pre, 0)
        s_def = s_def * alpha + tl.sum(a * f_def, 0)
        l_b = l_b * alpha + tl.sum(a * f_b, 0)
        mx = m_new
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # only padded rows
    inv_l = tl.where(rmask, 1.0 / tl.where(rmask, l_all, 1.0), 0.0)
    mass = l_pre * inv_l
    pooled_sum = (l_pre - s_def) * inv_l
    c = mass / (pooled_sum + 1e-12)
    out = ROW + h * 4 * RP
    tl.store(out + r, mx, mask=rmask)
    tl.store(out + RP + r, inv_l, mask=rmask)
    tl.store(out + 2 * RP + r, c, mask=rmask)
    tl.store(out + 3 * RP + r, l_b * inv_l, mask=rmask)
    if zero_len > 0:
        _zero_share(ZERO, zero_len, h.to(tl.int32) * tl.num_programs(0) + rb, tl.num_programs(0) * tl.num_programs(1),
                    BZ)


@triton.jit
def _dot_acc(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b for 16-bit a, b (exact products, fp32 accumulation on the tensor cores)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _p2_rows(q, mx, inv_l, c, r, k, kmask, ownf, omask, edge_tile, band, bias_col, do_bias, scale_log2,
             rs_acc, sel_m, sel_s,
             HALF: tl.constexpr, KPOOL: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, ROUND: tl.constexpr,
             EXACT: tl.constexpr, RBITS: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
             COLSUM_MMA: tl.constexpr, ROWSUM_MMA: tl.constexpr, EDGES: tl.constexpr):
    """One block of window rows against one key tile (tile columns = keys t0 .. t0+BN-1, of which the
    central BN - 2*HALF are this tile's outputs: ownf = 1.0 there, 0.0 elsewhere). Padded rows have
    inv_l = c = 0, so they are zero.

    Returns the unpooled column sums, the column max (EXACT: packed with its row, see below) and,
    for EXACT, the per-row sums of the rounded probabilities / pooled values / bias columns: as
    [BR] vectors, or (ROWSUM_MMA) the first two added into rs_acc's columns 0 and 1 by products
    with sel_m / sel_s (the central keys' indicator in that column) on the tensor cores, which
    takes them off the elementwise path (an FMA per element each, and a shuffle tree per row and
    tile). EDGES=False: an interior tile (see _p2_tile), compiled without the edge and bias code."""
    s = _dot(q, tl.trans(k), DOT_PREC, INTERP)
    # The scale rides in the exponent's FMA. 1/l stays a product: folded into the exponent as
    # log2(l) it would put every argument at |x| >= log2(l) (~17 at 128K keys), whose fp32 ulp
    # (2e-6) is 5x the error of this form on the tokens near the row max, the ones that matter;
    # measured: more probabilities rounded to the other bf16 neighbour than the reference.
    p = tl.exp2(s * scale_log2 - mx[:, None]) * inv_l[:, None]
    if EDGES:
        if edge_tile:  # keys outside [0, P) pool as zeros (the reference pools the prefix alone)
            p = tl.where(kmask[None, :], p, 0.0)
    if COLSUM_MMA and ROWSUM_MMA:
        # only the 16-bit probabilities are needed: no fp32 copy (a shift or mask per element)
        p16 = _pack16(p, ROUND, INTERP)
        p = p16
    else:
        p16, p = _round16(p, ROUND, INTERP)
    if COLSUM_MMA:
        # The column sums on the tensor cores (16 equal rows: their max is any of them, exactly)
        # instead of a shuffle tree per column. 16-bit probabilities only (p16 is exact there).
        unp = tl.max(_dot(tl.full([16, BR], 1.0, tl.float32).to(p16.dtype), p16, DOT_PREC, INTERP), 0)
    else:
        unp = tl.sum(p, 0)
    # Row sums of p before the band dot, so the fp32 probabilities die here (kept live across it
    # they cost 64 registers a thread at 128 x 64 tiles: spills). Each key's probability counts
    # once, in the tile it is an output of (a product, not a select: the sum's adds then fuse
    # with it into one FMA per element).
    bsum = tl.zeros([BR], tl.float32)
    msum = bsum
    s_past = bsum
    if ROWSUM_MMA:
        # keys outside [0, P) are zero in p, so the central keys' sum is the own keys' sum
        rs_acc = _dot_acc(p16, sel_m, rs_acc, INTERP)
        if EDGES:
            if do_bias:  # the bias columns: a tile or two a pair, off the hot path
                bsum = tl.sum(tl.where(bias_col[None, :], p.to(tl.float32) * ownf[None, :], 0.0), 1)
    elif EXACT:
        msum = tl.sum(p * ownf[None, :], 1)
        if EDGES:
            if do_bias:
                bsum = tl.sum(tl.where(bias_col[None, :], p * ownf[None, :], 0.0), 1)
    if HALF > 0:
        pooled = _div_pool(_band_dot(p16, p, band, ROUND, INTERP), KPOOL, ROUND)
    else:
        pooled = p.to(tl.float32)
    if ROWSUM_MMA:
        t_idx = tl.arange(0, BN)
        pr16, pr = _round16(pooled, ROUND, INTERP)
        rs_acc = _dot_acc(pr16, sel_s, rs_acc, INTERP)
        if EDGES:
            if edge_tile:
                # The central keys >= P pool to nonzero values: their sum is returned (as ssum) to be
                # taken back out of the row sums. Masking pr16 instead would unpack every pair, masking
                # pooled gets if-converted into every tile (~2 hot-loop instructions per element
                # either way), and so does this mask written without its redundant `ownf == 0.0`
                # (42 more hot-loop instructions in the sm_90 SASS).
                past = (ownf == 0.0) & (t_idx >= HALF) & (t_idx < BN - HALF) & ~kmask
                s_past = tl.sum(tl.where(past[None, :], pr, 0.0), 1)
    else:
        pr = _round(pooled, ROUND, INTERP)
    val = pr * c[:, None]
    if ROWSUM_MMA:
        ssum = s_past
    else:
        ssum = msum
    if EXACT:
        # Max and its row in one reduction: val >= 0, so its bit pattern orders like the value;
        # the low RBITS bits carry the row (a 2^(RBITS-23) relative truncation of the value, which
        # the fixup undoes exactly by rounding back to probs_dtype's grid).
        bits = val.to(tl.int32, bitcast=True)
        packed = (bits & (-(1 << RBITS))) | r[:, None]
        colmax = tl.max(packed, 0)
        if not ROWSUM_MMA:
            ssum = tl.sum(pr * ownf[None, :], 1)
    else:
        colmax = tl.max(val, 0)
    return unp, colmax, msum, ssum, bsum, rs_acc


@triton.jit
def _p2_tile(jt, q, mx, inv_l, c, r, K, BT, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift, hg, P,
             bias_lo, bias_hi, scale_log2, inv_rows, packed_out, unp_out, a_idx, central, band16, sel_m, sel_s,
             m_acc, s_acc, b_acc, rs_acc,
             HALF: tl.constexpr, KPOOL: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, ROUND: tl.constexpr,
             EXACT: tl.constexpr, RBITS: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
             INTERP: tl.constexpr, BS_POW2: tl.constexpr, OFF32: tl.constexpr, COLSUM_MMA: tl.constexpr,
             ROWSUM_MMA: tl.constexpr, EDGES: tl.constexpr):
    """Pass-2 tile jt of one row block: its keys, the rows' reductions, the stores of its outputs.
    EDGES=False: a tile the caller knows to be interior (every key in [0, P), no bias column),
    compiled without the masks and the edge code (sm_90 SASS, Qwen's shape: 25.0 -> 18.8 hot-loop
    instructions per element; the masks had spilled predicates into a register)."""
    STEP: tl.constexpr = BN - 2 * HALF
    t0 = jt * STEP - HALF  # first key of the tile (may be negative: zero padding)
    t = t0 + a_idx
    if EDGES:
        kmask = (t >= 0) & (t < P)
        omask = central & (t < P)  # this tile's outputs
        edge_tile = (t0 < 0) | (t0 + BN > P)
        bias_col = (t >= bias_lo) & (t < bias_hi)
        do_bias = (t0 < bias_hi) & (t0 + BN > bias_lo)
    else:
        kmask = tl.full([BN], 1, tl.int1)
        omask = central
        edge_tile = False
        bias_col = kmask
        do_bias = False
    ownf = omask.to(tl.float32)
    k = _load_key_tile(K, BT, t, kmask, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift,
                       BS_POW2, OFF32).to(CDT)
    unp, colmax, msum, ssum, bsum, rs_acc = _p2_rows(
        q, mx, inv_l, c, r, k, kmask, ownf, omask, edge_tile, band16, bias_col, do_bias, scale_log2,
        rs_acc, sel_m, sel_s,
        HALF, KPOOL, BR, BN, ROUND, EXACT, RBITS, DOT_PREC, INTERP, COLSUM_MMA, ROWSUM_MMA, EDGES)
    if EXACT:
        if not ROWSUM_MMA:
            m_acc += msum
        s_acc += ssum  # ROWSUM_MMA: the last tile's pooled values past P, subtracted by the caller
        b_acc += bsum
    out = hg * P + t
    if EXACT:
        tl.store(packed_out + out, colmax, mask=omask)  # turned into the max by the fixup kernel
    else:
        tl.store(packed_out + out, colmax.to(tl.int32, bitcast=True), mask=omask)
    tl.store(unp_out + out, unp * inv_rows, mask=omask)
    return m_acc, s_acc, b_acc, rs_acc


@triton.jit(do_not_specialize=_PASS2_LENGTHS)
def _window_pass2(
    Q, KPTRS, BT, ROW, PACKED, UNP, PSUMS,
    sqh, sqw, sqd, skb, skt, skh, skd, block_size, bs_shift, HKV,
    P, W, G, R, RP, HEAD_D, num_row_blocks, part_stride, tiles_per_prog, num_progs, scale_log2, inv_rows,
    bias_lo, bias_hi,
    HALF: tl.constexpr, KPOOL: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ROUND: tl.constexpr, EXACT: tl.constexpr, RBITS: tl.constexpr, CDT: tl.constexpr,
    KDT: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BS_POW2: tl.constexpr, OFF32: tl.constexpr, COLSUM_MMA: tl.constexpr, ROWSUM_MMA: tl.constexpr,
    INTERIOR: tl.constexpr,
):
    # program (row block rb, run of tiles pid) of a (layer, KV head) pair; the row blocks of one run
    # are neighbours in launch order, so they read the same key tiles at about the same time (L2)
    rb = tl.program_id(0) % num_row_blocks
    pid = tl.program_id(0) // num_row_blocks
    hg = tl.program_id(1).to(tl.int64)  # (layer, KV head) pair
    K, h = _layer_keys(KPTRS, hg, HKV, KDT, ALIGNED)
    STEP: tl.constexpr = BN - 2 * HALF  # outputs per tile; tiles overlap by the pooling halo
    n_tiles = tl.cdiv(P, STEP)
    jt0 = pid * tiles_per_prog
    jt1 = tl.minimum(jt0 + tiles_per_prog, n_tiles)
    dd = tl.arange(0, BD)
    dmask = dd < HEAD_D
    a_idx = tl.arange(0, BN)
    band = tl.where(tl.abs(a_idx[:, None] - a_idx[None, :]) <= HALF, 1.0, 0.0)
    central = (a_idx >= HALF) & (a_idx < BN - HALF)
    if ROUND == 1:
        band16 = band.to(tl.bfloat16)
    elif ROUND == 2:
        band16 = band.to(tl.float16)
    else:
        band16 = band
    # ROWSUM_MMA: the row sums of the rounded probabilities (column 0) and pooled values (column 1)
    # accumulate across the tiles in one [BR, 16] product accumulator
    col16 = tl.arange(0, 16)
    sel_m = tl.where(central[:, None] & (col16[None, :] == 0), 1.0, 0.0).to(band16.dtype)
    sel_s = tl.where(central[:, None] & (col16[None, :] == 1), 1.0, 0.0).to(band16.dtype)
    rs_acc = tl.zeros([BR, 16], tl.float32)
    row = ROW + hg * 4 * RP
    # The queries and row statistics of this program's rows, loaded once
    r = rb * BR + tl.arange(0, BR)
    rmask = r < R
    g = r // W
    i = r % W
    qh = (hg * G + g).to(tl.int64)
    q = tl.load(Q + qh[:, None] * sqh + i[:, None] * sqw + dd[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    mx = tl.load(row + r, mask=rmask, other=0.0)
    inv_l = tl.load(row + RP + r, mask=rmask, other=0.0)
    c = tl.load(row + 2 * RP + r, mask=rmask, other=0.0)
    m_acc = tl.zeros([BR], tl.float32)
    s_acc = tl.zeros([BR], tl.float32)
    b_acc = tl.zeros([BR], tl.float32)
    # this row block's share of the column outputs (the fixup merges the row blocks)
    packed_out = PACKED + rb * part_stride
    unp_out = UNP + rb * part_stride

    # Interior tiles (every key in [0, P), outside the bias columns) in a loop of their own,
    # compiled without the masks, edge and bias code, between the edge tiles before and after.
    # (INTERIOR=0: every tile in the first loop)
    if INTERIOR:
        j_int0 = tl.minimum(tl.maximum(jt0, 1 if HALF > 0 else 0), jt1)  # tile 0 starts at key -HALF
        lim = tl.minimum(P, bias_lo)
        j_int1 = tl.minimum(jt1, tl.maximum(lim + HALF - BN + STEP, 0) // STEP)  # t0 + BN <= lim
        j_int1 = tl.maximum(j_int1, j_int0)
    else:
        j_int0 = jt1
        j_int1 = jt1
    for jt in range(jt0, j_int0):
        m_acc, s_acc, b_acc, rs_acc = _p2_tile(
            jt, q, mx, inv_l, c, r, K, BT, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift, hg, P,
            bias_lo, bias_hi, scale_log2, inv_rows, packed_out, unp_out, a_idx, central, band16, sel_m, sel_s,
            m_acc, s_acc, b_acc, rs_acc,
            HALF, KPOOL, BR, BN, ROUND, EXACT, RBITS, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, COLSUM_MMA,
            ROWSUM_MMA, True)
    if INTERIOR:
        for jt in range(j_int0, j_int1):
            m_acc, s_acc, b_acc, rs_acc = _p2_tile(
                jt, q, mx, inv_l, c, r, K, BT, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift, hg, P,
                bias_lo, bias_hi, scale_log2, inv_rows, packed_out, unp_out, a_idx, central, band16, sel_m, sel_s,
                m_acc, s_acc, b_acc, rs_acc,
                HALF, KPOOL, BR, BN, ROUND, EXACT, RBITS, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, COLSUM_MMA,
                ROWSUM_MMA, False)
        for jt in range(j_int1, jt1):
            m_acc, s_acc, b_acc, rs_acc = _p2_tile(
                jt, q, mx, inv_l, c, r, K, BT, h, dd, dmask, skb, skt, skh, skd, block_size, bs_shift, hg, P,
                bias_lo, bias_hi, scale_log2, inv_rows, packed_out, unp_out, a_idx, central, band16, sel_m, sel_s,
                m_acc, s_acc, b_acc, rs_acc,
                HALF, KPOOL, BR, BN, ROUND, EXACT, RBITS, CDT, DOT_PREC, INTERP, BS_POW2, OFF32, COLSUM_MMA,
                ROWSUM_MMA, True)

    if EXACT:
        if ROWSUM_MMA:
            m_acc = tl.sum(tl.where(col16[None, :] == 0, rs_acc, 0.0), 1)
            s_acc = tl.sum(tl.where(col16[None, :] == 1, rs_acc, 0.0), 1) - s_acc
        # This program's own partial row sums: no atomics, so the totals, summed over the programs
        # in a fixed order by _window_sums, are the same on every run.
        sums = PSUMS + (hg * num_progs + pid) * 3 * RP
        tl.store(sums + r, m_acc, mask=rmask)
        tl.store(sums + RP + r, s_acc, mask=rmask)
        tl.store(sums + 2 * RP + r, b_acc, mask=rmask)


@triton.jit(do_not_specialize=["num_progs"])
def _window_sums(PSUMS, SUMS, R, RP, num_progs, BR: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr = 0):
    """Exact row sums: pass 2's per-program partials added in a fixed order (deterministic), one
    program per (rows, pair, sum): [BP programs x BR rows] tiles summed over the programs, the
    tiles in program order. (A loop over one program's partials at a time was a chain of dependent
    loads on few programs: 11.6 us of Qwen's 32K call, now 2.5.)"""
    _pdl_launch(PDL)
    _pdl_wait(PDL)
    rb = tl.program_id(0)
    hg = tl.program_id(1).to(tl.int64)
    k = tl.program_id(2)
    r = rb * BR + tl.arange(0, BR)
    rmask = r < R
    pp = tl.arange(0, BP)
    acc = tl.zeros([BR], tl.float32)
    for p0 in range(0, num_progs, BP):
        pm = (p0 + pp) < num_progs
        ptr = PSUMS + ((hg * num_progs + p0 + pp[:, None]) * 3 + k) * RP + r[None, :]
        acc += tl.sum(tl.load(ptr, mask=pm[:, None] & rmask[None, :], other=0.0), 0)
    tl.store(SUMS + (hg * 3 + k) * RP + r, acc, mask=rmask)


@triton.jit(do_not_specialize=["P", "part_stride"])
def _window_fixup(DMAX, SNAP, UNP, UNPP, PACKEDP, ROW, SUMS, BIAS, P, R, RP, HKV, NRB, NRB_MAX, part_stride,
                  bias_src_stride, bias_src_off,
                  HALF: tl.constexpr, KPOOL: tl.constexpr, BN: tl.constexpr, BRB: tl.constexpr,
                  RBITS: tl.constexpr, ROUND: tl.constexpr, DO_FIX: tl.constexpr, INTERP: tl.constexpr,
                  MERGE: tl.constexpr, PDL: tl.constexpr = 0):
    """Merges pass 2's row blocks (NRB shares of the unpooled mean, added in row-block order; NRB_MAX of
    the packed max: 1 where pass 2 merged them itself by atomic max) and finishes: the defensive max
    with the exact rounded-row sums (pooled / (S + eps) * m, as the reference); SnapKV's pooled mean,
    which is the pooled unpooled mean (pooling is linear: done here, off pass 2's hot loop); the
    window bias of each layer: the mean over its (KV head, row)s of their bias-column mass."""
    _pdl_wait(PDL)
    jt = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    a = tl.arange(0, BN)
    if MERGE:
        # Several row blocks: merge their unpooled means once per key over the program's window
        # (its BN - 2*HALF outputs and the pooling halo), write the merged mean, then pool it from
        # there: NRB + 2*HALF + 1 loads a token instead of NRB * (2*HALF + 2). Neighbouring
        # programs write the same bits to the halo keys they share.
        tw = jt * (BN - 2 * HALF) - HALF + a
        wmask = (tw >= 0) & (tw < P)
        u = tl.zeros([BN], tl.float32)
        for b in range(NRB):
            u += tl.load(UNPP + b * part_stride + h * P + tw, mask=wmask, other=0.0)
        tl.store(UNP + h * P + tw, u, mask=wmask)
        tl.debug_barrier()  # this program's stores are visible to all its threads past here
        t = tw
        tmask = wmask & (a >= HALF) & (a < BN - HALF)
    else:  # one row block: pass 2 wrote the unpooled mean itself (UNPP is UNP)
        t = jt * BN + a
        tmask = t < P
    out = h * P + t
    packed = tl.zeros([BN], tl.int32)  # values >= 0: their bits order like them
    for b in range(NRB_MAX):
        packed = tl.maximum(packed, tl.load(PACKEDP + b * part_stride + out, mask=tmask, other=0))
    win = tl.zeros([BN], tl.float32)
    for k in tl.static_range(2 * HALF + 1):  # zero padding outside [0, P), count_include_pad
        tk = t + (k - HALF)
        win += tl.load(UNP + h * P + tk, mask=tmask & (tk >= 0) & (tk < P), other=0.0)
    tl.store(SNAP + out, _div_const(win, KPOOL), mask=tmask)
    if DO_FIX:
        rr = packed & ((1 << RBITS) - 1)
        val = (packed & (-(1 << RBITS))).to(tl.float32, bitcast=True)
        ok = tmask & (val > 0)
        c = tl.load(ROW + h * 4 * RP + 2 * RP + rr, mask=ok, other=1.0)
        pooled = _round(tl.where(ok, val / c, 0.0), ROUND, INTERP)  # back on probs_dtype's grid: exact
        m = tl.load(SUMS + h * 3 * RP + rr, mask=ok, other=0.0)
        s = tl.load(SUMS + h * 3 * RP + RP + rr, mask=ok, other=1.0)
        tl.store(DMAX + out, tl.where(ok, pooled / (s + 1e-12) * m, 0.0), mask=tmask)
    else:
        tl.store(DMAX + out, packed.to(tl.float32, bitcast=True), mask=tmask)
    if (jt == 0) & (h % HKV == 0):
        acc = tl.zeros([BRB], tl.float32)
        for hh in range(HKV):
            for r0 in range(0, R, BRB):
                r = r0 + tl.arange(0, BRB)
                acc += tl.load(bias_src_off + (h + hh) * bias_src_stride + r, mask=r < R, other=0.0)
        tl.store(BIAS + h // HKV, tl.sum(acc, 0) / (HKV * R))


def _gluon_pass2(cfg: dict, dev: torch.device, rnd: int, half: int, d: int, cdt, kdt):
    """The Gluon pass-2 module where it applies (else None): `p2_gluon` on, CUDA, 16-bit queries,
    keys and probabilities, head dim 64 or 128, pooling halo <= 8. It runs 32-row blocks of the
    window rows (one warp each) whatever `p2_br` says (that is the Triton kernel's setting)."""
    if not (cfg["p2_gluon"] and dev.type == "cuda" and rnd > 0 and half <= 8 and d in (64, 128)
            and cdt == kdt and kdt in (torch.bfloat16, torch.float16)):
        return None
    try:
        from . import _scoring_gluon
    except ImportError:  # a Triton without Gluon
        return None
    return _scoring_gluon


def _gluon_pass1(cfg: dict, dev: torch.device, d: int, rows: int, cdt, kdt):
    """The Gluon pass-1 module where it applies (else None): `p1_gluon` on, a Hopper GPU (warpgroup
    MMA: sm_90 only), 16-bit queries and keys, head dim 64 or 128, at most 8 groups of 32 window rows."""
    if not (cfg["p1_gluon"] and dev.type == "cuda" and d in (64, 128) and cdt == kdt
            and kdt in (torch.bfloat16, torch.float16)):
        return None
    if torch.cuda.get_device_capability(dev) != (9, 0):
        return None
    try:
        from . import _scoring_gluon_pass1 as g1
    except ImportError:  # a Triton without Gluon
        return None
    return g1 if rows <= g1.ROWS_PER_GROUP * g1.MAX_GROUPS else None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _row_block(rows: int, cfg: dict) -> int:
    """Window rows (group x window) per block: `br` where configured (Qwen's shape: 128), else the
    whole group in one block up to 256 rows (every key tile then read once per program: four
    times fewer reads than blocks of 64, the H100-era choice), else blocks of 64."""
    if cfg["br"]:
        return int(cfg["br"])
    if rows <= 256:
        return max(16, _next_pow2(rows))
    return 64


def _warps(br: int, configured: int) -> int:
    """At least one warp per 32 rows of a block (a 256-row block on 4 warps holds 128 elements of
    every tile per thread)."""
    return max(configured, br // 32)


def _p1_warps(br: int, cfg: dict) -> int:
    """Pass 1's warps for blocks of br rows: `_warps` from 128 rows up, else p1_warps up to 4."""
    return _warps(br, cfg["p1_warps"]) if br >= 128 else min(4, cfg["p1_warps"])


def _maxnreg(n: int) -> dict:
    return {"maxnreg": int(n)} if n else {}


def _addressing(cache: torch.Tensor) -> tuple[int, bool, bool]:
    """(block size the kernels use, power of two?, element offsets fit int32?) for a key cache.

    One block (the dense entry points) may be addressed as the next power of two: every valid
    token offset is below it either way."""
    nblocks, block_size, hkv, d = cache.shape
    bs = _next_pow2(block_size) if nblocks == 1 else block_size
    pow2 = bs & (bs - 1) == 0
    last = sum((n - 1) * st for n, st in zip((nblocks, bs, hkv, d), cache.stride()))
    return bs, pow2, last < 2**31


_ROUND = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@functools.lru_cache(maxsize=16)
def _pdl_capable(device_type: str, index: int | None) -> bool:
    """Programmatic dependent launch: CUDA on sm_90 or newer (griddepcontrol), not the interpreter."""
    if device_type != "cuda":
        return False
    return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())[0] >= 9


@functools.lru_cache(maxsize=16)
def _num_sms(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 1


def window_stats(queries, key_cache, block_table, seq_len, pool_kernel=5, scale=None, probs_dtype=None,
                 fix_window_bias=False, window_bias_as_tensor=False, _split_len=None):
    """One layer: queries [Hq, W, d], key_cache [num_blocks, block_size, Hkv, d]."""
    st = window_stats_layers(queries.unsqueeze(0), [key_cache], block_table, seq_len, pool_kernel, scale,
                             probs_dtype, fix_window_bias, _split_len)
    bias = st.window_bias[0]
    return WindowStats(st.defensive_max[0], st.snapkv[0], st.unpooled_mean[0],
                       bias if window_bias_as_tensor else float(bias))


def window_stats_layers(queries, key_caches, block_table, seq_len, pool_kernel=5, scale=None, probs_dtype=None,
                        fix_window_bias=False, _split_len=None, _same_layout=False):
    """Every layer of one request in four launches: queries [layers, Hq, W, d], one key cache per
    layer (the same shape, strides and dtype), one block table. Returns WindowStats with fields
    [layers, Hkv, P] and the window bias as a [layers] device tensor (no sync)."""
    from ._pointers import base_table, same_layout

    lyr, hq, w, d = queries.shape
    if len(key_caches) != lyr or lyr == 0:
        raise ValueError(f"{lyr} layers of queries, {len(key_caches)} key caches")
    if not (_same_layout or same_layout(key_caches)):  # (the public entry point has checked it)
        raise ValueError("every layer's key cache must share shape, strides, dtype and device")
    kc = key_caches[0]
    nblocks, block_size, hkv, dk = kc.shape
    if dk != d:
        raise ValueError(f"query head dim {d} != key head dim {dk}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if pool_kernel < 1 or pool_kernel % 2 == 0 or pool_kernel > 33:
        raise ValueError(f"pool_kernel must be odd and <= 33, got {pool_kernel}")
    if probs_dtype not in _ROUND:
        raise ValueError(f"probs_dtype must be None, float32, bfloat16 or float16, got {probs_dtype}")
    if (hq // hkv) * w > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} window rows per KV head (group x window), got {(hq // hkv) * w}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError("block_table must be int32 or int64")
    g = hq // hkv
    n = int(seq_len)
    p = n - w
    rows = g * w
    pairs = lyr * hkv  # (layer, KV head) pairs: the kernels' head axis
    dev = queries.device
    if not block_table.is_contiguous():
        block_table = block_table.contiguous()
    q = queries.reshape(lyr * hq, w, d)  # query head (layer, h * G + g) = pair * G + g
    cdt = queries.dtype if queries.dtype == kc.dtype and queries.dtype in (torch.bfloat16, torch.float16) \
        else torch.float32
    dot_prec = "ieee" if cdt == torch.float32 else "tf32"
    interp = dev.type == "cpu"
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scale_log2 = scale * LOG2E
    half = pool_kernel // 2
    bd = max(16, _next_pow2(d))
    cfg = _cfg(d)
    br = _row_block(rows, cfg)
    nrb = cdiv(rows, br)
    rnd = _ROUND[probs_dtype]
    gluon = _gluon_pass2(cfg, dev, rnd, half, d, cdt, kc.dtype)
    # pass 2's rows per program (its row blocks run in parallel)
    br2 = gluon.ROWS_PER_PROGRAM if gluon else (int(cfg["p2_br"]) or br)
    nrb2 = cdiv(rows, br2)
    rp = max(nrb * br, nrb2 * br2)
    exact = rnd > 0
    if fix_window_bias:
        bias_lo, bias_hi = p, n
    else:
        bias_lo, bias_hi = max(p - w, 0), p
    sms = _num_sms(dev.type, dev.index)
    pdl = int(cfg["pdl"]) if _pdl_capable(dev.type, dev.index) else 0
    dep = {"launch_pdl": True} if pdl else {}  # the launch option of the kernels that wait

    g1 = _gluon_pass1(cfg, dev, d, rows, cdt, kc.dtype) if _split_len is None else None
    if g1:
        # interior tiles (every key real, below the bias columns and the pooling edge at P) on split
        # programs; the edge tiles on one program per group of 32 rows (split indices 0 .. ng - 1)
        bn1 = g1.KEYS_PER_TILE
        ng1 = cdiv(rows, g1.ROWS_PER_GROUP)
        t_lo = cdiv(half, bn1)
        t_hi = max(t_lo, min(p - half, bias_lo) // bn1)
        n_int = t_hi - t_lo
        target = max(1, cfg["p1_gluon_programs_per_sm"] * sms // pairs)
        tps1 = max(1, cdiv(n_int, target), min(cfg["p1_gluon_min_tiles"], n_int))
        nsplit = ng1 + cdiv(n_int, tps1)
    else:
        bn1 = cfg["p1_bn"]
        if _split_len is None:
            target = max(1, cfg["p1_programs_per_sm"] * sms // max(1, pairs * nrb))
            tiles = cdiv(n, bn1)
            split_tiles = cdiv(tiles, target)
            if dev.type == "cuda":
                # at least p1_min_tiles tiles a split while that still leaves a program per SM: one layer
                # on few pairs would otherwise get splits of one or two tiles, too short to fill pass 1's
                # pipeline (H200, one layer at 32K: Qwen 15.8 -> 12.9 us, Llama 36.5 -> 32.6)
                wave_splits = cdiv(sms, max(1, pairs * nrb))  # splits for one program per SM
                split_tiles = max(split_tiles, min(cfg["p1_min_tiles"], max(1, tiles // wave_splits)))
            split_len = split_tiles * bn1
        else:
            split_len = int(_split_len)
        nsplit = cdiv(n, split_len)
    bn2 = cfg["p2_bn"]
    if 2 * half >= bn2 // 2:
        bn2 = _next_pow2(8 * half)  # keep the tile overlap (2 * half keys) a small fraction
    if gluon:  # no halo: tiles of 32 keys, their outputs lagging half keys behind
        n_tiles = cdiv(p + half, gluon.KEYS_PER_TILE)
    else:
        n_tiles = cdiv(p, bn2 - 2 * half)
    rbits = max(1, (rp - 1).bit_length())  # row index of the max, padded rows included
    per_sm = (cfg["p2_gluon_programs_per_sm"] if gluon else 0) or cfg["p2_programs_per_sm"]
    progs = max(1, per_sm * sms // (pairs * nrb2)) if dev.type == "cuda" else 2
    if dev.type == "cuda":  # (the interpreter keeps 2: the tests exercise the partials' merge)
        # at least MIN_TILES tiles a program: one layer on few KV heads would otherwise get
        # hundreds of programs per pair, whose exact-sum partials `_window_sums` adds one by one
        progs = max(1, min(progs, n_tiles // MIN_TILES))
    if cfg["p2_progs"]:
        progs = int(cfg["p2_progs"])
    tiles_per_prog = cdiv(n_tiles, min(progs, n_tiles))
    nprog = cdiv(n_tiles, tiles_per_prog)

    # one workspace: pass-1 partials | row stats | exact sums | their per-program partials | dmax |
    # snap | unp | pass 2's row-block shares of unp (none with one row block: unp is its share) and
    # of the packed max | bias
    psize = pairs * nprog * 3 * rp if exact else 0
    # Every part starts 128-byte aligned: Triton specialises pointer arguments on 16-byte alignment,
    # so unpadded parts after a [pairs, P] one made the alignment of the next follow P's parity (a
    # fresh compile inside an engine step for a prompt of the other parity, seen on the GPU).
    pstride = cdiv(pairs * p, 32) * 32
    sizes = [pairs * nsplit * 5 * rp, pairs * 4 * rp, pairs * 3 * rp, psize, pairs * p, pairs * p, pairs * p,
             nrb2 * pstride if nrb2 > 1 else 0, nrb2 * pstride, lyr]
    atomic_max = bool(gluon and cfg["p2_gluon_atomic_max"] and nrb2 > 1)
    if atomic_max:
        sizes[8] = pstride
    padded = [cdiv(x, 32) * 32 for x in sizes]
    ws = torch.empty(sum(padded), dtype=torch.float32, device=dev)
    part, rowstats, sums, psums, dmax, snap, unp, unpp, packedp, bias = (
        x[:n_] for x, n_ in zip(ws.split(padded), sizes))
    packedp = packedp.view(torch.int32)
    if nrb2 == 1:
        unpp = unp
    zero_len = packedp.numel() if atomic_max else 0  # the atomic-max share starts at zero
    kptrs, aligned = base_table(key_caches, dev)
    kstrides = (kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3))
    bs_eff, bs_pow2, off32 = _addressing(kc)
    bs_shift = bs_eff.bit_length() - 1

    if g1:
        fast(g1.window_pass1_gluon)[(nsplit, pairs)](
            q, kptrs, block_table, part,
            q.stride(0), q.stride(1), q.stride(2), *kstrides, bs_eff, bs_shift, hkv,
            n, p, w, g, rows, rp, bias_lo, bias_hi, t_lo, t_hi, tps1, nsplit, scale_log2,
            HALF=half, KPOOL=pool_kernel, BD=d, NG=ng1, KDT=_TL[kc.dtype], ALIGNED=aligned, BS_POW2=bs_pow2,
            OFF32=off32, STAGES=int(cfg["p1_gluon_stages"]), NPOLY=int(cfg["p1_gluon_npoly"]),
            AHEAD=bool(cfg["p1_gluon_ahead"]),
            num_warps=4, **_maxnreg(cfg["p1_gluon_maxnreg"]),
        )
    else:
        fast(_window_pass1)[(nrb, nsplit, pairs)](
            q, kptrs, block_table, part, packedp,
            q.stride(0), q.stride(1), q.stride(2), *kstrides, bs_eff, bs_shift, hkv,
            n, p, w, g, rows, rp, d, bias_lo, bias_hi, split_len, nsplit, scale_log2, zero_len,
            HALF=half, KPOOL=pool_kernel, BR=br, BN=bn1, BD=bd, CDT=_TL[cdt], KDT=_TL[kc.dtype], ALIGNED=aligned,
            DOT_PREC=dot_prec, INTERP=interp, BS_POW2=bs_pow2, OFF32=off32, FIXED=bool(cfg["p1_fixed_offset"]),
            NPOLY=int(cfg["p1_npoly"]) if cfg["p1_fixed_offset"] else 0, PDL=pdl,
            num_warps=_p1_warps(br, cfg), num_stages=cfg["p1_stages"],
            **_maxnreg(cfg["p1_maxnreg"]),
        )
    # [COMBINE_SPLITS x COMBINE_ROWS] tiles on programs of their own row blocks (not pass 1's): one
    # layer's few pairs have hundreds of splits, which 128-row programs merged 16 at a time in a
    # chain of dependent loads (H200, one layer at 32K: 55 us for Qwen's shape, half the call).
    # BS does not follow nsplit (a constexpr that did would compile a variant per prompt-length range).
    # (behind the Gluon pass 1 it zeroes the atomic-max share; the Triton pass 1 does)
    fast(_window_combine)[(cdiv(rows, COMBINE_ROWS), pairs)](
        part, rowstats, packedp, rows, rp, nsplit, zero_len if g1 else 0,
        BR=COMBINE_ROWS, BS=COMBINE_SPLITS, BZ=ZERO_TILE, PDL=pdl, num_warps=4, **dep)
    if gluon:
        fast(gluon.window_pass2_gluon)[(nrb2 * nprog, pairs)](
            q, kptrs, block_table, rowstats, packedp, unpp, psums,
            q.stride(0), q.stride(1), q.stride(2), *kstrides, bs_eff, bs_shift, hkv,
            p, w, g, rows, rp, nrb2, pstride, tiles_per_prog, nprog, scale_log2, 1.0 / rows, bias_lo, bias_hi, half,
            HALF=half, KPOOL=pool_kernel, BD=d, RBITS=rbits, PDT=_TL[probs_dtype], KDT=_TL[kc.dtype], ALIGNED=aligned,
            BS_POW2=bs_pow2, OFF32=off32, STAGES=int(cfg["p2_gluon_stages"]), Q_SMEM=bool(cfg["p2_gluon_q_smem"]),
            ATOMIC_MAX=atomic_max, MOVM=bool(cfg["p2_gluon_movm"]), PDL=pdl, INNER=int(cfg["p2_gluon_inner"]),
            num_warps=1, **_maxnreg(cfg["p2_gluon_maxnreg"]), **dep,
        )
    else:
        fast(_window_pass2)[(nrb2 * nprog, pairs)](
            q, kptrs, block_table, rowstats, packedp, unpp, psums,
            q.stride(0), q.stride(1), q.stride(2), *kstrides, bs_eff, bs_shift, hkv,
            p, w, g, rows, rp, d, nrb2, pstride, tiles_per_prog, nprog, scale_log2, 1.0 / rows, bias_lo, bias_hi,
            HALF=half, KPOOL=pool_kernel, BR=br2, BN=bn2, BD=bd, ROUND=rnd, EXACT=exact, RBITS=rbits, CDT=_TL[cdt],
            KDT=_TL[kc.dtype], ALIGNED=aligned, DOT_PREC=dot_prec, INTERP=interp,
            BS_POW2=bs_pow2, OFF32=off32, COLSUM_MMA=bool(cfg["p2_colsum_mma"]) and rnd > 0,
            ROWSUM_MMA=bool(cfg["p2_rowsum_mma"]) and rnd > 0, INTERIOR=bool(cfg["p2_interior_loop"]),
            num_warps=_warps(br2, cfg["p2_warps"]), num_stages=cfg["p2_stages"],
            **_maxnreg(cfg["p2_maxnreg"]),
        )
    if exact:
        fast(_window_sums)[(cdiv(rows, SUMS_TILE), pairs, 3)](
            psums, sums, rows, rp, nprog, BR=SUMS_TILE, BP=SUMS_TILE, PDL=pdl, num_warps=1, **dep)
    if exact and not fix_window_bias:  # exact sum of the rounded probabilities, as the reference
        bias_src, bias_stride, bias_off = sums, 3 * rp, 2 * rp
    else:
        bias_src, bias_stride, bias_off = rowstats, 4 * rp, 3 * rp
    fix_bn = int(cfg["fix_bn"])
    fix_step = fix_bn - 2 * half if nrb2 > 1 else fix_bn  # (merging programs overlap by the halo)
    fast(_window_fixup)[(cdiv(p, fix_step), pairs)](
        dmax, snap, unp, unpp, packedp, rowstats, sums, bias, p, rows, rp, hkv, nrb2, 1 if atomic_max else nrb2,
        pstride, bias_stride, bias_src[bias_off:],
        HALF=half, KPOOL=pool_kernel, BN=fix_bn, BRB=min(128, max(16, _next_pow2(rows))), RBITS=rbits, ROUND=rnd,
        DO_FIX=exact, INTERP=interp, MERGE=nrb2 > 1, PDL=pdl, num_warps=int(cfg["fix_warps"]), **dep,
    )
    return WindowStats(dmax.view(lyr, hkv, p), snap.view(lyr, hkv, p), unp.view(lyr, hkv, p), bias)
