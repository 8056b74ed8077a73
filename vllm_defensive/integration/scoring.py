"""The scoring swap point: which tokens each KV head of each layer of one request keeps.

`select_keep` is the only function the worker calls to choose tokens. It hands the request's
layers (a generator: each layer's K/V is gathered when the method gets to it) to the policy
method's `compress_uniform_layers`, which measures layer by layer and scores and selects all
layers in one batched pass (no device sync). By default the measurements run on the policy
library (pure PyTorch, on whatever device the tensors live on: the reference by construction);
`choose_selector` swaps in the fused kernels on CUDA, and `set_selector(fn)` any other
implementation of the same contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from vllm.logger import init_logger

from ..policy import EvictionConfig, LayerInputs, get_method

logger = init_logger(__name__)

# (config, the request's layers, keep per head) -> [layers, Hkv, keep] sorted kept context indices
Selector = Callable[[EvictionConfig, Iterable[LayerInputs], int], torch.Tensor]


def policy_selector(config: EvictionConfig, layers: Iterable[LayerInputs], keep: int) -> torch.Tensor:
    """The same count on every KV head of every layer, measured by the policy library."""
    return get_method(config).compress_uniform_layers(layers, keep)


@functools.cache
def _kernel_ops():
    from .. import triton_kernels

    return triton_kernels.scoring_ops()


def kernel_selector(config: EvictionConfig, layers: Iterable[LayerInputs], keep: int) -> torch.Tensor:
    """The same methods with window scoring and value norms on the fused kernels."""
    return get_method(config, _kernel_ops()).compress_uniform_layers(layers, keep)


def choose_selector(device: torch.device) -> str:
    """Kernels where they run natively (CUDA + Triton), the policy library elsewhere (the CPU
    build). `VLLM_DEFENSIVE_KERNELS=torch` forces the policy library (see triton_kernels)."""
    from .. import triton_kernels

    name = "triton" if device.type == "cuda" and triton_kernels.backend(device) == "triton" else "torch"
    set_selector(kernel_selector if name == "triton" else None)
    logger.info("KV eviction scoring runs on the %s path", name)
    return name


_selector: Selector = policy_selector


def set_selector(fn: Selector | None) -> None:
    """Install a faster selector (None restores the policy library)."""
    global _selector
    _selector = fn or policy_selector


def select_keep(config: EvictionConfig, layers: Iterable[LayerInputs], keep: int,
                shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """[layers, Hkv, keep] kept context indices; `shape` = (layers, Hkv, context length)."""
    num_layers, heads, context_len = shape
    if keep >= context_len:
        return torch.arange(context_len, device=device).expand(num_layers, heads, context_len)
    idx = _selector(config, layers, keep)
    if idx.shape != (num_layers, heads, keep):
        raise ValueError(f"selector returned {tuple(idx.shape)}, want {(num_layers, heads, keep)}")
    return idx


def fallback_keep(config: EvictionConfig, context_len: int, num_kv_heads: int, keep: int, device) -> torch.Tensor:
    """Sinks + most recent tokens: used only when scoring failed after the blocks were committed."""
    sinks = min(max(config.sinks, 4), keep)
    idx = torch.cat([torch.arange(sinks), torch.arange(context_len - (keep - sinks), context_len)])
    return idx.to(device).expand(num_kv_heads, keep)
