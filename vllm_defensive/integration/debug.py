"""Test-only recording of what the worker selected (`additional_config.kv_eviction.record_keep_sets`).

Only useful when the worker runs in the test's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0 and
one worker); the keep sets never leave the worker otherwise.
"""

from __future__ import annotations

import torch

# internal request id -> per layer bool mask [Hkv, prompt_len] (True = kept)
KEEP_SETS: dict[str, list[torch.Tensor]] = {}


def record(request_id: str, masks: list[torch.Tensor]) -> None:
    KEEP_SETS[request_id] = [m.cpu() for m in masks]


def find(prefix: str) -> list[torch.Tensor] | None:
    """Keep sets of the request whose internal id is `prefix` or starts with `prefix-`."""
    if prefix in KEEP_SETS:
        return KEEP_SETS[prefix]
    hits = [k for k in KEEP_SETS if k.startswith(prefix + "-")]
    return KEEP_SETS[hits[-1]] if hits else None


def clear() -> None:
    KEEP_SETS.clear()
