"""Validated eviction configuration (pydantic): what the CLI, the API and the policy share."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MethodName = Literal[
    "none", "streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "defensivekv", "layer_defensivekv"
]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__  # type: ignore[attr-defined]
# Short aliases people type on the command line.
ALIASES = {"defensive": "defensivekv", "layer_defensive": "layer_defensivekv", "critical": "criticalkv",
           "snap": "snapkv", "streaming": "streamingllm", "off": "none"}


class EvictionConfig(BaseModel):
    """One request's eviction settings. Defaults follow ../shared/docs/algorithm.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MethodName = "defensivekv"
    budget: float | None = Field(None, description="fraction of the context kept per KV head, 0 < b <= 1")
    budget_tokens: int | None = Field(None, ge=1, description="absolute tokens kept per KV head")
    window: int = Field(32, ge=1, description="observation window: last context tokens used as queries")
    pool_kernel: int = Field(5, ge=1, description="average-pooling kernel along keys (odd)")
    sink_tokens: int | None = Field(None, ge=0, description="leading tokens always kept (None: method default)")
    protect_suffix: int = Field(0, ge=0, description="last prompt tokens never evicted nor used as window")
    min_prompt: int = Field(0, ge=0, description="prompts shorter than this are left alone")
    mass_threshold: float = Field(0.9, gt=0, le=1, description="DefensiveKV stage-1 cumulative-mass threshold")
    head_alpha: float | None = Field(None, ge=0, le=1, description="Ada-KV per-head floor (None: method default)")
    pyramid_beta: float = Field(20.0, gt=1)
    critical_stage1_fraction: float = Field(0.5, ge=0, le=1)
    probs_fp32: bool = Field(False, description="keep window probabilities in fp32 (official: model dtype)")
    fix_window_bias: bool = Field(False, description="measure window bias on the window (official: last prefix W)")
    # How DefensiveKV ranks a head's tokens when every head keeps the same count (the plugin's
    # allocation). Defaults: half of each head's count by the unfloored worst-case risk, the rest
    # by the floored risk x the token's own value norm (DefensiveKV.uniform_scores says why;
    # benchmarks/results/quality_ranking/ has the measurements).
    uniform_floor: bool = Field(
        True, description="DefensiveKV with the same count on every head: rank each head's tokens by "
        "the floored risk (True, the published score) or the unfloored one (False)")
    uniform_norm: Literal["share", "raw"] = Field(
        "raw", description="DefensiveKV with the same count on every head: weight the risk by the "
        "token's own value norm (raw, CriticalKV's weighting) or by its value-norm share across KV "
        "heads (share, the published score: its per-token divisor only matters when heads compete)")

    uniform_risk_first: float = Field(
        0.5, ge=0, le=1, description="DefensiveKV with the same count on every head: this fraction of "
        "each head's count is first filled by the unfloored worst-case risk alone (the window and "
        "sinks count toward it), the rest by the uniform ranking above; CriticalKV's two-stage "
        "shape, so a needle the floor ties with the haystack can still win a place (0: the floored "
        "ranking alone)")

    @field_validator("method", mode="before")
    @classmethod
    def _alias(cls, v):
        if isinstance(v, str):
            v = ALIASES.get(v.strip().lower(), v.strip().lower())
            if v not in METHOD_NAMES:
                raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHOD_NAMES)}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if v is None:
            return v
        if not math.isfinite(v) or not (0.0 < v <= 1.0):
            raise ValueError(f"budget must be a fraction with 0 < budget <= 1, got {v}")
        return v

    @field_validator("pool_kernel")
    @classmethod
    def _odd(cls, v):
        if v % 2 == 0:
            raise ValueError(f"pool_kernel must be odd so pooling stays centred, got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget is not None and self.budget_tokens is not None:
            raise ValueError("give budget or budget_tokens, not both")
        if self.budget is None and self.budget_tokens is None:
            object.__setattr__(self, "budget", 0.2)
        return self

    # --- derived quantities -------------------------------------------------------------------
    @property
    def sinks(self) -> int:
        if self.sink_tokens is not None:
            return self.sink_tokens
        return 4 if self.method == "streamingllm" else 0

    @property
    def alpha(self) -> float:
        if self.head_alpha is not None:
            return self.head_alpha
        return 0.2 if self.method in ("adakv", "criticalkv") else 0.0

    def context_len(self, prompt_len: int) -> int:
        """Tokens that eviction may touch: the prompt minus the protected suffix."""
        return prompt_len - self.protect_suffix

    def check_prompt(self, prompt_len: int) -> None:
        """Raise ValueError naming the field when this prompt cannot be compressed as asked."""
        if self.protect_suffix >= prompt_len:
            raise ValueError(f"protect_suffix ({self.protect_suffix}) must be shorter than the prompt ({prompt_len} tokens)")
        ctx = self.context_len(prompt_len)
        if self.window >= ctx:
            raise ValueError(f"window ({self.window}) must be shorter than the context ({ctx} tokens"
                             f"{' after protect_suffix' if self.protect_suffix else ''})")

    def window_probs_dtype(self, kv_dtype):
        """The dtype the window probabilities are rounded to: the model's (the official code's),
        or None (kept in fp32) with `probs_fp32`."""
        return None if self.probs_fp32 else kv_dtype

    def protected_count(self, context_len: int) -> int:
        return min(context_len, self.window + self.sinks)

    def keep_per_head(self, context_len: int) -> int:
        """Tokens each KV head keeps out of `context_len` (protected tokens always fit)."""
        if self.method == "none":
            return context_len
        want = self.budget_tokens if self.budget_tokens is not None else int(self.budget * context_len)
        return max(self.protected_count(context_len), min(context_len, want))

    def budget_fraction(self, context_len: int) -> float:
        return self.keep_per_head(context_len) / max(context_len, 1)
