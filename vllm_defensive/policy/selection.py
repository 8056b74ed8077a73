"""Budget allocation: how many tokens each (layer, KV head) keeps, and which.

Every function takes a ranking key [Hkv, L] where protected tokens are +inf, so that they rank
first and ties break toward the lower index (deterministic on every device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .scoring import top_rank_mask


def ranking_key(scores: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    key = scores.float()
    if forced is not None:
        key = key.masked_fill(forced, float("inf"))
    return key


def uniform_counts(num_kv_heads: int, per_head: int, device=None) -> torch.Tensor:
    return torch.full((num_kv_heads,), per_head, dtype=torch.long, device=device)


def flat_topk_counts(key: torch.Tensor, total: int) -> torch.Tensor:
    """Ada-KV allocation: one top-`total` over all (head, token) pairs; count the winners per head."""
    hkv, n = key.shape
    total = max(0, min(total, hkv * n))
    order = torch.sort(key.flatten(), descending=True, stable=True).indices[:total]
    return torch.bincount(order // n, minlength=hkv)


def adakv_counts(key: torch.Tensor, per_head: int, alpha: float) -> torch.Tensor:
    """Ada-KV with the alpha safeguard (kvpress's AdaKVPress): each head first keeps its top
    floor(alpha * per_head) tokens, the rest of the layer's budget goes to a flattened top-k."""
    hkv, n = key.shape
    floor_k = min(int(alpha * per_head), n)
    if floor_k == 0:
        return flat_topk_counts(key, hkv * per_head)
    safe = top_rank_mask(key, torch.full((hkv,), floor_k, device=key.device))
    rest = key.masked_fill(safe, float("-inf"))
    extra = flat_topk_counts(rest, hkv * per_head - hkv * floor_k)
    return floor_k + extra


def pyramid_budgets(num_layers: int, per_layer: int, beta: float, lo: int, hi: int) -> list[int]:
    """PyramidKV: budgets fall linearly from 2B - B/beta (first layer) to B/beta (last layer).

    Integer budgets clamped to [lo, hi] whose sum is exactly num_layers * per_layer when feasible.
    """
    b = float(per_layer)
    top, bottom = 2 * b - b / beta, b / beta
    if num_layers == 1:
        raw = [b]
    else:
        raw = [top - (top - bottom) * i / (num_layers - 1) for i in range(num_layers)]
    out = [min(hi, max(lo, int(x))) for x in raw]
    target = min(num_layers * per_layer, num_layers * hi)
    i = 0
    while sum(out) < target and any(o < hi for o in out):  # hand out the rounding remainder
        if out[i % num_layers] < hi:
            out[i % num_layers] += 1
        i += 1
    return out


def global_layer_totals(keys: Sequence[torch.Tensor], total: int) -> list[int]:
    """Layer-DefensiveKV: one top-`total` over every layer's (head, token) keys; winners per layer."""
    sizes = [k.numel() for k in keys]
    flat = torch.cat([k.flatten().float() for k in keys])
    total = max(0, min(total, flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:total]
    bounds = torch.tensor(sizes, device=flat.device).cumsum(0)
    layer_of = torch.bucketize(order, bounds, right=True)
    return torch.bincount(layer_of, minlength=len(keys)).tolist()


def select_by_counts(key: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep mask [Hkv, L] with each head's `counts[h]` best tokens."""
    return top_rank_mask(key, counts)


def mask_to_indices(mask: torch.Tensor) -> list[torch.Tensor]:
    """Sorted kept indices per head."""
    return [row.nonzero().flatten() for row in mask]


def uniform_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[..., Hkv, k] sorted kept indices of a mask that keeps exactly k tokens on every head (the
    uniform selections do by construction: top-k ranks). A stable sort rather than nonzero(): no
    device sync, and any leading (layer) axes."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
