"""Why does DefensiveKV lose to SnapKV when every KV head keeps the same count? An ablation on
needle-in-a-haystack through the HF reference path (query-aware, SmolLM2 by default).

For each prompt: one prefill, then keep sets for every variant; reports NIAH accuracy and needle
retention (share of the needle's (layer, KV head, token) entries kept) per variant. Variants are
`name=method[/native][,field=value...]` (EvictionConfig fields), e.g. `nostage1=defensivekv,mass_threshold=1e-6`.

    .venv/bin/python benchmarks/reference/ablation.py --prompts 8 --out benchmarks/results/reference
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from niah import QUESTION, build_prompt, haystack_text, machine  # noqa: E402

from vllm_defensive.models import ensure_model  # noqa: E402
from vllm_defensive.policy import EvictionConfig  # noqa: E402
from vllm_defensive.reference import decode, keep_sets_from, load_model, prefill  # noqa: E402

DEFAULT_VARIANTS = [
    "snapkv=snapkv",
    "criticalkv=criticalkv",
    "defensivekv=defensivekv",
    "defensivekv-native=defensivekv/native",
    "defensivekv-no-stage1=defensivekv,mass_threshold=1e-6",
    "defensivekv-stage1-0.5=defensivekv,mass_threshold=0.5",
    "defensivekv-fp32=defensivekv,probs_fp32=True",
]


def _value(v: str):
    if v in ("True", "False"):
        return v == "True"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_variant(spec: str):
    name, _, rest = spec.partition("=")
    parts = rest.split(",")
    method, _, alloc = parts[0].partition("/")
    fields = {}
    for kv in parts[1:]:
        k, _, v = kv.partition("=")
        fields[k] = _value(v)
    return name, method, alloc != "native", fields


def variant_keep_sets(pre, variant, budget: float):
    """Keep masks of one parsed variant on a captured prefill. `no_value_norm=True` is a switch of
    these scripts (not an EvictionConfig field): the layers are scored without their values."""
    name, method, uniform, fields = variant
    fields = dict(fields)
    if fields.pop("no_value_norm", False):
        pre = dataclasses.replace(pre, layers=[dataclasses.replace(x, values=None) for x in pre.layers])
    cfg = EvictionConfig(method=method, budget=1.0 if method == "none" else budget, **fields)
    return keep_sets_from(pre, cfg, uniform=uniform)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--out", default="benchmarks/results/reference")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    model, tok = load_model(ensure_model(args.model))
    hay = tok(haystack_text()[:400_000])["input_ids"]
    variants = [parse_variant(v) for v in args.variants]
    rows, t0 = [], time.time()
    for i in tqdm(range(args.prompts), desc="prompts"):
        n = args.min_tokens + (args.max_tokens - args.min_tokens) * i // max(args.prompts - 1, 1)
        depth = [0.1, 0.3, 0.5, 0.7, 0.9][i % 5]
        number = rng.randint(1_000_000, 9_999_999)
        ctx_ids, _ = build_prompt(tok, hay[i * 7000:], n, depth, number)
        ids = ctx_ids + tok(QUESTION)["input_ids"]
        digits = tok(f" {number}")["input_ids"]
        at = next(j for j in range(len(ctx_ids)) if ctx_ids[j:j + len(digits)] == digits)
        needle = torch.arange(at - 12, at + len(digits))  # "...essays is NNNNNNN"
        pre = prefill(model, ids, context_len=len(ids), window=32)
        row = {"tokens": len(ids), "depth": depth, "variants": {}}
        for variant in variants:
            name = variant[0]
            keep = variant_keep_sets(pre, variant, args.budget)
            retained = torch.stack([m[:, needle].float().mean() for m in keep]).mean().item()
            text = tok.decode(decode(model, pre, 12, keep))
            row["variants"][name] = {"hit": str(number) in text, "needle_retained": retained, "text": text}
        rows.append(row)
        tqdm.write(json.dumps({k: (v["hit"], round(v["needle_retained"], 3)) for k, v in row["variants"].items()}))
    summary = {name: {"accuracy": sum(r["variants"][name]["hit"] for r in rows) / len(rows),
                      "needle_retained": sum(r["variants"][name]["needle_retained"] for r in rows) / len(rows)}
               for name, *_ in variants}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"what": "DefensiveKV ablation, NIAH through the HF reference path (query-aware), CPU fp32",
           **machine(),
           "model": args.model, "budget": args.budget, "variants": args.variants, "summary": summary,
           "samples": rows, "wall_s": round(time.time() - t0, 1), "command": " ".join(sys.argv)}
    (out / f"ablation_{args.model}_b{args.budget}.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
