"""Eviction methods, one small class each (kvpress's press style), built from the pieces in
scoring / aggregation / selection. Every method answers, for every layer and KV head, which
context tokens to keep: deterministic, sorted, protected tokens always included.

Two entry points:
  compress(layers)               the method as published (its own head / layer allocation)
  compress_uniform(layer, k)     k tokens on every KV head of one layer: what stock paged attention
                                 can serve (one length per request); the plugin uses this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .aggregation import prior_risk_floor
from .config import EvictionConfig
from .scoring import mass_prefix_counts, value_norm_share, value_norms, window_stats
from .selection import (
    adakv_counts,
    flat_topk_counts,
    global_layer_totals,
    pyramid_budgets,
    ranking_key,
    select_by_counts,
    uniform_counts,
    uniform_indices,
)


@dataclass(frozen=True)
class ScoringOps:
    """The two heavy scoring primitives a method calls. The defaults are the policy library's own
    PyTorch functions (the reference); a fast path (e.g. `vllm_defensive.triton_kernels`) passes
    drop-ins with the same signatures and results, leaving every method's logic untouched."""

    window_stats: Callable = window_stats  # (queries, keys, pool_kernel, scale, probs_dtype, fix_window_bias)
    value_norms: Callable = value_norms  # (values [Hkv, L, d], o_proj_weight [D, Hq*d]) -> fp32 [Hkv, L]


REFERENCE_OPS = ScoringOps()


@dataclass
class LayerInputs:
    """One layer of one request, post-RoPE. L = context length (protected suffix excluded)."""

    queries: torch.Tensor  # [Hq, W, d] the window's queries
    keys: torch.Tensor  # [Hkv, L, d]
    values: torch.Tensor | None = None  # [Hkv, L, d]; needed by value-norm methods
    o_proj_weight: torch.Tensor | None = None  # [D, Hq*d]
    scale: float | None = None  # softmax scale; None = 1/sqrt(d)

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def context_len(self) -> int:
        return self.keys.shape[1]


@dataclass
class LayerScores:
    scores: torch.Tensor  # [Hkv, L] fp32, the method's importance
    forced: torch.Tensor  # [Hkv, L] bool, tokens that must stay (window, sinks, stage 1)
    extra: dict = field(default_factory=dict)
    protected: torch.Tensor | None = None  # subset of `forced` that outranks the rest (window, sinks)

    @property
    def key(self) -> torch.Tensor:
        key = ranking_key(self.scores, self.forced)
        if self.protected is not None:
            # forced-but-unprotected tokens (stage 1) rank just below the window and sinks, so a
            # tight layer budget (Layer-DefensiveKV) never drops the window for them
            key = key.masked_fill(self.forced & ~self.protected, torch.finfo(torch.float32).max)
        return key


class EvictionMethod:
    name = "base"

    def __init__(self, config: EvictionConfig | None = None, ops: ScoringOps | None = None):
        self.config = config or EvictionConfig(method=self.name if self.name != "base" else "defensivekv")
        self.ops = ops or REFERENCE_OPS

    # -- pieces a method overrides ---------------------------------------------------------------
    def score_layer(self, inp: LayerInputs, per_head: int) -> LayerScores:
        raise NotImplementedError

    def head_counts(self, scored: LayerScores, per_head: int) -> torch.Tensor:
        return uniform_counts(scored.scores.shape[0], per_head, scored.scores.device)

    def select_layer(self, inp: LayerInputs, scored: LayerScores, counts: torch.Tensor) -> torch.Tensor:
        return select_by_counts(scored.key, counts)

    def layer_budgets(self, scored: Sequence[LayerScores], per_head: int, context_len: int) -> list[int]:
        return [per_head] * len(scored)

    def uniform_scores(self, scored: LayerScores) -> LayerScores:
        """The scores that rank tokens inside one head when every head keeps the same count."""
        return scored

    # -- shared machinery -------------------------------------------------------------------------
    def protected(self, hkv: int, n: int, device) -> torch.Tensor:
        forced = torch.zeros(hkv, n, dtype=torch.bool, device=device)
        forced[:, max(n - self.config.window, 0):] = True
        forced[:, : min(self.config.sinks, n)] = True
        return forced

    def _window_stats(self, inp: LayerInputs):
        c = self.config
        return self.ops.window_stats(
            inp.queries, inp.keys, c.pool_kernel, inp.scale,
            None if c.probs_fp32 else inp.keys.dtype, c.fix_window_bias,
        )

    def _pad_window(self, prefix_scores: torch.Tensor, n: int) -> torch.Tensor:
        """Append the window's columns with the layer max (they are forced anyway)."""
        hkv, p = prefix_scores.shape
        top = prefix_scores.max() if prefix_scores.numel() else torch.tensor(0.0)
        return torch.cat([prefix_scores, top.expand(hkv, n - p).to(prefix_scores)], dim=-1)

    def _check(self, inp: LayerInputs) -> None:
        if inp.queries.shape[1] != self.config.window:
            raise ValueError(f"got {inp.queries.shape[1]} window queries, config.window is {self.config.window}")
        if self.config.window >= inp.context_len:
            raise ValueError(f"window ({self.config.window}) must be shorter than the context ({inp.context_len})")

    def compress(self, layers: Sequence[LayerInputs]) -> list[torch.Tensor]:
        """Keep masks [Hkv, L] per layer with the method's own allocation."""
        n = layers[0].context_len
        per_head = self.config.keep_per_head(n)
        if per_head >= n:
            return [torch.ones(x.num_kv_heads, n, dtype=torch.bool, device=x.keys.device) for x in layers]
        for x in layers:
            self._check(x)
        scored = [self.score_layer(x, per_head) for x in layers]
        budgets = self.layer_budgets(scored, per_head, n)
        return [self.select_layer(x, s, self.head_counts(s, b)) for x, s, b in zip(layers, scored, budgets)]

    def compress_uniform(self, inp: LayerInputs, per_head: int | None = None) -> torch.Tensor:
        """[Hkv, k] sorted kept indices, the same count k on every head of this layer."""
        n = inp.context_len
        k = self.config.keep_per_head(n) if per_head is None else min(per_head, n)
        if k >= n:
            return torch.arange(n, device=inp.keys.device).expand(inp.num_kv_heads, n).clone()
        self._check(inp)
        scored = self.uniform_scores(self.score_layer(inp, k))
        counts = uniform_counts(inp.num_kv_heads, k, inp.keys.device)
        return uniform_indices(self.select_layer(inp, scored, counts))


class NoEviction(EvictionMethod):
    name = "none"

    def score_layer(self, inp, per_head):
        hkv, n = inp.num_kv_heads, inp.context_len
        return LayerScores(torch.zeros(hkv, n, device=inp.keys.device),
                           torch.ones(hkv, n, dtype=torch.bool, device=inp.keys.device))


class StreamingLLM(EvictionMethod):
    """Attention sinks (4 by default) plus the most recent tokens."""

    name = "streamingllm"

    def score_layer(self, inp, per_head):
        hkv, n = inp.num_kv_heads, inp.context_len
        recency = torch.arange(n, device=inp.keys.device, dtype=torch.float32).expand(hkv, n)
        return LayerScores(recency.clone(), self.protected(hkv, n, inp.keys.device))


class SnapKV(EvictionMethod):
    """Mean attention of the window queries, pooled, averaged over the query group; uniform heads."""

    name = "snapkv"

    def score_layer(self, inp, per_head):
        stats = self._window_stats(inp)
        n = inp.context_len
        return LayerScores(self._pad_window(stats.snapkv, n), self.protected(inp.num_kv_heads, n, inp.keys.device),
                           {"stats": stats})


class PyramidKV(SnapKV):
    """SnapKV scores with budgets falling linearly across layers (beta = 20)."""

    name = "pyramidkv"

    def layer_budgets(self, scored, per_head, context_len):
        lo = self.config.protected_count(context_len)
        return pyramid_budgets(len(scored), per_head, self.config.pyramid_beta, lo, context_len)


class AdaKV(SnapKV):
    """SnapKV scores, one top-k over the layer's heads, each head keeping an alpha floor (0.2)."""

    name = "adakv"

    def head_counts(self, scored, per_head):
        return adakv_counts(scored.key, per_head, self.config.alpha)


def _norms_or_ones(ops: ScoringOps, inp: LayerInputs) -> torch.Tensor:
    if inp.values is None or inp.o_proj_weight is None:
        return torch.ones(inp.num_kv_heads, inp.context_len, device=inp.keys.device)
    return ops.value_norms(inp.values, inp.o_proj_weight)


class CriticalKV(AdaKV):
    """kvpress's CriticalAdaKV: Ada head budgets B_h; the top half of B_h by attention is kept
    (stage 1), the rest by (attention + 1e-4) * mean-group ||v W_o||_1 (stage 2)."""

    name = "criticalkv"

    def score_layer(self, inp, per_head):
        scored = super().score_layer(inp, per_head)
        scored.extra["norms"] = _norms_or_ones(self.ops, inp)
        return scored

    def select_layer(self, inp, scored, counts):
        stage1 = select_by_counts(scored.key, (counts.float() * self.config.critical_stage1_fraction).long())
        weighted = (scored.scores + 1e-4) * scored.extra["norms"]
        return select_by_counts(ranking_key(weighted, scored.forced | stage1), counts)


class DefensiveKV(EvictionMethod):
    """DefensiveKV (arXiv 2510.13334): worst case over window rows and group heads, floored at the
    head's mean, times the value-norm share across KV heads; a stage-1 set by cumulative attention
    mass and the window are forced; one top-k over the layer's heads (no alpha floor).

    Faithful by default: window probabilities in the model dtype (`probs_fp32` to change) and the
    official "window bias" slice (`fix_window_bias` to measure it on the window itself)."""

    name = "defensivekv"

    def score_layer(self, inp, per_head):
        c = self.config
        n, w, hkv = inp.context_len, c.window, inp.num_kv_heads
        p = n - w
        stats = self._window_stats(inp)
        risk = prior_risk_floor(stats.defensive_max)  # [Hkv, P]
        norms = _norms_or_ones(self.ops, inp)[:, :p]
        share = value_norm_share(norms)
        score = risk * share
        top = score.max()
        # Stage 1: the head's leading tokens by unpooled attention mass, capped by the budget.
        cap = int(p * per_head / n - w)
        counts = mass_prefix_counts(stats.unpooled_mean, c.mass_threshold - stats.window_bias, cap)
        stage1 = select_by_counts(stats.unpooled_mean, counts)
        score = score.masked_fill(stage1, float(top))
        protected = self.protected(hkv, n, inp.keys.device)
        forced = protected.clone()
        forced[:, :p] |= stage1
        extra = {"stats": stats, "stage1": counts, "raw": stats.defensive_max * share}
        return LayerScores(self._pad_window(score, n), forced, extra, protected)

    def uniform_scores(self, scored):
        """The prior-risk floor lifts every token below its head's mean risk to that mean: a
        correction for comparing heads (the paper's head-wise top-k, where floored tokens lose to
        other heads' riskier ones). With one count per head they must fill it instead, and the
        floored score orders them by the value-norm share alone. With max aggregation that is
        most of a head (84% of tokens below the mean on SmolLM2 NIAH prompts; a 20% budget keeps
        more than the 16% above it). So the uniform path ranks by the unfloored score unless
        `uniform_floor`; above the mean nothing changes. Stage-1 and window tokens stay forced."""
        if self.config.uniform_floor:
            return scored
        raw = scored.extra["raw"]  # forced tokens need no score: ranking_key puts them first
        scores = torch.cat([raw, scored.scores[:, raw.shape[1]:]], dim=-1)
        return LayerScores(scores, scored.forced, scored.extra, scored.protected)

    def head_counts(self, scored, per_head):
        if self.config.alpha > 0:
            return adakv_counts(scored.key, per_head, self.config.alpha)
        return flat_topk_counts(scored.key, scored.scores.shape[0] * per_head)


class LayerDefensiveKV(DefensiveKV):
    """Layer-DefensiveKV: DefensiveKV scores, one top-k over all layers' (head, token) pairs.

    Deliberate deviation from the official code: each layer's window and sinks rank first in the
    global top-k (the official code gives them only the layer max, so a layer could lose its
    window); stage-1 tokens keep the faithful layer-max score in the global ranking."""

    name = "layer_defensivekv"

    def layer_budgets(self, scored, per_head, context_len):
        hkv = scored[0].scores.shape[0]
        window_only = [ranking_key(s.scores, self.protected(hkv, context_len, s.scores.device)) for s in scored]
        totals = global_layer_totals(window_only, hkv * per_head * len(scored))
        return [t / hkv for t in totals]  # per-head average; head_counts multiplies back

    def head_counts(self, scored, per_head):
        total = round(per_head * scored.scores.shape[0])
        return flat_topk_counts(scored.key, total)


METHODS: dict[str, type[EvictionMethod]] = {
    m.name: m for m in (NoEviction, StreamingLLM, SnapKV, PyramidKV, AdaKV, CriticalKV, DefensiveKV, LayerDefensiveKV)
}


def get_method(config: EvictionConfig | str, ops: ScoringOps | None = None, **overrides) -> EvictionMethod:
    if isinstance(config, str):
        config = EvictionConfig(method=config, **overrides)
    return METHODS[config.method](config, ops)
