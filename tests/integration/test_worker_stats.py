"""WorkerStats: on CUDA the worker hands over timing events instead of waiting for its kernels;
the times are read when the scheduler (or the pickler, under tensor parallelism) needs them."""

from __future__ import annotations

import pickle

from vllm_defensive.integration.plan import WorkerStats


class RecordedEvent:
    """Stands in for torch.cuda.Event (CI has no GPU): a timestamp in ms, completion tracked."""

    def __init__(self, ms: float):
        self.ms, self.synced = ms, False

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: "RecordedEvent") -> float:
        return end.ms - self.ms


def test_events_resolve_to_milliseconds_once():
    start, scored, copied = RecordedEvent(10.0), RecordedEvent(14.5), RecordedEvent(15.25)
    st = WorkerStats(events=(start, scored, copied))
    assert st.resolve() is st
    assert (st.score_ms, st.compact_ms, st.events) == (4.5, 0.75, None)
    assert copied.synced  # waits on the last event: a no-op once the step's output was read
    st.resolve()
    assert (st.score_ms, st.compact_ms) == (4.5, 0.75)


def test_pickling_resolves_the_events():
    st = WorkerStats(error="x", events=(RecordedEvent(0.0), RecordedEvent(2.0), RecordedEvent(3.0)))
    back = pickle.loads(pickle.dumps(st))  # the real events are not picklable: must never travel
    assert (back.score_ms, back.compact_ms, back.error, back.events) == (2.0, 1.0, "x", None)


def test_host_times_pass_through():
    st = WorkerStats(score_ms=3.0, compact_ms=1.0)
    assert pickle.loads(pickle.dumps(st.resolve())) == WorkerStats(score_ms=3.0, compact_ms=1.0)
