"""Turn run.py outputs into the summaries and plots under benchmarks/results/serving/.

    python benchmarks/serving/report.py benchmarks/results/serving/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "serving"
KEYS = ("model", "workload", "arrival", "method", "budget", "output_tok_s", "req_s", "mean_running",
        "peak_running", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "peak_kv_usage",
        "eviction_seconds_sum", "failed", "requests", "wall_s")


def prefill_bounds(runs: list[dict]) -> list[dict]:
    """The most any eviction method can gain on a burst workload: plain vLLM's wall time on it over
    its wall time on the same prompts with one output token (prefill only, which eviction cannot
    shorten; scoring only adds to it)."""
    out = []
    for r in runs:
        if r["method"] != "plain" or r["arrival"] != "burst" or r["workload"].endswith("-1"):
            continue
        prefill = next((x for x in runs if x["method"] == "plain" and x["model"] == r["model"]
                        and x["arrival"] == "burst" and x["requests"] == r["requests"]
                        and x["workload"] == r["workload"].split("-")[0] + "-1"), None)
        if prefill and prefill.get("wall_s") and r.get("wall_s"):
            out.append({"model": r["model"], "workload": r["workload"], "requests": r["requests"],
                        "plain_wall_s": r["wall_s"], "prefill_only_wall_s": prefill["wall_s"],
                        "max_throughput_vs_plain": round(r["wall_s"] / prefill["wall_s"], 2)})
    return out


def main(paths: list[str]) -> None:
    docs = [{**json.loads(Path(p).read_text()), "source": Path(p).name} for p in paths
            if not Path(p).name.startswith(("summary", "concurrency"))]
    docs = sorted((d for d in docs if "runs" in d and "servers" in d), key=lambda d: d.get("date", ""))
    runs = [{**{k: r.get(k) for k in KEYS}, "source": d["source"]} for d in docs for r in d["runs"]]
    # a model's runs may come from several files (re-runs): the newest file's run of a
    # configuration wins
    latest = {}
    for r in runs:
        latest[(r["model"], r["workload"], r["arrival"], r["method"], r["budget"])] = r
    runs = list(latest.values())
    for r in runs:  # ratios against plain vLLM on the same model / workload / arrival
        base = next((x for x in runs if x["method"] == "plain" and all(x[k] == r[k] for k in ("model", "workload", "arrival"))), None)
        if base and base["output_tok_s"]:
            r["throughput_vs_plain"] = round(r["output_tok_s"] / base["output_tok_s"], 3)
            r["ttft_p50_vs_plain"] = round(r["ttft_p50_ms"] / base["ttft_p50_ms"], 3) if base["ttft_p50_ms"] else None
    bounds = prefill_bounds(runs)
    meta = {"device": docs[0]["device"], "versions": docs[0]["versions"],
            "commands": [d["command"] for d in docs], "servers": [s for d in docs for s in d["servers"]]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({**meta, "runs": runs, "prefill_bound": bounds}, indent=1))
    conc = [{"model": r["model"], "workload": r["workload"], "budget": r["budget"] if r["method"] != "plain" else None,
             "peak_running": r["peak_running"], "output_tok_s": r["output_tok_s"]}
            for r in runs if r["arrival"] == "burst"]
    (OUT / "concurrency.json").write_text(json.dumps({**meta, "runs": conc}, indent=1))

    # prefill-only runs ("-1") only feed the bound and the scoring overhead: not plotted
    groups = sorted({(r["model"], r["workload"], r["arrival"]) for r in runs if not r["workload"].endswith("-1")})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False)
    for j, g in enumerate(groups):
        rs = sorted((r for r in runs if (r["model"], r["workload"], r["arrival"]) == g),
                    key=lambda r: (r["method"] != "plain", -(r["budget"] or 0)))
        labels = ["plain" if r["method"] == "plain" else f"{r['budget']:g}" for r in rs]
        for i, (key, ylabel) in enumerate((("output_tok_s", "output tok/s"), ("peak_running", "peak running requests"))):
            ax = axes[i][j]
            ax.bar(labels, [r[key] or 0 for r in rs], color=["gray" if r["method"] == "plain" else "C0" for r in rs])
            bound = next((x for x in bounds if (x["model"], x["workload"]) == g[:2]), None)
            if i == 0 and bound and g[2] == "burst" and rs[0]["method"] == "plain":
                ax.axhline(rs[0]["output_tok_s"] * bound["max_throughput_vs_plain"], color="C3", ls="--",
                           label="prefill bound (plain wall / prefill-only wall)")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_ylabel(ylabel)
            ax.set_xlabel("budget (plugin) / plain vLLM")
            if i == 0:
                ax.set_title(" ".join(g))
    fig.suptitle(f"Serving: DefensiveKV plugin vs plain vLLM, same KV cache ({meta['device']})")
    fig.tight_layout()
    fig.savefig(OUT / "throughput_concurrency.png", dpi=110)
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
