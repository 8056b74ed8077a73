"""Observation-window attention and the per-token statistics every method builds on.

Shapes used throughout (one layer, one request):
  queries  [Hq, W, d]   the last W context tokens' queries, post-RoPE
  keys     [Hkv, L, d]  all L context keys, post-RoPE (window included)
  values   [Hkv, L, d]
  P = L - W is the evictable prefix; the window itself is always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-12


def group_size(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def window_attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float | None = None,
    probs_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax of the window queries over all L keys, causal inside the window.

    Returns [Hkv, G, W, L]. The softmax runs in fp32 over every key (window keys included, as the
    official code does; the prefix is *not* renormalised). `probs_dtype` casts the result, which
    is what the official code does with the model dtype (bf16); None keeps fp32.
    """
    hq, w, d = queries.shape
    hkv, n, _ = keys.shape
    g = group_size(hq, hkv)
    if w > n:
        raise ValueError(f"window ({w}) is longer than the context ({n})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = queries.reshape(hkv, g * w, d).float()
    logits = torch.einsum("hrd,hnd->hrn", q, keys.float()) * scale  # [Hkv, G*W, L]
    logits = logits.view(hkv, g, w, n)
    # Window row i sits at absolute position L-W+i and sees keys <= L-W+i.
    rows = torch.arange(w, device=keys.device).view(w, 1) + (n - w)
    cols = torch.arange(n, device=keys.device).view(1, n)
    logits = logits.masked_fill(cols > rows, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if probs_dtype is not None:
        probs = probs.to(probs_dtype)
    return probs


def avg_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """avg_pool1d along the last axis, stride 1, zero padding counted (edges divided by kernel)."""
    if kernel <= 1:
        return x
    shape = x.shape
    y = F.avg_pool1d(x.reshape(-1, 1, shape[-1]).float(), kernel, stride=1, padding=kernel // 2,
                     count_include_pad=True)
    return y.view(shape).to(x.dtype)


def pool_mass_preserving(probs: torch.Tensor, kernel: int) -> torch.Tensor:
    """Pool each row, then rescale it so its sum equals the row's mass before pooling."""
    mass = probs.float().sum(-1, keepdim=True)
    pooled = avg_pool(probs, kernel).float()
    return pooled / (pooled.sum(-1, keepdim=True) + EPS) * mass


@dataclass
class WindowStats:
    """Per-(KV head, prefix token) statistics of one layer's window attention, all fp32 [Hkv, P]."""

    defensive_max: torch.Tensor  # max over window rows and group heads of the pooled, mass-kept probs
    snapkv: torch.Tensor  # mean over window rows, pooled, mean over group heads
    unpooled_mean: torch.Tensor  # mean over window rows and group heads, no pooling (stage 1)
    window_bias: torch.Tensor  # fp32, 0-dim (or [layers] when stacked): mean attention mass on the
    # last W prefix columns (official quirk). A tensor so that reading it never syncs the device.

    _PER_TOKEN = ("defensive_max", "snapkv", "unpooled_mean")

    @classmethod
    def stack(cls, items: "list[WindowStats]") -> "WindowStats":
        """Layers on a leading axis: [layers, Hkv, P] statistics, [layers] window bias."""
        per_token = [torch.stack([getattr(s, f) for s in items]) for f in cls._PER_TOKEN]
        bias = torch.stack([torch.as_tensor(s.window_bias, dtype=torch.float32, device=per_token[0].device)
                            for s in items])
        return cls(*per_token, window_bias=bias)


def window_stats(
    queries: torch.Tensor,
    keys: torch.Tensor,
    pool_kernel: int = 5,
    scale: float | None = None,
    probs_dtype: torch.dtype | None = None,
    fix_window_bias: bool = False,
) -> WindowStats:
    """Everything the window-based methods need, from one attention computation.

    `fix_window_bias=False` reproduces the official code: the "window bias" is the mass on the
    last W *prefix* columns. True measures the mass on the window's own columns instead.
    """
    probs = window_attention_probs(queries, keys, scale, probs_dtype)  # [Hkv, G, W, L]
    w = queries.shape[1]
    n = keys.shape[1]
    p = n - w
    prefix = probs[..., :p]
    if fix_window_bias:
        bias = probs[..., p:].float().sum(-1).mean()
    else:
        bias = prefix[..., max(p - w, 0):].float().sum(-1).mean()
    pooled = pool_mass_preserving(prefix, pool_kernel)  # per row, before aggregation
    defensive_max = pooled.amax(dim=(1, 2))
    # SnapKV pools the row mean; pooling commutes with the mean, so pool once after averaging.
    snap = avg_pool(prefix.float().mean(dim=2), pool_kernel).mean(dim=1)
    unpooled = prefix.float().mean(dim=(1, 2))
    return WindowStats(defensive_max, snap, unpooled, bias.float())


def value_norms(values: torch.Tensor, o_proj_weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """CriticalKV's ||v W_o^q||_1 per token, averaged over each KV head's query group.

    values [Hkv, N, d]; o_proj_weight [D, Hq*d] (nn.Linear layout). Returns fp32 [Hkv, N].
    One GEMM per KV head against its group's W_o slices side by side, chunked over tokens so the
    (tokens x G*D) product stays bounded: `chunk` rows (default 256 on the CPU, where a product
    that fits the caches runs ~3x faster than 4096 rows; 4096 elsewhere).
    """
    hkv, n, d = values.shape
    dim_out, hqd = o_proj_weight.shape
    g = group_size(hqd // d, hkv)
    if chunk is None:
        chunk = 256 if values.device.type == "cpu" else 4096
    # [Hkv, d, G*D]: the d x D slices of W_o^T of a group's query heads, side by side.
    wo = o_proj_weight.float().t().reshape(hkv, g, d, dim_out).permute(0, 2, 1, 3).reshape(hkv, d, g * dim_out)
    out = torch.empty(hkv, n, dtype=torch.float32, device=values.device)
    for s in range(0, n, chunk):
        proj = torch.bmm(values[:, s : s + chunk].float(), wo)  # [Hkv, c, G*D]
        out[:, s : s + chunk] = proj.abs_().view(hkv, -1, g, dim_out).sum(-1).mean(-1)
    return out


def value_norm_share(norms: torch.Tensor) -> torch.Tensor:
    """DefensiveKV's weighting: each token's norm as a share across KV heads (sums to 1 per token).
    norms [..., Hkv, L].

    Faithful to the official code, which normalises over heads, not tokens: with one KV head the
    share is identically 1 and the weighting vanishes.
    """
    return norms / (norms.sum(-2, keepdim=True) + EPS)


def mass_prefix_counts(unpooled_mean: torch.Tensor, threshold: torch.Tensor | float, cap: int) -> torch.Tensor:
    """Stage-1 must-keep counts: leading tokens (by attention) whose cumulative share stays < threshold.

    The crossing token is excluded, as in the official code; counts are capped at `cap` (>= 0).
    Any leading (layer) axes; `threshold` broadcasts against [..., Hkv, 1].
    """
    share = unpooled_mean / (unpooled_mean.sum(-1, keepdim=True) + EPS)
    ordered = torch.sort(share, dim=-1, descending=True, stable=True).values
    below = (ordered.cumsum(-1) < threshold).sum(-1)
    return below.clamp(max=max(cap, 0))


def top_rank_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row's `counts[..., h]` highest scores (ties: lower index first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < counts.unsqueeze(-1)
