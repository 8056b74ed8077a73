"""Observability: per-request eviction records fan out to listeners (Prometheus metrics, logs).

The vLLM integration calls `on_record` in the API-server process for every record it receives
from the engine core: once when a request's KV cache is compacted (or skipped), and once when the
request finishes. Listeners register with `add_listener`; a failing listener never breaks serving.

The Prometheus metrics (`metrics.install_metrics`) install themselves on the first record a
process sees, so they appear on vLLM's `/metrics` even if nobody installed them explicitly; the
integration should still call `install_metrics(model_name, methods)` at start-up so the series
exist (at zero) before the first request. `VLLM_DEFENSIVE_METRICS=0` turns the metrics off.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ..stats import EvictionRecord

logger = logging.getLogger(__name__)
Listener = Callable[[EvictionRecord, str, bool], None]  # (record, model_name, finished)
_listeners: list[Listener] = []
_auto_lock = threading.Lock()
_auto_done = False


def add_listener(fn: Listener) -> None:
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def metrics_enabled() -> bool:
    return os.environ.get("VLLM_DEFENSIVE_METRICS", "1").strip().lower() not in ("0", "false", "no",
                                                                                "off")


def _auto_install(record: EvictionRecord, model_name: str) -> None:
    global _auto_done
    with _auto_lock:
        if _auto_done:
            return
        _auto_done = True
        if not metrics_enabled():
            return
        try:
            from .metrics import install_metrics

            install_metrics(model_name, [record.method])
        except Exception:  # metrics must never take a request down
            logger.exception("installing the eviction metrics failed")


def on_record(record: EvictionRecord, model_name: str, finished: bool) -> None:
    if not _auto_done:
        _auto_install(record, model_name)
    for fn in list(_listeners):
        try:
            fn(record, model_name, finished)
        except Exception:  # metrics must never take a request down
            logger.exception("eviction listener %r failed", fn)
