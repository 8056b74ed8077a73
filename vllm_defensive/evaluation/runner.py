"""The harness: data -> requests (every method through per-request overrides) -> scores -> reports."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import metrics, protocols, report, stats, tasks
from .client import CompletionClient, EndpointError, normalize_base_url
from .store import ResultStore, budget_key, merge_into, record_key

log = logging.getLogger("vllm_defensive.eval")

RESULTS_FILE = "samples.jsonl"


class EvalError(RuntimeError):
    """A problem the user can fix; the CLI prints it without a traceback."""


@dataclass
class EvalConfig:
    out_dir: Path
    endpoint: str | None = None
    model: str | None = None  # served model name
    model_label: str | None = None  # name in reports (default: the served name)
    tokenizer: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(tasks.TASK_NAMES))
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 20
    seed: int = 42
    methods: list[str] = field(default_factory=lambda: ["none", "snapkv", "criticalkv", "defensivekv"])
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    protocols: list[str] = field(default_factory=lambda: list(protocols.PROTOCOLS))
    concurrency: int = 16
    cache_dir: Path = field(default_factory=lambda: tasks.DEFAULT_CACHE)
    prompt_format: str = "base"
    max_new_tokens: int | None = None  # cap on RULER's tokens_to_generate
    timeout: float = 600.0
    retries: int = 4
    n_boot: int = 2000
    device: str | None = None
    api_key: str | None = None
    prepare_jobs: int = 2
    require_eviction: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # free text for results.json (server flags, ...)
    extra_xargs: dict = field(default_factory=dict)  # more vllm_xargs on every evicting request
    command: list[str] = field(default_factory=report.command_line)


@dataclass(frozen=True)
class Job:
    sample: tasks.Sample
    method: str
    budget: float
    protocol: str

    def key(self, model: str) -> tuple:
        return record_key({"model": model, "tokens": self.sample.length, "task": self.sample.task,
                           "uid": self.sample.uid, "method": self.method, "budget": self.budget,
                           "protocol": self.protocol})


def plan(cfg: EvalConfig, data: dict[tuple[str, int], list[tasks.Sample]]) -> list[Job]:
    """Every (sample, method, budget, protocol) to run. `none` runs once (budget 1.0, first protocol)."""
    jobs = []
    for length in cfg.lengths:
        for proto in cfg.protocols:
            for method in cfg.methods:
                if method == protocols.FULL_CACHE:
                    if proto != cfg.protocols[0]:
                        continue  # shared by every protocol (stats.aggregate)
                    budgets = [protocols.FULL_BUDGET]
                else:
                    budgets = cfg.budgets
                for b in budgets:
                    for task in cfg.tasks:
                        for s in data[(task, length)]:
                            jobs.append(Job(s, method, budget_key(b), proto))
    return jobs


def _done(job: Job, model: str, store: ResultStore) -> bool:
    if job.key(model) in store:
        return True
    if job.method == protocols.FULL_CACHE:  # protocol-independent: any protocol's result will do
        return any(Job(job.sample, job.method, job.budget, p).key(model) in store for p in protocols.PROTOCOLS)
    return False


def _record(job: Job, model: str, comp, xargs: dict) -> dict:
    s = job.sample
    return {
        "model": model, "tokens": s.length, "task": s.task, "sample": s.index, "uid": s.uid,
        "method": job.method, "budget": job.budget, "protocol": job.protocol,
        "score": metrics.score(s.metric, comp.text, s.outputs), "metric": s.metric,
        "prediction": comp.text, "references": s.outputs,
        "prompt_tokens": s.prompt_tokens, "server_prompt_tokens": comp.prompt_tokens,
        "question_tokens": s.question_tokens, "completion_tokens": comp.completion_tokens,
        "finish_reason": comp.finish_reason, "latency_s": round(comp.latency_s, 3),
        "xargs": xargs, "kv_eviction": comp.kv_eviction, "time": round(time.time(), 3),
    }


def _xargs(cfg: EvalConfig, job: Job) -> dict:
    """The request's vllm_xargs: method, budget and protocol, plus --xargs where it evicts."""
    xargs = protocols.request_overrides(job.method, job.budget, job.protocol, job.sample.question_tokens)
    if job.method != protocols.FULL_CACHE:
        xargs.update(cfg.extra_xargs)
    return xargs


def _max_tokens(cfg: EvalConfig, s: tasks.Sample) -> int:
    return min(s.max_new_tokens, cfg.max_new_tokens) if cfg.max_new_tokens else s.max_new_tokens


async def _probe(client: CompletionClient, cfg: EvalConfig, job: Job) -> dict:
    """One short request before the run: the endpoint accepts the overrides and counts tokens as we do."""
    s = job.sample
    xargs = _xargs(cfg, job)
    try:
        comp = await client.complete(s.prompt, 1, xargs)
    except EndpointError as e:
        if e.status is not None and 400 <= e.status < 500:
            raise EvalError(f"the endpoint refused a request with vllm_xargs={xargs}: {e}\n"
                            "Is the vllm-defensive plugin loaded, and is the prompt within --max-model-len?") from e
        raise EvalError(f"probe request failed: {e}") from e
    if comp.prompt_tokens is not None and comp.prompt_tokens != s.prompt_tokens:
        raise EvalError(
            f"tokenizer mismatch: {cfg.tokenizer} counts {s.prompt_tokens} prompt tokens for {s.task}#{s.index}, "
            f"the server counts {comp.prompt_tokens}. --tokenizer must be the served model's tokenizer "
            "(query_agnostic protects a token count computed locally).")
    info = {"server_prompt_tokens": comp.prompt_tokens, "has_eviction_record": comp.kv_eviction is not None,
            "response_fields": comp.raw_keys, "probe_xargs": xargs}
    if job.method != protocols.FULL_CACHE and comp.kv_eviction is None:
        msg = ("the endpoint's responses carry no `kv_eviction` record, so eviction cannot be verified "
               "(a server without the vllm-defensive plugin ignores vllm_xargs and keeps the full cache)")
        if cfg.require_eviction:
            raise EvalError(msg)
        log.warning(msg)
    return info


async def _run_jobs(cfg: EvalConfig, client: CompletionClient, model_label: str, jobs: list[Job],
                    store: ResultStore) -> dict:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"eval {model_label}", unit="req", file=sys.stderr, smoothing=0.05)
    failures: list[str] = []
    mismatches = 0
    fatal: list[BaseException] = []

    async def worker():
        nonlocal mismatches
        while not fatal:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            s = job.sample
            xargs = _xargs(cfg, job)
            try:
                comp = await client.complete(s.prompt, _max_tokens(cfg, s), xargs)
            except EndpointError as e:
                failures.append(f"{s.task}#{s.index} {job.method}@{job.budget} {job.protocol}: {e}")
                if e.status is not None and 400 <= e.status < 500 and e.status not in (408, 429):
                    fatal.append(e)  # the same request shape will keep failing
            else:
                rec = _record(job, model_label, comp, xargs)
                if comp.prompt_tokens is not None and comp.prompt_tokens != s.prompt_tokens:
                    mismatches += 1
                store.append(rec)
            if bar:
                bar.update(1)
                if failures:
                    bar.set_postfix(failed=len(failures))

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, cfg.concurrency))))
    finally:
        if bar:
            bar.close()
    if fatal:
        raise EvalError(f"the endpoint refused a request: {fatal[0]}")
    return {"failures": failures, "token_mismatches": mismatches}


def _expected(cfg: EvalConfig, label: str) -> dict:
    return {(label, n): {t: cfg.samples for t in cfg.tasks} for n in cfg.lengths}


def write_reports(cfg: EvalConfig, store: ResultStore, extra_meta: dict | None = None,
                  expected: dict | None = None) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store.load()
    runs = stats.aggregate(store.records, n_boot=cfg.n_boot, seed=0, expected=expected)
    meta_path = out / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    extra_meta = extra_meta or {}
    device = cfg.device or extra_meta.get("device") or old.get("device") or report.detect_device()
    versions = extra_meta.get("versions") or old.get("versions") or report.package_versions()
    commands = old.get("commands", [])
    if extra_meta.get("command") and extra_meta["command"] not in commands:
        commands.append(extra_meta["command"])
    notes = old.get("notes", []) + [n for n in cfg.notes if n not in old.get("notes", [])]
    meta = {**old, **extra_meta, "device": device, "versions": versions, "commands": commands, "notes": notes}
    meta.pop("command", None)
    devices = model_devices(old)
    if "last_run" in extra_meta:  # one entry per model label, the latest invocation's
        inv = dict(old.get("invocations", {}))
        last = extra_meta["last_run"]
        devices[last["model"]] = device
        prev = inv.get(last["model"], {})
        if not last.get("requests"):  # nothing ran: keep the last probe and request counts
            last = {**prev, **{k: v for k, v in last.items() if k not in ("probe", "requests", "failed",
                                                                          "token_mismatches")}}
        inv[last["model"]] = last
        meta["invocations"] = inv
        meta.pop("last_run")
    if devices:
        meta["devices"] = devices
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    results = report.write_results(out, runs, {
        "command": commands[-1] if commands else None, **meta,
        "samples_file": RESULTS_FILE, "bad_lines_skipped": store.bad_lines})
    summary = report.write_summary(out, runs, device, versions, devices)
    png = report.plot(out, runs, devices=devices)
    return {"runs": runs, "results": results, "summary": summary, "plot": png}


def prepare_data(cfg: EvalConfig) -> dict:
    if not cfg.tokenizer:
        raise EvalError("--tokenizer is required (the served model's HF folder)")
    req = tasks.DataRequest(tokenizer_path=cfg.tokenizer, tasks=cfg.tasks, lengths=cfg.lengths,
                            num_samples=cfg.samples, seed=cfg.seed, prompt_format=cfg.prompt_format,
                            cache_dir=Path(cfg.cache_dir), jobs=cfg.prepare_jobs)
    try:
        return tasks.prepare(req, progress=cfg.progress)
    except tasks.TaskError as e:
        raise EvalError(str(e)) from e


async def evaluate_async(cfg: EvalConfig, transport=None) -> dict:
    """Run what `samples.jsonl` lacks, then rewrite the reports. `transport`: an httpx transport (tests)."""
    if not cfg.endpoint:
        raise EvalError("--endpoint is required (e.g. http://127.0.0.1:8000)")
    try:
        normalize_base_url(cfg.endpoint)
    except ValueError as e:
        raise EvalError(str(e)) from None
    data = prepare_data(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / RESULTS_FILE)
    store.load()
    if store.bad_lines:
        log.warning("%s: skipped %d unreadable line(s)", store.path, store.bad_lines)

    async with CompletionClient(cfg.endpoint, cfg.model, cfg.api_key, timeout=cfg.timeout, retries=cfg.retries,
                                max_connections=max(8, cfg.concurrency), transport=transport,
                                retry_delay=0.0 if transport is not None else 1.0) as client:
        try:
            served = await client.resolve_model()
        except EndpointError as e:
            raise EvalError(f"cannot use endpoint {cfg.endpoint}: {e}") from e
        label = cfg.model_label or served
        jobs = plan(cfg, data)
        pending = [j for j in jobs if not _done(j, label, store)]
        server_version = await client.server_version()
        versions = report.package_versions(server_version)
        meta = {"command": cfg.command, "versions": versions, "endpoint": client.base_url,
                **({"device": cfg.device} if cfg.device else {})}
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                  if k not in ("api_key", "command", "progress", "notes")}
        print(f"{label}: {len(jobs)} requests planned, {len(jobs) - len(pending)} already done, "
              f"{len(pending)} to run", file=sys.stderr)
        outcome = {"failures": [], "token_mismatches": 0}
        probe = None
        if pending:
            first = next((j for j in pending if j.method != protocols.FULL_CACHE), pending[0])
            probe = await _probe(client, cfg, first)
            outcome = await _run_jobs(cfg, client, label, pending, store)
        run_meta = {**meta, "last_run": {"model": label, "served_model": served, "config": config, "probe": probe,
                                          "requests": len(pending), "failed": len(outcome["failures"]),
                                          "token_mismatches": outcome["token_mismatches"]}}
    # Every model and length in this output folder; "complete" against this invocation's plan.
    reports = write_reports(cfg, store, run_meta, expected=_expected(cfg, label))
    reports["failures"] = outcome["failures"]
    reports["token_mismatches"] = outcome["token_mismatches"]
    return reports


def evaluate(cfg: EvalConfig) -> dict:
    return asyncio.run(evaluate_async(cfg))


def model_devices(meta: dict) -> dict[str, str]:
    """{model label: device} of a run folder's meta.json (folders written before `devices`
    existed ran one device: their `device`, for every model they invoked)."""
    if meta.get("devices"):
        return dict(meta["devices"])
    if meta.get("device"):
        return {label: meta["device"] for label in meta.get("invocations", {})}
    return {}


def merge_results(out_dir: Path, src: Path) -> int:
    """Add another run folder's results (and meta: device, versions, commands) to `out_dir`."""
    src = Path(src)
    if src.is_dir():
        files = [src / n for n in (RESULTS_FILE, RESULTS_FILE + ".xz") if (src / n).is_file()]
        if not files:
            raise EvalError(f"{src} holds no {RESULTS_FILE}[.xz]")
        data, meta_file = files[0], src / "meta.json"
    else:
        data, meta_file = src, src.parent / "meta.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        added = merge_into(ResultStore(out_dir / RESULTS_FILE), data)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    if meta_file.is_file():
        theirs = json.loads(meta_file.read_text())
        mine_path = out_dir / "meta.json"
        mine = json.loads(mine_path.read_text()) if mine_path.is_file() else {}
        merged = {**theirs, **mine}
        merged["commands"] = mine.get("commands", []) + [c for c in theirs.get("commands", [])
                                                         if c not in mine.get("commands", [])]
        merged["invocations"] = {**theirs.get("invocations", {}), **mine.get("invocations", {})}
        merged["notes"] = mine.get("notes", []) + [n for n in theirs.get("notes", []) if n not in mine.get("notes", [])]
        by_model = {**model_devices(theirs), **model_devices(mine)}
        if by_model:
            merged["devices"] = by_model  # the reports name each model's device
        if len({d for d in (mine.get("device"), theirs.get("device")) if d}) > 1:
            log.info("merged results of several devices: %s", sorted(set(by_model.values())))
        mine_path.write_text(json.dumps(merged, indent=2) + "\n")
    return added
