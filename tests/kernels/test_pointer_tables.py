"""The address tables that let one launch reach every layer's cache: cached, least recently used
out first, and never cleared wholesale (a 32-layer model's per-layer calls plus its layered call
once overflowed a 32-entry cache that cleared itself, so every call paid a host-stalling copy)."""

import torch

from vllm_defensive.triton_kernels import _pointers


def test_tables_are_cached_and_evicted_oldest_first(monkeypatch):
    monkeypatch.setattr(_pointers, "_TABLES", type(_pointers._TABLES)())
    monkeypatch.setattr(_pointers, "_MAX_TABLES", 4)
    cpu = torch.device("cpu")
    first = _pointers.pointer_table([16, 32], cpu)
    assert first.dtype == torch.int64 and first.tolist() == [16, 32]
    assert _pointers.pointer_table([16, 32], cpu) is first  # a hit: the same tensor, no copy
    others = [_pointers.pointer_table([i * 16], cpu) for i in range(1, 4)]
    assert _pointers.pointer_table([16, 32], cpu) is first  # used last: now the newest
    _pointers.pointer_table([999 * 16], cpu)  # a fifth table evicts the oldest, [16]
    assert len(_pointers._TABLES) == 4
    assert _pointers.pointer_table([16, 32], cpu) is first
    assert _pointers.pointer_table([32], cpu) is others[1]
    assert _pointers.pointer_table([16], cpu) is not others[0]  # rebuilt, same values
    assert _pointers.pointer_table([16], cpu).tolist() == [16]


def test_every_layer_of_a_large_model_stays_cached():
    """80 one-layer tables (a 70B model's per-layer calls) plus the layered one all fit."""
    cpu = torch.device("cpu")
    layers = [[(1 << 20) + 64 * i] for i in range(80)]
    tables = [_pointers.pointer_table(a, cpu) for a in layers]
    layered = _pointers.pointer_table([a[0] for a in layers], cpu)
    assert all(_pointers.pointer_table(a, cpu) is t for a, t in zip(layers, tables))
    assert _pointers.pointer_table([a[0] for a in layers], cpu) is layered
