"""Load generator and metrics sampler for one running OpenAI-compatible vLLM server.

Random-token prompts (token-id lists, so every request has exactly the asked length), streaming
completions with `ignore_eos`, burst or Poisson arrivals; TTFT / TPOT per request; a background
sampler reads vLLM's /metrics (running / waiting requests, KV usage, our eviction histograms).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field

import httpx

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each metric name over its label sets (enough for gauges/counters we read)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE_RE.match(line.strip())
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    error: str = ""
    kv_eviction: dict | None = None

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / max(self.output_tokens - 1, 1)


@dataclass
class MetricsTrace:
    samples: list[dict] = field(default_factory=list)

    def series(self, name: str) -> list[float]:
        return [s.get(name, 0.0) for s in self.samples]


async def sample_metrics(client: httpx.AsyncClient, url: str, trace: MetricsTrace, stop: asyncio.Event,
                         every: float = 0.25) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            r = await client.get(f"{url}/metrics", timeout=5)
            m = parse_metrics(r.text)
            m["t"] = time.perf_counter() - t0
            trace.samples.append(m)
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def one_request(client, url, model, prompt, max_tokens, xargs) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if xargs:
        body["vllm_xargs"] = xargs
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=None) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None and not res.ttft_s:
                    res.ttft_s = time.perf_counter() - t0
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("kv_eviction"):
                    res.kv_eviction = chunk["kv_eviction"]
        res.latency_s = time.perf_counter() - t0
        res.ok = res.output_tokens > 0
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def run_load(url: str, model: str, n_requests: int, prompt_len: int, max_tokens: int,
                   rate: float | None, xargs: dict | None, seed: int = 0, vocab: tuple[int, int] = (1000, 20000)):
    """rate=None: all requests at once (burst); else Poisson arrivals at `rate` req/s."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(*vocab) for _ in range(prompt_len)] for _ in range(n_requests)]
    limits = httpx.Limits(max_connections=n_requests + 4, max_keepalive_connections=n_requests + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        trace, stop = MetricsTrace(), asyncio.Event()
        sampler = asyncio.create_task(sample_metrics(client, url, trace, stop))
        before = parse_metrics((await client.get(f"{url}/metrics")).text)
        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, url, model, p, max_tokens, xargs)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        after = parse_metrics((await client.get(f"{url}/metrics")).text)
        stop.set()
        await sampler
    return results, wall, trace, before, after


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(results, wall, trace, before, after) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    running = trace.series("vllm:num_requests_running")
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if "kv_eviction" in k and k.endswith("_sum")}
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 3),
        "output_tok_s": round(out_tokens / wall, 2), "req_s": round(len(ok) / wall, 4),
        "mean_running": round(statistics.fmean(running), 2) if running else None,
        "peak_running": max(running) if running else None,
        "peak_waiting": max(trace.series("vllm:num_requests_waiting") or [0]),
        "peak_kv_usage": max(trace.series("vllm:kv_cache_usage_perc") or [0]),
        "ttft_p50_ms": round(pct([r.ttft_s for r in ok], 50) * 1e3, 1),
        "ttft_p99_ms": round(pct([r.ttft_s for r in ok], 99) * 1e3, 1),
        "tpot_p50_ms": round(pct([r.tpot_s for r in ok], 50) * 1e3, 2),
        "tpot_p99_ms": round(pct([r.tpot_s for r in ok], 99) * 1e3, 2),
        "eviction_seconds_sum": {k: round(v, 4) for k, v in delta.items()},
        "kv_eviction_sample": next((r.kv_eviction for r in ok if r.kv_eviction), None),
        "timeline": [{"t": round(s["t"], 2), "running": s.get("vllm:num_requests_running", 0),
                      "waiting": s.get("vllm:num_requests_waiting", 0),
                      "kv_usage": s.get("vllm:kv_cache_usage_perc", 0)} for s in trace.samples[::4]],
    }
