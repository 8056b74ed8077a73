"""Plot the scoring kernels' step-by-step history on one device: every layer of a request at 32K,
as a multiple of the roofline, per shape (reads the `steps` of an ab_steps.json).

    python benchmarks/plot_kernel_steps.py benchmarks/results/kernels/h200_2026-12-01b/ab_steps.json
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    d = json.load(open(path))
    steps, roof = d["steps"], d["roofline_ms_32k"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for j, (shape, color) in enumerate((("llama8b", "tab:blue"), ("qwen05b", "tab:orange"))):
        xs = [i + (j - 0.5) * width for i in range(len(steps))]
        ys = [s[f"{shape}_ms"] / roof[shape] for s in steps]
        ax.bar(xs, ys, width, color=color, label=f"{shape} (roofline {roof[shape]:.3f} ms)")
        for x, y, s in zip(xs, ys, steps):
            ax.text(x, y, f"{s[f'{shape}_ms']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(3.0, color="k", ls="--", lw=1, label="3x roofline (target)")
    ax.set_xticks(range(len(steps)), [f"{i}. {s['step']}" for i, s in enumerate(steps)], rotation=18, ha="right",
                  fontsize=7)
    ax.set_ylabel("time / roofline (ms on the bars)")
    ax.set_title(f"Window scoring, all layers, 32K tokens: {d['device'].split(',')[0]}", fontsize=10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "steps.png")
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
