"""Prometheus metrics for KV-cache eviction, served on vLLM's own `/metrics`.

Mechanism, and why
------------------
vLLM 0.24 builds its Prometheus metrics (`PrometheusStatLogger`, `vllm/v1/metrics/loggers.py`)
in the *API-server* process, never in the engine core: the engine core ships its stats to the
front end over ZMQ, and the front end turns them into `prometheus_client` metrics. We do the same.
The integration forwards every `EvictionRecord` from the engine core to the API-server process
that owns the request and calls `observability.on_record` there; this module is a listener on
that hub that updates plain `prometheus_client` metrics. The two ways vLLM exposes them:

* one API server (the default): `/metrics` serves `prometheus_client.REGISTRY`
  (`get_prometheus_registry()` in `vllm/v1/metrics/prometheus.py`). We register our metrics there.
* `--api-server-count N > 1`: `vllm serve` calls `setup_multiprocess_prometheus()`, which sets
  `PROMETHEUS_MULTIPROC_DIR` *before* it spawns the API servers (with the `spawn` start method,
  so `prometheus_client` is imported in each child with multiprocess mode on). Every metric value
  then lives in a per-pid mmap file, and each API server's `/metrics` answers with a fresh registry
  holding only a `MultiProcessCollector`, which sums the files of all processes. Our metrics ride
  on exactly the same machinery: counters and histograms are summed across API servers, and our
  gauges declare `multiprocess_mode="livesum"` (each API server holds the saved blocks of its own
  running requests, so the total right now is the sum over live processes), so whichever API
  server the scrape lands on reports the whole deployment.

We did not use a stat-logger plugin (`vllm.stat_logger_plugins`): stat loggers only receive
vLLM's own `SchedulerStats`/`IterationStats`, which do not carry our per-request records (the
integration would have to smuggle them inside vLLM's stats objects), and a custom
`PrometheusStatLogger` subclass would replace vLLM's default one. A listener on the record hub
needs nothing from vLLM's stats plumbing and is correct in both modes above.

One vLLM quirk shapes the code: `PrometheusStatLogger.__init__` calls `unregister_vllm_metrics()`,
which removes from `REGISTRY` every collector whose `_name` starts with `vllm:`. Metrics created
the usual way would vanish from a single-API-server `/metrics` if they were registered before the
engine client is built. So our metrics are created unregistered and exposed through one wrapper
collector (no `_name`), which survives that sweep whatever the order of initialisation.

Installation: `install_metrics()` (idempotent) creates the metrics and adds the listener. The
integration calls it at start-up in each API-server process, with the served model name and the
method, so the series exist at zero before the first request; failing that, the hub
(`observability.on_record`) installs them on the first record a process sees.

Counting rules: a request is counted once, at its first record (normally the compaction/skip
record, `finished=False`; a request whose only record arrives at finish is counted then). The
"saved right now" gauges go up by the blocks/bytes freed at compaction and down by the same
amount when the request finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from ..stats import SKIP_REASONS, EvictionRecord
from . import add_listener, metrics_enabled, remove_listener

PREFIX = "vllm:kv_eviction_"
LABELS = ("model_name", "method")

KEPT_FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                         0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0)

# Every metric name as Prometheus exposes it (counters gain `_total`; histograms expose
# `_bucket`/`_sum`/`_count`). The dashboard and the tests use these.
METRIC_NAMES = {
    "requests_compacted": PREFIX + "requests_compacted_total",
    "requests_skipped": PREFIX + "requests_skipped_total",
    "prompt_tokens": PREFIX + "prompt_tokens_total",
    "tokens_kept": PREFIX + "tokens_kept_total",
    "tokens_evicted": PREFIX + "tokens_evicted_total",
    "blocks_before": PREFIX + "blocks_before_total",
    "blocks_freed": PREFIX + "blocks_freed_total",
    "bytes_freed": PREFIX + "bytes_freed_total",
    "blocks_saved": PREFIX + "blocks_saved",
    "bytes_saved": PREFIX + "bytes_saved",
    "num_requests_compacted": PREFIX + "num_requests_compacted",
    "kept_fraction": PREFIX + "kept_fraction",
    "scoring_seconds": PREFIX + "scoring_seconds",
    "compaction_seconds": PREFIX + "compaction_seconds",
}


class _Exposer(Collector):
    """Exposes our metrics; has no `_name`, so vLLM's `unregister_vllm_metrics()` keeps it."""

    def __init__(self, metrics: Iterable):
        self._metrics = list(metrics)

    def collect(self):
        for m in self._metrics:
            yield from m.collect()

    def describe(self):
        for m in self._metrics:
            yield from m.describe()


class EvictionMetrics:
    """The eviction metrics and the listener that feeds them.

    `registry`: where to expose them (vLLM's `/metrics` serves `prometheus_client.REGISTRY` with one
    API server); None creates them without exposing them (multiprocess mode reads the mmap files).
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        lab = list(LABELS)
        self.requests_compacted = Counter(
            PREFIX + "requests_compacted",
            "Requests whose KV cache was compacted after prefill.",
            lab, registry=None)
        self.requests_skipped = Counter(
            PREFIX + "requests_skipped",
            "Requests for which eviction was skipped, by reason ("
            + ", ".join(SKIP_REASONS) + ").",
            lab + ["reason"], registry=None)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of compacted requests (before eviction).", lab, registry=None)
        self.tokens_kept = Counter(
            PREFIX + "tokens_kept",
            "Prompt tokens kept in the KV cache of compacted requests (per KV head, protected "
            "suffix included).", lab, registry=None)
        self.tokens_evicted = Counter(
            PREFIX + "tokens_evicted",
            "Prompt tokens evicted from the KV cache of compacted requests (per KV head).",
            lab, registry=None)
        self.blocks_before = Counter(
            PREFIX + "blocks_before",
            "KV-cache blocks held by compacted requests before compaction.", lab, registry=None)
        self.blocks_freed = Counter(
            PREFIX + "blocks_freed",
            "KV-cache blocks returned to the pool by compaction.", lab, registry=None)
        self.bytes_freed = Counter(
            PREFIX + "bytes_freed",
            "KV-cache bytes returned to the pool by compaction (all layers, K and V).",
            lab, registry=None)
        self.blocks_saved = Gauge(
            PREFIX + "blocks_saved",
            "KV-cache blocks saved right now: blocks freed by compaction, summed over running "
            "requests.", lab, registry=None, multiprocess_mode="livesum")
        self.bytes_saved = Gauge(
            PREFIX + "bytes_saved",
            "KV-cache bytes saved right now, summed over running requests.",
            lab, registry=None, multiprocess_mode="livesum")
        self.num_requests_compacted = Gauge(
            PREFIX + "num_requests_compacted",
            "Running requests whose KV cache is compacted.",
            lab, registry=None, multiprocess_mode="livesum")
        self.kept_fraction = Histogram(
            PREFIX + "kept_fraction",
            "Fraction of prompt tokens kept per compacted request.",
            lab, registry=None, buckets=KEPT_FRACTION_BUCKETS)
        self.scoring_seconds = Histogram(
            PREFIX + "scoring_seconds",
            "Time to score a request's prompt tokens for eviction (device time on GPUs).",
            lab, registry=None, buckets=LATENCY_BUCKETS)
        self.compaction_seconds = Histogram(
            PREFIX + "compaction_seconds",
            "Time to compact a request's KV cache: copy the kept tokens into fresh blocks (device time on GPUs).",
            lab, registry=None, buckets=LATENCY_BUCKETS)

        self._all = [self.requests_compacted, self.requests_skipped, self.prompt_tokens,
                     self.tokens_kept, self.tokens_evicted, self.blocks_before, self.blocks_freed,
                     self.bytes_freed, self.blocks_saved, self.bytes_saved,
                     self.num_requests_compacted, self.kept_fraction, self.scoring_seconds,
                     self.compaction_seconds]
        self._lock = threading.Lock()
        # request_id -> (labels, blocks, bytes) added to the "saved" gauges, until it finishes
        self._live: dict[str, tuple[tuple[str, str], int, int]] = {}
        self._counted: set[str] = set()  # counted, not yet finished
        self.registry = registry
        self._exposer = _Exposer(self._all)
        if registry is not None:
            registry.register(self._exposer)

    # --- labels -------------------------------------------------------------------------------
    def preinitialize(self, model_name: str, methods: Iterable[str]) -> None:
        """Create the label children at zero, so the series exist before the first request."""
        for method in methods:
            for m in self._all:
                if m is self.requests_skipped:
                    for reason in SKIP_REASONS:
                        m.labels(model_name, method, reason)
                else:
                    m.labels(model_name, method)

    # --- the listener -------------------------------------------------------------------------
    def __call__(self, record: EvictionRecord, model_name: str, finished: bool) -> None:
        labels = (str(model_name), str(record.method))
        rid = record.request_id
        with self._lock:
            first = rid not in self._counted and rid not in self._live
            if first:
                self._count(record, labels)
                if not finished:
                    self._counted.add(rid)
            if not finished and record.compacted:
                # (re)compaction while running: the gauges hold this record's savings
                self._release(rid)
                self._live[rid] = (labels, int(record.blocks_freed), int(record.bytes_freed))
                self.blocks_saved.labels(*labels).inc(record.blocks_freed)
                self.bytes_saved.labels(*labels).inc(record.bytes_freed)
                self.num_requests_compacted.labels(*labels).inc()
            if finished:
                self._release(rid)
                self._counted.discard(rid)

    def _release(self, rid: str) -> None:
        live = self._live.pop(rid, None)
        if live is not None:
            labels, blocks, nbytes = live
            self.blocks_saved.labels(*labels).dec(blocks)
            self.bytes_saved.labels(*labels).dec(nbytes)
            self.num_requests_compacted.labels(*labels).dec()

    def _count(self, r: EvictionRecord, labels: tuple[str, str]) -> None:
        if not r.compacted:
            self.requests_skipped.labels(*labels, r.skip_reason or "unknown").inc()
            return
        self.requests_compacted.labels(*labels).inc()
        self.prompt_tokens.labels(*labels).inc(r.prompt_tokens)
        self.tokens_kept.labels(*labels).inc(r.tokens_kept)
        self.tokens_evicted.labels(*labels).inc(r.tokens_evicted)
        self.blocks_before.labels(*labels).inc(r.blocks_before)
        self.blocks_freed.labels(*labels).inc(r.blocks_freed)
        self.bytes_freed.labels(*labels).inc(r.bytes_freed)
        self.kept_fraction.labels(*labels).observe(r.kept_fraction)
        self.scoring_seconds.labels(*labels).observe(r.score_ms / 1000.0)
        self.compaction_seconds.labels(*labels).observe(r.compact_ms / 1000.0)

    def close(self) -> None:
        if self.registry is not None:
            try:
                self.registry.unregister(self._exposer)
            except KeyError:
                pass


_install_lock = threading.Lock()
_metrics: EvictionMetrics | None = None


def install_metrics(model_name: str | None = None,
                    methods: Iterable[str] = ()) -> EvictionMetrics | None:
    """Create the eviction metrics in this (API-server) process and listen to eviction records.

    Idempotent and cheap: the first call creates the metrics and exposes them on vLLM's `/metrics`
    (see the module docstring for single and multiple API servers); later calls return the same
    object. With `model_name` (vLLM's served model name, the `model_name` label of vLLM's own
    metrics) and `methods` (the eviction methods in use, as records name them), the label series
    are created at zero so dashboards show 0 rather than "no data" before the first request.
    Harmless in processes that never receive records (engine core, workers). Returns None (and
    installs nothing) when VLLM_DEFENSIVE_METRICS=0.
    """
    global _metrics
    if not metrics_enabled():
        return None
    with _install_lock:
        if _metrics is None:
            _metrics = EvictionMetrics(REGISTRY)
            add_listener(_metrics)
        if model_name is not None:
            _metrics.preinitialize(model_name, methods)
        return _metrics


def uninstall_metrics() -> None:
    """Undo `install_metrics` (tests)."""
    global _metrics
    with _install_lock:
        if _metrics is not None:
            remove_listener(_metrics)
            _metrics.close()
            _metrics = None
