"""Summary + plot of benchmarks/results/quality_ranking/: DefensiveKV's within-head ranking.

Each length has two eval runs against one server: the default run (full cache, SnapKV,
CriticalKV and DefensiveKV with the ranking the server defaulted to then: unfloored risk x
value-norm share) and a variant run (DefensiveKV with --xargs kv_uniform_floor=true,
kv_uniform_norm=raw: the ranking served by default now). Loss is against the default run's full
cache on the same prompts, with a bootstrap over prompts within tasks (as the eval's report).

    python benchmarks/quality/ranking_summary.py benchmarks/results/quality_ranking
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from paired import load, scores  # noqa: E402

RANKINGS = {"default": "unfloored risk x value-norm share (earlier default)",
            "rawfloor": "floored risk x own value norm (served default)"}


def task_average(s: dict, tasks: list[str], rng=None) -> float:
    means = []
    for t in tasks:
        v = np.array([s[t][u] for u in sorted(s[t])])
        means.append(v[rng.integers(0, len(v), len(v))].mean() if rng is not None else v.mean())
    return float(np.mean(means))


def main(folder: str, n_boot: int = 2000) -> None:
    root = Path(folder)
    runs, meta = [], None
    for length, tokens in (("4k", 4096), ("8k", 8192)):
        base = load(str(root / f"{length}_default" / "samples.jsonl.xz"))
        meta = meta or json.loads((root / f"{length}_default" / "meta.json").read_text())
        full = scores(base, "none", 1.0, "query_aware", tokens)
        tasks = sorted(full)
        entries = [(m, "default", scores(base, m, 0.2, "query_aware", tokens)) for m in ("snapkv", "criticalkv", "defensivekv")]
        variant = load(str(root / f"{length}_rawfloor" / "samples.jsonl.xz"))
        entries.append(("defensivekv", "rawfloor", scores(variant, "defensivekv", 0.2, "query_aware", tokens)))
        f0 = task_average(full, tasks)
        runs.append({"model": "Qwen2.5-Coder-0.5B-Instruct", "tokens": tokens, "protocol": "query_aware", "method": "none",
                     "budget": 1.0, "score": round(f0, 2), "loss_pct": 0.0, "n_samples": sum(len(full[t]) for t in tasks),
                     "per_task": {t: round(float(np.mean(list(full[t].values()))), 1) for t in tasks}})
        for method, run, s in entries:
            rng = np.random.default_rng(0)
            sc, loss = [], []
            for _ in range(n_boot):
                seed = int(rng.integers(1 << 31))
                a = task_average(s, tasks, np.random.default_rng(seed))
                b = task_average(full, tasks, np.random.default_rng(seed))  # same resample of prompts
                sc.append(a)
                loss.append(100 * (b - a) / b)
            v = task_average(s, tasks)
            runs.append({"model": "Qwen2.5-Coder-0.5B-Instruct", "tokens": tokens, "protocol": "query_aware",
                         "method": method, "budget": 0.2, "score": round(v, 2),
                         "ci95": [round(x, 2) for x in np.percentile(sc, [2.5, 97.5])],
                         "loss_pct": round(100 * (f0 - v) / f0, 2),
                         "loss_ci95": [round(x, 2) for x in np.percentile(loss, [2.5, 97.5])],
                         "n_samples": sum(len(s[t]) for t in tasks),
                         "per_task": {t: round(float(np.mean(list(s[t].values()))), 1) for t in tasks},
                         **({"defensivekv_ranking": RANKINGS[run], "run": f"{length}_{run}"} if method == "defensivekv"
                            else {"run": f"{length}_{run}"})})
    doc = {"device": meta["device"], "versions": meta["versions"],
           "what": "RULER 13 tasks, 15 samples each (seed 42), served by the plugin on one server per length; "
                   "the rawfloor runs sent kv_uniform_floor=true, kv_uniform_norm=raw per request",
           "loss_pct_definition": "100 * (full-cache score - score) / full-cache score, same prompts",
           "runs": runs}
    (root / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(runs, root / "quality.png", meta["device"])


def plot(runs, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"snapkv": "SnapKV", "criticalkv": "CriticalKV"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, tokens in zip(axes, (4096, 8192)):
        rows = [r for r in runs if r["tokens"] == tokens and r["method"] != "none"]
        full = next(r for r in runs if r["tokens"] == tokens and r["method"] == "none")
        names = [labels.get(r["method"]) or ("DefensiveKV (served)" if r["run"].endswith("rawfloor")
                                            else "DefensiveKV (earlier)") for r in rows]
        ys = [r["score"] for r in rows]
        err = [[y - r["ci95"][0] for y, r in zip(ys, rows)], [r["ci95"][1] - y for y, r in zip(ys, rows)]]
        colors = ["tab:blue", "tab:orange", "tab:gray", "tab:red"]
        ax.bar(names, ys, yerr=err, capsize=4, color=colors[:len(rows)])
        ax.axhline(full["score"], color="k", ls="--", lw=1, label=f"full cache {full['score']:.1f}")
        ax.set_title(f"{tokens // 1024}K tokens, 20% cache")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("RULER average (13 tasks)")
    fig.suptitle(f"Qwen2.5-Coder-0.5B served by vllm-defensive, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
