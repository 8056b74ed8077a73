"""How per-query attention becomes one score per (KV head, token).

The window-level reductions (mean for SnapKV, max for DefensiveKV) live in `scoring.window_stats`
because max does not commute with pooling; this module holds the defensive correction itself.
"""

from __future__ import annotations

import torch


def aggregate_mean(probs: torch.Tensor) -> torch.Tensor:
    """[Hkv, G, W, P] -> [Hkv, P]: the average-case importance of SnapKV-style methods."""
    return probs.float().mean(dim=(1, 2))


def aggregate_max(probs: torch.Tensor) -> torch.Tensor:
    """[Hkv, G, W, P] -> [Hkv, P]: the worst-case risk over window rows and group heads."""
    return probs.float().amax(dim=(1, 2))


def prior_risk_floor(risk: torch.Tensor) -> torch.Tensor:
    """Raise every token's risk to at least its head's mean risk (DefensiveKV step 2)."""
    return torch.maximum(risk, risk.mean(-1, keepdim=True))


def aggregate_defensive(probs: torch.Tensor) -> torch.Tensor:
    """Worst case over window rows and group heads, floored at the per-head mean."""
    return prior_risk_floor(aggregate_max(probs))
