"""Where a compacted request's extra prefill time goes: one engine, the same prompts with and without
eviction (a per-request override), timed one request at a time and then under torch.profiler.

The serving benchmark sees the plugin's prefill-only bursts take longer than plain vLLM's by more
than the scoring + compaction GPU time it reports (CUDA events). This profiles the engine step in
process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the worker runs in this process) and splits each
request's latency into GPU kernel time (model vs eviction kernels) and host time.

    python benchmarks/serving/profile_step.py --model-dir $GPU_MODEL_DIR --out $OUT/profile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

sys.path.insert(0, str(Path(__file__).parent))
from run import device, versions  # noqa: E402

# Kernels of the eviction path (ours, and the selection's torch ops are counted by elimination:
# everything the evicting requests run that the plain ones do not)
EVICTION_KERNELS = ("_window_pass", "_window_sums", "_value_norm", "_compact")


def prompts_of(n: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(tokens)] for _ in range(n)]


def gpu_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)


def kernel_table(prof) -> list:
    return [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA") and gpu_us(e) > 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=8, help="timed requests per setting")
    ap.add_argument("--profiled", type=int, default=3, help="requests per setting under the profiler")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--method", default="defensivekv")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model_dir, dtype=args.dtype, max_model_len=args.tokens + 512, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              additional_config={"kv_eviction": {"method": args.method, "budget": args.budget}})
    vocab = llm.get_tokenizer().vocab_size
    settings = {"plain": {"kv_eviction": "none"}, "evicting": {}}

    def run(ids, setting):
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, extra_args=settings[setting] or None)
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        return time.perf_counter() - t0, res

    for i, ids in enumerate(prompts_of(4, args.tokens, vocab, seed=1)):  # warm-up: compile, graphs
        run(ids, "plain" if i % 2 else "evicting")
    report = {"device": device(), "versions": versions(), "command": " ".join(sys.argv),
              "what": f"{args.tokens}-token prompts, 1 output token, one request at a time (nothing else in the "
                      f"step), {args.method} at {args.budget} vs the same engine with kv_eviction=none",
              "settings": {}}
    prompts = prompts_of(args.requests, args.tokens, vocab, seed=2)
    for setting in settings:  # same prompts for both; alternate order is not needed: engine is idle between
        walls, recs = [], []
        for ids in prompts:
            wall, res = run(ids, setting)
            walls.append(wall * 1e3)
            recs.append(getattr(res, "kv_eviction", None) or {})
        report["settings"][setting] = {
            "request_ms_median": statistics.median(walls), "request_ms": [round(w, 2) for w in walls],
            "score_ms_median": statistics.median(r.get("score_ms", 0.0) for r in recs),
            "compact_ms_median": statistics.median(r.get("compact_ms", 0.0) for r in recs)}
    cuda = torch.cuda.is_available()
    for setting in settings:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for ids in prompts[: args.profiled]:
                run(ids, setting)
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        (out / f"profile_{setting}_cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=60))
        (out / f"profile_{setting}_gpu.txt").write_text(events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60))
        kernels = kernel_table(prof)
        total = sum(gpu_us(e) for e in kernels) / args.profiled / 1e3
        ours = sum(gpu_us(e) for e in kernels if e.key.startswith(EVICTION_KERNELS)) / args.profiled / 1e3
        kernels.sort(key=lambda e: -gpu_us(e))
        report["settings"][setting].update({
            "profiled_gpu_ms_per_request": round(total, 3), "eviction_kernels_gpu_ms_per_request": round(ours, 3),
            "kernel_launches_per_request": sum(e.count for e in kernels) / args.profiled,
            "top_kernels": [{"kernel": e.key[:90], "calls": e.count / args.profiled,
                             "gpu_ms_per_request": round(gpu_us(e) / args.profiled / 1e3, 4)} for e in kernels[:15]]})
    p, e = report["settings"]["plain"], report["settings"]["evicting"]
    extra = e["request_ms_median"] - p["request_ms_median"]
    gpu_extra = e["profiled_gpu_ms_per_request"] - p["profiled_gpu_ms_per_request"]
    report["breakdown_ms"] = {
        "extra_latency": round(extra, 3), "extra_gpu_time": round(gpu_extra, 3),
        "of_which_eviction_kernels": e["eviction_kernels_gpu_ms_per_request"],
        "host_or_idle (extra latency - extra GPU time)": round(extra - gpu_extra, 3),
        "extra_latency_pct": round(100 * extra / p["request_ms_median"], 1)}
    (out / "profile_step.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("device", "breakdown_ms")}, indent=1))
    for s in settings:
        print(s, {k: v for k, v in report["settings"][s].items() if k not in ("top_kernels", "request_ms")})


if __name__ == "__main__":
    main()
