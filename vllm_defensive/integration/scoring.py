"""The scoring swap point: which tokens each KV head of each layer of one request keeps.

`select_keep` is the only function the worker calls to choose tokens. It hands the request's
layers (a generator: each layer's K/V is gathered when the method gets to it) to the policy
method's `compress_uniform_layers`, which measures layer by layer and scores and selects all
layers in one batched pass (no device sync). By default the measurements run on the policy
library (pure PyTorch, on whatever device the tensors live on: the reference by construction);
`choose_selector` swaps in the fused kernels on CUDA, and `set_selector(fn)` any other
implementation of the same contract.

`select_keep_paged` is the fused fast path for GPU caches: it measures every layer of the request
straight out of vLLM's pages in a handful of launches (no per-layer gather, no per-layer launches)
and hands the stacked measurements to the same method code (`compress_uniform_measured`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from vllm.logger import init_logger

from ..policy import METHODS, EvictionConfig, LayerInputs, get_method
from ..policy.methods import Measurements

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


def _keep_indices(shape: tuple[int, int, int], keep: int, device, select: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Everything when `keep` covers the context, else `select()`'s indices, checked for shape."""
    num_layers, heads, context_len = shape
    if keep >= context_len:
        return torch.arange(context_len, device=device).expand(num_layers, heads, context_len)
    idx = select()
    if idx.shape != (num_layers, heads, keep):
        raise ValueError(f"selector returned {tuple(idx.shape)}, want {(num_layers, heads, keep)}")
    return idx


def select_keep(config: EvictionConfig, layers: Iterable[LayerInputs], keep: int,
                shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """[layers, Hkv, keep] kept context indices; `shape` = (layers, Hkv, context length)."""
    return _keep_indices(shape, keep, device, lambda: _selector(config, layers, keep))


def fallback_keep(config: EvictionConfig, context_len: int, num_kv_heads: int, keep: int, device) -> torch.Tensor:
    """Sinks + most recent tokens: used only when scoring failed after the blocks were committed."""
    sinks = min(max(config.sinks, 4), keep)
    idx = torch.cat([torch.arange(sinks), torch.arange(context_len - (keep - sinks), context_len)])
    return idx.to(device).expand(num_kv_heads, keep)


@dataclass
class PagedRequest:
    """One request's layers where they sit: vLLM's paged caches (GPU layout) and its block table."""

    queries: torch.Tensor  # [layers, Hq, W, d] the window's post-RoPE queries
    key_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, d]
    value_caches: list[torch.Tensor]  # same
    block_table: torch.Tensor  # int32 [blocks]: the request's block ids, context first
    context_len: int  # tokens that eviction may touch (the protected suffix excluded)
    o_proj_weights: list[torch.Tensor | None]  # per layer [D, Hq*d]; None: value norms of 1
    scale: float | None  # the softmax scale, shared by every layer

    @property
    def num_layers(self) -> int:
        return len(self.key_caches)


def measure_paged(config: EvictionConfig, req: PagedRequest, impl: str | None = None) -> Measurements:
    """What `EvictionMethod.measure` measures, for every layer at once, from the pages."""
    from .. import triton_kernels

    method = METHODS[config.method]
    hkv, n = req.key_caches[0].shape[2], req.context_len
    stats = norms = None
    if method.uses_window:
        probs_dtype = config.window_probs_dtype(req.key_caches[0].dtype)
        stats = triton_kernels.paged_window_stats_layers(
            req.queries, req.key_caches, req.block_table, n, config.pool_kernel, req.scale, probs_dtype,
            config.fix_window_bias, impl=impl)
    if method.uses_values:
        if any(w is None for w in req.o_proj_weights):
            norms = torch.ones(req.num_layers, hkv, n, device=req.queries.device)
        else:
            norms = triton_kernels.paged_value_norms_layers(req.value_caches, req.block_table, n,
                                                            req.o_proj_weights, impl=impl)
    return Measurements(hkv, n, req.queries.device, stats, norms)


def select_keep_paged(config: EvictionConfig, req: PagedRequest, keep: int, impl: str | None = None) -> torch.Tensor:
    """[layers, Hkv, keep] kept context indices, measured straight from the pages (the kernels on
    CUDA); the same keep sets as `select_keep` on the gathered layers."""
    shape = (req.num_layers, req.key_caches[0].shape[2], req.context_len)

    def select() -> torch.Tensor:
        if req.queries.shape[2] != config.window:
            raise ValueError(f"got {req.queries.shape[2]} window queries, config.window is {config.window}")
        return get_method(config).compress_uniform_measured(measure_paged(config, req, impl), shape[0], keep)

    return _keep_indices(shape, keep, req.queries.device, select)
