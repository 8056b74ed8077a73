"""CriticalKV's ||v W_o^q||_1 per (token, query head), group mean -> fp32 [Hkv, N] (Triton).

One program per (token tile, KV head): the V tile is loaded once from the paged cache; the
kernel streams W_o^q (d x D, read straight out of o_proj.weight [D, Hq*d], no transpose copy) in
BO-column slices for each query head of the group, takes the tile product on the tensor cores
and reduces |.| over D on the fly, so the (tokens x D) product never exists. Accumulation in
fp32; bf16/fp16 products are exact, fp32 inputs use IEEE dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, fast

CONFIG = {"bt": 128, "bt_small": 64, "bo": 128, "warps": 8, "stages": 3}

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["N", "block_size"])  # one compile for every prompt length (dense: one block of N)
def _value_norm_kernel(
    VPTRS, BT, WPTRS, OUT,
    svb, svt, svh, svd, block_size, HKV, N, G, DOUT, HEAD_D, swo, swi,
    BTK: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, VDT: tl.constexpr,
    WDT: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    hg = tl.program_id(1).to(tl.int64)  # (layer, KV head) pair
    layer = hg // HKV
    h = hg % HKV
    V = tl.load(VPTRS + layer).to(tl.pointer_type(VDT))
    WO = tl.load(WPTRS + layer).to(tl.pointer_type(WDT))
    if ALIGNED:  # checked on the host (a loaded pointer hides it from the compiler)
        V = tl.multiple_of(V, 16)
        WO = tl.multiple_of(WO, 16)
    t = pid * BTK + tl.arange(0, BTK)
    tmask = t < N
    dd = tl.arange(0, BD)
    dmask = dd < HEAD_D
    blk = tl.load(BT + t // block_size, mask=tmask, other=0).to(tl.int64)
    off = (t % block_size).to(tl.int64)
    v = tl.load(V + blk[:, None] * svb + off[:, None] * svt + h * svh + dd[None, :] * svd,
                mask=tmask[:, None] & dmask[None, :], other=0.0).to(CDT)
    acc = tl.zeros([BTK], tl.float32)
    ob = tl.arange(0, BO)
    for gi in range(G):
        col = (h * G + gi) * HEAD_D + dd  # columns of o_proj.weight for this query head
        for o0 in range(0, DOUT, BO):
            o = o0 + ob
            w = tl.load(WO + o[None, :].to(tl.int64) * swo + col[:, None] * swi,
                        mask=dmask[:, None] & (o[None, :] < DOUT), other=0.0).to(CDT)
            if INTERP:  # the interpreter multiplies bf16 operands as raw integers
                prod = tl.dot(v.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                prod = tl.dot(v, w, input_precision=DOT_PREC)  # [BTK, BO] slice of v @ W_o^q
            acc += tl.sum(tl.abs(prod), 1)
    tl.store(OUT + hg * N + t, acc / G, mask=tmask)


def long_prompt_threshold(num_kv_heads: int, device: torch.device) -> int:
    """From this many tokens on, the kernel runs big tiles; below, short prompts / few KV heads get
    smaller tiles (more programs to fill the GPU): the one length-dependent compile variant."""
    if device.type != "cuda":
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return CONFIG["bt"] * cdiv(2 * sms, num_kv_heads)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def value_norms(value_cache, block_table, num_tokens, o_proj_weight):
    """One layer: fp32 [Hkv, N]."""
    return value_norms_layers([value_cache], block_table, num_tokens, [o_proj_weight])[0]


def value_norms_layers(value_caches, block_table, num_tokens, o_proj_weights):
    """Every layer in one launch: one value cache and one o_proj weight per layer (each set sharing
    shape, strides and dtype) -> fp32 [layers, Hkv, N]."""
    from ._pointers import base_table, same_layout

    lyr = len(value_caches)
    if lyr == 0 or len(o_proj_weights) != lyr:
        raise ValueError(f"{lyr} value caches, {len(o_proj_weights)} o_proj weights")
    if not (same_layout(value_caches) and same_layout(o_proj_weights)):
        raise ValueError("every layer's value cache (and o_proj weight) must share shape, strides and dtype")
    value_cache, o_proj_weight = value_caches[0], o_proj_weights[0]
    nblocks, block_size, hkv, d = value_cache.shape
    dout, hqd = o_proj_weight.shape
    if hqd % d:
        raise ValueError(f"o_proj input dim {hqd} is not a multiple of the head dim {d}")
    hq = hqd // d
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    n = int(num_tokens)
    dev = value_cache.device
    out = torch.empty(lyr, hkv, n, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    same = value_cache.dtype == o_proj_weight.dtype and value_cache.dtype in (torch.bfloat16, torch.float16)
    cdt = value_cache.dtype if same else torch.float32
    bt = CONFIG["bt"] if n >= long_prompt_threshold(hkv, dev) else CONFIG["bt_small"]
    vptrs, v_aligned = base_table(value_caches, dev)
    wptrs, w_aligned = base_table(o_proj_weights, dev)
    fast(_value_norm_kernel)[(cdiv(n, bt), lyr * hkv)](
        vptrs, block_table.contiguous(), wptrs, out,
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3),
        block_size, hkv, n, g, dout, d, o_proj_weight.stride(0), o_proj_weight.stride(1),
        BTK=bt, BO=CONFIG["bo"], BD=max(16, _next_pow2(d)), CDT=_TL[cdt], VDT=_TL[value_cache.dtype],
        WDT=_TL[o_proj_weight.dtype], ALIGNED=v_aligned and w_aligned,
        DOT_PREC="ieee" if cdt == torch.float32 else "tf32", INTERP=dev.type == "cpu",
        num_warps=CONFIG["warps"], num_stages=CONFIG["stages"],
    )
    return out
