"""DefensiveKV variants on RULER samples through the HF reference path (query-aware, uniform
per-head counts as the plugin serves): which ingredient costs quality against SnapKV?

Reads the samples that `run_gpu.sh prepare` cached (no generators needed), decodes each variant's
keep sets greedily and scores with RULER's metrics. Variants as in ablation.py.

    .venv/bin/python benchmarks/reference/ruler_ablation.py --tasks niah_multiquery niah_multivalue --samples 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from ablation import parse_variant, variant_keep_sets  # noqa: E402
from niah import machine  # noqa: E402

from vllm_defensive.evaluation.metrics import score  # noqa: E402
from vllm_defensive.evaluation.tasks import cache_path, read_cached, tokenizer_fingerprint  # noqa: E402
from vllm_defensive.models import ensure_model  # noqa: E402
from vllm_defensive.reference import decode, load_model, prefill  # noqa: E402

VARIANTS = [
    "none=none",
    "snapkv=snapkv",
    "defensivekv=defensivekv",
    "defensivekv-no-value-norm=defensivekv,no_value_norm=True",
    "criticalkv=criticalkv",
]
# `no_value_norm=True`: see ablation.variant_keep_sets.


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen05b")
    ap.add_argument("--data", default="tmp/quality-data")
    ap.add_argument("--tasks", nargs="+", default=["niah_multiquery", "niah_multivalue"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--out", default="benchmarks/results/reference")
    args = ap.parse_args(argv)
    tok_dir = Path(args.data) / "tokenizers" / args.model
    fp = tokenizer_fingerprint(tok_dir)
    model, tok = load_model(ensure_model(args.model))
    variants = [parse_variant(v) for v in args.variants]
    rows, t0 = [], time.time()
    work = []
    for task in args.tasks:
        samples = read_cached(cache_path(Path(args.data) / "ruler", fp, "base", task, args.length, 42), args.samples)
        if samples is None:
            raise SystemExit(f"no cached {task} samples at {args.length}: run benchmarks/quality/run_gpu.sh prepare")
        work += samples
    for s in tqdm(work, desc="samples"):
        ids = tok(s.prompt, add_special_tokens=True)["input_ids"]
        pre = prefill(model, ids, context_len=len(ids), window=32)
        row = {"task": s.task, "index": s.index, "tokens": len(ids), "scores": {}}
        for variant in variants:
            name = variant[0]
            keep = variant_keep_sets(pre, variant, args.budget)
            text = tok.decode(decode(model, pre, min(args.max_new_tokens, s.max_new_tokens), keep))
            row["scores"][name] = score(s.metric, text, s.outputs)
        rows.append(row)
        tqdm.write(json.dumps({"task": s.task, **row["scores"]}))
    summary = {name: sum(r["scores"][name] for r in rows) / len(rows) for name, *_ in variants}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "RULER through the HF reference path, query-aware, CPU fp32; DefensiveKV ablation",
           **machine(),
           "model": args.model, "length": args.length, "budget": args.budget, "tasks": args.tasks,
           "variants": args.variants, "summary": summary, "samples": rows, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(sys.argv)}
    (out / f"ruler_ablation_{args.model}_b{args.budget}.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
