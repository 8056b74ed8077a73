"""The launch fast path (`triton_kernels._launch`): its specialisation key, and on CUDA that calls
through it give the bits Triton's own dispatch gives, for every kernel of a scoring call."""

from __future__ import annotations

import pytest
import torch

from vllm_defensive.triton_kernels import _launch
from vllm_defensive.triton_kernels._launch import _spec

from kernel_testutil import layered_paged_inputs


def test_spec_classes_follow_tritons_int_specialisation():
    # 1, multiples of 16 and 64-bit values compile differently; other ints share a kernel
    assert _spec((1,)) != _spec((2,))
    assert _spec((16,)) == _spec((4096,)) != _spec((17,))
    assert _spec((17,)) == _spec((4095,))
    assert _spec((2**31,)) != _spec((2**31 - 16,))
    assert _spec((2**32,)) != _spec((2**32 + 1,)) and _spec((2**63,)) != _spec((2**62,))
    assert _spec((0.5,)) == _spec((2.0,))
    assert _spec((True,)) != _spec((False,))
    assert _spec((None,)) != _spec((0,))


def test_spec_tracks_tensor_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float32)
    assert _spec((x,)) == _spec((x[4:],))  # 16 bytes on: still aligned
    assert _spec((x,)) != _spec((x[1:],))  # 4 bytes on
    assert _spec((x,)) != _spec((x.to(torch.bfloat16),))


def test_disabled_by_env_and_off_other_triton_releases(monkeypatch):
    import triton

    assert _launch.enabled() == triton.__version__.startswith(_launch.TRITON_SERIES)
    _launch._triton_supported.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    try:
        assert not _launch.enabled()
    finally:
        monkeypatch.undo()
        _launch._triton_supported.cache_clear()
    assert _launch.enabled() == triton.__version__.startswith(_launch.TRITON_SERIES)
    for v in ("0", "false", "off"):
        monkeypatch.setenv(_launch.ENV, v)
        assert not _launch.enabled()


def test_interpreted_functions_always_take_tritons_path():
    """Under the interpreter (CPU) there is no compiled kernel: nothing is cached."""
    from vllm_defensive.triton_kernels import _scoring

    k = _launch.fast(_scoring._window_fixup)
    assert _launch.fast(_scoring._window_fixup) is k  # one per function
    if hasattr(_scoring._window_fixup, "device_caches"):
        pytest.skip("compiled Triton here (CUDA): the GPU tests below cover it")
    assert k.hits == 0


@pytest.mark.interp
def test_every_launch_of_the_package_fits_the_fast_path(monkeypatch):
    """Each kernel call site passes its run-time arguments positionally and its constexprs by
    keyword, so on CUDA every launch after the first skips Triton's dispatch (checked here on
    the interpreter's calls, against the kernels' own parameter lists)."""
    from triton.runtime.jit import JITFunction

    import vllm_defensive.triton_kernels as tk

    seen = {}
    real = _launch.FastKernel.launch

    def record(self, grid, args, kw):
        seen.setdefault(getattr(self.fn, "__name__", None) or self.fn.fn.__name__, (self.fn, len(args), kw))
        return real(self, grid, args, kw)

    monkeypatch.setattr(_launch.FastKernel, "launch", record)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impl = "triton"
    gen = torch.Generator().manual_seed(5)
    q, caches, table = _layered(70, gen, dev, layers=2, hq=4, hkv=2, d=16, w=8)
    tk.paged_window_stats_layers(q, caches, table, 70, probs_dtype=torch.bfloat16, impl=impl)
    w = torch.randn(32, 4 * 16, generator=gen).to(dev, torch.bfloat16)  # o_proj [D, Hq * d]
    tk.paged_value_norms_layers(caches, table, 70, [w] * len(caches), impl=impl)
    kept = torch.stack([torch.arange(0, 60, 3)] * 2).to(dev)
    tk.compact_kv(caches[:1], caches[1:2], kept, table, impl=impl)
    assert {"_window_pass1", "_window_combine", "_window_sums", "_window_fixup", "_value_norm_kernel",
            "_compact_kernel"} <= set(seen)
    for name, (fn, n_pos, kw) in seen.items():
        params = fn.params if hasattr(fn, "params") else JITFunction(fn.fn).params
        assert _launch.call_fits(params, n_pos, kw), name


def _layered(n, gen, dev="cuda", layers=3, hq=14, hkv=2, d=64, w=32):
    """Layered inputs (queries [layers, Hq, W, d], one paged cache per layer, one block table)."""
    q, caches, _, table = layered_paged_inputs(hq, hkv, w, n, d, torch.bfloat16, dev, gen, 16, "NHD", layers)
    return torch.stack(q), caches, table


def _stats(out):
    return [out.defensive_max, out.snapkv, out.unpooled_mean, out.window_bias]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14, 2, 64), (32, 8, 128)])
def test_fast_launches_give_tritons_bits(monkeypatch, shape):
    import vllm_defensive.triton_kernels as tk

    hq, hkv, d = shape
    gen = torch.Generator().manual_seed(3)
    for n in (3000, 2999, 4096):  # the prompt length's parity and a multiple of 16: other kernels
        q, caches, table = _layered(n, gen, hq=hq, hkv=hkv, d=d)
        monkeypatch.setenv(_launch.ENV, "0")
        ref = _stats(tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16))
        monkeypatch.delenv(_launch.ENV)
        tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16)  # cached from here on
        before = sum(k.hits for k in _launch._KERNELS.values())
        got = _stats(tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16))
        torch.cuda.synchronize()
        assert sum(k.hits for k in _launch._KERNELS.values()) - before >= 4, "Triton's dispatch not skipped"
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_fast_launches_defer_to_hooks_and_capture_in_graphs():
    import triton

    import vllm_defensive.triton_kernels as tk

    gen = torch.Generator().manual_seed(4)
    n = 2500
    q, caches, table = _layered(n, gen)
    ref = _stats(tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16))
    seen = []
    hook = lambda meta: seen.append(meta)  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = sum(k.hits for k in _launch._KERNELS.values())
        tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16)
        assert sum(k.hits for k in _launch._KERNELS.values()) == before  # a profiler sees every launch
        assert len(seen) >= 4
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    # CUDA graph capture of fast launches replays the same work
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        out = tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=torch.bfloat16)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(_stats(out), ref):
        assert torch.equal(a, b)
