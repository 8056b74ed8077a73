"""Paired differences between two methods' RULER scores on the same prompts.

The per-method CIs in summary.json treat methods as independent; every method here answers the
very same prompts (same seed, same uids), so the difference is much better resolved by a paired
bootstrap: resample prompts within each task, score both methods on the same resample, average
over tasks as the report does.

    python benchmarks/quality/paired.py A.jsonl.xz[:method[:budget]] B.jsonl.xz[:method[:budget]] ... --out X.json
    python benchmarks/quality/paired.py --pairs defensivekv,snapkv criticalkv,defensivekv \
        --samples benchmarks/results/quality_rerun/samples.jsonl.xz --out .../paired.json
"""

from __future__ import annotations

import argparse
import json
import lzma
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(path: str) -> list[dict]:
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def scores(recs, method, budget, protocol, tokens, model=None) -> dict[str, dict[str, float]]:
    """task -> uid -> score for one run (of `model`, where the samples hold several)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in recs:
        if r["method"] == method and (method == "none" or abs(r["budget"] - budget) < 1e-9) \
                and r["protocol"] == protocol and r["tokens"] == tokens and model in (None, r["model"]):
            out[r["task"]][r["uid"]] = float(r["score"])
    return out


def run_machine(samples_path: str, model: str | None = None) -> dict:
    """Device and versions of the eval run that wrote these samples (its meta.json, beside them;
    a folder that merged several machines names each model's device)."""
    meta = Path(samples_path).with_name("meta.json")
    if not meta.is_file():
        raise SystemExit(f"no {meta}: every figure needs its machine (run_gpu.sh copies meta.json)")
    doc = json.loads(meta.read_text())
    return {"device": (doc.get("devices") or {}).get(model) or doc.get("device"), "versions": doc.get("versions")}


def one_model(recs: list[dict], model: str | None, path: str) -> None:
    """Samples of several models need --model (their uids repeat across models)."""
    models = sorted({r["model"] for r in recs})
    if model is None and len(models) > 1:
        raise SystemExit(f"{path} holds {', '.join(models)}: pass --model")
    if model is not None and model not in models:
        raise SystemExit(f"{path} holds no results of {model!r} (it has {', '.join(models)})")


def paired(a: dict, b: dict, n_boot: int = 5000, seed: int = 0) -> dict:
    tasks = sorted(set(a) & set(b))
    rng = np.random.default_rng(seed)
    diffs, means = [], []
    for t in tasks:
        uids = sorted(set(a[t]) & set(b[t]))
        d = np.array([a[t][u] - b[t][u] for u in uids])
        diffs.append(d)
        means.append(d.mean())
    boots = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].mean(1)
    boots /= len(diffs)
    return {"difference": round(float(np.mean(means)), 2), "ci95": [round(float(x), 2) for x in np.percentile(boots, [2.5, 97.5])],
            "p_not_above_zero": round(float((boots <= 0).mean()), 4), "tasks": len(tasks),
            "prompts": int(sum(len(d) for d in diffs))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", required=True, help="samples.jsonl(.xz) of the run holding method A")
    ap.add_argument("--baseline-samples", help="samples of method B if another run (default: --samples)")
    ap.add_argument("--pairs", nargs="+", required=True, help="A,B method pairs: reports score(A) - score(B)")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--protocol", default="query_aware")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--model", help="model label, where the samples hold several models")
    ap.add_argument("--label", default="", help="what the comparison is, stored in the output")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    recs_a = load(args.samples)
    recs_b = load(args.baseline_samples) if args.baseline_samples else recs_a
    one_model(recs_a, args.model, args.samples)
    one_model(recs_b, args.model, args.baseline_samples or args.samples)
    rows = []
    for pair in args.pairs:
        ma, mb = pair.split(",")
        a = scores(recs_a, ma, args.budget, args.protocol, args.tokens, args.model)
        b = scores(recs_b, mb, args.budget, args.protocol, args.tokens, args.model)
        row = {"a": ma, "b": mb, **paired(a, b)}
        rows.append(row)
        print(json.dumps(row))
    try:
        doc = json.load(open(args.out))
    except (FileNotFoundError, json.JSONDecodeError):
        doc = {"what": "paired bootstrap of score(a) - score(b) on the same prompts (RULER average over tasks)",
               **run_machine(args.samples, args.model), "comparisons": []}
    runs = {"samples": {"path": args.samples, **run_machine(args.samples, args.model)}}
    if args.baseline_samples:
        runs["baseline_samples"] = {"path": args.baseline_samples, **run_machine(args.baseline_samples, args.model)}
    doc["comparisons"].append({"label": args.label, **({"model": args.model} if args.model else {}), **runs,
                               "budget": args.budget, "protocol": args.protocol,
                               "tokens": args.tokens, "rows": rows})
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
