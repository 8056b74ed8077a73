"""Per-request eviction record: what the engine did to one request's KV cache.

Shared contract between the vLLM integration (which fills it in the engine core), the API layer
(which returns it as the `kv_eviction` field of completion responses) and the Prometheus metrics.
Plain data, no vLLM import; travels between processes as a dict (`to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

SkipReason = Literal[
    "disabled",  # method none, or turned off by the request
    "prompt_too_short",  # shorter than --kv-min-prompt, or not longer than window + protected tokens
    "budget_full",  # the budget keeps every token (e.g. 1.0): nothing to evict
    "no_free_blocks",  # not enough free KV blocks to compact into
    "aborted",  # the request ended before scoring
    "error",  # scoring failed; the request kept its full cache
]
SKIP_REASONS: tuple[str, ...] = SkipReason.__args__  # type: ignore[attr-defined]


@dataclass
class EvictionRecord:
    request_id: str
    method: str
    budget: float | None  # fraction asked (None when a token count was asked)
    budget_tokens: int | None
    prompt_tokens: int
    compacted: bool
    skip_reason: str | None = None
    tokens_kept: int = 0  # per KV head, protected suffix included
    tokens_evicted: int = 0  # per KV head
    blocks_before: int = 0
    blocks_after: int = 0
    blocks_freed: int = 0
    bytes_freed: int = 0  # over all layers, K and V
    score_ms: float = 0.0
    compact_ms: float = 0.0

    @property
    def kept_fraction(self) -> float:
        return self.tokens_kept / self.prompt_tokens if self.prompt_tokens else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kept_fraction"] = round(self.kept_fraction, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvictionRecord":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)
