"""Where DefensiveKV's floor loses a RULER needle: per (layer, KV head), how many of the needle's
tokens each uniform ranking keeps, and how many of them have a worst-case risk under their head's
mean (the floor ties those with the haystack). HF reference path, CPU fp32, query-aware.

    .venv/bin/python benchmarks/reference/needle_floor.py --model smollm2 --samples 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from niah import machine  # noqa: E402

from vllm_defensive.evaluation.tasks import cache_path, read_cached, tokenizer_fingerprint  # noqa: E402
from vllm_defensive.models import ensure_model  # noqa: E402
from vllm_defensive.policy import EvictionConfig, Measurements, get_method  # noqa: E402
from vllm_defensive.reference import load_model, prefill  # noqa: E402

RANKINGS = {"floored": 0.0, "two_stage": 0.5}  # uniform_risk_first


def needle_positions(tok, ids: list[int], answer: str) -> list[int]:
    for text in (" " + answer, answer):
        digits = tok(text, add_special_tokens=False)["input_ids"]
        at = next((j for j in range(len(ids)) if ids[j:j + len(digits)] == digits), None)
        if at is not None:
            return list(range(at, at + len(digits)))
    raise ValueError(f"needle {answer!r} not found in the prompt's tokens")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="tmp/quality-data")
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--out", default="benchmarks/results/reference")
    args = ap.parse_args(argv)
    fp = tokenizer_fingerprint(Path(args.data) / "tokenizers" / args.model)
    samples = read_cached(cache_path(Path(args.data) / "ruler", fp, "base", args.task, args.length, 42), args.samples)
    if samples is None:
        raise SystemExit(f"no cached {args.task} samples: run benchmarks/quality/run_gpu.sh prepare")
    model, tok = load_model(ensure_model(args.model))
    methods = {name: get_method(EvictionConfig(method="defensivekv", budget=args.budget, uniform_risk_first=f))
               for name, f in RANKINGS.items()}
    rows, t0 = [], time.time()
    for s in samples:
        ids = tok(s.prompt, add_special_tokens=True)["input_ids"]
        pos = needle_positions(tok, ids, s.outputs[0])
        pre = prefill(model, ids, context_len=len(ids), window=32)
        k = methods["floored"].config.keep_per_head(len(ids))
        heads, below, below_all, entries, all_entries = [], 0, 0, 0, 0
        for li, x in enumerate(pre.layers):
            # one measurement per layer serves both rankings (they differ only after it)
            measured = Measurements.stack([methods["floored"].measure(x)])
            risk = measured.stats.defensive_max[0]  # [Hkv, P]
            under = risk < risk.mean(-1, keepdim=True)
            below += int(under[:, pos].sum())
            below_all += int(under.sum())
            entries += under[:, pos].numel()
            all_entries += under.numel()
            kept = {name: m.compress_uniform_measured(measured, 1, k)[0] for name, m in methods.items()}
            for h in range(x.num_kv_heads):
                heads.append({"layer": li, "head": h, "needle_under_mean": int(under[h, pos].sum()),
                              **{name: len(set(pos) & set(kept[name][h].tolist())) for name in methods}})
        rows.append({"needle": s.outputs[0], "needle_tokens": len(pos), "at": pos[0], "prompt_tokens": len(ids),
                     "needle_entries_under_mean": round(below / entries, 3),
                     "all_entries_under_mean": round(below_all / all_entries, 3),
                     **{f"needle_entries_kept_{name}": round(sum(r[name] for r in heads) / entries, 3)
                        for name in methods},
                     **{f"heads_keeping_the_whole_needle_{name}": sum(r[name] == len(pos) for r in heads)
                        for name in methods},
                     "heads": heads})
        print(json.dumps({k_: v for k_, v in rows[-1].items() if k_ != "heads"}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "needle tokens per (layer, KV head): under the head's mean worst-case risk, and kept by the "
                   "floored / two-stage uniform DefensiveKV rankings (HF reference path, CPU fp32, query-aware)",
           **machine(), "model": args.model, "task": args.task, "length": args.length, "budget": args.budget,
           "rankings": RANKINGS, "samples": rows, "wall_s": round(time.time() - t0, 1), "command": " ".join(sys.argv)}
    (out / f"needle_floor_{args.model}_{args.task}_b{args.budget}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
