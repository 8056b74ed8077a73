"""What the scheduler tells the workers each step, and what the workers answer.

Plain dataclasses (pickled to worker processes under tensor parallelism). They ride as extra
attributes on vLLM's `SchedulerOutput` / `ModelRunnerOutput` (both plain dataclasses in 0.24).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STEP_ATTR = "kv_eviction"  # SchedulerOutput.<attr>: StepPlan
STATS_ATTR = "kv_eviction_stats"  # ModelRunnerOutput.<attr>: dict[req_id, WorkerStats]


@dataclass
class CompactionPlan:
    """Compact one request whose prefill completes in this step.

    After the forward, every layer keeps `keep` of the first `context_len` positions per KV head
    (selected by the method in `config`), followed by the `tail` positions after the context
    (protected suffix, and generated tokens for a request recomputed after preemption), written
    to `dst_block_ids`. The source is the request's current block table.
    """

    request_id: str
    context_len: int
    keep: int
    tail: int
    dst_block_ids: list[int]
    config: dict[str, Any]  # EvictionConfig fields
    record_keep_sets: bool = False

    @property
    def offset(self) -> int:
        """Logical minus physical length from now on."""
        return self.context_len - self.keep


@dataclass
class StepPlan:
    # Requests whose observation window [start, end) may be computed in this step: the worker
    # keeps those positions' queries until the compaction.
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)
    compactions: dict[str, CompactionPlan] = field(default_factory=dict)


@dataclass
class WorkerStats:
    score_ms: float = 0.0
    compact_ms: float = 0.0
    error: str | None = None
    # On CUDA: timing events (start, scored, copied) recorded on the compute stream. The worker
    # never waits for its own kernels; the times are read once the step's output is on the host
    # (the sampled tokens come after the compaction in stream order, so the events are done).
    events: tuple[Any, Any, Any] | None = field(default=None, repr=False, compare=False)

    def resolve(self) -> WorkerStats:
        """Turn recorded events into milliseconds (idempotent)."""
        if self.events is not None:
            start, scored, copied = self.events
            copied.synchronize()  # already complete where the output was read; a no-op then
            self.score_ms, self.compact_ms = start.elapsed_time(scored), scored.elapsed_time(copied)
            self.events = None
        return self

    def __getstate__(self):  # pickled to the scheduler's process under tensor parallelism
        return self.resolve().__dict__
