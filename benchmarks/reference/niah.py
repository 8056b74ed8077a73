"""Needle-in-a-haystack through the HF reference path: accuracy of every method at one budget.

    .venv/bin/python benchmarks/reference/niah.py --budget 0.2 --prompts 10

One full-attention prefill per prompt; every method's keep sets come from the same captured
layers and decode from a copy of the same cache, so methods differ only in what they evict.
Writes JSON + a bar plot under benchmarks/results/reference/.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_defensive.models import ensure_model
from vllm_defensive.policy import METHOD_NAMES, EvictionConfig
from vllm_defensive.reference import decode, keep_sets_from, load_model, prefill

QUESTION = ("\nQuestion: What is the special magic number mentioned in the essays?\n"
            "Answer: The special magic number mentioned in the essays is")


def haystack_text() -> str:
    path = files("long_context_eval") / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    return json.loads(path.read_text())["text"]


def build_prompt(tok, hay_ids, n_tokens, depth, number):
    needle = tok(f" The special magic number mentioned in the essays is {number}. ")["input_ids"]
    q = tok(QUESTION)["input_ids"]
    body = hay_ids[: n_tokens - len(needle) - len(q)]
    at = int(len(body) * depth)
    return body[:at] + needle + body[at:], len(q)


def machine() -> dict:
    """Device and versions for every result file of these scripts."""
    return {"device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
            "versions": {"torch": torch.__version__, "transformers": version("transformers"),
                         "python": sys.version.split()[0]}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/reference")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_model(ensure_model(args.model))
    hay = tok(haystack_text()[:400_000])["input_ids"]
    methods = list(METHOD_NAMES)
    results = []
    t0 = time.time()
    for i in tqdm(range(args.prompts), desc="prompts"):
        n = args.min_tokens + (args.max_tokens - args.min_tokens) * i // max(args.prompts - 1, 1)
        depth = [0.1, 0.3, 0.5, 0.7, 0.9][i % 5]
        number = rng.randint(1_000_000, 9_999_999)
        ctx_ids, q_len = build_prompt(tok, hay[i * 7000 :], n, depth, number)
        ids = ctx_ids + tok(QUESTION)["input_ids"]
        pre = prefill(model, ids, context_len=len(ids), window=32)
        row = {"tokens": len(ids), "depth": depth, "needle": number, "answers": {}}
        for m in methods:
            for alloc in ("uniform", "native"):
                cfg = EvictionConfig(method=m, budget=1.0 if m == "none" else args.budget)
                keep = keep_sets_from(pre, cfg, uniform=alloc == "uniform")
                text = tok.decode(decode(model, pre, 12, keep))
                row["answers"][f"{m}/{alloc}"] = {"text": text, "hit": str(number) in text}
        results.append(row)
    summary = {}
    for key in results[0]["answers"]:
        hits = [r["answers"][key]["hit"] for r in results]
        summary[key] = sum(hits) / len(hits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "NIAH accuracy through the HF reference path (query-aware: question inside the window)",
        **machine(),
        "model": args.model, "budget": args.budget, "prompts": args.prompts,
        "token_range": [args.min_tokens, args.max_tokens], "seed": args.seed,
        "accuracy": summary, "samples": results, "wall_s": round(time.time() - t0, 1),
        "command": " ".join(["benchmarks/reference/niah.py"] + (argv or sys.argv[1:])),
    }
    stem = f"niah_{args.model}_b{args.budget}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(methods))
    for j, alloc in enumerate(("uniform", "native")):
        ax.bar([x + 0.4 * j for x in xs], [summary[f"{m}/{alloc}"] for m in methods], 0.4, label=f"{alloc} allocation")
    ax.set_xticks([x + 0.2 for x in xs], methods, rotation=30, ha="right")
    ax.set_ylabel("NIAH accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{args.model}, {args.prompts} prompts {args.min_tokens}-{args.max_tokens} tokens, budget {args.budget}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
