"""Pure-PyTorch path behind the same signatures as the Triton kernels.

Gathers the request's tokens out of the paged cache into dense [Hkv, N, d] tensors and calls the
policy library (`vllm_defensive.policy.scoring`), so on machines without Triton (the CPU vLLM
build) the results are the reference by construction. Also the reference the kernels are
tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_defensive.policy import scoring
from vllm_defensive.policy.scoring import WindowStats


def _positions(block_table: torch.Tensor, n: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(n, device=device)
    blk = block_table.to(device=device, dtype=torch.long)[t // block_size]
    return blk, t % block_size


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_blocks, block_size, H, d] pages + block table -> dense [H, num_tokens, d] (a copy)."""
    nblk_needed = -(-num_tokens // cache.shape[1])
    if block_table.numel() < nblk_needed:
        raise ValueError(f"block table has {block_table.numel()} blocks, {num_tokens} tokens need {nblk_needed}")
    blk, off = _positions(block_table, num_tokens, cache.shape[1], cache.device)
    return cache[blk, off].permute(1, 0, 2).contiguous()


def window_stats(queries, key_cache, block_table, seq_len, pool_kernel=5, scale=None, probs_dtype=None,
                 fix_window_bias=False, window_bias_as_tensor=False) -> WindowStats:
    keys = gather_paged(key_cache, block_table, seq_len)
    st = scoring.window_stats(queries, keys, pool_kernel, scale, probs_dtype, fix_window_bias)
    if window_bias_as_tensor:
        st.window_bias = torch.as_tensor(st.window_bias, dtype=torch.float32, device=queries.device)
    return st


def value_norms(value_cache, block_table, num_tokens, o_proj_weight) -> torch.Tensor:
    values = gather_paged(value_cache, block_table, num_tokens)
    return scoring.value_norms(values, o_proj_weight)


def compact_kv(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], kept: torch.Tensor,
               src_block_table: torch.Tensor, dst_block_table: torch.Tensor | None = None) -> None:
    """Slot i of head h in the destination pages receives source token kept[(layer,) h, i].

    Entries < 0 are skipped. Every layer's tokens are gathered before any is written, so the copy
    is safe in place (dst_block_table None = the source block table).
    """
    n_layers = len(key_caches)
    for layer in range(n_layers):
        idx = kept[layer] if kept.dim() == 3 else kept
        dst_bt = src_block_table if dst_block_table is None else (
            dst_block_table[layer] if dst_block_table.dim() == 2 else dst_block_table)
        for cache in (key_caches[layer], value_caches[layer]):
            bs, hkv = cache.shape[1], cache.shape[2]
            dev = cache.device
            idx_d = idx.to(device=dev, dtype=torch.long)
            valid = idx_d >= 0
            heads = torch.arange(hkv, device=dev).view(hkv, 1).expand_as(idx_d)
            slots = torch.arange(idx_d.shape[1], device=dev).view(1, -1).expand_as(idx_d)
            src_tok = idx_d[valid]
            h = heads[valid]
            dst_tok = slots[valid]
            sbt = src_block_table.to(device=dev, dtype=torch.long)
            dbt = dst_bt.to(device=dev, dtype=torch.long)
            rows = cache[sbt[src_tok // bs], src_tok % bs, h]  # gathered copy first: in-place safe
            cache[dbt[dst_tok // bs], dst_tok % bs, h] = rows
