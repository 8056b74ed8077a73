"""Turn run.py outputs into the summaries and plots under benchmarks/results/serving/.

    python benchmarks/serving/report.py benchmarks/results/serving/*.json

Runs are kept per device: a configuration (model, workload, arrival, method, budget) measured on
two GPUs appears twice, and every ratio (throughput and TTFT against plain vLLM, the prefill
bound) pairs runs of the same device only. Within a device the newest file's run of a
configuration wins (re-runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "serving"
KEYS = ("model", "workload", "arrival", "rate", "method", "budget", "output_tok_s", "req_s", "mean_running",
        "peak_running", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "peak_kv_usage",
        "eviction_seconds_sum", "failed", "requests", "wall_s")
SAME_SETUP = ("device", "model", "workload", "arrival")


def short(device: str) -> str:
    """'NVIDIA H100 80GB HBM3 x1' -> 'H100' (plot titles)."""
    for name in ("H100", "H200", "A100", "L40S", "B200"):
        if name in device:
            return name
    return device.split(" x")[0]


def prefill_bounds(runs: list[dict]) -> list[dict]:
    """The most any eviction method can gain on a burst workload: plain vLLM's wall time on it over
    its wall time on the same prompts with one output token (prefill only, which eviction cannot
    shorten; scoring only adds to it). Same device, model and request count."""
    out = []
    for r in runs:
        if r["method"] != "plain" or r["arrival"] != "burst" or r["workload"].endswith("-1"):
            continue
        prefill = next((x for x in runs if x["method"] == "plain" and x["device"] == r["device"]
                        and x["model"] == r["model"] and x["arrival"] == "burst" and x["requests"] == r["requests"]
                        and x["workload"] == r["workload"].split("-")[0] + "-1"), None)
        if prefill and prefill.get("wall_s") and r.get("wall_s"):
            out.append({"device": r["device"], "model": r["model"], "workload": r["workload"],
                        "requests": r["requests"], "plain_wall_s": r["wall_s"],
                        "prefill_only_wall_s": prefill["wall_s"],
                        "max_throughput_vs_plain": round(r["wall_s"] / prefill["wall_s"], 2)})
    return out


def with_ratios(runs: list[dict]) -> list[dict]:
    """Throughput and TTFT p50 against plain vLLM of the same device / model / workload / arrival."""
    for r in runs:
        base = next((x for x in runs if x["method"] == "plain" and all(x[k] == r[k] for k in SAME_SETUP)), None)
        if base and base["output_tok_s"]:
            r["throughput_vs_plain"] = round(r["output_tok_s"] / base["output_tok_s"], 3)
            r["ttft_p50_vs_plain"] = round(r["ttft_p50_ms"] / base["ttft_p50_ms"], 3) if base["ttft_p50_ms"] else None
            r["wall_vs_plain"] = round(r["wall_s"] / base["wall_s"], 3) if base["wall_s"] else None
    return runs


def load_runs(paths: list[str]) -> tuple[list[dict], list[dict]]:
    docs = [{**json.loads(Path(p).read_text()), "source": Path(p).name} for p in paths
            if not Path(p).name.startswith(("summary", "concurrency"))]
    docs = sorted((d for d in docs if "runs" in d and "servers" in d), key=lambda d: d.get("date", ""))
    latest = {}
    for d in docs:
        for r in d["runs"]:
            row = {"device": d["device"], **{k: r.get(k) for k in KEYS}, "source": d["source"]}
            if d.get("caveat"):  # a note added to a run file by hand (what the figures do not measure)
                row["caveat"] = d["caveat"]
            latest[(row["device"], row["model"], row["workload"], row["arrival"], row["method"], row["budget"])] = row
    return with_ratios(list(latest.values())), docs


def plot(runs: list[dict], bounds: list[dict], path: Path) -> None:
    # prefill-only runs ("-1") only feed the bound and the scoring overhead: not plotted
    groups = sorted({tuple(r[k] for k in SAME_SETUP) for r in runs if not r["workload"].endswith("-1")},
                    key=lambda g: (short(g[0]) != "H200", g))
    cols = len(groups)
    fig, axes = plt.subplots(2, cols, figsize=(3.3 * cols, 7), squeeze=False)
    for j, g in enumerate(groups):
        rs = sorted((r for r in runs if tuple(r[k] for k in SAME_SETUP) == g),
                    key=lambda r: (r["method"] != "plain", -(r["budget"] or 0)))
        labels = ["plain" if r["method"] == "plain" else f"{r['budget']:g}" for r in rs]
        for i, (key, ylabel) in enumerate((("output_tok_s", "output tok/s"), ("peak_running", "peak running requests"))):
            ax = axes[i][j]
            ax.bar(labels, [r[key] or 0 for r in rs], color=["gray" if r["method"] == "plain" else "C0" for r in rs])
            bound = next((x for x in bounds if (x["device"], x["model"], x["workload"]) == g[:3]), None)
            if i == 0 and bound and g[3] == "burst" and rs[0]["method"] == "plain":
                ax.axhline(rs[0]["output_tok_s"] * bound["max_throughput_vs_plain"], color="C3", ls="--",
                           label=f"prefill bound {bound['max_throughput_vs_plain']:g}x")
                ax.legend(fontsize=7, loc="lower right")
            if i == 0:
                for x, r in enumerate(rs):
                    if r.get("throughput_vs_plain") and r["method"] != "plain":
                        ax.annotate(f"{r['throughput_vs_plain']:.2f}x", (x, r[key] or 0), ha="center",
                                    va="bottom", fontsize=7)
                flagged = any(r.get("caveat") for r in rs)
                ax.set_title(f"{short(g[0])} {g[1]}\n{g[2]} {g[3]}" + ("\n(caveat in summary.json)" if flagged else ""),
                             fontsize=9, color="C3" if flagged else "black")
            ax.set_ylabel(ylabel)
            ax.set_xlabel("budget (plugin) / plain vLLM", fontsize=8)
    fig.suptitle(f"Serving on {runs[0]['device']}: DefensiveKV plugin vs plain vLLM, same KV-cache bytes per pair")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(paths: list[str]) -> None:
    runs, docs = load_runs(paths)
    bounds = prefill_bounds(runs)
    devices = sorted({r["device"] for r in runs}, key=lambda dv: max(d.get("date", "") for d in docs
                                                                      if d["device"] == dv), reverse=True)
    meta = {"device": devices[0], "devices": devices,
            "versions": next(d["versions"] for d in reversed(docs) if d["device"] == devices[0]),
            "versions_by_device": {d["device"]: d["versions"] for d in docs},
            "commands": [d["command"] for d in docs], "servers": [s for d in docs for s in d["servers"]]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({**meta, "runs": runs, "prefill_bound": bounds}, indent=1))
    conc = [{"device": r["device"], "model": r["model"], "workload": r["workload"],
             "budget": r["budget"] if r["method"] != "plain" else None,
             "peak_running": r["peak_running"], "output_tok_s": r["output_tok_s"]}
            for r in runs if r["arrival"] == "burst"]
    (OUT / "concurrency.json").write_text(json.dumps({**meta, "runs": conc}, indent=1))
    for i, dev in enumerate(devices):  # one figure per GPU, the newest as throughput_concurrency.png
        name = "throughput_concurrency.png" if i == 0 else f"throughput_concurrency_{short(dev)}.png"
        plot([r for r in runs if r["device"] == dev], bounds, OUT / name)
    for r in runs:
        print(short(r["device"]), r["model"], r["workload"], r["arrival"], r["method"], r["budget"],
              r["output_tok_s"], r.get("throughput_vs_plain"), r["ttft_p50_ms"], r.get("ttft_p50_vs_plain"))


if __name__ == "__main__":
    main(sys.argv[1:])
