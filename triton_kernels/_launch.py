"""Kernel launches without Triton's per-call dispatch, once a specialisation has been compiled.

`fn[grid](*args, **kw)` on a ``@triton.jit`` function binds every argument, computes its
specialisation key and looks the compiled kernel up before it launches: ~25 us of Python a launch
(Triton 3.6), five times per scoring call. `fast(fn)[grid](*args, **kw)` takes the same arguments,
looks the compiled kernel up by a key of its own built from the same inputs Triton specialises on
(each int's value class: 1, a multiple of 16, or 64-bit; each tensor's dtype and 16-byte alignment;
the constexpr and option keywords by value), and calls the kernel's launcher directly. A key it has
not seen goes through Triton once, which compiles or finds the kernel; so do launches while a
launch hook is set (profilers), under the interpreter, under a Triton other than 3.6 (whose
launcher convention this calls) and with ``VLLM_DEFENSIVE_FAST_LAUNCH=0``. Launches that pass a
run-time argument by keyword or a constexpr positionally always go through Triton (`call_fits`).
Triton options read from the environment at launch (``TRITON_DEBUG``) are not part of the key:
changing them in a running process keeps the kernels already compiled.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "VLLM_DEFENSIVE_FAST_LAUNCH"
_INT32 = (-(2**31), 2**31)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (`triton.cdiv` is a constexpr function: microseconds a call)."""
    return -(-a // b)


# The launcher's calling convention (`CompiledKernel.run(gx, gy, gz, stream, function, packed
# metadata, launch metadata, enter hook, exit hook, *args)`) is Triton 3.6's, the release torch
# 2.11 / vLLM 0.24.0 ship with; under any other Triton every launch takes Triton's own path.
TRITON_SERIES = "3.6."


@functools.lru_cache(maxsize=1)
def _triton_supported() -> bool:
    import triton

    return triton.__version__.startswith(TRITON_SERIES)


def enabled() -> bool:
    return (os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
            and _triton_supported())


def _spec(args: tuple) -> tuple:
    """What Triton's binder specialises on in positional arguments (ints: 1, divisible by 16,
    64-bit; tensors: dtype, 16-byte alignment; bools by value; floats: nothing). Finer than
    Triton's key is harmless (a second key for the same kernel); coarser would launch a kernel
    compiled for other arguments, so every class Triton tells apart is told apart here."""
    out = []
    for a in args:
        t = type(a)
        if t is int:
            if _INT32[0] <= a < _INT32[1]:
                out.append(1 if a == 1 else 2 if a % 16 == 0 else 3)
            else:  # i64, or u64 from 2^63 (and their divisibility)
                out.append((a >= 2**63, a % 16 == 0))
        elif t is float:
            out.append(0)
        elif t is bool or a is None:
            out.append(a)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        else:  # anything else (a dtype, a constexpr object): by value, or by type where unhashable
            try:
                hash(a)
                out.append(a)
            except TypeError:
                out.append(type(a))
    return tuple(out)


def call_fits(params, n_positional: int, kw: dict) -> bool:
    """A launch the fast path can repeat: the run-time arguments positional (a positional
    constexpr is specialised by value, which `_spec` does not key on) and every constexpr by
    keyword (keyed by value; a run-time keyword would be frozen at its first value)."""
    return (all(not p.is_constexpr for p in params[:n_positional])
            and all(p.is_constexpr and p.name in kw for p in params[n_positional:]))


def _hooked(chain) -> bool:
    """A launch hook is installed (Triton 3.6 keeps an always-present, usually empty, chain)."""
    return chain is not None and bool(getattr(chain, "calls", True))


class FastKernel:
    """A ``@triton.jit`` (or Gluon) function whose launches skip Triton's dispatch once compiled."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, constexpr values in order)
        self.hits = 0  # launches that skipped Triton's dispatch (tests and benchmarks read it)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launch(grid, args, kw)

    def launch(self, grid, args: tuple, kw: dict):
        from triton import knobs
        from triton.runtime import driver

        if (_hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)
                or not enabled() or not hasattr(self.fn, "device_caches")):  # (the interpreter's functions)
            return self.fn[grid](*args, **kw)
        device = driver.active.get_current_device()
        key = (device, _spec(args), tuple(kw.items()))
        try:
            hit = self._compiled.get(key)
        except TypeError:  # an unhashable keyword value: Triton's path
            return self.fn[grid](*args, **kw)
        if hit is None:
            kernel = self.fn[grid](*args, **kw)
            tail = self._tail(args, kw)
            if tail is not None and hasattr(kernel, "packed_metadata"):
                self._compiled[key] = (kernel, tail)
            return kernel
        kernel, tail = hit
        g = tuple(grid) + (1, 1)
        kernel.run(g[0], g[1], g[2], driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)
        self.hits += 1
        return kernel

    def _tail(self, args: tuple, kw: dict):
        """The constexpr keyword arguments, in the kernel's order, that every later launch with this
        key passes as they are; None (Triton's path every time) where the call does not pass the
        run-time arguments positionally and every constexpr by keyword (defaults are not filled in)."""
        params = self.fn.params
        if not call_fits(params, len(args), kw):
            return None
        return tuple(kw[p.name] for p in params[len(args):])


_KERNELS: dict = {}


def fast(fn) -> FastKernel:
    """The FastKernel of `fn` (one per function, so its compiled kernels are kept across calls)."""
    k = _KERNELS.get(fn)
    if k is None:
        k = _KERNELS[fn] = FastKernel(fn)
    return k
