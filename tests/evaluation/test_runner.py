"""The harness end to end against an in-process fake endpoint: overrides, resume, errors, reports."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from vllm_defensive.evaluation import runner
from vllm_defensive.evaluation.store import ResultStore

from eval_helpers import SMOKE_LENGTH, SMOKE_SAMPLES, SMOKE_TASKS


class FakeEndpoint:
    """An OpenAI-compatible completions server that answers from the real samples."""

    def __init__(self, ruler_data, fail_after: int | None = None, reject_xargs: bool = False, token_skew: int = 0,
                 with_record: bool = True):
        self.by_prompt = {s.prompt: s for samples in ruler_data.values() for s in samples}
        self.bodies: list[dict] = []
        self.fail_after = fail_after
        self.reject_xargs = reject_xargs
        self.token_skew = token_skew
        self.with_record = with_record

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        if path == "/version":
            return httpx.Response(200, json={"version": "0.24.0-fake"})
        if path != "/v1/completions":
            return httpx.Response(404, json={"error": {"message": "not found"}})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.reject_xargs and "vllm_xargs" in body:
            return httpx.Response(400, json={"error": {"message": "unknown field vllm_xargs"}})
        if self.fail_after is not None and len(self.bodies) > self.fail_after:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        s = self.by_prompt[body["prompt"]]
        x = body.get("vllm_xargs", {})
        method, budget = x.get("kv_eviction"), x.get("kv_budget", 1.0)
        # full cache answers everything; eviction at 0.1 loses the answer
        text = " " + ", ".join(s.outputs) + "." if method == "none" or budget > 0.1 else " 42."
        resp = {"id": "x", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": s.prompt_tokens + self.token_skew, "completion_tokens": 3}}
        if self.with_record:
            resp["kv_eviction"] = {"method": method, "compacted": method != "none",
                                   "skip_reason": "disabled" if method == "none" else None,
                                   "prompt_tokens": s.prompt_tokens, "kept_fraction": budget}
        return httpx.Response(200, json=resp)


def _cfg(tmp_path, smollm2_dir, ruler_cache, **kw):
    base = dict(out_dir=tmp_path / "out", endpoint="http://fake:8000", tokenizer=smollm2_dir, tasks=SMOKE_TASKS,
                lengths=[SMOKE_LENGTH], samples=SMOKE_SAMPLES, methods=["none", "snapkv", "defensivekv"],
                budgets=[0.1, 0.4], protocols=["query_aware", "query_agnostic"], concurrency=3,
                cache_dir=ruler_cache, retries=0, n_boot=200, progress=False, device="test-device",
                command=["vllm-defensive", "eval", "--test"])
    base.update(kw)
    return runner.EvalConfig(**base)


def _run(cfg, fake):
    return asyncio.run(runner.evaluate_async(cfg, transport=httpx.MockTransport(fake)))


N_TASK_SAMPLES = len(SMOKE_TASKS) * SMOKE_SAMPLES
# none once + 2 methods x 2 budgets x 2 protocols, per sample
N_REQUESTS = N_TASK_SAMPLES * (1 + 2 * 2 * 2)


def test_overrides_per_protocol_and_reports(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    fake = FakeEndpoint(ruler_data)
    out = _run(_cfg(tmp_path, smollm2_dir, ruler_cache), fake)
    assert not out["failures"] and out["token_mismatches"] == 0
    bodies = fake.bodies[1:]  # the first is the probe (max_tokens 1)
    assert fake.bodies[0]["max_tokens"] == 1 and len(bodies) == N_REQUESTS
    by_prompt = fake.by_prompt
    for b in bodies:
        s = by_prompt[b["prompt"]]
        x = b["vllm_xargs"]
        assert b["temperature"] == 0.0 and b["max_tokens"] == s.max_new_tokens and b["model"] == "fake-model"
        if x["kv_eviction"] == "none":
            assert x == {"kv_eviction": "none"}
        else:
            assert x["kv_budget"] in (0.1, 0.4)
            assert x["kv_protect_suffix"] in (0, s.question_tokens)
    agnostic = [b for b in bodies if b["vllm_xargs"].get("kv_protect_suffix")]
    assert len(agnostic) == N_TASK_SAMPLES * 2 * 2

    # per-sample JSONL
    recs = ResultStore(tmp_path / "out" / "samples.jsonl").load()
    assert len(recs) == N_REQUESTS
    r = next(iter(recs.values()))
    for k in ("model", "tokens", "task", "sample", "uid", "method", "budget", "protocol", "score", "prediction",
              "references", "prompt_tokens", "server_prompt_tokens", "question_tokens", "xargs", "kv_eviction"):
        assert k in r

    # summary.json in the format
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["device"] == "test-device" and summary["versions"]["vllm_server"] == "0.24.0-fake"
    rows = {(r["protocol"], r["method"], r["budget"]): r for r in summary["runs"]}
    assert len(rows) == 2 * (1 + 2 * 2)
    for row in summary["runs"]:
        assert {"model", "tokens", "protocol", "method", "budget", "score", "ci95", "loss_pct"} <= set(row)
        assert row["model"] == "fake-model" and row["tokens"] == SMOKE_LENGTH
        assert row["protocol"] in ("query_aware", "query_agnostic") and len(row["ci95"]) == 2
    assert rows[("query_aware", "none", 1.0)]["score"] == 100.0
    assert rows[("query_agnostic", "snapkv", 0.1)]["loss_pct"] == 100.0
    assert rows[("query_agnostic", "defensivekv", 0.4)]["loss_pct"] == 0.0

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["command"] == ["vllm-defensive", "eval", "--test"]
    assert results["invocations"]["fake-model"]["probe"]["has_eviction_record"] is True
    run = results["runs"][0]
    assert set(run["per_task"]) == set(SMOKE_TASKS) and run["complete"] is True
    assert (tmp_path / "out" / "quality.png").stat().st_size > 10_000


def test_resume_runs_only_what_is_missing(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    cfg = _cfg(tmp_path, smollm2_dir, ruler_cache)
    flaky = FakeEndpoint(ruler_data, fail_after=20)
    out = _run(cfg, flaky)
    done = len(ResultStore(cfg.out_dir / "samples.jsonl").load())
    assert done == 19 and len(out["failures"]) == N_REQUESTS - 19  # 20 answered, one of them the probe
    # a torn line from a crash mid-write is skipped, and the next append starts on a new line
    with open(cfg.out_dir / "samples.jsonl", "a") as f:
        f.write('{"model": "fake-model", "tok')
    healthy = FakeEndpoint(ruler_data)
    out = _run(cfg, healthy)
    assert not out["failures"] and len(healthy.bodies) == 1 + N_REQUESTS - 19
    store = ResultStore(cfg.out_dir / "samples.jsonl")
    assert len(store.load()) == N_REQUESTS and store.bad_lines == 1
    again = FakeEndpoint(ruler_data)
    _run(cfg, again)
    assert again.bodies == []  # nothing left: no probe either
    # more samples later: only the new ones run (the data is prefix-stable)
    assert json.loads((cfg.out_dir / "results.json").read_text())["runs"][0]["n_samples"] == N_TASK_SAMPLES


def test_full_cache_runs_once_for_both_protocols(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    cfg = _cfg(tmp_path, smollm2_dir, ruler_cache, methods=["none", "snapkv"], budgets=[0.4],
               protocols=["query_agnostic"])
    first = FakeEndpoint(ruler_data)
    _run(cfg, first)
    assert sum(b["vllm_xargs"]["kv_eviction"] == "none" for b in first.bodies) == N_TASK_SAMPLES
    both = FakeEndpoint(ruler_data)
    out = _run(_cfg(tmp_path, smollm2_dir, ruler_cache, methods=["none", "snapkv"], budgets=[0.4]), both)
    assert not any(b["vllm_xargs"]["kv_eviction"] == "none" for b in both.bodies)  # reused
    assert len(both.bodies) == 1 + N_TASK_SAMPLES  # probe + snapkv query_aware
    shared = [r for r in out["runs"] if r["method"] == "none" and r["protocol"] == "query_aware"]
    assert shared and shared[0]["shared_from_protocol"] == "query_agnostic"


def test_merge_results_from_another_machine(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    import lzma
    import shutil

    from vllm_defensive.evaluation.runner import merge_results

    cfg = _cfg(tmp_path, smollm2_dir, ruler_cache, methods=["none", "snapkv"], budgets=[0.1])
    _run(cfg, FakeEndpoint(ruler_data))
    remote = tmp_path / "device-out"  # what run_gpu.sh leaves in $OUT
    remote.mkdir()
    with open(cfg.out_dir / "samples.jsonl", "rb") as f, lzma.open(remote / "samples.jsonl.xz", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(cfg.out_dir / "meta.json", remote / "meta.json")
    merged = tmp_path / "merged"
    assert merge_results(merged, remote) == N_TASK_SAMPLES * (1 + 2)
    assert merge_results(merged, remote) == 0  # idempotent
    store = ResultStore(merged / "samples.jsonl")
    out = runner.write_reports(runner.EvalConfig(out_dir=merged, n_boot=200), store)
    theirs = json.loads((cfg.out_dir / "summary.json").read_text())
    ours = json.loads(out["summary"].read_text())
    for r in theirs["runs"]:
        r.pop("complete")  # known only to the invocation that planned the runs
    assert ours == theirs  # same runs, device and versions
    (tmp_path / "empty").mkdir()
    with pytest.raises(runner.EvalError, match="holds no samples.jsonl"):
        merge_results(merged, tmp_path / "empty")
    with pytest.raises(runner.EvalError, match="does not exist"):
        merge_results(merged, tmp_path / "missing.jsonl")


def test_merged_machines_keep_each_models_device(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    from vllm_defensive.evaluation.runner import merge_results

    for label, device in (("model-a", "GPU A"), ("model-b", "GPU B")):
        cfg = _cfg(tmp_path / label, smollm2_dir, ruler_cache, methods=["none", "snapkv"], budgets=[0.2],
                   model_label=label, device=device)
        _run(cfg, FakeEndpoint(ruler_data))
        merge_results(tmp_path / "merged", cfg.out_dir)
    meta = json.loads((tmp_path / "merged" / "meta.json").read_text())
    assert meta["devices"] == {"model-a": "GPU A", "model-b": "GPU B"}
    out = runner.write_reports(runner.EvalConfig(out_dir=tmp_path / "merged", n_boot=50),
                               ResultStore(tmp_path / "merged" / "samples.jsonl"))
    summary = json.loads(out["summary"].read_text())
    assert {(r["model"], r["device"]) for r in summary["runs"]} == {("model-a", "GPU A"), ("model-b", "GPU B")}
    assert summary["device"] == "GPU A (model-a); GPU B (model-b)"


def test_endpoint_refusing_overrides_is_a_clear_error(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    with pytest.raises(runner.EvalError, match="refused a request with vllm_xargs"):
        _run(_cfg(tmp_path, smollm2_dir, ruler_cache), FakeEndpoint(ruler_data, reject_xargs=True))


def test_tokenizer_mismatch_is_caught_before_the_run(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    fake = FakeEndpoint(ruler_data, token_skew=1)
    with pytest.raises(runner.EvalError, match="tokenizer mismatch"):
        _run(_cfg(tmp_path, smollm2_dir, ruler_cache), fake)
    assert len(fake.bodies) == 1


def test_missing_eviction_record(tmp_path, smollm2_dir, ruler_cache, ruler_data, caplog):
    cfg = _cfg(tmp_path, smollm2_dir, ruler_cache, methods=["snapkv"], budgets=[0.4], protocols=["query_aware"])
    with pytest.raises(runner.EvalError, match="no `kv_eviction` record"):
        _run(_cfg(tmp_path, smollm2_dir, ruler_cache, require_eviction=True), FakeEndpoint(ruler_data, with_record=False))
    out = _run(cfg, FakeEndpoint(ruler_data, with_record=False))
    assert "cannot be verified" in caplog.text
    assert out["runs"][0]["eviction"] == {"records": 0, "of": N_TASK_SAMPLES}


def test_wrong_model_name(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    with pytest.raises(runner.EvalError, match="does not serve model 'other'"):
        _run(_cfg(tmp_path, smollm2_dir, ruler_cache, model="other"), FakeEndpoint(ruler_data))


def test_unreachable_endpoint(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    cfg = _cfg(tmp_path, smollm2_dir, ruler_cache, endpoint="http://127.0.0.1:9", timeout=5)
    with pytest.raises(runner.EvalError, match="cannot use endpoint"):
        asyncio.run(runner.evaluate_async(cfg))


def test_extra_xargs_ride_on_evicting_requests_only(tmp_path, smollm2_dir, ruler_cache, ruler_data):
    """--xargs (a method variant) goes on every evicting request, never on the full-cache ones."""
    fake = FakeEndpoint(ruler_data)
    extra = {"kv_uniform_norm": "raw", "kv_uniform_floor": True}
    out = _run(_cfg(tmp_path, smollm2_dir, ruler_cache, extra_xargs=extra, protocols=["query_aware"]), fake)
    assert not out["failures"]
    for b in fake.bodies[1:]:
        x = b["vllm_xargs"]
        if x["kv_eviction"] == "none":
            assert x == {"kv_eviction": "none"}
        else:
            assert {k: x[k] for k in extra} == extra
