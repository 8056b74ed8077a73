"""deploy/: the dashboard (built as code), Prometheus configs, docker-compose and Kubernetes
manifests. Docker and Kubernetes cannot run here: YAML is parsed and cross-checked; Prometheus
configs and every dashboard expression are checked with the real `promtool` when installed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_defensive.observability.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# vLLM's metric definitions, read as text (finding the package does not import it)
VLLM_LOGGERS = (Path(next(iter(importlib.util.find_spec("vllm").submodule_search_locations)))
                / "v1" / "metrics" / "loggers.py")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard",
                                                  DEPLOY / "grafana" / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


builder = load_builder()
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "vllm-defensive.json").read_text())


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --- dashboard -----------------------------------------------------------------------------------

def test_committed_dashboard_is_up_to_date():
    r = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert DASHBOARD == builder.build()


def test_dashboard_structure():
    d = DASHBOARD
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "model_name"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "piechart", "heatmap"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]


def test_dashboard_covers_the_issue():
    rows = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows == ["Memory saved", "Concurrency gained", "Kept fraction", "Eviction latency",
                    "Skip reasons", "Throughput"]
    exprs = " ".join(e for _, _, e in builder.iter_targets(DASHBOARD))
    for needed in ["vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:generation_tokens_total", "vllm:kv_eviction_blocks_saved",
                   "vllm:kv_eviction_bytes_saved", "vllm:kv_eviction_kept_fraction_bucket",
                   "vllm:kv_eviction_compaction_seconds_bucket",
                   "vllm:kv_eviction_scoring_seconds_bucket",
                   "vllm:kv_eviction_requests_skipped_total"]:
        assert needed in exprs, needed
    assert "sum by (reason)" in exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(vllm:[a-z_:]+)", expr))


def test_dashboard_metrics_exist():
    """Every metric a panel reads is one of ours or one vLLM 0.24.0 really exports."""
    ours = set(METRIC_NAMES.values())
    ours |= {f"{n}_{s}" for n in ours for s in ("bucket", "sum", "count")}
    vllm_src = VLLM_LOGGERS.read_text()
    for title, ref, expr in builder.iter_targets(DASHBOARD):
        for name in metric_names(expr):
            if name.startswith("vllm:kv_eviction_"):
                assert name in ours, (title, ref, name)
            else:
                base = name.removesuffix("_total")
                assert f'"{base}"' in vllm_src, (title, ref, name)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_dashboard_promql_parses(tmp_path):
    """promtool parses every expression (as recording rules) with the variables substituted."""
    rules = [{"record": f"panel_{i}:{ref}", "expr": builder.render_expr(expr)}
             for i, (_, ref, expr) in enumerate(builder.iter_targets(DASHBOARD))]
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_render_expr():
    e = 'sum(rate(x{model_name=~"$model_name"}[$__rate_interval])) + increase(y[$__range])'
    assert builder.render_expr(e, "30s", "10m", "m") == \
        'sum(rate(x{model_name=~"m"}[30s])) + increase(y[10m])'


# --- Prometheus ----------------------------------------------------------------------------------

def k8s_prometheus_config() -> str:
    cm = next(d for d in yaml_docs(DEPLOY / "k8s" / "prometheus.yaml")
              if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-config")
    return cm["data"]["prometheus.yml"]


def test_prometheus_configs_scrape_vllm():
    compose_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = compose_cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vllm:8000"]
    k8s_cfg = yaml.safe_load(k8s_prometheus_config())
    kjob = k8s_cfg["scrape_configs"][0]
    sd = kjob["dns_sd_configs"][0]
    assert sd["type"] == "A" and sd["port"] == 8000
    # the name is the headless Service selecting the vLLM pods
    svc = next(o for o in k8s_objects() if o["kind"] == "Service"
               and sd["names"][0].startswith(o["metadata"]["name"] + ".vllm-defensive.svc"))
    assert svc["spec"]["clusterIP"] == "None"
    dep = next(o for o in k8s_objects() if o["kind"] == "Deployment"
               and o["metadata"]["name"] == "vllm")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheus_configs_are_valid(tmp_path):
    k8s = tmp_path / "k8s-prometheus.yml"
    k8s.write_text(k8s_prometheus_config())
    for f in [DEPLOY / "prometheus" / "prometheus.yml", k8s]:
        r = subprocess.run(["promtool", "check", "config", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


# --- docker-compose ------------------------------------------------------------------------------

def test_compose_stack():
    c = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    s = c["services"]
    assert set(s) == {"vllm", "prometheus", "grafana"}
    v = s["vllm"]
    assert (DEPLOY / v["build"]["context"] / v["build"]["dockerfile"]).is_file()
    args = " ".join(v["command"])
    assert "--kv-eviction=" in args and "--kv-budget=" in args and "--port=8000" in args
    gpu = v["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "/health" in " ".join(v["healthcheck"]["test"])
    assert any(m.startswith("hf-cache:") for m in v["volumes"])
    for name in ("prometheus", "grafana"):
        for m in s[name]["volumes"]:
            src = m.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), (name, src)
    assert "--config.file=/etc/prometheus/prometheus.yml" in s["prometheus"]["command"]
    for vol in c["volumes"]:
        assert any(m.startswith(vol + ":") for svc in s.values() for m in svc["volumes"])


def test_grafana_provisioning_files():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/vllm-defensive.yaml")
                          .read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


def test_dockerfile_installs_the_plugin():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}", text, re.M)
    assert "ARG VLLM_IMAGE=vllm/vllm-openai:v0.24.0" in text
    for line in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / line).exists(), line
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    assert "**" in ignore.splitlines() and "!vllm_defensive/**" in ignore.splitlines()


# --- Kubernetes ----------------------------------------------------------------------------------

def k8s_objects() -> list[dict]:
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    objs = []
    for res in kust["resources"]:
        objs += yaml_docs(DEPLOY / "k8s" / res)
    return objs


def test_k8s_manifests_parse_and_are_consistent():
    objs = k8s_objects()
    for o in objs:
        assert o["apiVersion"] and o["kind"] and o["metadata"]["name"]
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "vllm-defensive"
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    for (kind, name), o in by.items():
        if kind != "Deployment":
            continue
        spec = o["spec"]["template"]["spec"]
        sel = o["spec"]["selector"]["matchLabels"]
        assert sel.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, (name, m)
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports
        for v in vols.values():
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in by
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in by
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in by
    for (kind, name), o in by.items():
        if kind == "Service":
            sel = o["spec"]["selector"]
            assert any(d["spec"]["template"]["metadata"]["labels"].items() >= sel.items()
                       for (k, _), d in by.items() if k == "Deployment"), name


def test_k8s_vllm_server():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    dep = objs[("Deployment", "vllm")]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["command"] == ["vllm", "serve"]
    args = " ".join(c["args"])
    assert "--kv-eviction=" in args and "--port=8000" in args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"]["value"].startswith(mounts["model-cache"])
    assert mounts["dshm"] == "/dev/shm"
    svc = objs[("Service", "vllm")]
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_k8s_grafana_dashboard_configmap_matches():
    cm = yaml_docs(DEPLOY / "k8s" / "grafana-dashboard.yaml")[0]
    assert json.loads(cm["data"]["vllm-defensive.json"]) == DASHBOARD
    grafana = next(o for o in k8s_objects() if o["kind"] == "ConfigMap"
                   and o["metadata"]["name"] == "grafana-provisioning")
    prov = yaml.safe_load(grafana["data"]["dashboards.yaml"])
    dep = next(o for o in k8s_objects() if o["kind"] == "Deployment"
               and o["metadata"]["name"] == "grafana")
    mounts = {m["name"]: m["mountPath"]
              for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["dashboards"] == prov["providers"][0]["options"]["path"]
    ds = yaml.safe_load(grafana["data"]["datasources.yaml"])["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"


# --- set-up --------------------------------------------------------------------------------------

def test_setup_installs_prometheus_idempotently():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert "apt-get install -y -qq --no-install-recommends prometheus" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed: the set-up step was not run here")
    block = text[text.index("# Prometheus: tests/observability"):]
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""  # already installed: a no-op
