"""Pass 1 of the window scoring in Gluon (sm_80+): the softmax statistics of every window row, on
one-warp programs of 32 rows.

Same outputs as `_scoring._window_pass1` (per split and row: the offset m, and the sums l_all, l_pre,
s_def, l_b of exp2(s * scale_log2 - m)), merged by the same `_window_combine`; the host code picks it
with `p1_gluon` (`_scoring._gluon_pass1`). What changes against the Triton kernel:

* A program is one group of 32 window rows (one warp, the rows on the M axis of mma.sync, the queries
  in registers for the whole run) over a split of the key tiles, as pass 2's programs are
  (`_scoring_gluon`: the same key ring, the same copies). The group's row blocks are neighbours in
  launch order and read the same tiles from L2. No padded rows: Qwen2.5-0.5B's 224 rows a KV head are
  seven programs, where the Triton kernel's 128-row blocks compute 256. (The Triton kernel on 32-row
  blocks of one warp: 14.8 SASS instructions an element, spills, no copy pipelining; 6.0 on 128.)
* The interior tiles (every key real, clear of the pooling edges and the bias columns) need only
  l_all = l_pre, which each thread adds up in the registers of the product; the sums over the keys
  happen once, at the end. The offset is each row's maximum over the split's first tile, not a
  running maximum: a sum is exact against any offset (the combine and pass 2 only need exp2(s - m)
  finite and l_all not lost). If a row's sum leaves [2^-100, 2^100] (a later key ~100 octaves above
  the first tile's), the program recomputes its split exactly with running maxima (`_exact_group`).
* The edge tiles (the first, whose pooling window is cut, and those from the bias columns or the
  pooling edge at P to the end: the causal mask, the bias columns, the deficit of the pooled row
  sums) run on split 0, one program per group, exactly: each row's maximum first, then its sums.

Grid: (groups x splits, (layer, KV head) pairs); program (sp * groups + g) is group g of split sp.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from ._scoring_gluon import AX0, AX1, BN, BR, COPY, KEYS1, KEYS_SMEM, MMA, OPA, OPB, _issue, _row_offsets, _scores

ROWS_PER_GROUP = 32  # window rows per program (one warp)
KEYS_PER_TILE = 32  # keys per tile (two 16-key products), as pass 2's
LIMIT_HI = gl.constexpr(2.0 ** 100)  # outside [1 / LIMIT_HI, LIMIT_HI] a fast-path sum is recomputed
LIMIT_LO = gl.constexpr(2.0 ** -100)


@gluon.jit
def _store_rows(base, RP, r, R, m, l_all, l_pre, s_def, l_b):
    rm = r < R
    gl.store(base + r, m, mask=rm)
    gl.store(base + RP + r, l_all, mask=rm)
    gl.store(base + 2 * RP + r, l_pre, mask=rm)
    gl.store(base + 3 * RP + r, s_def, mask=rm)
    gl.store(base + 4 * RP + r, l_b, mask=rm)


@gluon.jit
def _half_scores(q, K, BT, t0, L, h, dd, skb, skt, skh, skd, block_size, bs_shift,
                 BS_POW2: gl.constexpr, OFF32: gl.constexpr):
    """The rows' scores against keys t0 .. t0 + 15, loaded straight from the cache (the exact path:
    few tiles; keys at or past L read as zeros)."""
    t = t0 + gl.arange(0, 16, layout=gl.SliceLayout(1, COPY))
    ro = _row_offsets(BT, t, L, h, skb, skt, skh, block_size, bs_shift, BS_POW2, OFF32)
    k = gl.load(K + ro[:, None] + dd[None, :] * skd, mask=(t < L)[:, None], other=0.0)
    return _scores(q, gl.convert_layout(gl.permute(k, [1, 0]), OPB))


@gluon.jit
def _exact_group(q, K, BT, r, a0, a1, b0, b1, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                 skb, skt, skh, skd, block_size, bs_shift, scale_log2,
                 HALF: gl.constexpr, KPOOL: gl.constexpr, BS_POW2: gl.constexpr, OFF32: gl.constexpr):
    """The group's rows r over the tiles [a0, a1) and [b0, b1), exactly as the Triton kernel: each
    row's maximum first (one pass over the tiles), then its sums against it, with the causal mask,
    the pooling edges and the bias columns."""
    lim = P + r % W  # window row i sees keys <= P + i
    rm = r < R
    k16 = gl.arange(0, 16, layout=AX1)
    n = (a1 - a0) + (b1 - b0)
    mx = gl.full([BR], float("-inf"), gl.float32, AX0)
    for it in range(0, n):
        jt = a0 + it
        if it >= a1 - a0:
            jt = b0 + it - (a1 - a0)
        for part in gl.static_range(2):
            t = jt * BN + part * 16 + k16
            s = _half_scores(q, K, BT, jt * BN + part * 16, L, h, dd, skb, skt, skh, skd, block_size, bs_shift,
                             BS_POW2, OFF32)
            vis = (t[None, :] < L) & (t[None, :] <= lim[:, None]) & rm[:, None]
            mx = gl.maximum(mx, gl.max(gl.where(vis, s, float("-inf")), 1))
    m = mx * scale_log2
    m = gl.where(m == float("-inf"), 0.0, m)
    l_all = gl.zeros([BR, 16], gl.float32, MMA)
    l_pre = l_all
    s_def = l_all
    l_b = l_all
    for it in range(0, n):
        jt = a0 + it
        if it >= a1 - a0:
            jt = b0 + it - (a1 - a0)
        for part in gl.static_range(2):
            t = jt * BN + part * 16 + k16
            s = _half_scores(q, K, BT, jt * BN + part * 16, L, h, dd, skb, skt, skh, skd, block_size, bs_shift,
                             BS_POW2, OFF32)
            vis = (t[None, :] < L) & (t[None, :] <= lim[:, None]) & rm[:, None]
            p = gl.where(vis, gl.exp2(s * scale_log2 - m[:, None]), 0.0)
            l_all += p
            l_pre += gl.where((t < P)[None, :], p, 0.0)
            if HALF > 0:
                cnt = gl.minimum(t + HALF, P - 1) - gl.maximum(t - HALF, 0) + 1
                deficit = gl.where(t < P, 1.0 - cnt.to(gl.float32) / KPOOL, 0.0)
                s_def += p * deficit[None, :]
            l_b += gl.where(((t >= bias_lo) & (t < bias_hi))[None, :], p, 0.0)
    _store_rows(base, RP, r, R, m, gl.sum(l_all, 1), gl.sum(l_pre, 1), gl.sum(s_def, 1), gl.sum(l_b, 1))


@gluon.jit
def _queries(Q, hg, g, sqh, sqw, sqd, dd, G, W, R, KDT: gl.constexpr):
    """Group g's queries [32 rows, d] as an A operand (rows past R: zeros)."""
    rq = g * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, COPY))
    qh = (hg * G + rq // W).to(gl.int64)
    q = gl.load(Q + qh[:, None] * sqh + (rq % W)[:, None] * sqw + dd[None, :] * sqd, mask=(rq < R)[:, None],
                other=0.0)
    return gl.convert_layout(q.to(KDT), OPA)


@gluon.jit
def _first_max(q, kt_lo, kt_hi, scale_log2):
    """The rows' offsets: their maximum over the split's first tile, scaled (padded rows: 0)."""
    return gl.maximum(gl.max(_scores(q, kt_lo), 1), gl.max(_scores(q, kt_hi), 1)) * scale_log2


@gluon.jit
def _tile_exp(q, kt_lo, kt_hi, m, scale_log2):
    """exp2(s - m) of the rows against a tile's two 16-key halves, added elementwise: [32 rows, 16]."""
    return gl.exp2(_scores(q, kt_lo) * scale_log2 - m[:, None]) + gl.exp2(_scores(q, kt_hi) * scale_log2 - m[:, None])


@gluon.jit
def _finish(acc, m, r, base, RP, R):
    """A fast-path group's sums reduced over the keys and stored; returns whether one is out of range."""
    l = gl.sum(acc, 1)
    zero = gl.zeros([BR], gl.float32, AX0)
    _store_rows(base, RP, r, R, m, l, l, zero, zero)
    ok = (l >= LIMIT_LO) & (l <= LIMIT_HI)  # (false for NaN)
    return gl.max(gl.where((r < R) & ~ok, 1, 0), 0)


@gluon.jit(do_not_specialize=["L", "P", "bias_lo", "bias_hi", "t_lo", "t_hi", "tiles_per_split", "num_splits",
                              "block_size", "bs_shift"])
def window_pass1_gluon(
    Q, KPTRS, BT, PART,
    sqh, sqw, sqd, skb, skt, skh, skd, block_size, bs_shift, HKV,
    L, P, W, G, R, RP, bias_lo, bias_hi, t_lo, t_hi, tiles_per_split, num_splits, scale_log2,
    HALF: gl.constexpr, KPOOL: gl.constexpr, BD: gl.constexpr, NG: gl.constexpr, KDT: gl.constexpr,
    ALIGNED: gl.constexpr, BS_POW2: gl.constexpr, OFF32: gl.constexpr, STAGES: gl.constexpr, GPP: gl.constexpr,
):
    npp: gl.constexpr = (NG + GPP - 1) // GPP  # programs per split
    g0 = (gl.program_id(0) % npp) * GPP  # its first group of 32 rows (GPP = 2: and g0 + 1, if any)
    sp = gl.program_id(0) // npp  # 0: the edge tiles; 1 ..: interior splits
    hg = gl.program_id(1).to(gl.int64)  # (layer, KV head) pair
    K = gl.load(KPTRS + hg // HKV).to(gl.pointer_type(KDT))
    if ALIGNED:
        K = gl.multiple_of(K, 16)
    h = hg % HKV
    base = PART + ((hg * num_splits + sp) * 5) * RP
    dd = gl.arange(0, BD, layout=gl.SliceLayout(0, COPY))
    r0 = g0 * BR + gl.arange(0, BR, layout=AX0)
    q0 = _queries(Q, hg, g0, sqh, sqw, sqd, dd, G, W, R, KDT)
    r1 = r0 + BR
    two = g0 + 1 < NG  # (GPP = 2) a second group (Qwen2.5-0.5B's seven: not in the last program)
    q1 = q0
    if GPP == 2:
        q1 = _queries(Q, hg, g0 + 1, sqh, sqw, sqd, dd, G, W, R, KDT)

    if sp == 0:
        n_tiles = gl.cdiv(L, BN)
        _exact_group(q0, K, BT, r0, 0, t_lo, t_hi, n_tiles, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                     skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL, BS_POW2, OFF32)
        if GPP == 2:
            if two:
                _exact_group(q1, K, BT, r1, 0, t_lo, t_hi, n_tiles, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                             skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL, BS_POW2, OFF32)
    else:
        jt0 = t_lo + (sp - 1) * tiles_per_split
        jt1 = gl.minimum(jt0 + tiles_per_split, t_hi)
        if jt0 >= jt1:  # no tiles left for this split (rows past R: masked)
            zero = gl.zeros([BR], gl.float32, AX0)
            _store_rows(base, RP, r0, R, zero + float("-inf"), zero, zero, zero, zero)
            _store_rows(base, RP, r1, R, zero + float("-inf"), zero, zero, zero, zero)
        else:
            ring = gl.allocate_shared_memory(KDT, [STAGES, BN, BD], KEYS_SMEM)
            tc = gl.arange(0, BN, layout=KEYS1)
            for s in gl.static_range(STAGES - 1):
                if jt0 + s < jt1:
                    ro = _row_offsets(BT, (jt0 + s) * BN + tc, L, h, skb, skt, skh, block_size, bs_shift,
                                      BS_POW2, OFF32)
                    _issue(ring, jt0 + s, ro, K, dd, skd, L, STAGES)
                async_copy.commit_group()
            ro_next = _row_offsets(BT, (jt0 + STAGES - 1) * BN + tc, L, h, skb, skt, skh, block_size, bs_shift,
                                   BS_POW2, OFF32)
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            kbuf = ring.index(jt0 % STAGES)
            # (not named as the loop's operands: a name assigned in the loop would be carried through it)
            k0_lo = kbuf.slice(0, 16, dim=0).permute([1, 0]).load(OPB)
            k0_hi = kbuf.slice(16, 16, dim=0).permute([1, 0]).load(OPB)
            m0 = _first_max(q0, k0_lo, k0_hi, scale_log2)
            m1 = m0
            if GPP == 2:
                if two:
                    m1 = _first_max(q1, k0_lo, k0_hi, scale_log2)
            acc0 = gl.zeros([BR, 16], gl.float32, MMA)
            acc1 = acc0
            for jt in range(jt0, jt1):
                async_copy.wait_group(STAGES - 2)  # tile jt has landed (this lane's copies) ...
                gl.thread_barrier()  # ... everyone's, and the ring slot of tile jt - 1 is free
                kbuf = ring.index(jt % STAGES)
                kt_lo = kbuf.slice(0, 16, dim=0).permute([1, 0]).load(OPB)
                kt_hi = kbuf.slice(16, 16, dim=0).permute([1, 0]).load(OPB)
                nxt = jt + STAGES - 1
                if nxt < jt1:
                    _issue(ring, nxt, ro_next, K, dd, skd, L, STAGES)
                async_copy.commit_group()
                ro_next = _row_offsets(BT, (nxt + 1) * BN + tc, L, h, skb, skt, skh, block_size, bs_shift,
                                       BS_POW2, OFF32)
                acc0 += _tile_exp(q0, kt_lo, kt_hi, m0, scale_log2)
                if GPP == 2:
                    if two:
                        acc1 += _tile_exp(q1, kt_lo, kt_hi, m1, scale_log2)
            async_copy.wait_group(0)
            bad = _finish(acc0, m0, r0, base, RP, R)
            if GPP == 2:
                if two:
                    bad |= _finish(acc1, m1, r1, base, RP, R)
            if bad != 0:
                # a key far above the first tile's (or far below): this split again, exactly (the
                # stores above are this program's own: overwritten in order)
                _exact_group(q0, K, BT, r0, jt0, jt1, 0, 0, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                             skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL, BS_POW2, OFF32)
                if GPP == 2:
                    if two:
                        _exact_group(q1, K, BT, r1, jt0, jt1, 0, 0, base, RP, L, P, W, R, bias_lo, bias_hi, h, dd,
                                     skb, skt, skh, skd, block_size, bs_shift, scale_log2, HALF, KPOOL, BS_POW2, OFF32)
