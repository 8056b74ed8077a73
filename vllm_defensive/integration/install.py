"""Install every patch, once per process. Called from `vllm_defensive.plugin.register()`, which
vLLM runs in the API server, the engine core and every worker process."""

from __future__ import annotations

import logging

_installed = False


def _share_vllm_logging() -> None:
    """Our loggers print like vLLM's: vLLM configures only the "vllm" logger tree."""
    ours, theirs = logging.getLogger("vllm_defensive"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def install() -> None:
    global _installed
    if _installed:
        return
    from . import compat

    _share_vllm_logging()
    compat.check_version()
    compat.verify_targets()
    from . import checks, cli, frontend, scheduler, worker

    cli.install()
    checks.install()
    scheduler.install()
    worker.install()
    frontend.install()
    _installed = True
