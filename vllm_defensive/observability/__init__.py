"""Observability: per-request eviction records fan out to listeners (Prometheus metrics, logs).

The vLLM integration calls `on_record` in the API-server process for every record it receives
from the engine core: once when a request's KV cache is compacted (or skipped), and once when the
request finishes. Listeners register with `add_listener`; a failing listener never breaks serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..stats import EvictionRecord

logger = logging.getLogger(__name__)
Listener = Callable[[EvictionRecord, str, bool], None]  # (record, model_name, finished)
_listeners: list[Listener] = []


def add_listener(fn: Listener) -> None:
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def on_record(record: EvictionRecord, model_name: str, finished: bool) -> None:
    for fn in list(_listeners):
        try:
            fn(record, model_name, finished)
        except Exception:  # metrics must never take a request down
            logger.exception("eviction listener %r failed", fn)
