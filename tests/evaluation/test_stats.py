"""Aggregation, quality loss and bootstrap CIs on records built over real samples."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_defensive.evaluation import stats

from eval_helpers import SMOKE_LENGTH


def _records(ruler_data, method, budget, protocol, score_fn, model="m"):
    out = []
    for (task, length), samples in ruler_data.items():
        for i, s in enumerate(samples):
            out.append({"model": model, "tokens": length, "task": task, "uid": s.uid, "sample": s.index,
                        "method": method, "budget": budget, "protocol": protocol, "score": score_fn(task, i),
                        "prompt_tokens": s.prompt_tokens})
    return out


def test_average_is_the_mean_of_task_means(ruler_data):
    full = _records(ruler_data, "none", 1.0, "query_aware", lambda t, i: 100.0 if t == "vt" else [100, 0, 0][i])
    runs = stats.aggregate(full, n_boot=200)
    (run,) = runs
    assert run["per_task"]["vt"] == {"score": 100.0, "n": 3}
    assert run["per_task"]["niah_single_1"]["score"] == pytest.approx(100 / 3, abs=1e-3)
    assert run["score"] == pytest.approx((100 + 100 / 3) / 2, abs=1e-3)
    assert run["loss_pct"] == 0.0 and run["reference"]["method"] == "none"
    lo, hi = run["ci95"]
    assert lo <= run["score"] <= hi and hi <= 100.0 and lo >= 50.0


def test_loss_against_full_cache_and_sharing_of_none(ruler_data):
    recs = (_records(ruler_data, "none", 1.0, "query_aware", lambda t, i: 100.0)
            + _records(ruler_data, "snapkv", 0.2, "query_aware", lambda t, i: 50.0)
            + _records(ruler_data, "snapkv", 0.2, "query_agnostic", lambda t, i: 25.0)
            + _records(ruler_data, "defensivekv", 0.2, "query_agnostic", lambda t, i: 100.0 if i else 0.0))
    runs = {(r["protocol"], r["method"], r["budget"]): r for r in stats.aggregate(recs, n_boot=500)}
    # `none` ran once and serves both protocols
    assert runs[("query_agnostic", "none", 1.0)]["shared_from_protocol"] == "query_aware"
    assert runs[("query_aware", "snapkv", 0.2)]["loss_pct"] == 50.0
    assert runs[("query_agnostic", "snapkv", 0.2)]["loss_pct"] == 75.0
    # constant differences: the paired interval collapses onto the point
    assert runs[("query_agnostic", "snapkv", 0.2)]["loss_ci95"] == [75.0, 75.0]
    d = runs[("query_agnostic", "defensivekv", 0.2)]
    assert d["loss_pct"] == pytest.approx(100 / 3, abs=1e-3)
    lo, hi = d["loss_ci95"]
    assert 0.0 <= lo <= d["loss_pct"] <= hi <= 100.0 and hi > lo
    assert d["reference"] == {"method": "none", "budget": 1.0, "n_paired": 6, "score": 100.0}


def test_loss_uses_only_paired_samples_and_handles_missing_references(ruler_data):
    full = _records(ruler_data, "none", 1.0, "query_aware", lambda t, i: 100.0 if i < 2 else 0.0)
    part = [r for r in _records(ruler_data, "snapkv", 0.1, "query_aware", lambda t, i: 50.0) if r["sample"] < 2]
    runs = {r["method"]: r for r in stats.aggregate(full + part, n_boot=100,
                                                     expected={("m", SMOKE_LENGTH): {"vt": 3, "niah_single_1": 3}})}
    assert runs["snapkv"]["reference"]["n_paired"] == 4 and runs["snapkv"]["loss_pct"] == 50.0
    assert runs["snapkv"]["complete"] is False and runs["none"]["complete"] is True
    # no full-cache run: no loss; a zero full-cache score: no loss either
    alone = stats.aggregate(part, n_boot=50)
    assert alone[0]["loss_pct"] is None and alone[0]["reference"] is None
    zero = _records(ruler_data, "none", 1.0, "query_aware", lambda t, i: 0.0)
    runs = {r["method"]: r for r in stats.aggregate(zero + part, n_boot=50)}
    assert runs["snapkv"]["loss_pct"] is None


def test_budget_one_is_a_full_cache_reference(ruler_data):
    recs = (_records(ruler_data, "defensivekv", 1.0, "query_agnostic", lambda t, i: 80.0)
            + _records(ruler_data, "defensivekv", 0.4, "query_agnostic", lambda t, i: 60.0))
    runs = {r["budget"]: r for r in stats.aggregate(recs, n_boot=50)}
    assert runs[0.4]["reference"]["budget"] == 1.0 and runs[0.4]["loss_pct"] == 25.0


def test_bootstrap_is_deterministic_and_covers():
    rng = np.random.default_rng(1)
    per_task = {"a": rng.integers(0, 2, 40) * 100.0, "b": rng.integers(0, 2, 40) * 100.0}
    b1 = stats.bootstrap_average(per_task, 2000, np.random.default_rng(5))
    b2 = stats.bootstrap_average(per_task, 2000, np.random.default_rng(5))
    assert np.array_equal(b1, b2)
    lo, hi = stats.ci95(b1)
    point = stats.average_score(per_task)
    assert lo < point < hi
    # the half-width of a mean of 80 Bernoulli(.5)-ish samples is about 1.96*50/sqrt(80) ~ 11
    assert 6 < (hi - lo) / 2 < 16
