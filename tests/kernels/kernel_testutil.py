"""Shared helpers of the kernel tests: paged caches with scattered blocks, realistic attention."""

from __future__ import annotations

import math

import torch


def make_paged(x: torch.Tensor, block_size: int, layout: str = "NHD", extra_blocks: int = 3,
               gen: torch.Generator | None = None, spare_table: int = 2):
    """Dense [H, N, d] -> (cache view [num_blocks, block_size, H, d], int32 block table).

    Blocks are scattered over a larger pool filled with noise (non-contiguous, shuffled ids) and
    the table carries unused trailing entries, like a row of vLLM's block table. layout: "NHD"
    (contiguous), "HND" (vLLM's other stride order) or "FA" (the K half of a
    (num_blocks, 2, block_size, H, d) FlashAttention cache).
    """
    h, n, d = x.shape
    dev = x.device
    nblk = -(-n // block_size)
    total = nblk + extra_blocks
    noise = lambda *s: torch.randn(*s, generator=gen, device="cpu").to(device=dev, dtype=x.dtype)  # noqa: E731
    if layout == "NHD":
        cache = noise(total, block_size, h, d)
    elif layout == "HND":
        cache = noise(total, h, block_size, d).permute(0, 2, 1, 3)
    elif layout == "FA":
        cache = noise(total, 2, block_size, h, d)[:, 0]
    else:
        raise ValueError(layout)
    ids = torch.randperm(total, generator=gen)[:nblk].to(dev)
    pos = torch.arange(n, device=dev)
    cache[ids[pos // block_size], pos % block_size] = x.permute(1, 0, 2)
    table = torch.cat([ids, torch.full((spare_table,), total - 1, device=dev, dtype=ids.dtype)])
    return cache, table.to(torch.int32)


def attention_inputs(hq: int, hkv: int, w: int, n: int, d: int, dtype, device, gen: torch.Generator,
                     peaky: float = 1.0):
    """Window queries and keys with LLM-like attention: a sink, a few heavy hitters, local bias."""
    q = torch.randn(hq, w, d, generator=gen) * peaky
    k = torch.randn(hkv, n, d, generator=gen)
    sink_dir = torch.randn(d, generator=gen)
    sink_dir = sink_dir / sink_dir.norm()
    k[:, 0] += (4.0 * math.sqrt(d) / 1.5) * sink_dir  # about +4 on the sink logit
    q += 1.5 * sink_dir
    hot = torch.randint(0, n, (max(1, n // 50),), generator=gen)
    k[:, hot] *= 1.8
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def layered_paged_inputs(hq: int, hkv: int, w: int, n: int, d: int, dtype, device, gen: torch.Generator,
                         block_size: int, layout: str, layers: int, edit=None):
    """`layers` layers of attention_inputs in paged caches that share one block table (the layered
    path's contract; more than one layer needs the NHD layout). edit(q, k) -> (q, k) changes a
    layer's inputs before they are paged. Returns the queries, the caches, the dense keys and the
    block table."""
    qs, caches, keys, table = [], [], [], None
    for _ in range(layers):
        q, k = attention_inputs(hq, hkv, w, n, d, dtype, device, gen)
        if edit is not None:
            q, k = edit(q, k)
        if table is None:
            cache, table = make_paged(k, block_size, layout, gen=gen)
        else:  # the first layer's block table: keys written through it into a cache of the same shape
            assert layout == "NHD"
            cache = torch.randn(caches[0].shape, generator=gen).to(device, dtype)
            t = torch.arange(n, device=device)
            cache[table[t // block_size].long(), t % block_size] = k.permute(1, 0, 2)
        qs.append(q)
        caches.append(cache)
        keys.append(k)
    return qs, caches, keys, table


def assert_topk_agree(got: torch.Tensor, ref: torch.Tensor, k: int, rtol: float, close: float = 1e-4) -> None:
    """Per-row top-k sets agree except where the reference is tied at the cut (within rtol).

    A token whose own score differs from the reference by more than `close` (a probability that
    rounded to the other neighbour in probs_dtype: one ulp) may displace one other token; each
    such token buys one allowed difference, and none exist in the small CPU cases.
    """
    for h in range(ref.shape[0]):
        r, g = ref[h].double(), got[h].double()
        kk = min(k, r.numel())
        thr = torch.topk(r, kk).values[-1]
        flipped = (g - r).abs() > close * r.abs() + 1e-12
        sure_in = (r > thr * (1 + rtol) + 1e-30) & ~flipped
        sure_out = (r < thr * (1 - rtol)) & ~flipped
        picked = torch.zeros_like(sure_in)
        picked[torch.topk(g, kk).indices] = True
        budget = int(flipped.sum())
        missed = int((sure_in & ~picked).sum())
        wrong = int((sure_out & picked).sum())
        assert missed <= budget, f"head {h}: {missed} clear top-{kk} tokens dropped ({budget} flipped)"
        assert wrong <= budget, f"head {h}: {wrong} clearly-out tokens kept ({budget} flipped)"
