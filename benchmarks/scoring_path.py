"""What one request's eviction costs in the engine step: the plugin's whole scoring path.

The serving benchmark showed the plugin's prefill steps stalled by scoring. This times exactly
what `integration.worker.WorkerEviction._score` runs for one request after its prefill, for every
layer: gather the context K/V out of the paged cache, score with the method, select the same
count per KV head (`integration.scoring.select_keep`: measure per layer, then one batched
selection for all layers), on the two selectors the worker can use:

  torch    the policy library (`policy_selector`): materialises the [Hq, W, L] window
           probabilities and the [Hq, L, D] value product
  triton   the same methods on the fused kernels (`kernel_selector`, the default on CUDA)
  triton_layer_by_layer   the kernels, but each layer scored and selected on its own (what the
           worker did before the batched selection)
  paged    what the worker runs on GPU caches now (`select_keep_paged`): no gather, every layer
           measured by the layered kernels in a handful of launches, one batched selection

and the compaction that follows (kept tokens of every layer into fresh pages): `compact_indexing`,
the per-layer gather + scatter by advanced indexing (the worker's CPU path and its GPU path before
the one-launch kernel), against `compact_kernel` (`triton_kernels.compact_kv`, one launch).

Shapes: Qwen2.5-0.5B (24 layers, 14/2 heads, d 64, hidden 896) and Llama-3.1-8B (32 layers, 32/8,
d 128, hidden 4096), bf16, window 32, budget 0.2. Writes scoring_path.json and scoring_path.png.
Needs the package installed (`pip install -e .`); run it from outside the checkout, whose
top-level `triton_kernels/` folder would shadow OpenAI's package of that name inside vLLM.

    python benchmarks/scoring_path.py --out benchmarks/results/scoring      # GPU
    python benchmarks/scoring_path.py --out /tmp/x --tokens 512 --layers 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import torch

from vllm_defensive.policy import EvictionConfig, LayerInputs, get_method

SHAPES = {
    "qwen05b": dict(hq=14, hkv=2, d=64, hidden=896, layers=24),
    "llama8b": dict(hq=32, hkv=8, d=128, hidden=4096, layers=32),
}
BLOCK = 16


def make_request(shape: dict, tokens: int, layers: int, device, dtype=torch.bfloat16, window=32):
    """Paged K/V of one request (shuffled blocks, FlashAttention layout), window queries, W_o."""
    g = torch.Generator(device="cpu").manual_seed(tokens)
    nblk = -(-tokens // BLOCK)
    table = torch.randperm(nblk * 2, generator=g)[:nblk].to(device)  # the other half: fresh pages
    out = []
    for _ in range(layers):
        cache = torch.randn(nblk * 2, 2, BLOCK, shape["hkv"], shape["d"], generator=g).to(device, dtype)
        q = torch.randn(shape["hq"], window, shape["d"], generator=g).to(device, dtype)
        wo = (torch.randn(shape["hidden"], shape["hq"] * shape["d"], generator=g) * 0.02).to(device, dtype)
        out.append((cache, q, wo))
    t = torch.arange(tokens, device=device)
    slots = table[t // BLOCK] * BLOCK + t % BLOCK
    return out, slots, table


def score_request(layers, slots, cfg: EvictionConfig, keep: int, hkv: int):
    """The worker's path (`WorkerEviction._score`): a generator gathers each layer's K/V by slot
    with the GPU layout's own gather when the method measures it; one batched selection."""
    from vllm_defensive.integration.layout import GpuLayout
    from vllm_defensive.integration.scoring import select_keep

    rows = slots.expand(hkv, -1)
    layout = GpuLayout(BLOCK, hkv, layers[0][0].shape[-1])

    def inputs():
        for cache, q, wo in layers:
            k, v = layout.gather(cache, rows)  # [Hkv, N, d] each
            yield LayerInputs(q, k, v, wo)

    return select_keep(cfg, inputs(), keep, (len(layers), hkv, slots.numel()), slots.device)


def paged_request(layers, table, tokens: int):
    from vllm_defensive.integration.scoring import PagedRequest

    return PagedRequest(queries=torch.stack([q for _, q, _ in layers]), key_caches=[c[:, 0] for c, _, _ in layers],
                        value_caches=[c[:, 1] for c, _, _ in layers], block_table=table.to(torch.int32),
                        context_len=tokens, o_proj_weights=[wo for _, _, wo in layers], scale=None)


def compaction_times(layers, table, slots, kept, repeat, sync) -> dict:
    """The copy after scoring: into fresh pages, per-layer indexing vs the one-launch kernel."""
    from vllm_defensive import triton_kernels as tk
    from vllm_defensive.integration.layout import GpuLayout

    nblocks = layers[0][0].shape[0]
    hkv, keep = kept.shape[1], kept.shape[2]
    dst_blocks = -(-keep // BLOCK)
    used = set(table.tolist())
    free = torch.tensor([b for b in range(nblocks) if b not in used][:dst_blocks], device=table.device)
    if free.numel() < dst_blocks:
        return {}
    layout = GpuLayout(BLOCK, hkv, layers[0][0].shape[-1])
    pos = torch.arange(keep, device=table.device)
    dst = (free[pos // BLOCK] * BLOCK + pos % BLOCK).expand(hkv, -1)

    def indexing():
        for (cache, _, _), idx in zip(layers, kept):
            k, v = layout.gather(cache, slots[idx])
            layout.scatter(cache, dst, k, v)

    def kernel():
        tk.compact_kv([c[:, 0] for c, _, _ in layers], [c[:, 1] for c, _, _ in layers], kept, table, free)

    return {"compact_indexing_ms": timed(indexing, repeat, sync)[0], "compact_kernel_ms": timed(kernel, repeat, sync)[0]}


def timed(fn, repeat: int, sync) -> tuple[float, float]:
    fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    ts = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if torch.cuda.is_available() else 0.0
    ts.sort()
    return ts[len(ts) // 2] * 1e3, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+", default=["snapkv", "criticalkv", "defensivekv"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs); times are scaled up")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true",
                    help="profile one paged request per shape and length (the last method): the GPU time per kernel "
                         "goes into the row (profile_top) and profile_<shape>_<tokens>.txt")
    args = ap.parse_args()
    from vllm_defensive.integration import scoring
    from vllm_defensive import triton_kernels as tk

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    selectors = {"torch": scoring.policy_selector}
    if cuda and tk.backend(device) == "triton":
        selectors["triton"] = scoring.kernel_selector

        def triton_layer_by_layer(config, layers, keep):  # the same, scored and selected per layer
            method = get_method(config, tk.scoring_ops())
            return torch.stack([method.compress_uniform(x, keep) for x in layers])

        selectors["triton_layer_by_layer"] = triton_layer_by_layer
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        n_layers = args.layers or shape["layers"]
        for tokens in args.tokens:
            layers, slots, table = make_request(shape, tokens, n_layers, device)
            for method in args.methods:
                cfg = EvictionConfig(method=method, budget=0.2)
                keep = cfg.keep_per_head(tokens)
                results, kept = {}, {}
                for name, fn in selectors.items():
                    scoring.set_selector(fn)
                    try:
                        ms, peak = timed(lambda: score_request(layers, slots, cfg, keep, shape["hkv"]), args.repeat, sync)
                        kept[name] = score_request(layers, slots, cfg, keep, shape["hkv"])
                    except torch.OutOfMemoryError:
                        ms, peak = None, None
                    finally:
                        scoring.set_selector(None)
                    scale = shape["layers"] / n_layers
                    results[name] = {"request_ms": ms and ms * scale, "peak_extra_mb": peak}
                if "triton" in selectors:
                    req = paged_request(layers, table, tokens)
                    run = lambda: scoring.select_keep_paged(cfg, req, keep)  # noqa: E731
                    ms, peak = timed(run, args.repeat, sync)
                    kept["paged"] = run()
                    results["paged"] = {"request_ms": ms * shape["layers"] / n_layers, "peak_extra_mb": peak}
                    if args.profile and cuda and method == args.methods[-1]:
                        try:
                            profile_top = profile_kernels(run, os.path.join(args.out, f"profile_{shape_name}_{tokens}.txt"))
                        except Exception as e:  # a profiler problem must not cost the timings
                            profile_top = [{"error": f"{type(e).__name__}: {e}"}]
                agree = None
                if "triton" in kept and "torch" in kept:  # keep-set agreement (bf16 ties may reorder a few)
                    a, b = kept["torch"], kept["triton"]
                    same = sum(len(set(x[h].tolist()) & set(y[h].tolist())) for x, y in zip(a, b) for h in range(x.shape[0]))
                    agree = same / sum(x.numel() for x in a)
                row = {"shape": shape_name, "tokens": tokens, "method": method, "layers": shape["layers"],
                       "keep_per_head": keep, "selectors": results, "keep_set_overlap": agree}
                if "triton_layer_by_layer" in kept and "triton" in kept:
                    row["batched_equals_layer_by_layer"] = bool(torch.equal(kept["triton"], kept["triton_layer_by_layer"]))
                if "paged" in kept:
                    row["paged_equals_batched"] = bool(torch.equal(kept["paged"].long(), kept["triton"].long()))
                    if method == args.methods[-1]:
                        row.update({k: v * shape["layers"] / n_layers for k, v in compaction_times(
                            layers, table, slots, kept["paged"].long(), args.repeat, sync).items()})
                if args.profile and "paged" in kept and method == args.methods[-1]:
                    row["profile_top"] = profile_top
                if results.get("triton", {}).get("request_ms") and results["torch"]["request_ms"]:
                    row["speedup"] = results["torch"]["request_ms"] / results["triton"]["request_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            del layers
            if cuda:
                torch.cuda.empty_cache()
    vers = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("vllm", "triton"):
        try:
            vers[pkg] = version(pkg)
        except Exception:
            pass
    doc = {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})", "versions": vers,
           "command": " ".join(sys.argv), "what": "one request's scoring in the engine step (all layers, budget 0.2, "
           "window 32, bf16, paged block size 16): gather + score + select, median of --repeat; compaction "
           "of the kept tokens of every layer into fresh pages (compact_*_ms)", "runs": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scoring_path.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, os.path.join(args.out, "scoring_path.png"))


def profile_kernels(fn, path: str, top: int = 12) -> list[dict]:
    """GPU time per kernel of one call (after a warm run): where a request's scoring time goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(events.table(sort_by="cuda_time_total", row_limit=40))
    def gpu_us(e) -> float:  # device_time_total since torch 2.4 (cuda_time_total before)
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)

    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and gpu_us(e) > 0]
    kernels.sort(key=lambda e: -gpu_us(e))
    total = sum(gpu_us(e) for e in kernels)
    return [{"kernel": "(all kernels)", "calls": sum(e.count for e in kernels), "gpu_ms": round(total / 1e3, 4)}] + [
        {"kernel": e.key[:80], "calls": e.count, "gpu_ms": round(gpu_us(e) / 1e3, 4)} for e in kernels[:top]]


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    labels = [f"{r['shape']}\n{r['tokens'] // 1024}K {r['method']}" for r in runs]
    x = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(8, len(runs) * 0.9), 4.5))
    names = [n for n in ("torch", "triton_layer_by_layer", "triton", "paged") if any(n in r["selectors"] for r in runs)]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ys = [(r["selectors"].get(name) or {}).get("request_ms") or 0 for r in runs]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in x], ys, width=width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("ms per request (all layers)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_title(f"Eviction scoring per request, {doc['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
