"""Which implementation runs: Triton on CUDA, Triton's interpreter on CPU (tests), or PyTorch.

Selection, per call, from the tensors' device:
  * ``VLLM_DEFENSIVE_KERNELS=torch|triton`` forces one (``triton`` on CPU tensors runs Triton's
    interpreter, which needs ``TRITON_INTERPRET=1`` set before Triton is first imported);
  * CUDA tensors and an importable Triton -> ``"triton"``;
  * anything else (CPU tensors, the CPU vLLM build, no Triton) -> ``"torch"``. The interpreter is
    never picked automatically: it is a test vehicle, far slower than the PyTorch path.
  * ``impl="triton"|"torch"`` on a call overrides all of this.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "VLLM_DEFENSIVE_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on the CPU build
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend(device: torch.device | str | None = None) -> str:
    """``"triton"`` or ``"torch"``: what a call with tensors on ``device`` would run.

    ``device=None`` asks about the default accelerator: CUDA when one is visible, else the CPU.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if forced == "torch":
        return "torch"
    if not triton_available():
        if forced == "triton":
            raise RuntimeError(f"{ENV}=triton but Triton cannot be imported")
        return "torch"
    if device.type == "cuda":
        return "triton"
    if forced == "triton" and device.type == "cpu" and interpreting():
        return "triton"
    if forced == "triton":
        raise RuntimeError(f"{ENV}=triton on a {device.type} tensor needs TRITON_INTERPRET=1")
    return "torch"


def resolve(impl: str | None, device: torch.device) -> str:
    if impl is None or impl == "auto":
        return backend(device)
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
    return impl
