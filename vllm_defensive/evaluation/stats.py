"""Aggregation: per-task and average scores, quality loss against full cache, bootstrap CIs.

* A run is one (model, tokens, protocol, method, budget). Its score is RULER's average: the mean
  over tasks of each task's mean sample score (0-100).
* Its full-cache reference is method `none` of the same model, length and protocol (`none` is
  protocol-independent, so the other protocol's `none` serves when this one has none; then a run
  at budget 1.0 of the same protocol).
* loss_pct = 100 * (full - score) / full: the paper's "generation quality loss" (relative drop of
  the average), positive when the method is worse. It is computed on the samples both runs share.
* CIs are percentile bootstrap 95% intervals, resampling samples with replacement within each
  task (task weights stay equal, as in the average). The loss interval is paired: the same
  resampled samples for the run and its reference, so it reflects only the method's effect.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np

from .protocols import FULL_CACHE, PROTOCOLS
from .store import budget_key

RunKey = tuple  # (model, tokens, protocol, method, budget)


def run_key(rec: dict) -> RunKey:
    return (rec["model"], int(rec["tokens"]), rec["protocol"], rec["method"], budget_key(rec["budget"]))


def _rng(key: RunKey, seed: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(repr((key, seed)).encode()).digest()[:8], "little")
    return np.random.default_rng(h)


def average_score(per_task: dict[str, np.ndarray]) -> float:
    return float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else float("nan")


def bootstrap_average(per_task: dict[str, np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of the task-averaged score (samples resampled within each task)."""
    boots = np.zeros(n_boot)
    for v in per_task.values():
        idx = rng.integers(0, len(v), size=(n_boot, len(v)))
        boots += v[idx].mean(axis=1)
    return boots / max(len(per_task), 1)


def bootstrap_loss(run: dict[str, np.ndarray], ref: dict[str, np.ndarray], n_boot: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Paired bootstrap of loss_pct; `run[t]` and `ref[t]` are aligned sample by sample."""
    s_run, s_ref = np.zeros(n_boot), np.zeros(n_boot)
    for t, v in run.items():
        w = ref[t]
        idx = rng.integers(0, len(v), size=(n_boot, len(v)))
        s_run += v[idx].mean(axis=1)
        s_ref += w[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = 100.0 * (s_ref - s_run) / s_ref
    return loss[np.isfinite(loss)]


def ci95(boots: np.ndarray) -> list[float] | None:
    if boots.size == 0:
        return None
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _per_task(recs: list[dict]) -> dict[str, dict[str, float]]:
    """task -> uid -> score."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in recs:
        out[r["task"]][r["uid"]] = float(r["score"])
    return out


def _eviction_summary(recs: list[dict]) -> dict:
    with_rec = [r for r in recs if isinstance(r.get("kv_eviction"), dict)]
    out = {"records": len(with_rec), "of": len(recs)}
    if with_rec:
        out["compacted"] = sum(1 for r in with_rec if r["kv_eviction"].get("compacted"))
        skips = Counter(r["kv_eviction"].get("skip_reason") for r in with_rec if not r["kv_eviction"].get("compacted"))
        out["skipped"] = dict(skips)
        kept = [r["kv_eviction"].get("kept_fraction") for r in with_rec if r["kv_eviction"].get("kept_fraction") is not None]
        if kept:
            out["mean_kept_fraction"] = round(float(np.mean(kept)), 4)
    return out


def aggregate(records: list[dict], n_boot: int = 2000, seed: int = 0,
              expected: dict[tuple, dict[str, int]] | None = None) -> list[dict]:
    """One dict per run, sorted by model, tokens, protocol, method, budget.

    `expected` maps (model, tokens) to {task: samples planned}; runs short of it are marked
    incomplete.
    """
    groups: dict[RunKey, list[dict]] = defaultdict(list)
    for r in records:
        groups[run_key(r)].append(r)

    # `none` is protocol-independent: make it available to every protocol that lacks its own.
    protocols_by_mt: dict[tuple, set] = defaultdict(set)
    for (m, t, p, _, _) in groups:
        protocols_by_mt[(m, t)].add(p)
    shared: dict[RunKey, str] = {}
    for (m, t), protos in protocols_by_mt.items():
        nones = {}  # protocol -> its `none` run
        for k in sorted(groups):
            if k[:2] == (m, t) and k[3] == FULL_CACHE:
                nones.setdefault(k[2], k)
        if not nones:
            continue
        src = min(nones, key=lambda p: PROTOCOLS.index(p) if p in PROTOCOLS else 9)
        for p in protos - set(nones):
            k = nones[src]
            new = (m, t, p, FULL_CACHE, k[4])
            groups[new] = groups[k]
            shared[new] = src

    def reference(key: RunKey) -> RunKey | None:
        m, t, p, _, _ = key
        cands = [k for k in groups if k[:3] == (m, t, p) and k[3] == FULL_CACHE]
        if not cands:
            cands = [k for k in groups if k[:3] == (m, t, p) and k[4] >= 1.0]
        return sorted(cands)[0] if cands else None

    runs = []
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], 9), k[3] != FULL_CACHE, k[3], k[4])):
        m, t, p, meth, b = key
        recs = groups[key]
        tasks = _per_task(recs)
        arrays = {task: np.array(list(d.values())) for task, d in sorted(tasks.items())}
        score = average_score(arrays)
        run = {
            "model": m, "tokens": t, "protocol": p, "method": meth, "budget": b,
            "score": round(score, 4),
            "ci95": ci95(bootstrap_average(arrays, n_boot, _rng(key, seed))),
            "n_samples": sum(len(v) for v in arrays.values()),
            "per_task": {task: {"score": round(float(v.mean()), 4), "n": int(len(v))} for task, v in arrays.items()},
            "mean_prompt_tokens": round(float(np.mean([r.get("prompt_tokens", 0) for r in recs])), 1),
            "eviction": _eviction_summary(recs),
        }
        if key in shared:
            run["shared_from_protocol"] = shared[key]
        if expected and (m, t) in expected:
            want = expected[(m, t)]
            run["complete"] = all(run["per_task"].get(task, {}).get("n", 0) >= n for task, n in want.items())
        ref_key = reference(key)
        run["reference"] = None
        run["loss_pct"] = None
        run["loss_ci95"] = None
        if ref_key is not None:
            ref = _per_task(groups[ref_key])
            run_al, ref_al = {}, {}
            for task, d in tasks.items():
                common = sorted(set(d) & set(ref.get(task, {})))
                if common:
                    run_al[task] = np.array([d[u] for u in common])
                    ref_al[task] = np.array([ref[task][u] for u in common])
            run["reference"] = {"method": ref_key[3], "budget": ref_key[4],
                                "n_paired": sum(len(v) for v in run_al.values())}
            if run_al:
                s_run, s_ref = average_score(run_al), average_score(ref_al)
                run["reference"]["score"] = round(s_ref, 4)
                if s_ref > 0:
                    run["loss_pct"] = round(100.0 * (s_ref - s_run) / s_ref, 4)
                    run["loss_ci95"] = ci95(bootstrap_loss(run_al, ref_al, n_boot, _rng(key + ("loss",), seed)))
        runs.append(run)
    return runs
