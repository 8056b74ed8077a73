"""Eviction methods, one small class each (kvpress's press style), built from the pieces in
scoring / aggregation / selection. Every method answers, for every layer and KV head, which
context tokens to keep: deterministic, sorted, protected tokens always included.

Entry points:
  compress(layers)                  the method as published (its own head / layer allocation)
  compress_uniform(layer, k)        k tokens on every KV head of one layer: what stock paged
                                    attention can serve (one length per request)
  compress_uniform_layers(layers,k) the same for every layer of a request at once: the plugin's path

A method's scoring is split in two: `measure` (per layer: the window statistics and value norms,
the heavy part that the kernels accelerate) and `score` (elementwise and per-row work on those
measurements, written for any leading axes). `compress_uniform_layers` measures layer by layer,
stacks the measurements and scores and selects all layers in one go: a few batched ops and no
device sync, instead of ~50 small ops and several syncs per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .aggregation import prior_risk_floor
from .config import EvictionConfig
from .scoring import WindowStats, mass_prefix_counts, value_norm_share, value_norms, window_stats
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
class Measurements:
    """What a method's scores are computed from, measured on one layer (or stacked over layers on
    a leading axis by `stack`)."""

    num_kv_heads: int
    context_len: int
    device: torch.device
    stats: WindowStats | None = None  # window attention statistics
    norms: torch.Tensor | None = None  # [..., Hkv, L] fp32 value norms

    @classmethod
    def of(cls, inp: LayerInputs, **fields) -> "Measurements":
        return cls(inp.num_kv_heads, inp.context_len, inp.keys.device, **fields)

    @classmethod
    def stack(cls, items: Sequence["Measurements"]) -> "Measurements":
        first = items[0]
        if any((m.num_kv_heads, m.context_len) != (first.num_kv_heads, first.context_len) for m in items):
            raise ValueError("stacked layers must share KV heads and context length")
        stats = WindowStats.stack([m.stats for m in items]) if first.stats is not None else None
        norms = torch.stack([m.norms for m in items]) if first.norms is not None else None
        return cls(first.num_kv_heads, first.context_len, first.device, stats, norms)


@dataclass
class LayerScores:
    """Scores of one layer [Hkv, L], or of stacked layers [layers, Hkv, L]; `forced` and
    `protected` may omit the layer axis (they broadcast)."""

    scores: torch.Tensor  # [..., Hkv, L] fp32, the method's importance
    forced: torch.Tensor  # [..., Hkv, L] bool, tokens that must stay (window, sinks, stage 1)
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
    uses_window = False  # scores from the window's attention statistics
    uses_values = False  # ... weighted by value norms (callers may skip gathering values otherwise)

    def __init__(self, config: EvictionConfig | None = None, ops: ScoringOps | None = None):
        self.config = config or EvictionConfig(method=self.name if self.name != "base" else "defensivekv")
        self.ops = ops or REFERENCE_OPS

    # -- pieces a method overrides ---------------------------------------------------------------
    def measure(self, inp: LayerInputs) -> Measurements:
        """Per layer, through `self.ops`: the heavy part. Must not sync the device."""
        return Measurements.of(inp, stats=self._window_stats(inp) if self.uses_window else None,
                               norms=_norms_or_ones(self.ops, inp) if self.uses_values else None)

    def score(self, m: Measurements, per_head: int) -> LayerScores:
        """Scores from measurements, for any leading (layer) axes."""
        raise NotImplementedError

    def score_layer(self, inp: LayerInputs, per_head: int) -> LayerScores:
        return self.score(self.measure(inp), per_head)

    def head_counts(self, scored: LayerScores, per_head: int) -> torch.Tensor:
        return uniform_counts(scored.scores.shape[0], per_head, scored.scores.device)

    def select(self, scored: LayerScores, counts: torch.Tensor) -> torch.Tensor:
        """Keep mask [..., Hkv, L] with counts[..., h] tokens per head."""
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

    def _window_stats(self, inp: LayerInputs) -> WindowStats:
        c = self.config
        return self.ops.window_stats(
            inp.queries, inp.keys, c.pool_kernel, inp.scale,
            c.window_probs_dtype(inp.keys.dtype), c.fix_window_bias,
        )

    def _pad_window(self, prefix_scores: torch.Tensor, n: int) -> torch.Tensor:
        """Append the window's columns with the layer max (they are forced anyway)."""
        top = prefix_scores.amax(dim=(-2, -1), keepdim=True)
        return torch.cat([prefix_scores, top.expand(*prefix_scores.shape[:-1], n - prefix_scores.shape[-1])], dim=-1)

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
        return [self.select(s, self.head_counts(s, b)) for s, b in zip(scored, budgets)]

    def compress_uniform(self, inp: LayerInputs, per_head: int | None = None) -> torch.Tensor:
        """[Hkv, k] sorted kept indices, the same count k on every head of this layer."""
        return self.compress_uniform_layers([inp], per_head)[0]

    def compress_uniform_layers(self, layers: Iterable[LayerInputs], per_head: int | None = None) -> torch.Tensor:
        """[layers, Hkv, k] sorted kept indices, k on every head of every layer (layers share the
        context length). `layers` may be a generator: each layer's inputs are dropped once
        measured, so only the measurements of all layers are alive at once."""
        measured = []
        for inp in layers:
            n, k = inp.context_len, self._uniform_k(inp.context_len, per_head)
            if k < n:
                self._check(inp)
                measured.append(self.measure(inp))
            else:
                measured.append(Measurements.of(inp))
        if not measured:
            raise ValueError("no layers to compress")
        return self.compress_uniform_measured(Measurements.stack(measured), len(measured), per_head)

    def compress_uniform_measured(self, m: Measurements, num_layers: int, per_head: int | None = None) -> torch.Tensor:
        """The second half of `compress_uniform_layers`: [layers, Hkv, k] kept indices from
        measurements stacked over the layers (taken by `measure`, or by a fast path that measures
        every layer at once and promises the same fields: `stats` when `uses_window`, `norms`
        when `uses_values`)."""
        n, hkv, k = m.context_len, m.num_kv_heads, self._uniform_k(m.context_len, per_head)
        if k >= n:
            return torch.arange(n, device=m.device).expand(num_layers, hkv, n).clone()
        if self.config.window >= n:
            raise ValueError(f"window ({self.config.window}) must be shorter than the context ({n})")
        scored = self.uniform_scores(self.score(m, k))
        mask = self.select(scored, uniform_counts(hkv, k, m.device))
        return uniform_indices(mask.expand(num_layers, hkv, n), k)

    def _uniform_k(self, n: int, per_head: int | None) -> int:
        return self.config.keep_per_head(n) if per_head is None else min(per_head, n)


class NoEviction(EvictionMethod):
    name = "none"

    def score(self, m, per_head):
        hkv, n = m.num_kv_heads, m.context_len
        return LayerScores(torch.zeros(hkv, n, device=m.device), torch.ones(hkv, n, dtype=torch.bool, device=m.device))


class StreamingLLM(EvictionMethod):
    """Attention sinks (4 by default) plus the most recent tokens."""

    name = "streamingllm"

    def score(self, m, per_head):
        hkv, n = m.num_kv_heads, m.context_len
        recency = torch.arange(n, device=m.device, dtype=torch.float32).expand(hkv, n)
        return LayerScores(recency.clone(), self.protected(hkv, n, m.device))


class SnapKV(EvictionMethod):
    """Mean attention of the window queries, pooled, averaged over the query group; uniform heads."""

    name = "snapkv"
    uses_window = True

    def score(self, m, per_head):
        n = m.context_len
        return LayerScores(self._pad_window(m.stats.snapkv, n), self.protected(m.num_kv_heads, n, m.device),
                           {"stats": m.stats})


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
    uses_values = True

    def score(self, m, per_head):
        scored = super().score(m, per_head)
        scored.extra["norms"] = m.norms
        return scored

    def select(self, scored, counts):
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
    uses_window = uses_values = True

    def score(self, m, per_head):
        c = self.config
        n, w, hkv = m.context_len, c.window, m.num_kv_heads
        p = n - w
        stats = m.stats
        risk = prior_risk_floor(stats.defensive_max)  # [..., Hkv, P]
        norms = m.norms[..., :p]
        share = value_norm_share(norms)
        score = risk * share
        top = score.amax(dim=(-2, -1), keepdim=True)  # the layer max
        # Stage 1: the head's leading tokens by unpooled attention mass, capped by the budget.
        cap = int(p * per_head / n - w)
        bias = torch.as_tensor(stats.window_bias, dtype=torch.float32, device=m.device)
        threshold = c.mass_threshold - bias[..., None, None]
        counts = mass_prefix_counts(stats.unpooled_mean, threshold, cap)
        stage1 = select_by_counts(stats.unpooled_mean, counts)
        score = torch.where(stage1, top, score)
        protected = self.protected(hkv, n, m.device)
        forced = protected.expand(*score.shape[:-1], n).clone()
        forced[..., :p] |= stage1
        extra = {"stats": stats, "stage1": counts, "share": share, "norms": norms, "per_head": per_head}
        return LayerScores(self._pad_window(score, n), forced, extra, protected)

    def uniform_scores(self, scored):
        """How a head ranks its tokens when every head keeps the same count (the plugin's path).

        The published score is floored risk x value-norm *share* (the token's norm over its sum
        across KV heads). The share's divisor is the same for a token on every head, a correction
        for the paper's head-wise top-k where heads compete; inside one head it reweights tokens
        by how the *other* heads' values look, which erases CriticalKV's output-perturbation
        weighting. With one count per head the floor ties most of a head at its mean (84% of
        tokens below it on SmolLM2 NIAH prompts), and those ties are then broken by the norm
        alone: by the share, noise; by the token's own ||v W_o||, CriticalKV's signal.

        Ranking (`uniform_floor=True`, `uniform_norm="raw"`): floored risk x own value norm.
        Served on the GPU (Qwen2.5-Coder-0.5B, RULER 13 tasks, 20%,
        benchmarks/results/quality_ranking/) it scored +7.5 (4K) and +8.0 (8K) points above the
        share weighting without the floor, which the floored share ranking was 7.8 points below
        in turn.

        The floor is also what makes it fragile: a token whose worst-case risk stays under its
        head's mean ties with the haystack, and on SmolLM2-135M a third to a half of the
        needle's (layer, head) entries do (RULER
        niah_single_1 at 20%: 2 of 25 served on the GPU, 3 of 25 on the CPU, against 21 for
        SnapKV; the published head-wise allocation loses it too). So by default
        (`uniform_risk_first=0.5`) half of each head's count goes first to the top *unfloored*
        worst-case risks, the rest to the floored ranking: CriticalKV's two-stage shape with
        DefensiveKV's aggregation. It keeps SmolLM2's needle (21 of 25 served, CPU) at -1.2 /
        -1.7 points (95% CIs include 0) on Qwen's 13 tasks at 4K / 8K. Every field can be set
        per request. Stage-1, window and sink tokens stay forced whatever the ranking."""
        c, ex = self.config, scored.extra
        raw_risk = ex["stats"].defensive_max
        risk = prior_risk_floor(raw_risk) if c.uniform_floor else raw_risk
        prefix = risk * (ex["share"] if c.uniform_norm == "share" else ex["norms"])
        # forced tokens (stage 1, window, sinks) need no score: ranking_key puts them first
        scores = torch.cat([prefix, scored.scores[..., prefix.shape[-1]:]], dim=-1)
        forced = scored.forced
        first = int(c.uniform_risk_first * ex["per_head"])
        if first > 0:  # CriticalKV's two-stage shape: part of the count by the unfloored risk alone
            n, hkv = scores.shape[-1], scores.shape[-2]
            key = ranking_key(self._pad_window(raw_risk, n), forced)
            forced = forced | select_by_counts(key, uniform_counts(hkv, first, scores.device))
        return LayerScores(scores, forced, ex, scored.protected)

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
