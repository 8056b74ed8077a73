"""vLLM general-plugin entry point (`vllm.general_plugins: defensive`).

vLLM calls `register()` in every process it starts (API server, engine core, workers). It checks
the vLLM version (failing closed on anything but 0.24.0) and installs the integration's patches.
The patches stay dormant unless eviction is configured (`--kv-eviction ...` on `vllm serve`, or
`additional_config={"kv_eviction": {...}}` for the offline `LLM` API).
"""

from __future__ import annotations


def register() -> None:
    from .integration.install import install

    install()
