"""Unit tests of the eviction metrics listener against real prometheus_client registries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_defensive import observability
from vllm_defensive.observability import metrics as M
from vllm_defensive.stats import SKIP_REASONS, EvictionRecord

MODEL = "smollm2"


def rec(rid: str, compacted: bool = True, method: str = "defensive", prompt: int = 1000,
        kept: int = 200, block_size: int = 16, skip: str | None = None, **kw) -> EvictionRecord:
    if not compacted:
        return EvictionRecord(rid, method, kw.pop("budget", 0.2), None, prompt, False,
                              skip_reason=skip or "prompt_too_short", **kw)
    before = -(-prompt // block_size)
    after = -(-kept // block_size)
    return EvictionRecord(rid, method, kw.pop("budget", 0.2), None, prompt, True,
                          tokens_kept=kept, tokens_evicted=prompt - kept, blocks_before=before,
                          blocks_after=after, blocks_freed=before - after,
                          bytes_freed=(before - after) * 4096, score_ms=kw.pop("score_ms", 12.5),
                          compact_ms=kw.pop("compact_ms", 1.5), **kw)


def samples(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} as a scrape of `registry` would show it."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(registry, name: str, **labels) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    tot, found = 0.0, False
    for (n, lab), v in samples(registry).items():
        if n == name and set(labels.items()) <= set(lab):
            tot += v
            found = True
    assert found, f"no sample {name}{labels}"
    return tot


@pytest.fixture
def reg():
    r = CollectorRegistry()
    m = M.EvictionMetrics(r)
    yield r, m
    m.close()


def test_compaction_then_finish(reg):
    r, m = reg
    a = rec("a", prompt=1000, kept=200)
    m(a, MODEL, False)
    lab = dict(model_name=MODEL, method="defensive")
    assert value(r, "vllm:kv_eviction_requests_compacted_total", **lab) == 1
    assert value(r, "vllm:kv_eviction_prompt_tokens_total", **lab) == 1000
    assert value(r, "vllm:kv_eviction_tokens_kept_total", **lab) == 200
    assert value(r, "vllm:kv_eviction_tokens_evicted_total", **lab) == 800
    assert value(r, "vllm:kv_eviction_blocks_before_total", **lab) == 63
    assert value(r, "vllm:kv_eviction_blocks_freed_total", **lab) == 63 - 13
    assert value(r, "vllm:kv_eviction_bytes_freed_total", **lab) == 50 * 4096
    assert value(r, "vllm:kv_eviction_blocks_saved", **lab) == 50
    assert value(r, "vllm:kv_eviction_bytes_saved", **lab) == 50 * 4096
    assert value(r, "vllm:kv_eviction_num_requests_compacted", **lab) == 1
    assert value(r, "vllm:kv_eviction_kept_fraction_count", **lab) == 1
    assert value(r, "vllm:kv_eviction_kept_fraction_sum", **lab) == pytest.approx(0.2)
    assert value(r, "vllm:kv_eviction_kept_fraction_bucket", le="0.2", **lab) == 1
    assert value(r, "vllm:kv_eviction_kept_fraction_bucket", le="0.15", **lab) == 0
    assert value(r, "vllm:kv_eviction_scoring_seconds_sum", **lab) == pytest.approx(0.0125)
    assert value(r, "vllm:kv_eviction_compaction_seconds_sum", **lab) == pytest.approx(0.0015)

    m(a, MODEL, True)  # finish: counters unchanged, "saved now" back to zero
    assert value(r, "vllm:kv_eviction_requests_compacted_total", **lab) == 1
    assert value(r, "vllm:kv_eviction_tokens_kept_total", **lab) == 200
    assert value(r, "vllm:kv_eviction_blocks_saved", **lab) == 0
    assert value(r, "vllm:kv_eviction_bytes_saved", **lab) == 0
    assert value(r, "vllm:kv_eviction_num_requests_compacted", **lab) == 0
    assert value(r, "vllm:kv_eviction_kept_fraction_count", **lab) == 1
    assert not m._live and not m._counted


def test_skips_by_reason_and_method(reg):
    r, m = reg
    for i, reason in enumerate(SKIP_REASONS):
        x = rec(f"s{i}", compacted=False, skip=reason, method="none" if reason == "disabled"
                else "defensive")
        m(x, MODEL, False)
        m(x, MODEL, True)
    for reason in SKIP_REASONS:
        method = "none" if reason == "disabled" else "defensive"
        assert value(r, "vllm:kv_eviction_requests_skipped_total", model_name=MODEL,
                     method=method, reason=reason) == 1
    s = samples(r)
    # skipped requests touch neither the compaction counters nor the gauges
    assert not any(n.startswith("vllm:kv_eviction_requests_compacted") for n, _ in s)
    assert not any(n == "vllm:kv_eviction_blocks_saved" for n, _ in s)


def test_finish_only_record_is_counted_once(reg):
    r, m = reg
    m(rec("late", compacted=False, skip="aborted"), MODEL, True)
    m(rec("c"), MODEL, True)  # a compacted request whose only record arrives at finish
    assert value(r, "vllm:kv_eviction_requests_skipped_total", reason="aborted") == 1
    assert value(r, "vllm:kv_eviction_requests_compacted_total") == 1
    # never running as compacted here: the "saved now" gauge was never touched
    assert not any(n == "vllm:kv_eviction_blocks_saved" for n, _ in samples(r))
    assert not m._live and not m._counted


def test_recompaction_moves_the_gauge_without_recounting(reg):
    r, m = reg
    m(rec("a", prompt=1000, kept=200), MODEL, False)
    m(rec("a", prompt=1000, kept=500), MODEL, False)  # e.g. compacted again after a preemption
    assert value(r, "vllm:kv_eviction_requests_compacted_total") == 1
    assert value(r, "vllm:kv_eviction_blocks_saved") == 63 - 32
    assert value(r, "vllm:kv_eviction_num_requests_compacted") == 1
    m(rec("a", prompt=1000, kept=500), MODEL, True)
    assert value(r, "vllm:kv_eviction_blocks_saved") == 0
    assert value(r, "vllm:kv_eviction_num_requests_compacted") == 0


def test_labels_separate_models_and_methods(reg):
    r, m = reg
    m(rec("a", method="defensive"), "m1", False)
    m(rec("b", method="snapkv"), "m1", False)
    m(rec("c", method="defensive"), "m2", False)
    for model, method in [("m1", "defensive"), ("m1", "snapkv"), ("m2", "defensive")]:
        assert value(r, "vllm:kv_eviction_requests_compacted_total", model_name=model,
                     method=method) == 1
    m(rec("b", method="snapkv"), "m1", True)
    assert value(r, "vllm:kv_eviction_blocks_saved", model_name="m1", method="snapkv") == 0
    assert value(r, "vllm:kv_eviction_blocks_saved", model_name="m1", method="defensive") == 50


def test_preinitialize_creates_zero_series(reg):
    r, m = reg
    m.preinitialize(MODEL, ["defensive"])
    s = samples(r)
    for reason in SKIP_REASONS:
        key = ("vllm:kv_eviction_requests_skipped_total",
               tuple(sorted({"model_name": MODEL, "method": "defensive", "reason": reason}.items())))
        assert s[key] == 0
    assert value(r, "vllm:kv_eviction_blocks_saved", model_name=MODEL) == 0
    assert value(r, "vllm:kv_eviction_kept_fraction_count", model_name=MODEL) == 0


def test_metric_names_exposed(reg):
    r, m = reg
    m.preinitialize(MODEL, ["defensive"])
    names = {n for n, _ in samples(r)}
    for name in M.METRIC_NAMES.values():
        assert name in names or f"{name}_count" in names, name
    # vLLM conventions: `vllm:` prefix, counters `_total`, latency histograms in seconds
    assert all(n.startswith("vllm:kv_eviction_") for n in names)


def test_concurrent_records_from_many_threads(reg):
    r, m = reg
    n_threads, per = 8, 200

    def work(t):
        for i in range(per):
            x = rec(f"{t}-{i}", prompt=500 + i, kept=100)
            m(x, MODEL, False)
            if i % 2:
                m(x, MODEL, True)
            m(rec(f"{t}-{i}-s", compacted=False, skip="budget_full"), MODEL, False)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(r, "vllm:kv_eviction_requests_compacted_total") == n_threads * per
    assert value(r, "vllm:kv_eviction_requests_skipped_total") == n_threads * per
    assert value(r, "vllm:kv_eviction_prompt_tokens_total") == n_threads * sum(
        500 + i for i in range(per))
    running = [rec("x", prompt=500 + i, kept=100) for i in range(per) if not i % 2]
    assert value(r, "vllm:kv_eviction_blocks_saved") == n_threads * sum(x.blocks_freed
                                                                         for x in running)
    assert value(r, "vllm:kv_eviction_num_requests_compacted") == n_threads * len(running)


def test_install_is_idempotent_and_survives_vllm_unregister():
    M.uninstall_metrics()
    try:
        a = M.install_metrics()
        b = M.install_metrics(MODEL, ["defensive"])
        assert a is b
        assert observability._listeners.count(a) == 1
        # vLLM's PrometheusStatLogger sweeps every `vllm:` collector out of REGISTRY when the
        # engine client is built, possibly after we installed; ours must stay on /metrics.
        from vllm.v1.metrics.prometheus import get_prometheus_registry, unregister_vllm_metrics

        unregister_vllm_metrics()
        observability.on_record(rec("x"), MODEL, False)
        assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None
        registry = get_prometheus_registry()  # what vLLM's /metrics serves (one API server)
        assert registry is REGISTRY
        assert value(registry, "vllm:kv_eviction_requests_compacted_total", model_name=MODEL) == 1
        assert value(registry, "vllm:kv_eviction_blocks_saved", model_name=MODEL) == 50
        observability.on_record(rec("x"), MODEL, True)
        assert value(registry, "vllm:kv_eviction_blocks_saved", model_name=MODEL) == 0
    finally:
        M.uninstall_metrics()
    assert not any(isinstance(fn, M.EvictionMetrics) for fn in observability._listeners)
    assert "vllm:kv_eviction_blocks_saved" not in generate_latest(REGISTRY).decode()


# --- prometheus_client multiprocess mode, as vLLM uses it with --api-server-count N > 1 ---------

API_SERVER = textwrap.dedent("""
    # One simulated API-server process: multiprocess mode is on because PROMETHEUS_MULTIPROC_DIR
    # is in the environment when prometheus_client is first imported (vLLM spawns API servers).
    import json, os, sys
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"]
    from prometheus_client import values
    assert values.ValueClass is not values.MutexValue
    from vllm_defensive.observability import on_record
    from vllm_defensive.observability.metrics import install_metrics
    from vllm_defensive.stats import EvictionRecord
    install_metrics(sys.argv[1], ["defensive"])
    for d, finished in json.loads(sys.stdin.read()):
        on_record(EvictionRecord.from_dict(d), sys.argv[1], finished)
    print(os.getpid())
""")


def run_api_server(tmp: Path, events: list[tuple[EvictionRecord, bool]]) -> int:
    import json

    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp))
    p = subprocess.run([sys.executable, "-c", API_SERVER, MODEL], env=env, check=True,
                       input=json.dumps([(r.to_dict(), f) for r, f in events]),
                       capture_output=True, text=True, timeout=120)
    return int(p.stdout.strip())


def test_multiprocess_mode_sums_api_servers(tmp_path, monkeypatch):
    # API server 1: two compacted requests, one still running; one skip.
    # API server 2: one compacted request still running, one finished-only skip.
    a, b, c = rec("a", prompt=1000, kept=200), rec("b", prompt=320, kept=64), rec("a", prompt=2000)
    pid1 = run_api_server(tmp_path, [(a, False), (b, False), (b, True),
                                     (rec("s", compacted=False, skip="budget_full"), False)])
    pid2 = run_api_server(tmp_path, [(c, False),
                                     (rec("t", compacted=False, skip="disabled"), True)])
    assert pid1 != pid2
    assert any(f.name.startswith("gauge_livesum_") for f in tmp_path.iterdir())

    # What vLLM's /metrics serves in this mode: a fresh registry with a MultiProcessCollector.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    registry = get_prometheus_registry()
    assert registry is not REGISTRY
    lab = dict(model_name=MODEL, method="defensive")
    assert value(registry, "vllm:kv_eviction_requests_compacted_total", **lab) == 3
    assert value(registry, "vllm:kv_eviction_requests_skipped_total", reason="budget_full") == 1
    assert value(registry, "vllm:kv_eviction_requests_skipped_total", reason="disabled") == 1
    assert value(registry, "vllm:kv_eviction_requests_skipped_total", reason="error") == 0
    assert value(registry, "vllm:kv_eviction_tokens_kept_total", **lab) == 200 + 64 + 200
    assert value(registry, "vllm:kv_eviction_blocks_freed_total", **lab) == (
        a.blocks_freed + b.blocks_freed + c.blocks_freed)
    # "saved now" = a (server 1) + c (server 2), summed over the live processes
    assert value(registry, "vllm:kv_eviction_blocks_saved", **lab) == a.blocks_freed + c.blocks_freed
    assert value(registry, "vllm:kv_eviction_num_requests_compacted", **lab) == 2
    assert value(registry, "vllm:kv_eviction_kept_fraction_count", **lab) == 3
    assert value(registry, "vllm:kv_eviction_kept_fraction_bucket", le="0.1", **lab) == 1
    # one series per label set (no per-pid duplicates)
    s = samples(registry)
    assert sum(1 for n, _ in s if n == "vllm:kv_eviction_blocks_saved") == 1

    # A dead API server's live gauges drop out (vLLM marks its processes dead at shutdown).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid2, str(tmp_path))
    registry = get_prometheus_registry()
    assert value(registry, "vllm:kv_eviction_blocks_saved", **lab) == a.blocks_freed
    assert value(registry, "vllm:kv_eviction_requests_compacted_total", **lab) == 3


def test_first_record_installs_the_metrics(monkeypatch):
    """Without an explicit install_metrics(), the first record a process sees installs them."""
    M.uninstall_metrics()
    monkeypatch.setattr(observability, "_auto_done", False)
    try:
        observability.on_record(rec("auto", method="defensivekv"), MODEL, False)
        assert M._metrics is not None and M._metrics in observability._listeners
        assert value(REGISTRY, "vllm:kv_eviction_requests_compacted_total", model_name=MODEL,
                     method="defensivekv") == 1
        # zero series for every skip reason of the method seen
        assert value(REGISTRY, "vllm:kv_eviction_requests_skipped_total", model_name=MODEL,
                     method="defensivekv", reason="no_free_blocks") == 0
        observability.on_record(rec("auto", method="defensivekv"), MODEL, True)
        assert value(REGISTRY, "vllm:kv_eviction_requests_compacted_total", model_name=MODEL,
                     method="defensivekv") == 1
    finally:
        M.uninstall_metrics()


def test_metrics_can_be_turned_off(monkeypatch):
    M.uninstall_metrics()
    monkeypatch.setenv("VLLM_DEFENSIVE_METRICS", "0")
    monkeypatch.setattr(observability, "_auto_done", False)
    assert M.install_metrics(MODEL, ["defensivekv"]) is None
    observability.on_record(rec("off"), MODEL, False)
    observability.on_record(rec("off"), MODEL, True)
    assert M._metrics is None
    assert "vllm:kv_eviction_" not in generate_latest(REGISTRY).decode()


def test_failing_listener_does_not_break_others():
    seen = []

    def bad(r, m, f):
        raise RuntimeError("boom")

    def good(r, m, f):
        seen.append((r.request_id, f))

    observability.add_listener(bad)
    observability.add_listener(good)
    try:
        observability.on_record(rec("z"), MODEL, False)
    finally:
        observability.remove_listener(bad)
        observability.remove_listener(good)
    assert seen == [("z", False)]
