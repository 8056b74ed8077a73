"""HF transformers reference path: the oracle the vLLM integration is checked against.

Prefill a real model with full attention, compute every layer's keep sets with the policy
library from the captured post-RoPE window queries / keys / values, then decode greedily with the
evicted entries masked out. Positions stay the original ones (nothing is removed from the cache,
only hidden), which is exactly what the plugin does physically: RoPE is baked into the kept keys
and new tokens continue at the original prompt length.

Batch size 1, no padding: the causal mask is built here, not taken from HF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .policy import EvictionConfig, LayerInputs, get_method

ATTN_NAME = "kvd_reference"


@dataclass
class _Hooks:
    capture_ctx: int | None = None  # context length to capture at prefill (None: no capture)
    window: int = 32
    captured: dict[int, LayerInputs] = field(default_factory=dict)
    keep: list[torch.Tensor] | None = None  # per layer [Hkv, prompt_len] bool, applied to old keys


_HOOKS = _Hooks()


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with our own causal mask, optional keep masks and optional capture."""
    _, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(d)
    layer = module.layer_idx
    h = _HOOKS
    if h.capture_ctx is not None and t == s:  # prefill: capture the window and the context KV
        n, w = h.capture_ctx, h.window
        h.captured[layer] = LayerInputs(
            queries=query[0, :, n - w : n].detach().clone(),
            keys=key[0, :, :n].detach().clone(),
            values=value[0, :, :n].detach().clone(),
            o_proj_weight=module.o_proj.weight.detach(),
            scale=scaling,
        )
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [1, Hq, T, S]
    rows = torch.arange(t, device=query.device).view(t, 1) + (s - t)
    cols = torch.arange(s, device=query.device).view(1, s)
    mask = cols > rows
    if h.keep is not None and t < s:  # decode: hide evicted prompt entries of this layer
        keep = h.keep[layer].to(query.device)  # [Hkv, P]
        hidden = torch.zeros(hkv, s, dtype=torch.bool, device=query.device)
        hidden[:, : keep.shape[1]] = ~keep
        mask = mask.view(1, 1, t, s) | hidden.repeat_interleave(g, dim=0).view(1, hq, 1, s)
    logits = logits.masked_fill(mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the reference attention installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _register()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 attn_implementation=ATTN_NAME)
    model.eval()
    return model, tok


@dataclass
class Prefill:
    """One full-attention prefill: its KV cache, first greedy token and captured layer inputs."""

    input_ids: list[int]
    cache: object
    first_token: int
    layers: list[LayerInputs]
    context_len: int


@torch.no_grad()
def prefill(model, input_ids: list[int], context_len: int | None = None, window: int = 32) -> Prefill:
    """Prefill with full attention, capturing each layer's window queries and context K/V."""
    from transformers import DynamicCache

    ctx = len(input_ids) if context_len is None else context_len
    _HOOKS.capture_ctx, _HOOKS.window, _HOOKS.captured, _HOOKS.keep = ctx, window, {}, None
    try:
        cache = DynamicCache()
        out = model(torch.tensor([input_ids]), past_key_values=cache, use_cache=True)
        layers = [_HOOKS.captured[i] for i in sorted(_HOOKS.captured)]
    finally:
        _HOOKS.capture_ctx, _HOOKS.captured = None, {}
    return Prefill(list(input_ids), cache, int(out.logits[0, -1].argmax()), layers, ctx)


def keep_sets_from(pre: Prefill, config: EvictionConfig, uniform: bool = True) -> list[torch.Tensor]:
    """Per-layer keep masks [Hkv, prompt_len] from a captured prefill; the suffix is always kept.

    uniform=True gives every KV head the same count (what the plugin serves on stock attention);
    False uses the method's own head/layer allocation.
    """
    n_prompt = len(pre.input_ids)
    config.check_prompt(n_prompt)
    ctx = config.context_len(n_prompt)
    if ctx != pre.context_len or config.window != pre.layers[0].queries.shape[1]:
        raise ValueError("prefill was captured with another context length or window")
    method = get_method(config)
    if uniform:
        masks = []
        for x in pre.layers:
            idx = method.compress_uniform(x)
            m = torch.zeros(x.num_kv_heads, ctx, dtype=torch.bool)
            m.scatter_(1, idx.cpu(), True)
            masks.append(m)
    else:
        masks = [m.cpu() for m in method.compress(pre.layers)]
    suffix = torch.ones(masks[0].shape[0], n_prompt - ctx, dtype=torch.bool)
    return [torch.cat([m, suffix], dim=1) for m in masks]


def keep_sets(model, input_ids: list[int], config: EvictionConfig, uniform: bool = True) -> list[torch.Tensor]:
    config.check_prompt(len(input_ids))
    pre = prefill(model, input_ids, config.context_len(len(input_ids)), config.window)
    return keep_sets_from(pre, config, uniform)


@torch.no_grad()
def decode(model, pre: Prefill, max_new_tokens: int, keep: list[torch.Tensor] | None = None,
           eos_token_id: int | None = None) -> list[int]:
    """Greedy decode after a prefill (its cache is copied, so one prefill serves many keep sets).
    Every decode step sees only the kept prompt entries plus all generated tokens."""
    import copy

    cache = copy.deepcopy(pre.cache)
    nxt = pre.first_token
    generated = [nxt]
    _HOOKS.keep = keep
    try:
        pos = len(pre.input_ids)
        while len(generated) < max_new_tokens and nxt != eos_token_id:
            out = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos]]))
            nxt = int(out.logits[0, -1].argmax())
            generated.append(nxt)
            pos += 1
    finally:
        _HOOKS.keep = None
    return generated


def greedy(model, input_ids: list[int], max_new_tokens: int, keep: list[torch.Tensor] | None = None,
           eos_token_id: int | None = None) -> list[int]:
    """Greedy decode. Prefill attends to everything (eviction happens after prefill, as in the
    plugin); every decode step sees only the kept prompt entries plus all generated tokens."""
    return decode(model, prefill(model, input_ids, window=1), max_new_tokens, keep, eos_token_id)
