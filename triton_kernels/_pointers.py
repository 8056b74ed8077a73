"""Device-side tables of base addresses, so one launch can reach every layer's cache.

vLLM keeps each layer's KV cache (and each layer's o_proj weight) in its own tensor; the kernels
that cover all layers in one launch take a table of their base addresses and load the base of
the layer they work on. The caches live for the engine's lifetime, so the tables are cached
instead of copied host -> device (a pageable copy stalls the host) on every call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# Least recently used first. One table per (layer set, device); per-layer callers need one per
# layer (80 for a 70B model) next to the layered ones, so the cache holds far more than that: it
# used to hold 32 and clear itself when full, which a 32-layer model's per-layer calls plus one
# layered call overflowed on every call (a host-stalling copy each time).
_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_TABLES = 1024


def pointer_table(addrs: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 device tensor holding `addrs` (cached by value). A miss copies from pinned memory
    without blocking the host (the caching host allocator keeps the buffer until the copy is done)."""
    key = (device.type, device.index, tuple(addrs))
    t = _TABLES.get(key)
    if t is not None:
        _TABLES.move_to_end(key)
        return t
    host = torch.tensor(list(addrs), dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # a captured copy would replay from a pinned buffer that is gone by then
            raise RuntimeError("a new address table inside CUDA graph capture: run the call once before capturing")
        t = host.pin_memory().to(device, non_blocking=True)
    else:
        t = host.to(device)
    _TABLES[key] = t
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return t


def same_layout(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor shares shape, strides and dtype with the first: one launch can then
    address them all with the first one's strides."""
    first = tensors[0]
    return all(t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
               and t.device == first.device for t in tensors)


def base_table(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
    """(`pointer_table` of the tensors' base addresses, every one of them 16-byte aligned?), each
    address read once. The alignment lets a kernel promise it (tl.multiple_of) to the compiler,
    which a loaded pointer otherwise hides, and keep its vectorised loads."""
    addrs = [t.data_ptr() for t in tensors]
    return pointer_table(addrs, device), all(a % 16 == 0 for a in addrs)
