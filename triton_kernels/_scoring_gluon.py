"""Pass 2 of the window scoring in Gluon (sm_80+): the layouts Triton cannot be asked for.

Same inputs and outputs as `_scoring._window_pass2` (the row statistics in, per row block the packed
column max and the unpooled column sums, per program the exact row sums), for one-warp programs
of 32 window rows and 16-bit probabilities; `_scoring.window_stats_layers` selects it on CUDA
(`p2_gluon`). Triton 3.6 keeps every tensor of a tile in the layout of the product that made it and
moves a transposed operand through shared memory; Gluon states the layouts, which lets the tile
run in both orientations at once without moving data:

* S = Q K^T has the window rows on the product's M axis. Its 16-bit probabilities P are, as they
  sit in the registers, the A operand of P @ X and the B operand of X @ P^T (the fragments of an
  m16n8k16 accumulator and of a k16n8 B operand hold the same elements; `convert_layout(...,
  assert_trivial=True)` checks it at compile time).
* Pooling runs as Band^T @ P^T: the pooled values come out with the keys on M and the rows on N,
  so the max over the rows is along the cheap axis (in-thread, then the four lanes of a quad)
  instead of across eight lanes.
* The unpooled column sums: movmatrix transposes P's 8x8 blocks in the registers, which makes them
  the A operand of P^T @ ones (a ones column: the sums over the rows). One small product and eight
  transposes a half tile instead of a shuffle tree per column; the identity product I @ P^T (exact,
  16-bit values) did the transposing before (`MOVM` off), 8 of the tile's 64 HMMA.
* The row sums of P (and of the bias columns) are P @ selector products, as in the Triton kernel.

No halo: a tile is 32 new keys, and its 32 pooled outputs lag HALF keys behind them, so the keys
they need from the previous tile come from that tile's second half (kept in registers as a B
operand) through a second band block. The Triton kernel computes 32 keys for 28 outputs.

Key tiles stream into a shared-memory ring (STAGES buffers) with cp.async, the block-table entries
one tile ahead of their copies.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from ._scoring import PDL_LAUNCH_ASM, PDL_WAIT_ASM

ROWS_PER_PROGRAM = 32  # window rows per program (one warp)
# (16 rows, offline sm_90 at d = 64: no spills at 128 registers, 16 warps an SM against 12, but its
# interior loop takes 21.2 instructions an element against 16.3: the copies, fragment loads, band
# products and addressing serve half the rows. Not built further.)
KEYS_PER_TILE = 32  # keys per tile (two 16-key halves)
BR = gl.constexpr(ROWS_PER_PROGRAM)
BN = gl.constexpr(KEYS_PER_TILE)

MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
OPA = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
OPB = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA.value, k_width=2))
AX0 = gl.constexpr(gl.SliceLayout(1, MMA.value))  # a vector along axis 0 of an MMA tile
AX1 = gl.constexpr(gl.SliceLayout(0, MMA.value))  # along axis 1
# 16-byte chunks, eight lanes a key: each copy instruction reads four whole key rows (one key per lane
# had every instruction touch 32 lines: L1TEX-bound, pass 2 at 600 us)
COPY = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0]))
KEYS1 = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # a key per lane
KEYS_SMEM = gl.constexpr(gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))


@gluon.jit
def _pdl_wait(PDL: gl.constexpr):
    """_scoring._pdl_wait in Gluon (a Gluon kernel calls Gluon functions)."""
    if PDL > 0:
        gl.inline_asm_elementwise(PDL_WAIT_ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pdl_launch(PDL: gl.constexpr):
    """_scoring._pdl_launch in Gluon."""
    if PDL == 1:
        gl.inline_asm_elementwise(PDL_LAUNCH_ASM, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _row_offsets(BT, t, P, h, skb, skt, skh, block_size, bs_shift, BS_POW2: gl.constexpr, OFF32: gl.constexpr,
                 MASK: gl.constexpr = True):
    """Element offsets of keys t (a key per lane) of head h in the paged cache: computed where every
    lane has its own key, then spread to the copy layout's eight lanes a key (_issue). MASK=False:
    every t is below P (no bound check)."""
    blk = _block_ids(BT, t, P, block_size, bs_shift, BS_POW2, MASK)
    if BS_POW2:
        off = t & (block_size - 1)
    else:
        off = t % block_size
    if OFF32:
        return blk * skb + off * skt + h.to(gl.int32) * skh
    else:
        return blk.to(gl.int64) * skb + off.to(gl.int64) * skt + h * skh


@gluon.jit
def _block_ids(BT, t, P, block_size, bs_shift, BS_POW2: gl.constexpr, MASK: gl.constexpr = True):
    if BS_POW2:
        bi = t >> bs_shift
    else:
        bi = t // block_size
    if MASK:
        return gl.load(BT + bi, mask=t < P, other=0)
    return gl.load(BT + bi)


@gluon.jit
def _round16(x, PDT: gl.constexpr):
    """fp32 -> PDT -> fp32, round-to-nearest-even, a packed conversion per pair (see _scoring._ROUND16_*)."""
    if PDT == gl.bfloat16:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
            "=r,=r,r,r", [x], dtype=gl.float32, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(
            "{ .reg .b16 l, h; .reg .b32 t; cvt.rn.f16x2.f32 t, $3, $2; mov.b32 {l, h}, t; cvt.f32.f16 $0, l; "
            "cvt.f32.f16 $1, h; }", "=r,=r,r,r", [x], dtype=gl.float32, is_pure=True, pack=2)


@gluon.jit
def _rows_operand(p):
    """p [BR rows, 16 keys] as the A operand of a row-sum product, in the registers' B-operand order.

    The A fragment pairs (row, row + 8) where the B fragment of p^T pairs (keys, keys + 8): used in
    both roles as laid out, each tile's p would be copied into the other pairing (two moves a
    register). Swapping the row-bit-3 and key-bit-3 axes of the tensor makes its A fragment the
    registers in B order; a product with a selector of keys 0-7 (column 0) / 8-15 (column 1) then
    puts row r's sum over its keys 0-7 and 8-15 at rows r and r + 8 of one column (see _finish_rows)."""
    x = gl.reshape(p, [BR // 16, 2, 8, 2, 8])
    x = gl.permute(x, [0, 3, 2, 1, 4])
    return gl.convert_layout(gl.reshape(x, [BR, 16]), OPA, assert_trivial=True)


# an 8x8 block of 16-bit values transposed across the warp: the lane holding (row g, columns 2t, 2t+1)
# of the block gets (columns g, rows 2t, 2t+1), one register (two values) in, one out
_MOVM_TRANS = gl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")


@gluon.jit
def _transposed_operand(p):
    """p [BR rows, 16 keys] (16-bit, as the score product left it) as the A operand of P^T [16 keys, BR
    rows]: each 8x8 block transposed in place by movmatrix, then the blocks renamed (no data moves).

    After the transposes, the register of p's element (8rb + ri, 8kb + ki) holds P[8rb + ki, 8kb + ri];
    so the tensor read as [rb, ri, kb, ki] is P^T's [kb, ri, rb, ki], whose registers sit where the A
    fragment of a [keys, rows] operand wants them."""
    y = gl.inline_asm_elementwise(_MOVM_TRANS, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=2)
    y = gl.permute(gl.reshape(y, [BR // 8, 8, 2, 8]), [2, 1, 0, 3])
    return gl.convert_layout(gl.reshape(y, [16, BR]), OPA, assert_trivial=True)


@gluon.jit
def _probs(q, kt, lse, scale_log2, t, P, PDT: gl.constexpr, EDGE: gl.constexpr):
    """16-bit probabilities of the block's rows against 16 keys (kt: their K^T as a B operand)."""
    return _probs_of(_scores(q, kt), lse, scale_log2, t, P, PDT, EDGE)


@gluon.jit
def _scores(q, kt):
    return mma_v2(q, kt, gl.zeros([BR, 16], gl.float32, MMA))


@gluon.jit
def _probs_of(s, lse, scale_log2, t, P, PDT: gl.constexpr, EDGE: gl.constexpr):
    # exp2(s - max) / sum as one exponential of s - (max + log2 sum): a multiply an element fewer
    p = gl.exp2(s * scale_log2 - lse[:, None])
    if EDGE:
        p = gl.where((t < P)[None, :], p, 0.0)  # keys past the prefix (zero-filled copies)
    return p.to(PDT)


@gluon.jit
def _tile(jt, s_lo, s_hi, lse, c, r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg,
          packed_out, unp_out, band0, band1, eye, ones, sel, x_prev, rs, s_acc,
          HALF: gl.constexpr, KPOOL: gl.constexpr, RBITS: gl.constexpr, PDT: gl.constexpr, EDGE: gl.constexpr,
          ATOMIC_MAX: gl.constexpr, MOVM: gl.constexpr):
    t0 = jt * BN
    k16 = gl.arange(0, 16, layout=AX1)
    t_lo = t0 + k16
    t_hi = t0 + 16 + k16
    p_lo = _probs_of(s_lo, lse, scale_log2, t_lo, P, PDT, EDGE)
    p_hi = _probs_of(s_hi, lse, scale_log2, t_hi, P, PDT, EDGE)

    # row sums (see _rows_operand): columns 0/1 every key; 2-5 the bias columns, which depend on the
    # original key (8b + c for the operand's row bit b), so one column per (a, b)
    if EDGE:
        kk = gl.arange(0, 16, layout=gl.SliceLayout(1, OPB.value))
        col = gl.arange(0, 8, layout=gl.SliceLayout(0, OPB.value))
        a = (kk >= 8).to(gl.int32)[:, None]
        cc = (kk % 8)[:, None]
        colb = (col[None, :] - 2) % 2  # the b of bias column 2 + 2a' + b
        own = (col[None, :] >= 2) & (col[None, :] < 6) & ((col[None, :] - 2) // 2 == a)
        k_lo = t0 + 8 * colb + cc
        k_hi = t0 + 16 + 8 * colb + cc
        sel_lo = gl.where((col[None, :] == a) | (own & (k_lo >= bias_lo) & (k_lo < bias_hi)), 1.0, 0.0).to(PDT)
        sel_hi = gl.where((col[None, :] == a) | (own & (k_hi >= bias_lo) & (k_hi < bias_hi)), 1.0, 0.0).to(PDT)
    else:
        sel_lo = sel
        sel_hi = sel
    rs = mma_v2(_rows_operand(p_lo), sel_lo, rs)
    rs = mma_v2(_rows_operand(p_hi), sel_hi, rs)

    pt_lo = gl.convert_layout(gl.permute(p_lo, [1, 0]), OPB, assert_trivial=True)  # [16 keys, BR rows]
    pt_hi = gl.convert_layout(gl.permute(p_hi, [1, 0]), OPB, assert_trivial=True)

    # unpooled column sums: P^T as an A operand (movmatrix transposes, or exactly as I @ P^T), its
    # rows summed against a ones column
    o16 = gl.arange(0, 16, layout=AX0)
    c8 = gl.arange(0, 8, layout=AX1)
    zero_t = gl.zeros([16, BR], gl.float32, MMA)
    zero_8 = gl.zeros([16, 8], gl.float32, MMA)
    if MOVM:
        a_lo = _transposed_operand(p_lo)
        a_hi = _transposed_operand(p_hi)
    else:
        a_lo = gl.convert_layout(mma_v2(eye, pt_lo, zero_t).to(PDT), OPA, assert_trivial=True)
        a_hi = gl.convert_layout(mma_v2(eye, pt_hi, zero_t).to(PDT), OPA, assert_trivial=True)
    u_lo = mma_v2(a_lo, ones, zero_8)
    u_hi = mma_v2(a_hi, ones, zero_8)
    ku_lo = t0 + o16
    ku_hi = t0 + 16 + o16
    first = c8[None, :] == 0  # every column holds the sums: column 0 is stored
    if EDGE:
        gl.store(unp_out + ku_lo[:, None] + c8[None, :], u_lo * inv_rows, mask=first & (ku_lo < P)[:, None])
        gl.store(unp_out + ku_hi[:, None] + c8[None, :], u_hi * inv_rows, mask=first & (ku_hi < P)[:, None])
    else:
        # A scalar base a tile plus lane offsets fixed across tiles: the four stores (and the interior
        # atomics below) then share one address register pair through immediate offsets; as
        # `out + (t0 + o16)` each built its own 64-bit address (offline sm_90 SASS, Qwen's interior
        # loop: 11 instructions fewer alone, 15 with the unbounded inner loop; H200: -2.5 us of the
        # 2026-12-04b gain alone). The edge tiles keep that form: this one spilled registers there.
        ub = unp_out + t0
        uo = o16[:, None] + c8[None, :]
        gl.store(ub + uo, u_lo * inv_rows, mask=first)
        gl.store((ub + 16) + uo, u_hi * inv_rows, mask=first)

    # pooled outputs o = t0 - HALF + i: keys o - HALF .. o + HALF span the previous tile's second half
    # and this tile's halves (band1: the block HALF - 16 keys behind the outputs, band0: aligned)
    x_lo = mma_v2(band0, pt_lo, x_prev)
    x_hi = mma_v2(band1, pt_lo, mma_v2(band0, pt_hi, zero_t))
    x_next = mma_v2(band1, pt_hi, zero_t)  # the next tile's first outputs' share of these keys
    if KPOOL == 5:
        pr_lo = _round16(x_lo * 0.2, PDT)  # the IEEE quotient's 16-bit rounding (_scoring._div_pool)
        pr_hi = _round16(x_hi * 0.2, PDT)
    else:
        pr_lo = _round16(gl.div_rn(x_lo, gl.full(x_lo.shape, KPOOL, gl.float32, MMA)), PDT)
        pr_hi = _round16(gl.div_rn(x_hi, gl.full(x_hi.shape, KPOOL, gl.float32, MMA)), PDT)
    o_lo = t0 - HALF + o16
    o_hi = t0 + 16 - HALF + o16
    if EDGE:
        v_lo = (o_lo >= 0) & (o_lo < P)
        v_hi = (o_hi >= 0) & (o_hi < P)
        pr_lo = gl.where(v_lo[:, None], pr_lo, 0.0)
        pr_hi = gl.where(v_hi[:, None], pr_hi, 0.0)
    # the rows' pooled sums: this tile's keys summed in-thread (lanes' keys g and g + 8), reduced over
    # the lanes at the end (on the tensor cores, pooled @ I, this pass was 10% slower: 2026-12-03)
    s_acc += gl.sum(gl.reshape(pr_lo + pr_hi, [2, 8, BR]), 0)
    # max over the rows and its row, in one integer max (see _scoring._p2_rows)
    lo = gl.max((((pr_lo * c[None, :]).to(gl.int32, bitcast=True)) & (-(1 << RBITS))) | r1[None, :], 1)
    hi = gl.max((((pr_hi * c[None, :]).to(gl.int32, bitcast=True)) & (-(1 << RBITS))) | r1[None, :], 1)
    pb = packed_out + (t0 - HALF)  # (o_lo = t0 - HALF + o16, o_hi = o_lo + 16)
    if ATOMIC_MAX:  # every row block into one share (zeroed first, `_scoring._zero_share`): the fixup reads one
        if EDGE:
            gl.atomic_max(packed_out + o_lo, lo, mask=v_lo, sem="relaxed")
            gl.atomic_max(packed_out + o_hi, hi, mask=v_hi, sem="relaxed")
        else:
            gl.atomic_max(pb + o16, lo, sem="relaxed")
            gl.atomic_max((pb + 16) + o16, hi, sem="relaxed")
    elif EDGE:
        gl.store(packed_out + o_lo, lo, mask=v_lo)
        gl.store(packed_out + o_hi, hi, mask=v_hi)
    else:
        gl.store(pb + o16, lo)
        gl.store((pb + 16) + o16, hi)
    return x_next, rs, s_acc


@gluon.jit
def _finish_rows(rs, c_b0: gl.constexpr, c_b1: gl.constexpr, out, rb, R):
    """Row sums from the products of _rows_operand: row r = 16m + 8a' + g of P has its keys-half-b
    sum at row 16m + 8b + g of the product, in column c_b0 + a' (b = 0) or c_b1 + a' (b = 1); added
    here, stored by row. (m sums: c_b0 = c_b1 = 0; bias: 2, 3 with a stride of 2 over a'.)"""
    c8 = gl.arange(0, 8, layout=AX1)
    rows = gl.arange(0, BR, layout=AX0)
    stride: gl.constexpr = 1 if c_b0 == c_b1 else 2
    for ap in gl.static_range(2):
        v0 = gl.sum(gl.where(c8[None, :] == c_b0 + stride * ap, rs, 0.0), 1)  # [BR]: entries 16m + 8b + g
        v1 = gl.sum(gl.where(c8[None, :] == c_b1 + stride * ap, rs, 0.0), 1)
        v = gl.where((rows // 8) % 2 == 0, v0, v1)
        v = gl.convert_layout(v, gl.BlockedLayout([1], [32], [1], [0]))
        w = gl.sum(gl.reshape(v, [BR // 16, 2, 8]), 1)  # row 16m + 8a' + g: the sum over b
        m = gl.arange(0, BR // 16, layout=gl.SliceLayout(1, w.type.layout))
        g = gl.arange(0, 8, layout=gl.SliceLayout(0, w.type.layout))
        r = rb * BR + m[:, None] * 16 + ap * 8 + g[None, :]
        gl.store(out + r, w, mask=r < R)


@gluon.jit
def _issue(buf, jt, ro, K, dd, skd, P, MASK: gl.constexpr = True):
    """Start the copy of key tile jt into the ring slot buf."""
    ro = gl.convert_layout(ro, gl.SliceLayout(1, COPY))
    ptr = K + ro[:, None] + dd[None, :] * skd
    if MASK:
        t = jt * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, COPY))
        async_copy.async_copy_global_to_shared(buf, ptr, mask=(t < P)[:, None])
    else:
        async_copy.async_copy_global_to_shared(buf, ptr)


@gluon.jit
def _step(jt, jt1, ro_next, ring, qs, q, K, BT, h, dd, tc, skb, skt, skh, skd, block_size, bs_shift, lse, c, r1,
          scale_log2, inv_rows, P, bias_lo, bias_hi, hg, packed_out, unp_out, band0, band1, eye, ones, sel, x_prev, rs,
          s_acc, HALF: gl.constexpr, KPOOL: gl.constexpr, RBITS: gl.constexpr, PDT: gl.constexpr,
          BS_POW2: gl.constexpr, OFF32: gl.constexpr, EDGE: gl.constexpr, STAGES: gl.constexpr,
          Q_SMEM: gl.constexpr, ATOMIC_MAX: gl.constexpr, MOVM: gl.constexpr, INNER: gl.constexpr = False):
    """One tile of the ring: wait for tile jt, take its key fragments, start the copy of tile
    jt + STAGES - 1 (its block ids were loaded a step ago), load the next block ids, compute tile jt.
    INNER: both tiles ahead are interior ones too (in the program's range, every key below P), so
    neither the copy nor the block-id load needs a bound.
    (The fragments first: issued after the copies, the shared-memory loads queued behind them and
    the tile's first product waited on them, a sixth of the stall samples.)"""
    async_copy.wait_group(STAGES - 2)  # tile jt has landed (this lane's copies) ...
    gl.thread_barrier()  # ... everyone's, and the ring slot of tile jt - 1 is free
    kbuf = ring.index(jt % STAGES)
    kt_lo = kbuf.slice(0, 16, dim=0).permute([1, 0]).load(OPB)
    kt_hi = kbuf.slice(16, 16, dim=0).permute([1, 0]).load(OPB)
    if Q_SMEM:
        q = qs.load(OPA)
    nxt = jt + STAGES - 1
    if INNER:
        _issue(ring.index(nxt % STAGES), nxt, ro_next, K, dd, skd, P, False)
    elif nxt < jt1:
        _issue(ring.index(nxt % STAGES), nxt, ro_next, K, dd, skd, P)
    async_copy.commit_group()
    ro_next = _row_offsets(BT, (nxt + 1) * BN + tc, P, h, skb, skt, skh, block_size, bs_shift, BS_POW2, OFF32,
                           not INNER)
    x_prev, rs, s_acc = _tile(jt, _scores(q, kt_lo), _scores(q, kt_hi), lse, c, r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg,
                              packed_out, unp_out, band0, band1, eye, ones, sel, x_prev, rs, s_acc,
                              HALF, KPOOL, RBITS, PDT, EDGE, ATOMIC_MAX, MOVM)
    return ro_next, x_prev, rs, s_acc


@gluon.jit(do_not_specialize=["P", "num_row_blocks", "part_stride", "tiles_per_prog", "num_progs", "bias_lo",
                              "bias_hi", "block_size", "bs_shift", "half_rt"])
def window_pass2_gluon(
    Q, KPTRS, BT, ROW, PACKED, UNP, PSUMS,
    sqh, sqw, sqd, skb, skt, skh, skd, block_size, bs_shift, HKV,
    P, W, G, R, RP, num_row_blocks, part_stride, tiles_per_prog, num_progs, scale_log2, inv_rows,
    bias_lo, bias_hi, half_rt,
    HALF: gl.constexpr, KPOOL: gl.constexpr, BD: gl.constexpr, RBITS: gl.constexpr, PDT: gl.constexpr,
    KDT: gl.constexpr, ALIGNED: gl.constexpr, BS_POW2: gl.constexpr, OFF32: gl.constexpr, STAGES: gl.constexpr,
    Q_SMEM: gl.constexpr, ATOMIC_MAX: gl.constexpr, MOVM: gl.constexpr, PDL: gl.constexpr = 0,
    INNER: gl.constexpr = 1,
):
    rb = gl.program_id(0) % num_row_blocks
    pid = gl.program_id(0) // num_row_blocks
    hg = gl.program_id(1).to(gl.int64)
    K = gl.load(KPTRS + hg // HKV).to(gl.pointer_type(KDT))
    if ALIGNED:
        K = gl.multiple_of(K, 16)
    h = hg % HKV
    n_tiles = gl.cdiv(P + HALF, BN)
    jt0 = pid * tiles_per_prog
    jt1 = gl.minimum(jt0 + tiles_per_prog, n_tiles)
    row = ROW + hg * 4 * RP
    _pdl_launch(PDL)  # (see _scoring._pdl_wait: up to the wait below, this program reads only the call's inputs)

    # rows along axis 0 (the score products) and along axis 1 (the pooled values)
    r0 = rb * BR + gl.arange(0, BR, layout=AX0)
    r1 = rb * BR + gl.arange(0, BR, layout=AX1)
    rq = rb * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, COPY))
    dd = gl.arange(0, BD, layout=gl.SliceLayout(0, COPY))
    qh = (hg * G + rq // W).to(gl.int64)
    q = gl.load(Q + qh[:, None] * sqh + (rq % W)[:, None] * sqw + dd[None, :] * sqd,
                mask=(rq < R)[:, None], other=0.0)
    q = q.to(KDT)
    q = gl.convert_layout(q, OPA)

    # constant operands: the band blocks (outputs i against keys j of the aligned / previous half),
    # the identity, the ones column
    # (from the runtime half_rt = HALF: constants ptxas could see through got their zero registers
    # rebuilt for every product, a move per register)
    i = gl.arange(0, 16, layout=gl.SliceLayout(1, OPA.value))
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, OPA.value))
    band0 = gl.where(gl.abs(j[None, :] - i[:, None] + half_rt) <= half_rt, 1.0, 0.0).to(PDT)
    band1 = gl.where(gl.abs(j[None, :] - 16 - i[:, None] + half_rt) <= half_rt, 1.0, 0.0).to(PDT)
    eye = gl.where(j[None, :] - i[:, None] == half_rt - HALF, 1.0, 0.0).to(PDT)
    rr = gl.arange(0, BR, layout=gl.SliceLayout(1, OPB.value))
    kk = gl.arange(0, 16, layout=gl.SliceLayout(1, OPB.value))
    col = gl.arange(0, 8, layout=gl.SliceLayout(0, OPB.value))
    ones = gl.where(rr[:, None] + col[None, :] >= half_rt - HALF, 1.0, 0.0).to(PDT)
    sel = gl.where(col[None, :] == (kk >= 8 + half_rt - HALF).to(gl.int32)[:, None], 1.0, 0.0).to(PDT)

    # Q_SMEM: the queries reloaded every tile from a slot of the ring's own allocation, past its
    # STAGES key slots (the copies into that allocation keep the loads in the loop: from an allocation
    # of their own, the compiler hoisted them out of it, and the registers with them)
    ring = gl.allocate_shared_memory(KDT, [STAGES + Q_SMEM, BN, BD], KEYS_SMEM)
    qs = ring
    if Q_SMEM:
        qs = ring.index(STAGES)
        qs.store(gl.convert_layout(q, COPY))
    tc = gl.arange(0, BN, layout=KEYS1)

    # prologue: tiles jt0, jt0 + 1 in flight, block ids of jt0 + 2 loaded
    for s in gl.static_range(STAGES - 1):
        jt = jt0 + s
        if jt < jt1:
            ro = _row_offsets(BT, jt * BN + tc, P, h, skb, skt, skh, block_size, bs_shift, BS_POW2, OFF32)
            _issue(ring.index(jt % STAGES), jt, ro, K, dd, skd, P)
        async_copy.commit_group()
    ro_next = _row_offsets(BT, (jt0 + STAGES - 1) * BN + tc, P, h, skb, skt, skh, block_size, bs_shift, BS_POW2,
                            OFF32)

    # pass 1's row statistics (the combine's output: a dependent launch waits for it here)
    _pdl_wait(PDL)
    mx = gl.load(row + r0, mask=r0 < R, other=0.0)
    inv_l = gl.load(row + RP + r0, mask=r0 < R, other=0.0)
    # the rows' log2-sum-exp (in units of the scaled scores): +inf on padded rows, whose p is then 0
    lse = gl.where(inv_l > 0, mx - gl.log2(inv_l), float("inf"))
    c = gl.load(row + 2 * RP + r1, mask=r1 < R, other=0.0)

    # the previous tile's second half: its share of this run's first pooled outputs (none at the start;
    # carried as that product's accumulator: a 16-bit operand carried across iterations was kept
    # one element per register and repacked at every use)
    x_prev = gl.zeros([16, BR], gl.float32, MMA)
    if jt0 > 0:
        tw = jt0 * BN - 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, COPY))
        ro = _row_offsets(BT, tw, P, h, skb, skt, skh, block_size, bs_shift, BS_POW2, OFF32)
        kw = gl.load(K + ro[:, None] + dd[None, :] * skd, mask=(tw < P)[:, None], other=0.0)
        kwt = gl.convert_layout(gl.permute(kw, [1, 0]), OPB)
        pw = _probs(q, kwt, lse, scale_log2, jt0 * BN - 16 + gl.arange(0, 16, layout=AX1), P, PDT, True)
        x_prev = mma_v2(band1, gl.convert_layout(gl.permute(pw, [1, 0]), OPB, assert_trivial=True), x_prev)

    rs = gl.zeros([BR, 8], gl.float32, MMA)  # row sums: col 0 of P, col 1 of its bias columns
    # pooled sums per (lane's keys, row), in the layout of the in-thread sum in _tile
    s_acc = gl.sum(gl.reshape(gl.zeros([16, BR], gl.float32, MMA), [2, 8, BR]), 0)
    # this row block's share of the column outputs (of the max: one share for all with ATOMIC_MAX)
    packed_out = PACKED + (0 if ATOMIC_MAX else rb) * part_stride + hg * P
    unp_out = UNP + rb * part_stride + hg * P
    # interior tiles: every key real and below the bias columns, every output in [0, P)
    lim = gl.minimum(P, bias_lo)
    j_int0 = gl.minimum(gl.maximum(jt0, 1), jt1)
    j_int1 = gl.maximum(gl.minimum(jt1, lim // BN), j_int0)
    for jt in range(jt0, j_int0):
        ro_next, x_prev, rs, s_acc = _step(
            jt, jt1, ro_next, ring, qs, q, K, BT, h, dd, tc, skb, skt, skh, skd, block_size, bs_shift, lse, c,
            r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg, packed_out, unp_out, band0, band1, eye, ones, sel, x_prev,
            rs, s_acc, HALF, KPOOL, RBITS, PDT, BS_POW2, OFF32, True, STAGES, Q_SMEM, ATOMIC_MAX, MOVM, False)
    # (the interior tiles whose tiles STAGES - 1 and STAGES ahead are interior too, copied without a
    # bound: offline sm_90 SASS, 24 instructions fewer a tile)
    j_inner = j_int0
    if INNER:
        j_inner = gl.maximum(j_int1 - STAGES, j_int0)
    for jt in range(j_int0, j_inner):
        ro_next, x_prev, rs, s_acc = _step(
            jt, jt1, ro_next, ring, qs, q, K, BT, h, dd, tc, skb, skt, skh, skd, block_size, bs_shift, lse, c,
            r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg, packed_out, unp_out, band0, band1, eye, ones, sel, x_prev,
            rs, s_acc, HALF, KPOOL, RBITS, PDT, BS_POW2, OFF32, False, STAGES, Q_SMEM, ATOMIC_MAX, MOVM, True)
    for jt in range(j_inner, j_int1):
        ro_next, x_prev, rs, s_acc = _step(
            jt, jt1, ro_next, ring, qs, q, K, BT, h, dd, tc, skb, skt, skh, skd, block_size, bs_shift, lse, c,
            r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg, packed_out, unp_out, band0, band1, eye, ones, sel, x_prev,
            rs, s_acc, HALF, KPOOL, RBITS, PDT, BS_POW2, OFF32, False, STAGES, Q_SMEM, ATOMIC_MAX, MOVM, False)
    for jt in range(j_int1, jt1):
        ro_next, x_prev, rs, s_acc = _step(
            jt, jt1, ro_next, ring, qs, q, K, BT, h, dd, tc, skb, skt, skh, skd, block_size, bs_shift, lse, c,
            r1, scale_log2, inv_rows, P, bias_lo, bias_hi, hg, packed_out, unp_out, band0, band1, eye, ones, sel, x_prev,
            rs, s_acc, HALF, KPOOL, RBITS, PDT, BS_POW2, OFF32, True, STAGES, Q_SMEM, ATOMIC_MAX, MOVM, False)
    async_copy.wait_group(0)

    sums = PSUMS + (hg * num_progs + pid) * 3 * RP
    _finish_rows(rs, 0, 0, sums, rb, R)
    _finish_rows(rs, 2, 3, sums + 2 * RP, rb, R)
    gl.store(sums + RP + r1, gl.convert_layout(gl.sum(s_acc, 0), AX1), mask=r1 < R)
