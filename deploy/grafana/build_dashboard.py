#!/usr/bin/env python3
"""Build the vllm-defensive Grafana dashboard as code (plain JSON, standard library only).

    python deploy/grafana/build_dashboard.py          # (re)write the generated files
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the committed files are stale

Writes
  deploy/grafana/dashboards/vllm-defensive.json      provisioned by docker-compose
  deploy/k8s/grafana-dashboard.yaml                  the same JSON in a ConfigMap for Kubernetes

Every PromQL expression uses only the Grafana variables `$datasource` (panel datasource),
`$model_name`, `$__rate_interval` and `$__range`; `render_expr` substitutes them for use outside
Grafana (tests/observability run every expression against a real Prometheus).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
DASHBOARD_PATH = HERE / "dashboards" / "vllm-defensive.json"
K8S_CONFIGMAP_PATH = DEPLOY / "k8s" / "grafana-dashboard.yaml"
UID = "vllm-defensive"
DS = {"type": "prometheus", "uid": "${datasource}"}

# our metrics (vllm_defensive/observability/metrics.py) and vLLM's own (vllm/v1/metrics/loggers.py)
E = "vllm:kv_eviction_"
SEL = '{model_name=~"$model_name"}'
RI = "$__rate_interval"


def rate(metric: str, by: str = "", sel: str = SEL) -> str:
    agg = f"sum by ({by}) " if by else "sum"
    return f"{agg}(rate({metric}{sel}[{RI}]))"


def quantile(q: float, hist: str, by: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({hist}_bucket{SEL}[{RI}])))"


class Board:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self._id = 0
        self._y = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "id": self._next_id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def line(self, specs: list[tuple[int, dict]], h: int = 8) -> None:
        """Lay panels out left to right on one line; each spec is (width, panel)."""
        x = 0
        for w, panel in specs:
            panel["id"] = self._next_id()
            panel["gridPos"] = {"h": h, "w": w, "x": x, "y": self._y}
            x += w
            self.panels.append(panel)
        assert x <= 24, "a line is at most 24 units wide"
        self._y += h


def target(expr: str, legend: str, ref: str, instant: bool = False,
           fmt: str = "time_series") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref,
            "range": not instant, "instant": instant, "format": fmt, "editorMode": "code"}


def panel(kind: str, title: str, desc: str, targets: list[tuple[str, str]], unit: str = "short",
          instant: bool = False, **options) -> dict:
    p = {
        "type": kind, "title": title, "description": desc, "datasource": DS,
        "targets": [target(e, lg, chr(ord("A") + i), instant,
                           "heatmap" if kind == "heatmap" else "time_series")
                    for i, (e, lg) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1,
                                                  "fillOpacity": 10, "showPoints": "never"}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif kind == "piechart":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "pieType": "donut", "legend": {"displayMode": "table", "placement": "right",
                                                       "showLegend": True, "values": ["value"]}}
    elif kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": unit},
                        "cellGap": 1, "color": {"mode": "scheme", "scheme": "Spectral"}}
    p["fieldConfig"]["defaults"].update(options.pop("defaults", {}))
    p["options"].update(options)
    return p


def build() -> dict:
    b = Board()

    b.row("Memory saved")
    b.line([
        (6, panel("stat", "KV blocks saved now",
                  "KV-cache blocks freed by compaction, summed over running requests "
                  "(vllm:kv_eviction_blocks_saved).",
                  [(f"sum({E}blocks_saved{SEL})", "blocks")], instant=True)),
        (6, panel("stat", "KV memory saved now",
                  "KV-cache bytes freed by compaction, summed over running requests.",
                  [(f"sum({E}bytes_saved{SEL})", "bytes")], unit="bytes", instant=True)),
        (6, panel("stat", "KV memory freed (range)",
                  "Bytes returned to the KV pool by compaction over the dashboard range.",
                  [(f"sum(increase({E}bytes_freed_total{SEL}[$__range]))", "bytes")], unit="bytes",
                  instant=True)),
        (6, panel("stat", "KV capacity multiplier",
                  "Prompt KV blocks before compaction / after, over the dashboard range: how many "
                  "times more compacted prompts fit in the same KV pool.",
                  [(f"sum(increase({E}blocks_before_total{SEL}[$__range])) / clamp_min("
                    f"sum(increase({E}blocks_before_total{SEL}[$__range])) - "
                    f"sum(increase({E}blocks_freed_total{SEL}[$__range])), 1)", "x")],
                  unit="x", instant=True)),
    ], h=5)
    b.line([
        (12, panel("timeseries", "KV blocks saved (running requests) and freed",
                   "Blocks saved right now across running requests, and the rate at which "
                   "compaction frees blocks.",
                   [(f"sum by (method) ({E}blocks_saved{SEL})", "saved now · {{method}}"),
                    (rate(f"{E}blocks_freed_total", "method"), "freed/s · {{method}}")])),
        (12, panel("timeseries", "KV memory saved and freed",
                   "Bytes saved right now across running requests, and bytes freed per second.",
                   [(f"sum by (method) ({E}bytes_saved{SEL})", "saved now · {{method}}"),
                    (rate(f"{E}bytes_freed_total", "method"), "freed/s · {{method}}")],
                   unit="bytes")),
    ])
    b.line([
        (12, panel("timeseries", "vLLM KV-cache usage",
                   "vllm:kv_cache_usage_perc per engine (1 = full).",
                   [(f"max by (engine) (vllm:kv_cache_usage_perc{SEL})", "engine {{engine}}")],
                   unit="percentunit")),
        (12, panel("timeseries", "Prompt tokens kept and evicted",
                   "Per-KV-head prompt tokens kept / evicted by compaction, per second.",
                   [(rate(f"{E}tokens_kept_total", "method"), "kept · {{method}}"),
                    (rate(f"{E}tokens_evicted_total", "method"), "evicted · {{method}}")],
                   unit="short")),
    ])

    b.row("Concurrency gained")
    b.line([
        (12, panel("timeseries", "Running and waiting requests (vLLM) vs compacted requests",
                   "vLLM's own scheduler gauges next to the running requests whose KV cache is "
                   "compacted: compaction lets more requests run instead of waiting.",
                   [(f"sum(vllm:num_requests_running{SEL})", "running (vLLM)"),
                    (f"sum(vllm:num_requests_waiting{SEL})", "waiting (vLLM)"),
                    (f"sum({E}num_requests_compacted{SEL})", "running, compacted")])),
        (12, panel("timeseries", "Preemptions and requests compacted",
                   "vLLM preemptions (KV pool exhausted) next to compaction and skip rates.",
                   [(rate("vllm:num_preemptions_total"), "preemptions/s (vLLM)"),
                    (rate(f"{E}requests_compacted_total"), "compacted/s"),
                    (rate(f"{E}requests_skipped_total"), "skipped/s")], unit="reqps")),
    ])

    b.row("Kept fraction")
    b.line([
        (12, panel("timeseries", "Kept fraction (quantiles and mean)",
                   "Fraction of prompt tokens kept per compacted request.",
                   [(quantile(0.5, f"{E}kept_fraction", "method"), "p50 · {{method}}"),
                    (quantile(0.9, f"{E}kept_fraction", "method"), "p90 · {{method}}"),
                    (f"{rate(E + 'tokens_kept_total', 'method')} / "
                     f"{rate(E + 'prompt_tokens_total', 'method')}", "mean · {{method}}")],
                   unit="percentunit", defaults={"min": 0, "max": 1})),
        (12, panel("heatmap", "Kept fraction distribution",
                   "Compacted requests per kept-fraction bucket.",
                   [(f"sum by (le) (increase({E}kept_fraction_bucket{SEL}[{RI}]))", "{{le}}")],
                   unit="percentunit")),
    ])

    b.row("Eviction latency")
    b.line([
        (12, panel("timeseries", "Scoring and compaction latency",
                   "Per-request time to score prompt tokens and to compact the KV cache.",
                   [(quantile(0.5, f"{E}scoring_seconds"), "scoring p50"),
                    (quantile(0.99, f"{E}scoring_seconds"), "scoring p99"),
                    (quantile(0.5, f"{E}compaction_seconds"), "compaction p50"),
                    (quantile(0.99, f"{E}compaction_seconds"), "compaction p99")], unit="s")),
        (12, panel("timeseries", "Mean eviction time per request",
                   "Mean scoring and compaction time per compacted request.",
                   [(f"{rate(E + 'scoring_seconds_sum')} / {rate(E + 'scoring_seconds_count')}",
                     "scoring"),
                    (f"{rate(E + 'compaction_seconds_sum')} / "
                     f"{rate(E + 'compaction_seconds_count')}", "compaction")], unit="s")),
    ])

    b.row("Skip reasons")
    b.line([
        (12, panel("timeseries", "Requests compacted and skipped",
                   "Compactions per second, and skips per second by reason.",
                   [(rate(f"{E}requests_compacted_total", "method"), "compacted · {{method}}"),
                    (rate(f"{E}requests_skipped_total", "reason"), "skipped · {{reason}}")],
                   unit="reqps")),
        (12, panel("piechart", "Skip reasons (range)",
                   "Why eviction was skipped, over the dashboard range.",
                   [(f"sum by (reason) (increase({E}requests_skipped_total{SEL}[$__range]))",
                     "{{reason}}")], instant=True)),
    ])

    b.row("Throughput")
    b.line([
        (12, panel("timeseries", "Token throughput (vLLM)",
                   "vLLM's generation and prompt token rates.",
                   [(rate("vllm:generation_tokens_total"), "generation tokens/s"),
                    (rate("vllm:prompt_tokens_total"), "prompt tokens/s")], unit="short")),
        (12, panel("timeseries", "Finished requests (vLLM)",
                   "vLLM's finished requests per second, by finish reason.",
                   [(rate("vllm:request_success_total", "finished_reason"),
                     "{{finished_reason}}")], unit="reqps")),
    ])

    return {
        "uid": UID,
        "title": "vLLM · DefensiveKV eviction",
        "description": "KV-cache eviction (vllm-defensive): memory saved, concurrency gained, kept "
                       "fraction, eviction latency, skip reasons, throughput. Generated by "
                       "deploy/grafana/build_dashboard.py; do not edit by hand.",
        "tags": ["vllm", "kv-cache", "vllm-defensive"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            {"name": "model_name", "label": "Model", "type": "query", "datasource": DS,
             "definition": "label_values(vllm:num_requests_running, model_name)",
             "query": {"query": "label_values(vllm:num_requests_running, model_name)",
                       "refId": "model_name"},
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "hide": 0, "regex": "", "options": []},
        ]},
        "panels": b.panels,
    }


def render_expr(expr: str, rate_interval: str = "1m", range_: str = "5m",
                model_name: str = ".*") -> str:
    """Substitute the Grafana variables of an expression, for use with Prometheus's HTTP API."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("$model_name", model_name))


def iter_targets(dashboard: dict):
    """(panel title, refId, expr) for every query of every panel."""
    for p in dashboard["panels"]:
        for sub in [p] + p.get("panels", []):
            for t in sub.get("targets", []):
                yield sub["title"], t["refId"], t["expr"]


def dashboard_json(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def configmap_yaml(dashboard_text: str) -> str:
    # A ConfigMap for the Grafana sidecar-less provisioning in deploy/k8s/grafana.yaml.
    # Written by hand as YAML text (literal block) to keep this script dependency-free.
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard_text.splitlines())
    return (
        "# Generated by deploy/grafana/build_dashboard.py; do not edit by hand.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: grafana-dashboard-vllm-defensive\n"
        "  namespace: vllm-defensive\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: vllm-defensive\n"
        "    grafana_dashboard: \"1\"\n"
        "data:\n"
        "  vllm-defensive.json: |\n"
        f"{body}"
    )


def outputs() -> dict[Path, str]:
    text = dashboard_json(build())
    return {DASHBOARD_PATH: text, K8S_CONFIGMAP_PATH: configmap_yaml(text)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    if stale:
        print("stale (run deploy/grafana/build_dashboard.py): "
              + ", ".join(str(p.relative_to(DEPLOY.parent)) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
