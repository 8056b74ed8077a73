"""The scoring swap point: which tokens each KV head of one layer keeps.

`select_keep` is the only function the worker calls to choose tokens. By default it runs the
policy library (pure PyTorch, on whatever device the tensors live on: the reference by
construction). A faster implementation with the same contract (e.g. the Triton kernels on GPU)
replaces it with `set_selector(fn)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from vllm.logger import init_logger

from ..policy import EvictionConfig, LayerInputs, get_method

logger = init_logger(__name__)

Selector = Callable[[EvictionConfig, LayerInputs, int], torch.Tensor]


def policy_selector(config: EvictionConfig, layer: LayerInputs, keep: int) -> torch.Tensor:
    """[Hkv, keep] sorted kept context indices, the same count on every head."""
    return get_method(config).compress_uniform(layer, keep)


@functools.cache
def _kernel_ops():
    from .. import triton_kernels

    return triton_kernels.scoring_ops()


def kernel_selector(config: EvictionConfig, layer: LayerInputs, keep: int) -> torch.Tensor:
    """The same methods with window scoring and value norms on the fused kernels."""
    return get_method(config, _kernel_ops()).compress_uniform(layer, keep)


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


def select_keep(config: EvictionConfig, layer: LayerInputs, keep: int) -> torch.Tensor:
    if keep >= layer.context_len:
        return torch.arange(layer.context_len, device=layer.keys.device).expand(layer.num_kv_heads, -1)
    idx = _selector(config, layer, keep)
    if idx.shape != (layer.num_kv_heads, keep):
        raise ValueError(f"selector returned {tuple(idx.shape)}, want ({layer.num_kv_heads}, {keep})")
    return idx


def fallback_keep(config: EvictionConfig, context_len: int, num_kv_heads: int, keep: int, device) -> torch.Tensor:
    """Sinks + most recent tokens: used only when scoring failed after the blocks were committed."""
    sinks = min(max(config.sinks, 4), keep)
    idx = torch.cat([torch.arange(sinks), torch.arange(context_len - (keep - sinks), context_len)])
    return idx.to(device).expand(num_kv_heads, keep)
