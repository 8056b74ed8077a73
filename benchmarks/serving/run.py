"""Serving benchmark: plain vLLM against the plugin at several budgets, same KV cache size.

Runs on the GPU machine (../../../shared/gpu/README.md). For each model: one plain vLLM server
(VLLM_PLUGINS=none: the plugin is not even loaded), then one plugin server whose budgets travel as
per-request overrides (so one start serves budgets 1.0 / 0.5 / 0.2 / 0.1). The KV cache is held to
the same byte size for both (`--kv-cache-memory-bytes`) so that it is the bottleneck.

    python benchmarks/serving/run.py --model-dir $GPU_MODEL_DIR --name qwen05b --kv-bytes 640M \
        --workloads 8k-256:burst:48 8k-256:poisson:48@4 32k-128:burst:12 --out $OUT/qwen05b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import run_load, summarize  # noqa: E402

# "-1" variants are prefill only (one output token): plain vLLM's time on them is a floor under
# any eviction method's time on the full workload (eviction cannot shorten prefill), which bounds
# the throughput ratio a method can reach (report.py: "prefill_bound").
WORKLOADS = {"8k-256": (8192, 256), "32k-128": (32000, 128), "2k-64": (2048, 64), "8k-1": (8192, 1),
             "32k-1": (32000, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, name, port, kv_bytes, max_len, plugin: bool, extra, log_path):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
           "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", "256"] + extra
    if plugin:
        cmd += ["--kv-eviction", "defensive", "--kv-budget", "1.0"]
    else:
        env["VLLM_PLUGINS"] = "none"
    env["VLLM_SERVER_DEV_MODE"] = "1"  # for POST /reset_prefix_cache between runs (reset_prefix_cache)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc, cmd, time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("server did not start in 600 s")


def stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)


def reset_prefix_cache(url: str) -> None:
    """Every measured run starts with a cold prefix cache. The runs of one server reuse the same
    random prompts (plain and plugin see the same ones), and a compacted request's old blocks go
    back to the free pool with their hashes: without a reset, a later run (another budget) could
    hit the cache left by an earlier one and skip most of its prefill."""
    r = httpx.post(f"{url}/reset_prefix_cache", timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"POST /reset_prefix_cache answered {r.status_code}: {r.text[:200]}")


def reset_outcomes(log_path: Path) -> dict:
    """How the server answered the resets. vLLM refuses one while any KV block is still held, so a
    failed reset between runs (nothing in flight) means blocks leaked in the run before it."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return {"ok": text.count("Successfully reset prefix cache"),
            "failed_blocks_still_held": text.count("Failed to reset prefix cache")}


def parse_workload(spec: str, default_budgets: list[float]):
    """"8k-256:burst:48", "8k-256:poisson:48@4"; an optional last field names the plugin budgets
    of this workload ("32k-128:burst:12:0.2/1.0"), else --budgets."""
    fields = spec.split(":")
    if len(fields) not in (3, 4) or fields[0] not in WORKLOADS or fields[1] not in ("burst", "poisson"):
        raise ValueError(f"workload {spec!r}: want NAME:burst|poisson:COUNT[@RATE][:B1/B2...], NAME in "
                         f"{', '.join(WORKLOADS)}")
    name, arrival, count = fields[:3]
    rate = None
    if "@" in count:
        count, r = count.split("@")
        rate = float(r)
    if (arrival == "poisson") != (rate is not None):
        raise ValueError(f"workload {spec!r}: poisson arrivals need a rate (COUNT@RATE), bursts none")
    budgets = [float(b) for b in fields[3].split("/")] if len(fields) == 4 else list(default_budgets)
    return name, arrival, int(count), rate, budgets


def versions() -> dict:
    from importlib.metadata import version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("vllm", "vllm-defensive", "triton", "transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            pass
    return out


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu ({platform.machine()})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--kv-bytes", required=True)
    ap.add_argument("--max-model-len", type=int, default=33024)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--workloads", nargs="+", default=["8k-256:burst:48"])
    ap.add_argument("--extra", default="", help="extra vllm serve flags, e.g. '--load-format dummy'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--servers", default="plain,plugin",
                    help="which servers to run, in order: plain (VLLM_PLUGINS=none) and/or plugin")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": device(), "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "model": args.name, "kv_cache_bytes": args.kv_bytes, "prefix_cache": "reset before every run",
           "command": " ".join(sys.argv), "servers": [], "runs": []}

    def save():
        out.write_text(json.dumps(doc, indent=1))

    try:
        workloads = [parse_workload(spec, args.budgets) for spec in args.workloads]
    except ValueError as e:
        ap.error(str(e))
    wanted = [x.strip() for x in args.servers.split(",") if x.strip()]
    if not wanted or set(wanted) - {"plain", "plugin"}:
        ap.error(f"--servers takes plain and/or plugin, got {args.servers!r}")
    for plugin in [w == "plugin" for w in wanted]:
        port = free_port()
        log_path = out.with_suffix(f".{'plugin' if plugin else 'plain'}.log")
        proc, cmd, start_s = start_server(args.model_dir, args.name, port, args.kv_bytes, args.max_model_len,
                                          plugin, args.extra.split(), log_path)
        doc["servers"].append({"plugin": plugin, "command": " ".join(cmd), "start_s": round(start_s, 1)})
        url = f"http://127.0.0.1:{port}"
        try:
            # compile/warm paths; on the plugin, through eviction too (the first scoring call used to
            # JIT-compile the Triton kernels inside a measured burst; the worker now warms them up)
            warm_xargs = {"kv_eviction": "defensivekv", "kv_budget": 0.2} if plugin else None
            asyncio.run(run_load(url, args.name, args.warmup, 512, 8, None, warm_xargs))
            for wl, arrival, count, rate, budgets in workloads:
                prompt_len, max_tokens = WORKLOADS[wl]
                for b in budgets if plugin else [None]:
                    xargs = {"kv_eviction": "defensivekv", "kv_budget": b} if plugin else None
                    print(f"[bench] {args.name} {wl} {arrival} plugin={plugin} budget={b}", flush=True)
                    reset_prefix_cache(url)
                    res = asyncio.run(run_load(url, args.name, count, prompt_len, max_tokens, rate, xargs))
                    row = {"model": args.name, "workload": wl, "arrival": arrival, "rate": rate,
                           "method": "defensivekv" if plugin else "plain", "budget": b, **summarize(*res)}
                    doc["runs"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "timeline"}), flush=True)
                    save()
        finally:
            stop_server(proc)
            doc["servers"][-1]["prefix_cache_resets"] = reset_outcomes(log_path)
    save()


if __name__ == "__main__":
    main()
