"""`vllm-defensive eval`: RULER quality of KV-cache eviction through a served endpoint.

    vllm-defensive eval --endpoint http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
        --tasks all --lengths 4096 --samples 20 \\
        --methods none,snapkv,criticalkv,defensivekv --budgets 0.1,0.2,0.4 \\
        --protocols both --out benchmarks/results/quality

One server serves every method: methods, budgets and the protocol travel per request as
`vllm_xargs`. Reruns skip what `samples.jsonl` already holds; every run rewrites results.json,
summary.json and quality.png from all the results in --out (several models can share it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import protocols, tasks


def _csv_ints(text: str) -> list[int]:
    out = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        mult = 1
        low = item.lower()
        if low.endswith("k"):
            mult, low = 1024, low[:-1]
        try:
            out.append(int(float(low) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"length {item!r} is not a number of tokens (e.g. 4096 or 4k)") from None
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return sorted(set(out))


def _wrap(fn):
    def parse(text):
        try:
            return fn(text)
        except (ValueError, tasks.TaskError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = fn.__name__
    return parse


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return v
    return parse


# Set by the harness from --methods / --budgets / --protocols: --xargs may not change them.
_HARNESS_XARGS = ("kv_eviction", "kv_budget", "kv_budget_tokens", "kv_protect_suffix")


def _extra_xargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.startswith("kv_") for k in value):
        raise argparse.ArgumentTypeError('a JSON object of kv_* fields, e.g. {"kv_uniform_norm": "raw"}')
    fixed = [k for k in value if k in _HARNESS_XARGS]
    if fixed:
        raise argparse.ArgumentTypeError(f"{', '.join(fixed)} come from --methods / --budgets / --protocols")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="RULER quality of KV eviction methods through an OpenAI-compatible endpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("endpoint")
    g.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000 (/v1 optional)")
    g.add_argument("--model", help="served model name (default: the endpoint's only model)")
    g.add_argument("--model-label", help="model name in the reports (default: the served name)")
    g.add_argument("--api-key", help="bearer token, if the endpoint needs one")
    g.add_argument("--concurrency", type=_positive(int), default=16, help="requests in flight (default 16)")
    g.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds per request (default 600)")
    g.add_argument("--retries", type=int, default=4, help="retries of a failed request (default 4)")
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", required=False, help="the served model's HF folder (its tokenizer builds the data)")
    g.add_argument("--tasks", type=_wrap(tasks.parse_tasks), default=list(tasks.TASK_NAMES),
                   help="comma list of RULER tasks, 'niah' or 'all' (default all 13)")
    g.add_argument("--lengths", type=_csv_ints, default=[4096], help="RULER lengths in tokens, e.g. 4096,8192 or 4k")
    g.add_argument("--samples", type=_positive(int), default=20, help="samples per task and length (default 20)")
    g.add_argument("--seed", type=int, default=42, help="generation seed: picks the samples (default 42, RULER's)")
    g.add_argument("--prompt-format", choices=tasks.PROMPT_FORMATS, default="base",
                   help="base: RULER's plain template (default); chat: wrapped in the tokenizer's chat template")
    g.add_argument("--cache-dir", type=Path, default=tasks.DEFAULT_CACHE, help=f"generated data (default {tasks.DEFAULT_CACHE})")
    g.add_argument("--prepare-jobs", type=_positive(int), default=2, help="tasks generated in parallel (default 2)")
    g.add_argument("--max-new-tokens", type=_positive(int), help="cap on RULER's tokens to generate (smoke runs)")
    g = p.add_argument_group("what to compare")
    g.add_argument("--methods", type=_wrap(protocols.parse_methods), default=["none", "snapkv", "criticalkv", "defensivekv"],
                   help=f"comma list from {', '.join(protocols.METHOD_NAMES)} or 'all' (none = full cache)")
    g.add_argument("--budgets", type=_wrap(protocols.parse_budgets), default=[0.1, 0.2, 0.4],
                   help="fractions of the context kept (default 0.1,0.2,0.4)")
    g.add_argument("--protocols", type=_wrap(protocols.parse_protocols), default=list(protocols.PROTOCOLS),
                   help="query_aware, query_agnostic or both (default both)")
    g.add_argument("--xargs", type=_extra_xargs, default={}, metavar="JSON",
                   help="more per-request fields on every evicting request, e.g. "
                        "'{\"kv_uniform_norm\": \"raw\", \"kv_uniform_floor\": true}' (a method variant; "
                        "write it to its own --out, and compare runs with benchmarks/quality/paired.py)")
    g.add_argument("--require-eviction", action="store_true",
                   help="fail unless responses carry the plugin's kv_eviction record")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="output folder (samples.jsonl, results.json, summary.json, quality.png)")
    g.add_argument("--bootstrap", type=_positive(int), default=2000, help="bootstrap resamples (default 2000)")
    g.add_argument("--device", help="device name for the reports (default: nvidia-smi here, else the CPU)")
    g.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for results.json's notes (e.g. the server's flags); repeatable")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prepare-only", action="store_true", help="only generate and cache the data (no endpoint)")
    mode.add_argument("--report-only", action="store_true", help="only rebuild the reports from samples.jsonl")
    p.add_argument("--merge", nargs="+", type=Path, metavar="PATH",
                   help="with --report-only: first add the results of other output folders (or their "
                        "samples.jsonl[.xz]) to --out, with their meta.json (device, versions, commands)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    from .runner import EvalConfig

    return EvalConfig(
        out_dir=args.out, endpoint=args.endpoint, model=args.model, model_label=args.model_label,
        tokenizer=args.tokenizer, tasks=args.tasks, lengths=args.lengths, samples=args.samples, seed=args.seed,
        methods=args.methods, budgets=args.budgets, protocols=args.protocols, concurrency=args.concurrency,
        cache_dir=args.cache_dir, prompt_format=args.prompt_format, max_new_tokens=args.max_new_tokens,
        timeout=args.timeout, retries=args.retries, n_boot=args.bootstrap, device=args.device,
        api_key=args.api_key, prepare_jobs=args.prepare_jobs, require_eviction=args.require_eviction,
        progress=not args.no_progress, notes=list(args.note), extra_xargs=dict(args.xargs),
    )


def run(args: argparse.Namespace) -> int:
    from . import report
    from .runner import EvalError, evaluate, prepare_data, write_reports
    from .store import ResultStore

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    cfg = config_from_args(args)
    try:
        if args.prepare_only:
            data = prepare_data(cfg)
            for (task, length), samples in sorted(data.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                toks = [s.prompt_tokens for s in samples]
                qt = [s.question_tokens for s in samples]
                print(f"{task:<16} {length:>6}: {len(samples)} samples, prompt {min(toks)}-{max(toks)} tokens, "
                      f"question {min(qt)}-{max(qt)} tokens")
            return 0
        if args.merge and not args.report_only:
            raise EvalError("--merge goes with --report-only")
        if args.report_only:
            store = ResultStore(Path(cfg.out_dir) / "samples.jsonl")
            if args.merge:
                from .runner import merge_results

                for path in args.merge:
                    added = merge_results(Path(cfg.out_dir), path)
                    print(f"merged {added} new results from {path}", file=sys.stderr)
            if not store.path.is_file():
                raise EvalError(f"{store.path} does not exist: nothing to report")
            out = write_reports(cfg, store)
        else:
            if not cfg.tokenizer:
                raise EvalError("--tokenizer is required (the served model's HF folder)")
            out = evaluate(cfg)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished requests are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    print(report.text_table(out["runs"]))
    print(f"\nwrote {out['results']}, {out['summary']}" + (f", {out['plot']}" if out.get("plot") else ""))
    if out.get("token_mismatches"):
        print(f"warning: {out['token_mismatches']} responses counted a different number of prompt tokens than "
              "--tokenizer", file=sys.stderr)
    if out.get("failures"):
        print(f"error: {len(out['failures'])} requests failed (rerun to retry them); first: {out['failures'][0]}",
              file=sys.stderr)
        return 1
    return 0
