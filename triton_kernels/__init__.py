"""Fast paths for DefensiveKV scoring and compaction over vLLM's paged KV cache.

Installs as ``vllm_defensive.triton_kernels`` (never import it as top-level ``triton_kernels``:
vLLM imports OpenAI's package of that name). Triton kernels on CUDA; the same functions fall back
to pure PyTorch (gather from the pages, then the policy library) where Triton or CUDA is missing,
e.g. on the CPU build of vLLM. See ``backend()``.

Launches: every kernel goes through ``_launch.fast``, which skips Triton's per-call dispatch once
a specialisation has been compiled (~25 us a launch); ``VLLM_DEFENSIVE_FAST_LAUNCH=0`` turns it off.

Cache layout (vLLM 0.24.0, FlashAttention backend): one layer's cache is
``(num_blocks, 2, block_size, num_kv_heads, head_size)``; pass its K and V halves
(``split_kv_cache``), i.e. ``[num_blocks, block_size, num_kv_heads, head_size]`` views with any
strides (the HND stride order included). A request's ``block_table`` is a 1-D int32/int64 tensor
of (not necessarily contiguous) block ids; token t lives in block ``block_table[t // block_size]``
at offset ``t % block_size``.

Public API
  backend(device=None) -> "triton" | "torch"
  paged_window_stats(queries, key_cache, block_table, seq_len, ...) -> policy WindowStats
  window_stats(queries, keys, ...)                 dense [Hkv, L, d] keys, same kernels
  paged_window_stats_layers(queries, key_caches, block_table, seq_len, ...)
                                                   every layer of a request at once: [layers, Hkv, P]
  paged_value_norms(value_cache, block_table, num_tokens, o_proj_weight) -> fp32 [Hkv, N]
  paged_value_norms_layers(value_caches, block_table, num_tokens, o_proj_weights) -> [layers, Hkv, N]
  value_norms(values, o_proj_weight)               dense [Hkv, N, d] values, same kernel
  scoring_ops(impl=None) -> policy ScoringOps      these kernels as drop-ins for the policy methods
  value_norm_share(norms)                          share across KV heads (policy's)
  compact_kv(key_caches, value_caches, kept, src_block_table, dst_block_table=None)
  split_kv_cache(kv_cache) -> (key_cache, value_cache)
  gather_paged(cache, block_table, num_tokens) -> dense [H, N, d]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from vllm_defensive.policy.methods import ScoringOps
from vllm_defensive.policy.scoring import WindowStats, value_norm_share

from . import torch_impl
from ._backend import backend, resolve, triton_available
from .torch_impl import gather_paged

__all__ = [
    "backend", "triton_available", "paged_window_stats", "window_stats", "paged_value_norms", "value_norms",
    "paged_window_stats_layers", "paged_value_norms_layers",
    "scoring_ops",
    "value_norm_share", "warmup_lengths", "compact_kv", "split_kv_cache", "gather_paged", "dense_as_paged", "WindowStats",
]


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM FlashAttention layer cache (num_blocks, 2, block_size, Hkv, d) -> its K and V views."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"expected (num_blocks, 2, block_size, num_kv_heads, head_size), got {tuple(kv_cache.shape)}")
    return kv_cache[:, 0], kv_cache[:, 1]


def dense_as_paged(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [H, N, d] -> a one-block paged view [1, N, H, d] (no copy) and its block table."""
    h, n, d = x.shape
    return x.permute(1, 0, 2).unsqueeze(0), torch.zeros(1, dtype=torch.int32, device=x.device)


def _check_cache(cache: torch.Tensor, block_table: torch.Tensor, n: int, what: str) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{what} must be [num_blocks, block_size, num_kv_heads, head_size], got {tuple(cache.shape)}")
    if block_table.dim() != 1:
        raise ValueError(f"block_table must be 1-D, got {tuple(block_table.shape)}")
    need = -(-n // cache.shape[1])
    if block_table.numel() < need:
        raise ValueError(f"block_table has {block_table.numel()} blocks; {n} tokens need {need}")


def _scoring_kernel_runs(hq: int, hkv: int, w: int, seq_len: int, impl: str | None, device) -> bool:
    """The fused scoring kernels take this call: Triton chosen, a prefix to score, and at most
    MAX_ROWS window rows per KV head (group x window: the kernels pack the row index in 9 bits)."""
    if resolve(impl, device) != "triton" or seq_len == w:
        return False
    from . import _scoring

    return (hq // hkv) * w <= _scoring.MAX_ROWS


def paged_window_stats(
    queries: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    pool_kernel: int = 5,
    scale: float | None = None,
    probs_dtype: torch.dtype | None = None,
    fix_window_bias: bool = False,
    window_bias_as_tensor: bool = False,
    impl: str | None = None,
) -> WindowStats:
    """`policy.scoring.window_stats` over paged keys, without the [Hq, W, L] probabilities.

    queries [Hq, W, d] (post-RoPE, the last W prompt tokens); key_cache [num_blocks, block_size,
    Hkv, d]; the first `seq_len` tokens of `block_table` are the prompt. Returns fp32 [Hkv, L-W]
    defensive_max / snapkv / unpooled_mean and the window bias (a Python float, or a 0-dim
    device tensor with `window_bias_as_tensor`, which avoids a device sync).
    """
    _check_cache(key_cache, block_table, seq_len, "key_cache")
    w = queries.shape[1]
    if w > seq_len:
        raise ValueError(f"window ({w}) is longer than the context ({seq_len})")
    if not _scoring_kernel_runs(queries.shape[0], key_cache.shape[2], w, seq_len, impl, queries.device):
        return torch_impl.window_stats(queries, key_cache, block_table, seq_len, pool_kernel, scale, probs_dtype,
                                       fix_window_bias, window_bias_as_tensor)
    from . import _scoring

    return _scoring.window_stats(queries, key_cache, block_table, seq_len, pool_kernel, scale, probs_dtype,
                                 fix_window_bias, window_bias_as_tensor)


def paged_window_stats_layers(
    queries: torch.Tensor,
    key_caches: Sequence[torch.Tensor],
    block_table: torch.Tensor,
    seq_len: int,
    pool_kernel: int = 5,
    scale: float | None = None,
    probs_dtype: torch.dtype | None = None,
    fix_window_bias: bool = False,
    impl: str | None = None,
) -> WindowStats:
    """`paged_window_stats` of every layer of one request: queries [layers, Hq, W, d], one key
    cache per layer, one block table (the layers' pages share block ids, as in vLLM). Returns
    fields [layers, Hkv, P] and the window bias as a [layers] device tensor (no sync).

    On the Triton path the four launches cover all layers (the caches are reached through a
    table of base addresses), instead of four per layer: the per-request host cost no longer grows
    with the layer count. Caches that do not share one layout, and the PyTorch path, go layer
    by layer with the same results."""
    from ._pointers import same_layout

    if queries.dim() != 4 or queries.shape[0] != len(key_caches) or not key_caches:
        raise ValueError(f"queries [layers, Hq, W, d] and one key cache per layer, got {tuple(queries.shape)} "
                         f"and {len(key_caches)} caches")
    shared = same_layout(key_caches)
    for cache in key_caches[:1] if shared else key_caches:  # (one layout: the first stands for all)
        _check_cache(cache, block_table, seq_len, "key_cache")
    w = queries.shape[2]
    if w > seq_len:
        raise ValueError(f"window ({w}) is longer than the context ({seq_len})")
    if not (shared
            and _scoring_kernel_runs(queries.shape[1], key_caches[0].shape[2], w, seq_len, impl, queries.device)):
        return WindowStats.stack([
            paged_window_stats(queries[i], cache, block_table, seq_len, pool_kernel, scale, probs_dtype,
                               fix_window_bias, window_bias_as_tensor=True, impl=impl)
            for i, cache in enumerate(key_caches)])
    from . import _scoring

    return _scoring.window_stats_layers(queries, list(key_caches), block_table, seq_len, pool_kernel, scale,
                                        probs_dtype, fix_window_bias, _same_layout=True)


def window_stats(queries: torch.Tensor, keys: torch.Tensor, pool_kernel: int = 5, scale: float | None = None,
                 probs_dtype: torch.dtype | None = None, fix_window_bias: bool = False,
                 window_bias_as_tensor: bool = False, impl: str | None = None) -> WindowStats:
    """Drop-in for `policy.scoring.window_stats` on dense keys [Hkv, L, d] (no copy of the keys)."""
    cache, table = dense_as_paged(keys)
    return paged_window_stats(queries, cache, table, keys.shape[1], pool_kernel, scale, probs_dtype,
                              fix_window_bias, window_bias_as_tensor, impl)


def paged_value_norms(value_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
                      o_proj_weight: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """`policy.scoring.value_norms` of the first `num_tokens` tokens in the pages: fp32 [Hkv, N]."""
    _check_cache(value_cache, block_table, num_tokens, "value_cache")
    if resolve(impl, value_cache.device) == "torch":
        return torch_impl.value_norms(value_cache, block_table, num_tokens, o_proj_weight)
    from . import _value_norm

    return _value_norm.value_norms(value_cache, block_table, num_tokens, o_proj_weight)


def paged_value_norms_layers(value_caches: Sequence[torch.Tensor], block_table: torch.Tensor, num_tokens: int,
                             o_proj_weights: Sequence[torch.Tensor], impl: str | None = None) -> torch.Tensor:
    """`paged_value_norms` of every layer: fp32 [layers, Hkv, N], one launch on the Triton path
    (layer by layer where the caches or weights do not share one layout)."""
    from ._pointers import same_layout

    if len(value_caches) != len(o_proj_weights) or not value_caches:
        raise ValueError(f"{len(value_caches)} value caches, {len(o_proj_weights)} o_proj weights")
    for cache in value_caches:
        _check_cache(cache, block_table, num_tokens, "value_cache")
    if resolve(impl, value_caches[0].device) == "triton" and same_layout(value_caches) \
            and same_layout(o_proj_weights):
        from . import _value_norm

        return _value_norm.value_norms_layers(list(value_caches), block_table, num_tokens, list(o_proj_weights))
    return torch.stack([paged_value_norms(c, block_table, num_tokens, wt, impl)
                        for c, wt in zip(value_caches, o_proj_weights)])


def value_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Drop-in for `policy.scoring.value_norms` on dense values [Hkv, N, d] (no copy)."""
    cache, table = dense_as_paged(values)
    return paged_value_norms(cache, table, values.shape[1], o_proj_weight, impl)


def warmup_lengths(num_kv_heads: int, window: int, device: torch.device) -> list[int]:
    """Prompt lengths whose scoring compiles every kernel variant a model can hit, for warming up
    at start-up: prompt lengths are not specialised on, except the value-norm kernel's tile size
    (small below a threshold that depends on the GPU and the KV head count)."""
    short = 4 * window + 67
    if resolve(None, device) != "triton":
        return [short]
    from ._value_norm import long_prompt_threshold

    return [short, max(short, long_prompt_threshold(num_kv_heads, device)) + 3]


def scoring_ops(impl: str | None = None) -> ScoringOps:
    """The policy methods' heavy primitives served by these kernels: same results, no [Hq, W, L]
    probabilities and no [Hq, L, D] value product. `impl` as everywhere here (None = by device)."""
    return ScoringOps(window_stats=functools.partial(window_stats, window_bias_as_tensor=True, impl=impl),
                      value_norms=functools.partial(value_norms, impl=impl))


def compact_kv(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], kept: torch.Tensor,
               src_block_table: torch.Tensor, dst_block_table: torch.Tensor | None = None,
               impl: str | None = None, check: bool = False) -> None:
    """Copy each layer's kept tokens into destination pages: slot i of head h <- token kept[h, i].

    key_caches / value_caches: one [num_blocks, block_size, Hkv, d] cache per layer (a list, or a
    stacked tensor). kept: int [Hkv, k] (the same for every layer) or [layers, Hkv, k]; entries
    < 0 are skipped (ragged per-head counts). src_block_table: the request's block ids ([blocks]
    or [layers, blocks]). dst_block_table: where slot i goes ([blocks] or [layers, blocks]); its
    blocks must not hold source tokens still to be copied. None compacts in place into the source
    pages, which needs each head's valid kept indices strictly increasing (what the policy's
    selection returns; `check=True` verifies it, at the cost of a device sync).
    """
    if isinstance(key_caches, torch.Tensor) and key_caches.dim() == 5:
        key_caches = list(key_caches.unbind(0))
    if isinstance(value_caches, torch.Tensor) and value_caches.dim() == 5:
        value_caches = list(value_caches.unbind(0))
    key_caches, value_caches = list(key_caches), list(value_caches)
    if check and dst_block_table is None:
        idx = kept if kept.dim() == 3 else kept.unsqueeze(0)
        valid = idx >= 0
        pos = torch.arange(idx.shape[-1], device=idx.device)
        # valid entries strictly increasing <=> each valid entry is larger than every earlier one
        run = torch.where(valid, idx, torch.full_like(idx, -1)).cummax(-1).values
        prev = torch.cat([torch.full_like(run[..., :1], -1), run[..., :-1]], -1)
        if bool(((idx <= prev) & valid).any()) or bool(((idx < pos) & valid).any()):
            raise ValueError("in-place compaction needs each head's kept indices strictly increasing")
    if resolve(impl, key_caches[0].device) == "torch":
        torch_impl.compact_kv(key_caches, value_caches, kept, src_block_table, dst_block_table)
        return
    from . import _compact

    _compact.compact_kv(key_caches, value_caches, kept, src_block_table, dst_block_table)
