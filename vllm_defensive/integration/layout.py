"""Reading and writing single tokens of a paged KV cache, per KV head, whatever the backend layout.

Compaction needs token-level access: gather one request's K/V for scoring, and copy kept tokens
(a different set per KV head) into fresh blocks. Two layouts exist in vLLM 0.24:

* GPU backends (FlashAttention, Triton, FlashInfer): each layer's tensor is the logical view
  `(num_blocks, 2, block_size, num_kv_heads, head_size)` (strides follow the NHD/HND layout, the
  view hides them), so plain advanced indexing works.
* CPU_ATTN: `(num_blocks, num_kv_heads, block_size, 2 * head_size)`, where each (block, head)
  page holds K then V, packed in an ISA-specific order (`csrc/cpu/cpu_attn_*.hpp`). Rather than
  re-implement every packing, we write a known pattern with vLLM's own write op
  (`cpu_attn_reshape_and_cache`) into a scratch page once and read back where each
  (token, dim) of K and V lands.

Slots are `block_id * block_size + offset`, as in vLLM's slot mapping.
"""

from __future__ import annotations

import torch

from . import compat


class KVLayout:
    block_size: int
    num_kv_heads: int
    head_size: int

    def gather(self, kv: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [H, n] (one row per KV head) -> K, V of shape [H, n, d]."""
        raise NotImplementedError

    def scatter(self, kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K, V [H, n, d] into slots [H, n]."""
        raise NotImplementedError

    def _split(self, slots: torch.Tensor):
        slots = slots.to(torch.long)
        heads = torch.arange(slots.shape[0], device=slots.device).view(-1, 1).expand_as(slots)
        return slots // self.block_size, slots % self.block_size, heads


class GpuLayout(KVLayout):
    """Logical `(num_blocks, 2, block_size, num_kv_heads, head_size)` views."""

    def __init__(self, block_size: int, num_kv_heads: int, head_size: int):
        self.block_size, self.num_kv_heads, self.head_size = block_size, num_kv_heads, head_size

    def check(self, kv: torch.Tensor) -> None:
        want = (2, self.block_size, self.num_kv_heads, self.head_size)
        if kv.dim() != 5 or tuple(kv.shape[1:]) != want:
            raise compat.UnsupportedVllmError(
                f"unexpected KV cache shape {tuple(kv.shape)} (want (num_blocks, *{want}))")

    def gather(self, kv, slots):
        blk, off, heads = self._split(slots)
        return kv[blk, 0, off, heads], kv[blk, 1, off, heads]

    def scatter(self, kv, slots, k, v):
        blk, off, heads = self._split(slots)
        kv[blk, 0, off, heads] = k.to(kv.dtype)
        kv[blk, 1, off, heads] = v.to(kv.dtype)


class CpuLayout(KVLayout):
    """CPU_ATTN pages, with the element order probed from vLLM's own write op."""

    def __init__(self, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, isa: str):
        self.block_size, self.num_kv_heads, self.head_size = block_size, num_kv_heads, head_size
        self.dtype, self.isa = dtype, isa
        self.key_pos, self.value_pos = probe_cpu_page(block_size, head_size, dtype, isa)  # [bs, d] each

    def check(self, kv: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.block_size, 2 * self.head_size)
        if kv.dim() != 4 or tuple(kv.shape[1:]) != want or not kv.is_contiguous():
            raise compat.UnsupportedVllmError(
                f"unexpected CPU KV cache {tuple(kv.shape)} (want contiguous (num_blocks, *{want}))")
        if kv.dtype != self.dtype:
            raise compat.UnsupportedVllmError(f"CPU KV cache dtype {kv.dtype}, probed {self.dtype}")

    def _index(self, kv, slots):
        blk, off, heads = self._split(slots)
        flat = kv.view(kv.shape[0], kv.shape[1], -1)
        return flat, blk.unsqueeze(-1), heads.unsqueeze(-1), off

    def gather(self, kv, slots):
        flat, blk, heads, off = self._index(kv, slots)
        return flat[blk, heads, self.key_pos[off]], flat[blk, heads, self.value_pos[off]]

    def scatter(self, kv, slots, k, v):
        flat, blk, heads, off = self._index(kv, slots)
        flat[blk, heads, self.key_pos[off]] = k.to(kv.dtype)
        flat[blk, heads, self.value_pos[off]] = v.to(kv.dtype)


def probe_cpu_page(block_size: int, head_size: int, dtype: torch.dtype, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Where token t, dim j of K (and of V) land in one flattened (block, head) page."""
    write = compat.CPU_RESHAPE_AND_CACHE.resolve()
    page = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
    halves = page.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)

    def fill(values: torch.Tensor) -> torch.Tensor:  # values [bs, d], small exact integers
        page.zero_()
        k = values.view(block_size, 1, head_size).to(dtype)
        write(k, -k, halves[0], halves[1], slots, isa)
        return page.view(-1).float().clone()

    t = torch.arange(1, block_size + 1).view(-1, 1).expand(block_size, head_size)
    j = torch.arange(1, head_size + 1).view(1, -1).expand(block_size, head_size)
    by_token, by_dim = fill(t), fill(j)
    key_pos = torch.full((block_size, head_size), -1, dtype=torch.long)
    value_pos = torch.full((block_size, head_size), -1, dtype=torch.long)
    for sign, pos in ((1.0, key_pos), (-1.0, value_pos)):
        where = (by_token * sign > 0).nonzero().flatten()
        tok = (by_token[where] * sign).long() - 1
        dim = (by_dim[where] * sign).long() - 1
        pos[tok, dim] = where
    ok = bool((key_pos >= 0).all() and (value_pos >= 0).all())
    ok = ok and torch.cat([key_pos.flatten(), value_pos.flatten()]).unique().numel() == 2 * block_size * head_size
    if not ok:
        raise compat.UnsupportedVllmError(
            f"could not map the CPU KV page layout (isa={isa}, dtype={dtype}, block_size={block_size}, "
            f"head_size={head_size}); serve without --kv-eviction")
    return key_pos, value_pos
