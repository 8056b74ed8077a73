"""Compaction copy: every layer's kept K and V rows, source pages -> destination pages, one launch.

The caches of all layers (K and V) are reached through a table of base pointers, so one launch
covers every layer; each program copies raw elements (as integers of the element's width, so
any cache dtype, fp8 included, moves bit-exactly) of one head.

Two modes:
  * disjoint (dst_block_table given, its blocks not among the source blocks still to be read):
    grid (slot chunks, Hkv, 2 * layers), every chunk in parallel;
  * in place (dst_block_table None: destination = the source block table). Slot i of head h
    receives token kept[h, i]; with each head's kept indices strictly increasing, kept[h, i] >= i,
    so a program that walks its head's slots in increasing chunks, loading a whole chunk before a
    barrier and storing it after, never overwrites a row it (or any other program: heads, layers
    and K/V are disjoint) has still to read. Slots whose token does not move are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import cdiv, fast
from ._pointers import base_table

# H100 sweep (llama8b, 32 layers, 32K, keep 20%): the disjoint copy is flat across tile sizes (within
# 3%); in place, 128-token chunks with 4 warps were best.
CONFIG = {"bt": 32, "bt_inplace": 128, "warps": 8, "warps_inplace": 4}

_INT = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


@triton.jit
def _copy_chunk(base, IDX, SRC_BT, DST_BT, i, K_KEEP, h, sb, st, sh, sd, block_size, dd, dmask,
                SKIP_SAME: tl.constexpr, BARRIER: tl.constexpr):
    imask = i < K_KEEP
    src = tl.load(IDX + i, mask=imask, other=-1).to(tl.int64)
    valid = imask & (src >= 0)
    if SKIP_SAME:
        valid = valid & (src != i)
    sblk = tl.load(SRC_BT + src // block_size, mask=valid, other=0).to(tl.int64)
    dblk = tl.load(DST_BT + i // block_size, mask=valid, other=0).to(tl.int64)
    soff = (src % block_size).to(tl.int64)
    doff = (i % block_size).to(tl.int64)
    m2 = valid[:, None] & dmask[None, :]
    x = tl.load(base + sblk[:, None] * sb + soff[:, None] * st + h * sh + dd[None, :] * sd, mask=m2)
    if BARRIER:
        tl.debug_barrier()
    tl.store(base + dblk[:, None] * sb + doff[:, None] * st + h * sh + dd[None, :] * sd, x, mask=m2)


# The kept count and the strides that follow it vary per request: not specialised, so the copy
# compiles once per model instead of once per "divisible by 16" pattern of the count.
@triton.jit(do_not_specialize=["K_KEEP", "idx_sl", "idx_sh", "src_sl", "dst_sl"])
def _compact_kernel(
    PTRS, IDX, SRC_BT, DST_BT,
    sb, st, sh, sd, block_size, K_KEEP, HEAD_D, idx_sl, idx_sh, src_sl, dst_sl,
    ELEM: tl.constexpr, BTK: tl.constexpr, BD: tl.constexpr, INPLACE: tl.constexpr, ALIGNED: tl.constexpr,
):
    pc = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    z = tl.program_id(2)
    layer = z // 2
    base = tl.load(PTRS + z).to(tl.pointer_type(ELEM))
    if ALIGNED:  # every base 16-byte aligned (checked on the host): lets the copy use 16-byte accesses
        base = tl.multiple_of(base, 16)
    idx = IDX + layer * idx_sl + h * idx_sh
    sbt = SRC_BT + layer * src_sl
    dbt = DST_BT + layer * dst_sl
    dd = tl.arange(0, BD)
    dmask = dd < HEAD_D
    if INPLACE:
        for c0 in range(0, K_KEEP, BTK):
            i = c0 + tl.arange(0, BTK)
            _copy_chunk(base, idx, sbt, dbt, i, K_KEEP, h, sb, st, sh, sd, block_size, dd, dmask,
                        SKIP_SAME=True, BARRIER=True)
            tl.debug_barrier()
    else:
        i = pc * BTK + tl.arange(0, BTK)
        _copy_chunk(base, idx, sbt, dbt, i, K_KEEP, h, sb, st, sh, sd, block_size, dd, dmask,
                    SKIP_SAME=False, BARRIER=False)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def compact_kv(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], kept: torch.Tensor,
               src_block_table: torch.Tensor, dst_block_table: torch.Tensor | None = None) -> int:
    """Returns the number of kernel launches (1 when every cache shares its strides and dtype)."""
    n_layers = len(key_caches)
    if len(value_caches) != n_layers or n_layers == 0:
        raise ValueError("need one key and one value cache per layer")
    caches = [c for pair in zip(key_caches, value_caches) for c in pair]
    c0 = caches[0]
    hkv = c0.shape[2]
    dev = c0.device
    if kept.dim() == 2:
        kept_l = kept.unsqueeze(0)
        idx_sl = 0
    elif kept.dim() == 3 and kept.shape[0] == n_layers:
        kept_l = kept
        idx_sl = None
    else:
        raise ValueError(f"kept must be [Hkv, k] or [layers, Hkv, k], got {tuple(kept.shape)}")
    if kept_l.shape[1] != hkv:
        raise ValueError(f"kept has {kept_l.shape[1]} heads, the cache {hkv}")
    kept_l = kept_l.to(device=dev)
    if kept_l.dtype not in (torch.int32, torch.int64):
        kept_l = kept_l.long()
    kept_l = kept_l.contiguous()
    if idx_sl is None:
        idx_sl = kept_l.stride(0)
    k_keep = kept_l.shape[2]
    if k_keep == 0:
        return 0

    def _table(bt):
        bt = bt.to(device=dev)
        if bt.dtype not in (torch.int32, torch.int64):
            bt = bt.long()
        bt = bt.contiguous()
        if bt.dim() == 1:
            return bt, 0
        if bt.dim() == 2 and bt.shape[0] == n_layers:
            return bt, bt.stride(0)
        raise ValueError(f"block table must be [blocks] or [layers, blocks], got {tuple(bt.shape)}")

    src_bt, src_sl = _table(src_block_table)
    inplace = dst_block_table is None
    dst_bt, dst_sl = (src_bt, src_sl) if inplace else _table(dst_block_table)

    # One launch over every layer when all caches share dtype and strides (vLLM's case);
    # otherwise one launch per cache.
    for c in caches:
        if c.shape[1:] != c0.shape[1:]:
            raise ValueError("every cache must have the same block size, heads and head dim")
    if all(c.dtype == c0.dtype and c.stride() == c0.stride() for c in caches):
        ptrs, aligned = base_table(caches, dev)
        _launch(ptrs, len(caches), kept_l, idx_sl, src_bt, src_sl, dst_bt, dst_sl, c0, k_keep, inplace, aligned)
        return 1
    for z, c in enumerate(caches):
        lay = z // 2
        ptrs, aligned = base_table([c], dev)
        _launch(ptrs, 1, kept_l[0 if idx_sl == 0 else lay].unsqueeze(0), 0,
                src_bt if src_sl == 0 else src_bt[lay], 0, dst_bt if dst_sl == 0 else dst_bt[lay], 0,
                c, k_keep, inplace, aligned)
    return len(caches)


def _launch(ptrs, nz, idx, idx_sl, src_bt, src_sl, dst_bt, dst_sl, cache, k_keep, inplace, aligned):
    _, block_size, hkv, d = cache.shape
    strides = cache.stride()
    esz = cache.element_size()
    bt = CONFIG["bt_inplace"] if inplace else CONFIG["bt"]
    grid = (1 if inplace else cdiv(k_keep, bt), hkv, nz)
    fast(_compact_kernel)[grid](
        ptrs, idx, src_bt, dst_bt,
        strides[0], strides[1], strides[2], strides[3], block_size, k_keep, d,
        idx_sl, idx.stride(-2), src_sl, dst_sl,
        ELEM=_INT[esz], BTK=bt, BD=max(16, _next_pow2(d)), INPLACE=inplace, ALIGNED=aligned,
        num_warps=CONFIG["warps_inplace" if inplace else "warps"],
    )
