"""Pass 1 of the window scoring in Gluon on Hopper (sm_90): the softmax statistics of every window row.

Off by default (`_scoring.CONFIG["p1_gluon"]`): correct (GPU tests) but so far slower than the Triton
pass 1 (H200, Qwen2.5-0.5B's shape, every layer at 32K: 190 us against 175; see CONFIG).

Same outputs as `_scoring._window_pass1` (per split and row: the offset m, and the sums l_all, l_pre,
s_def, l_b of exp2(s * scale_log2 - m)), merged by the same `_window_combine`. What changes:

* One warpgroup a (KV head, key split) runs every window row of the group, with the keys on the
  product's M axis: S^T = K Q^T by warpgroup MMA (the key tile the A operand, from registers), one
  [64 keys, 32 rows] product per group of 32 rows (7 for Qwen2.5-0.5B's 224 rows, 4 for
  Llama-3.1-8B's 128). No padded rows (the Triton kernel pads 224 to 256), and the key tile is
  copied once for all of them.
* No per-tile reductions. The sums stay in the registers of the product (each thread's two keys of
  a row added in-thread: 8 registers a group) and are reduced over the keys once, at the end. The
  offset is one number per group, the group's maximum over the split's first tile, not a running
  maximum: a sum is exact whatever offset it is taken against (the combine and pass 2 only need
  exp2(s - m) finite and l_all not lost to underflow). If a later key lifts a row past that (l
  outside [2^-100, 2^100]: scores ~100 octaves from the first tile's), the program recomputes its
  split exactly, with each row's running maximum (`_exact_group`), so nothing rides on the guess.
* Optionally part of the exponentials on the FMA pipe: the first NPOLY groups use a degree-5
  polynomial (max relative error 2.1e-7, as MUFU.EX2's 2^-22.5) instead of MUFU.EX2, whose 16
  results a clock per SM bound pass 1 on paper. Measured, the kernel is not MUFU-bound (ncu, H200:
  1.8-3 warps a scheduler, its stalls fixed-latency dependencies, barriers and shared memory), and
  NPOLY = 1 was slower.
* The edge tiles (the first, whose pooling window is cut, and those from the bias columns to the
  end: the causal mask, the bias columns, the pooling edge at P) run on programs of their own, one
  per group (split indices 0 .. NG - 1; the rows of the other groups are written empty), exactly.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from ._scoring import EXP2_POLY_ASM
from ._scoring_gluon import _row_offsets  # keys' element offsets in the paged cache (mask: t < its bound)

KEYS_PER_TILE = 64
ROWS_PER_GROUP = 32
MAX_GROUPS = 8
BN = gl.constexpr(KEYS_PER_TILE)
BG = gl.constexpr(ROWS_PER_GROUP)

MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 32, 16]))
KEYS = gl.constexpr(gl.SliceLayout(1, MMA.value))  # a vector along the keys (axis 0 of a product)
ROWS = gl.constexpr(gl.SliceLayout(0, MMA.value))  # along the rows (axis 1)
# 16-byte chunks, eight lanes a key (see _scoring_gluon.COPY)
COPY = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))
SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
# the key tile as the A operand in registers (ldmatrix from the ring): the tensor cores then read only
# the queries from shared memory, written once, so the copies need no proxy fence each tile (it
# compiles to MEMBAR.ALL.CTA; H200, Qwen at 32K: 250 -> 238 us without it)
OPA = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
LIMIT_HI = gl.constexpr(2.0 ** 100)  # outside [1 / LIMIT_HI, LIMIT_HI] a fast-path sum is recomputed
LIMIT_LO = gl.constexpr(2.0 ** -100)


@gluon.jit
def _exp2_poly(x):
    """exp2 on the FMA pipe (`_scoring.EXP2_POLY_ASM`: a degree-5 polynomial, MUFU.EX2's accuracy)."""
    return gl.inline_asm_elementwise(EXP2_POLY_ASM, "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _scores(kb, qs, g: gl.constexpr):
    """Start S^T = K Q_g^T for group g: [64 keys, 32 rows] (asynchronous: a token to wait on). kb:
    the key tile in shared memory or in registers (OPA)."""
    qt = qs.index(g).permute([1, 0])
    return warpgroup_mma(kb, qt, gl.zeros([BN, BG], gl.float32, MMA), use_acc=False, is_async=True)


@gluon.jit
def _exp_group(s, m, scale_log2, g: gl.constexpr, NPOLY: gl.constexpr):
    x = s * scale_log2 - m
    if g < NPOLY:
        return _exp2_poly(x)
    else:
        return gl.exp2(x)


@gluon.jit
def _fold(p):
    """[BN keys, 32 rows] -> [4, 8, 32]: each thread's keys of a row (rows r + 8b + 64c of its warp's
    16 in each 64-key block of the product's layout) added in-thread: a group's sums in 8 registers."""
    return gl.sum(gl.sum(gl.reshape(p, [BN // 64, 4, 2, 8, BG]), 2), 0)


@gluon.jit
def _tile_sums(kb, qs, a0, a1, a2, a3, a4, a5, a6, a7, m0, m1, m2, m3, m4, m5, m6, m7, scale_log2,
               NG: gl.constexpr, NPOLY: gl.constexpr, AHEAD: gl.constexpr):
    """One interior tile: every group's exp2(s - m) added to its accumulator. AHEAD: group g + 1's
    product in flight while group g's exponentials run (16 registers more)."""
    t = _scores(kb, qs, 0)
    # (no lists of tensors in Gluon: a name per group's accumulator and offset, picked at compile time)
    for g in gl.static_range(NG):
        if AHEAD and g + 1 < NG:
            t_next = _scores(kb, qs, g + 1)
            s = warpgroup_mma_wait(1, deps=[t])
        else:
            s = warpgroup_mma_wait(0, deps=[t])
            if g + 1 < NG:
                t_next = _scores(kb, qs, g + 1)
        if g == 0:
            a0 += _fold(_exp_group(s, m0, scale_log2, 0, NPOLY))
        elif g == 1:
            a1 += _fold(_exp_group(s, m1, scale_log2, 1, NPOLY))
        elif g == 2:
            a2 += _fold(_exp_group(s, m2, scale_log2, 2, NPOLY))
        elif g == 3:
            a3 += _fold(_exp_group(s, m3, scale_log2, 3, NPOLY))
        elif g == 4:
            a4 += _fold(_exp_group(s, m4, scale_log2, 4, NPOLY))
        elif g == 5:
            a5 += _fold(_exp_group(s, m5, scale_log2, 5, NPOLY))
        elif g == 6:
            a6 += _fold(_exp_group(s, m6, scale_log2, 6, NPOLY))
        else:
            a7 += _fold(_exp_group(s, m7, scale_log2, 7, NPOLY))
        if g + 1 < NG:
            t = t_next
    return a0, a1, a2, a3, a4, a5, a6, a7


@gluon.jit
def _first_max(kb, qs, g: gl.constexpr, R, scale_log2):
    """Group g's offset: its maximum over the first tile, scaled (0 if it has no real row)."""
    s = warpgroup_mma_wait(0, deps=[_scores(kb, qs, g)])
    r = g * BG + gl.arange(0, BG, layout=ROWS)
    mx = gl.max(gl.max(gl.where((r < R)[None, :], s, float("-inf")), 1), 0) * scale_log2
    return gl.where(mx == float("-inf"), 0.0, mx)


@gluon.jit
def _issue(ring, i, ro, K, dd, skd, STAGES: gl.constexpr):
    ptr = K + gl.convert_layout(ro, gl.SliceLayout(1, COPY))[:, None] + dd[None, :] * skd
    async_copy.async_copy_global_to_shared(ring.index(i % STAGES), ptr)


@gluon.jit
def _store_rows(base, RP, g: gl.constexpr, R, m, l_all, l_pre, s_def, l_b):
    r = g * BG + gl.arange(0, BG, layout=ROWS)
    rm = r < R
    gl.store(base + r, m, mask=rm)
    gl.store(base + RP + r, l_all, mask=rm)
    gl.store(base + 2 * RP + r, l_pre, mask=rm)
    gl.store(base + 3 * RP + r, s_def, mask=rm)
    gl.store(base + 4 * RP + r, l_b, mask=rm)


@gluon.jit
def _finish(acc, m, base, RP, g: gl.constexpr, R):
    """A fast-path group's sums reduced over the keys and stored; returns whether they are in range."""
    l = gl.convert_layout(gl.sum(gl.sum(acc, 0), 0), ROWS)
    zero = gl.zeros([BG], gl.float32, ROWS)
    _store_rows(base, RP, g, R, zero + m, l, l, zero, zero)
    r = g * BG + gl.arange(0, BG, layout=ROWS)
    ok = (l >= LIMIT_LO) & (l <= LIMIT_HI)  # (false for NaN)
    return gl.max(gl.where((r < R) & ~ok, 1, 0), 0)


@gluon.jit
def _tile_scores(kb_s, K, BT, qs, g: gl.constexpr, jt, L, h, dd, skb, skt, skh, skd, block_size, bs_shift,
                 BS_POW2: gl.constexpr, OFF32: gl.constexpr):
    """Group g's scores against tile jt, the keys loaded straight into one shared buffer (the exact
    path: few tiles)."""
    t = jt * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, COPY))
    ro = _row_offsets(BT, t, L, h, skb, skt, skh, block_size, bs_shift, BS_POW2, OFF32)
    k = gl.load(K + ro[:, None] + dd[None, :] * skd, mask=(t < L)[:, None], other=0.0)
    gl.thread_barrier()  # everyone is done with the buffer's previous tile
    kb_s.store(k)
    fence_async_shared()
    gl.thread_barrier()
    return warpgroup_mma_wait(0, deps=[_scores(kb_s, qs, g)])


@gluon.jit
def _exact_group(kb_s, K, BT, qs, g: gl.constexpr, a0, a1, b0, b1, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                 skb, skt, skh, skd, block_size, bs_shift, scale_log2,
                 HALF: gl.constexpr, KPOOL: gl.constexpr, BS_POW2: gl.constexpr, OFF32: gl.constexpr):
    """Group g over the tiles [a0, a1) and [b0, b1), exactly as the Triton kernel: each row's maximum
    first (one pass over the tiles), then its sums against it, with the causal mask, the pooling
    edges and the bias columns."""
    r = g * BG + gl.arange(0, BG, layout=ROWS)
    lim = P + r % W  # window row i sees keys <= P + i
    rm = r < R
    mx2 = gl.full([BN, BG], float("-inf"), gl.float32, MMA)
    n = (a1 - a0) + (b1 - b0)
    for it in range(0, n):
        jt = a0 + it
        if it >= a1 - a0:
            jt = b0 + it - (a1 - a0)
        s = _tile_scores(kb_s, K, BT, qs, g, jt, L, h, dd, skb, skt, skh, skd, block_size, bs_shift, BS_POW2, OFF32)
        t = jt * BN + gl.arange(0, BN, layout=KEYS)
        vis = (t[:, None] < L) & (t[:, None] <= lim[None, :]) & rm[None, :]
        mx2 = gl.maximum(mx2, gl.where(vis, s, float("-inf")))
    m = gl.max(mx2, 0) * scale_log2
    m = gl.where(m == float("-inf"), 0.0, m)
    l_all = gl.zeros([BN, BG], gl.float32, MMA)
    l_pre = gl.zeros([BN, BG], gl.float32, MMA)
    s_def = gl.zeros([BN, BG], gl.float32, MMA)
    l_b = gl.zeros([BN, BG], gl.float32, MMA)
    for it in range(0, n):
        jt = a0 + it
        if it >= a1 - a0:
            jt = b0 + it - (a1 - a0)
        s = _tile_scores(kb_s, K, BT, qs, g, jt, L, h, dd, skb, skt, skh, skd, block_size, bs_shift, BS_POW2, OFF32)
        t = jt * BN + gl.arange(0, BN, layout=KEYS)
        vis = (t[:, None] < L) & (t[:, None] <= lim[None, :]) & rm[None, :]
        p = gl.where(vis, gl.exp2(s * scale_log2 - m[None, :]), 0.0)
        l_all += p
        l_pre += gl.where((t < P)[:, None], p, 0.0)
        if HALF > 0:
            cnt = gl.minimum(t + HALF, P - 1) - gl.maximum(t - HALF, 0) + 1
            deficit = gl.where(t < P, 1.0 - cnt.to(gl.float32) / KPOOL, 0.0)
            s_def += p * deficit[:, None]
        l_b += gl.where(((t >= bias_lo) & (t < bias_hi))[:, None], p, 0.0)
    _store_rows(base, RP, g, R, m, gl.sum(l_all, 0), gl.sum(l_pre, 0), gl.sum(s_def, 0), gl.sum(l_b, 0))


@gluon.jit(do_not_specialize=["L", "P", "bias_lo", "bias_hi", "t_lo", "t_hi", "tiles_per_split", "num_splits",
                              "block_size", "bs_shift"])
def window_pass1_gluon(
    Q, KPTRS, BT, PART,
    sqh, sqw, sqd, skb, skt, skh, skd, block_size, bs_shift, HKV,
    L, P, W, G, R, RP, bias_lo, bias_hi, t_lo, t_hi, tiles_per_split, num_splits, scale_log2,
    HALF: gl.constexpr, KPOOL: gl.constexpr, BD: gl.constexpr, NG: gl.constexpr, KDT: gl.constexpr,
    ALIGNED: gl.constexpr, BS_POW2: gl.constexpr, OFF32: gl.constexpr, STAGES: gl.constexpr,
    NPOLY: gl.constexpr, AHEAD: gl.constexpr,
):
    sp = gl.program_id(0)  # 0 .. NG - 1: the edge tiles of group sp; NG ..: interior splits
    hg = gl.program_id(1).to(gl.int64)  # (layer, KV head) pair
    K = gl.load(KPTRS + hg // HKV).to(gl.pointer_type(KDT))
    if ALIGNED:
        K = gl.multiple_of(K, 16)
    h = hg % HKV
    base = PART + ((hg * num_splits + sp) * 5) * RP

    # every group's queries in shared memory: group g holds rows g * 32 ..
    dd = gl.arange(0, BD, layout=gl.SliceLayout(0, COPY))
    qs = gl.allocate_shared_memory(KDT, [NG, BG, BD], SMEM)
    for g in gl.static_range(NG):
        rq = g * BG + gl.arange(0, BG, layout=gl.SliceLayout(1, COPY))
        qh = (hg * G + rq // W).to(gl.int64)
        q = gl.load(Q + qh[:, None] * sqh + (rq % W)[:, None] * sqw + dd[None, :] * sqd, mask=(rq < R)[:, None],
                    other=0.0)
        qs.index(g).store(q.to(KDT))
    n_tiles = gl.cdiv(L, BN)

    if sp < NG:
        kb_s = gl.allocate_shared_memory(KDT, [BN, BD], SMEM)
        fence_async_shared()
        zero = gl.zeros([BG], gl.float32, ROWS)
        for g in gl.static_range(NG):  # the other groups' rows of this split: empty
            if g != sp:
                _store_rows(base, RP, g, R, zero + float("-inf"), zero, zero, zero, zero)
        for g in gl.static_range(NG):
            if g == sp:
                _exact_group(kb_s, K, BT, qs, g, 0, t_lo, t_hi, n_tiles, base, RP, L, P, W, R, bias_lo, bias_hi,
                             h, dd, skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL, BS_POW2, OFF32)
    else:
        jt0 = t_lo + (sp - NG) * tiles_per_split
        jt1 = gl.minimum(jt0 + tiles_per_split, t_hi)
        zero = gl.zeros([BG], gl.float32, ROWS)
        if jt0 >= jt1:  # no tiles left for this split
            for g in gl.static_range(NG):
                _store_rows(base, RP, g, R, zero + float("-inf"), zero, zero, zero, zero)
        else:
            fence_async_shared()
            ring = gl.allocate_shared_memory(KDT, [STAGES, BN, BD], SMEM)
            tk = gl.arange(0, BN, layout=gl.SliceLayout(1, COPY))
            for s in gl.static_range(STAGES - 1):
                if jt0 + s < jt1:
                    ro = _row_offsets(BT, (jt0 + s) * BN + tk, L, h, skb, skt, skh, block_size, bs_shift,
                                      BS_POW2, OFF32)
                    _issue(ring, jt0 + s, ro, K, dd, skd, STAGES)
                async_copy.commit_group()
            ro_next = _row_offsets(BT, (jt0 + STAGES - 1) * BN + tk, L, h, skb, skt, skh, block_size, bs_shift,
                                   BS_POW2, OFF32)

            # the first tile: each group's offset
            async_copy.wait_group(STAGES - 2)
            fence_async_shared()
            gl.thread_barrier()
            kb = ring.index(jt0 % STAGES)
            m0 = _first_max(kb, qs, 0, R, scale_log2)
            m1 = m0
            m2 = m0
            m3 = m0
            m4 = m0
            m5 = m0
            m6 = m0
            m7 = m0
            if NG > 1:
                m1 = _first_max(kb, qs, 1, R, scale_log2)
            if NG > 2:
                m2 = _first_max(kb, qs, 2, R, scale_log2)
            if NG > 3:
                m3 = _first_max(kb, qs, 3, R, scale_log2)
            if NG > 4:
                m4 = _first_max(kb, qs, 4, R, scale_log2)
            if NG > 5:
                m5 = _first_max(kb, qs, 5, R, scale_log2)
            if NG > 6:
                m6 = _first_max(kb, qs, 6, R, scale_log2)
            if NG > 7:
                m7 = _first_max(kb, qs, 7, R, scale_log2)
            a0 = _fold(gl.zeros([BN, BG], gl.float32, MMA))
            a1 = a0
            a2 = a0
            a3 = a0
            a4 = a0
            a5 = a0
            a6 = a0
            a7 = a0
            for i in range(jt0, jt1):
                if i > jt0:
                    async_copy.wait_group(STAGES - 2)  # tile i has landed (this thread's copies) ...
                    gl.thread_barrier()  # ... everyone's, and the slot of tile i - 1 is free
                ka = ring.index(i % STAGES).load(OPA)
                nxt = i + STAGES - 1
                if nxt < jt1:
                    _issue(ring, nxt, ro_next, K, dd, skd, STAGES)
                async_copy.commit_group()
                ro_next = _row_offsets(BT, (nxt + 1) * BN + tk, L, h, skb, skt, skh, block_size, bs_shift,
                                       BS_POW2, OFF32)
                a0, a1, a2, a3, a4, a5, a6, a7 = _tile_sums(
                    ka, qs, a0, a1, a2, a3, a4, a5, a6, a7, m0, m1, m2, m3, m4, m5, m6, m7,
                    scale_log2, NG, NPOLY, AHEAD)
            async_copy.wait_group(0)

            bad = _finish(a0, m0, base, RP, 0, R)
            if NG > 1:
                bad |= _finish(a1, m1, base, RP, 1, R)
            if NG > 2:
                bad |= _finish(a2, m2, base, RP, 2, R)
            if NG > 3:
                bad |= _finish(a3, m3, base, RP, 3, R)
            if NG > 4:
                bad |= _finish(a4, m4, base, RP, 4, R)
            if NG > 5:
                bad |= _finish(a5, m5, base, RP, 5, R)
            if NG > 6:
                bad |= _finish(a6, m6, base, RP, 6, R)
            if NG > 7:
                bad |= _finish(a7, m7, base, RP, 7, R)
            if bad != 0:  # a key far above the first tile's (or far below): this split again, exactly
                gl.thread_barrier()  # (the stores above are this program's own: overwritten in order)
                kb_s = ring.index(0)
                for g in gl.static_range(NG):
                    _exact_group(kb_s, K, BT, qs, g, jt0, jt1, 0, 0, base, RP, L, P, W, R, bias_lo, bias_hi,
                                 h, dd, skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL,
                                 BS_POW2, OFF32)
