"""Kernel tests: Triton's interpreter on CPU (small sizes), the real kernels on CUDA (`gpu` marker).

TRITON_INTERPRET must be set before Triton is first imported (triton.language's own jit helpers
are decorated then, and Triton reads it again lazily at launch), so without CUDA this conftest
sets it for the session. Nothing else changes: the package's automatic backend choice never uses
the interpreter (CPU tensors go to the PyTorch path); these tests ask for impl="triton".
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_TRITON_PRELOADED = "triton" in sys.modules
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_usable() -> bool:
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if _TRITON_PRELOADED:  # imported before us without the interpreter: its helpers are compiled-only
        import triton

        return triton.knobs.runtime.interpret and type(triton.language.zeros).__name__ == "InterpretedFunction"
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


TRITON_CPU = _interpreter_usable()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (real-size kernel tests); skipped without it")
    config.addinivalue_line("markers", "interp: runs the Triton kernels (CUDA, or the interpreter on CPU)")
    # Triton 3.6's interpreter trips a NumPy deprecation on every scalar index: noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_interp = pytest.mark.skip(reason="no CUDA and Triton's interpreter is unusable (Triton missing or "
                                          "imported before TRITON_INTERPRET was set)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interp" in item.keywords and not (HAS_CUDA or TRITON_CPU):
            item.add_marker(skip_interp)


@pytest.fixture(scope="session")
def kernels_run() -> bool:
    """Whether the `interp` tests run here (CUDA, or the interpreter on CPU) instead of skipping."""
    return HAS_CUDA or TRITON_CPU


@pytest.fixture(scope="session")
def kdev() -> torch.device:
    """Device of the small-size kernel tests: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
