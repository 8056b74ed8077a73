"""End to end, on CPU: a real `vllm serve` with the plugin, scraped every second by a real
Prometheus (Debian's package, installed by scripts/setup.sh).

* the per-request `kv_eviction` stats agree with the engine's block accounting (block size and
  pool size from vLLM's `vllm:cache_config_info`, blocks in use from `vllm:kv_cache_usage_perc`,
  page bytes from the model's config);
* after a concurrent burst with mixed budgets and per-request overrides, the eviction counters on
  `/metrics` equal the sums of the per-request stats;
* every PromQL expression of every dashboard panel returns data through Prometheus's HTTP API.

One server and one Prometheus for the module; both are killed (process groups) at the end.
KVD_OBS_API_SERVERS=N runs the same tests against `--api-server-count N` (prometheus_client
multiprocess mode; every API server's /metrics must report the totals of all of them).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from obs_procs import Prometheus, Server, model_dir  # noqa: E402

from vllm_defensive.policy import EvictionConfig  # noqa: E402
from vllm_defensive.stats import SKIP_REASONS  # noqa: E402

pytestmark = pytest.mark.slow

SERVED = "smollm2-obs"
SERVER_BUDGET = 0.2
API_SERVERS = int(os.environ.get("KVD_OBS_API_SERVERS", "1"))
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
E = "vllm:kv_eviction_"


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboard",
                                                  DEPLOY / "grafana" / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        msg = "prometheus not installed (scripts/setup.sh installs Debian's package)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    work = tmp_path_factory.mktemp("obs-e2e")
    model = model_dir("smollm2")
    server = Server(model, ["--served-model-name", SERVED, "--dtype", "float32",
                            "--max-model-len", "4096", "--kv-eviction", "defensive",
                            "--kv-budget", str(SERVER_BUDGET),
                            "--api-server-count", str(API_SERVERS)], work, timeout=600)
    prom = None
    try:
        prom = Prometheus(f"127.0.0.1:{server.port}", work)
        deadline = time.monotonic() + 30
        while not prom.targets_up():
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.5)
        yield server, prom, model
    finally:
        if prom is not None:
            prom.stop()
        server.stop()


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and set(labels.items()) <= set(lab))


def engine_info(samples) -> dict:
    info = next(dict(lab) for (n, lab) in samples if n == "vllm:cache_config_info")
    bs = int(info["block_size"])
    blocks = info.get("num_gpu_blocks")
    blocks = int(blocks) if blocks not in (None, "None") else (
        int(info["kv_cache_size_tokens"]) // bs)
    return {"block_size": bs, "num_gpu_blocks": blocks}


def page_bytes(model: str, block_size: int) -> int:
    """Bytes of one KV block over all layers, K and V (float32 cache)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * block_size


WORDS = ("river stone garden lamp copper violet engine harbor pencil meadow orbit signal canyon "
         "maple throne velvet cobalt ember falcon glacier lantern marble nectar opal prairie quartz "
         "raven saffron tundra umbra willow zephyr anchor bramble cedar dune fjord grove hollow "
         "island jasper kettle lagoon mosaic nimbus oasis pebble quiver ripple summit thicket").split()


def prompt(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\nSummarise the text above."


def expected_kept(prompt_tokens: int, xargs: dict) -> int | None:
    """Tokens kept per KV head by the policy library for this request (protected suffix
    included), or None when it should be skipped."""
    if xargs.get("kv_eviction") == "none":
        return None
    fields = {"method": "defensivekv", "budget": xargs.get("kv_budget", SERVER_BUDGET),
              "protect_suffix": xargs.get("kv_protect_suffix", 0)}
    if "kv_budget_tokens" in xargs:
        fields.update(budget=None, budget_tokens=xargs["kv_budget_tokens"])
    cfg = EvictionConfig(**fields)
    ctx = cfg.context_len(prompt_tokens)
    return cfg.keep_per_head(ctx) + cfg.protect_suffix


def send(server, spec: dict) -> dict:
    """One request; returns {"spec", "usage", "kv_eviction", "text"}."""
    body = {"model": SERVED, "max_tokens": spec.get("max_tokens", 8), "temperature": 0.0,
            "ignore_eos": True}
    if spec.get("xargs"):
        body["vllm_xargs"] = spec["xargs"]
    chat = spec.get("chat", False)
    if chat:
        body["messages"] = [{"role": "user", "content": spec["prompt"]}]
    else:
        body["prompt"] = spec["prompt"]
    url = server.url + ("/v1/chat/completions" if chat else "/v1/completions")
    if not spec.get("stream"):
        r = httpx.post(url, json=body, timeout=300)
        assert r.status_code == 200, r.text
        j = r.json()
        return {"spec": spec, "usage": j["usage"], "kv_eviction": j.get("kv_eviction")}
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    record, usage = None, None
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            record = chunk.get("kv_eviction", record)
            usage = chunk.get("usage") or usage
    return {"spec": spec, "usage": usage, "kv_eviction": record}


def check_record(res: dict, info: dict, model: str) -> None:
    """The per-request stats agree with the engine's block accounting and the policy."""
    rec, spec = res["kv_eviction"], res["spec"]
    assert rec is not None, f"no kv_eviction in the response to {spec['name']}"
    prompt_tokens = res["usage"]["prompt_tokens"]
    assert rec["prompt_tokens"] == prompt_tokens, spec["name"]
    bs = info["block_size"]
    if spec["expect"] != "compacted":
        assert rec["compacted"] is False and rec["skip_reason"] == spec["expect"], (spec, rec)
        assert rec["blocks_freed"] == 0 and rec["bytes_freed"] == 0, rec
        return
    assert rec["compacted"] is True and rec["skip_reason"] is None, (spec, rec)
    kept = rec["tokens_kept"]
    assert kept == expected_kept(prompt_tokens, spec.get("xargs", {})), (spec, rec)
    assert kept + rec["tokens_evicted"] == prompt_tokens, rec
    assert rec["blocks_before"] == math.ceil(prompt_tokens / bs), (rec, bs)
    assert rec["blocks_after"] == math.ceil(kept / bs), (rec, bs)
    assert rec["blocks_freed"] == rec["blocks_before"] - rec["blocks_after"], rec
    assert rec["bytes_freed"] == rec["blocks_freed"] * page_bytes(model, bs), rec
    assert rec["kept_fraction"] == pytest.approx(kept / prompt_tokens, abs=1e-6)
    assert rec["score_ms"] > 0 and rec["compact_ms"] >= 0, rec


# --- the in-flight request: engine block accounting ----------------------------------------------

def test_inflight_request_matches_engine_block_accounting(stack):
    """While one compacted request decodes, vLLM's own KV-cache usage shows only the kept blocks,
    and our "saved now" gauges hold exactly what the response reports as freed."""
    server, prom, model = stack
    info = engine_info(scrape(server))
    bs = info["block_size"]
    # Enough decode steps after the scrape that the request is surely still running: a slow
    # client makes vLLM merge the streamed deltas, so the 4th chunk can arrive late (CI once
    # saw the request finished at the scrape with 24 tokens).
    spec = {"name": "inflight", "prompt": prompt(900, seed=1), "expect": "compacted",
            "stream": True, "max_tokens": 320}
    body = {"model": SERVED, "prompt": spec["prompt"], "max_tokens": spec["max_tokens"],
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    during, record, usage, n_tokens = None, None, None, 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                n_tokens += 1
            record = chunk.get("kv_eviction", record)
            usage = chunk.get("usage") or usage
            if n_tokens == 4 and during is None:
                during = scrape(server)  # mid-decode, well after compaction
    assert during is not None and record is not None
    res = {"spec": spec, "usage": usage, "kv_eviction": record}
    check_record(res, info, model)
    freed = record["blocks_freed"]
    assert freed > 0
    lab = dict(model_name=SERVED)
    assert total(during, "vllm:num_requests_running", **lab) == 1, "the scrape came too late"
    assert total(during, E + "blocks_saved", **lab) == freed
    assert total(during, E + "bytes_saved", **lab) == record["bytes_freed"]
    assert total(during, E + "num_requests_compacted", **lab) == 1
    # vLLM's own accounting: blocks in use = kept prompt + tokens generated so far
    usage_perc = total(during, "vllm:kv_cache_usage_perc", **lab)
    used = round(usage_perc * (info["num_gpu_blocks"] - 1))
    low = math.ceil((record["tokens_kept"] + 1) / bs)
    high = math.ceil((record["tokens_kept"] + spec["max_tokens"] + 1) / bs)
    print(f"inflight: prompt={record['prompt_tokens']} kept={record['tokens_kept']} "
          f"blocks {record['blocks_before']}->{record['blocks_after']} engine used={used} "
          f"({usage_perc:.4f} of {info['num_gpu_blocks'] - 1}) block_size={bs}")
    assert low <= used <= high, (used, record, info)
    assert used < record["blocks_before"]
    after = scrape(server)
    assert total(after, E + "blocks_saved", **lab) == 0
    assert total(after, E + "num_requests_compacted", **lab) == 0


# --- the burst -----------------------------------------------------------------------------------

def burst_specs(wave: int) -> list[dict]:
    s = 100 * wave
    specs = [
        {"name": "default", "prompt": prompt(400, s + 1), "expect": "compacted"},
        {"name": "budget-0.5", "prompt": prompt(500, s + 2), "xargs": {"kv_budget": 0.5},
         "expect": "compacted"},
        {"name": "budget-0.1+suffix", "prompt": prompt(450, s + 3),
         "xargs": {"kv_budget": 0.1, "kv_protect_suffix": 64}, "expect": "compacted"},
        {"name": "budget-tokens", "prompt": prompt(350, s + 4),
         "xargs": {"kv_budget_tokens": 150}, "expect": "compacted"},
        {"name": "chat-0.3", "prompt": prompt(350, s + 5), "xargs": {"kv_budget": 0.3},
         "chat": True, "expect": "compacted"},
        {"name": "stream", "prompt": prompt(300, s + 6), "stream": True, "expect": "compacted"},
        {"name": "budget-1.0", "prompt": prompt(200, s + 7), "xargs": {"kv_budget": 1.0},
         "expect": "budget_full"},
        {"name": "off", "prompt": prompt(200, s + 8), "xargs": {"kv_eviction": "none"},
         "expect": "disabled"},
        {"name": "short", "prompt": "Hi there", "expect": "prompt_too_short"},
    ]
    for sp in specs:
        sp["name"] = f"w{wave}-{sp['name']}"
    return specs


@pytest.fixture(scope="module")
def burst(stack):
    server, prom, model = stack
    before = scrape(server)
    results = []
    lock = threading.Lock()

    def one(spec):
        res = send(server, spec)
        with lock:
            results.append(res)

    t0 = time.monotonic()
    for wave in (1, 2):
        specs = burst_specs(wave)
        with ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(one, specs))
        time.sleep(2)  # a few scrapes between waves: rates see the counters move
    after = scrape(server)
    return {"before": before, "after": after, "results": results,
            "seconds": time.monotonic() - t0}


def test_burst_per_request_stats(stack, burst):
    server, prom, model = stack
    info = engine_info(burst["after"])
    assert len(burst["results"]) == 18
    print(f"burst: {burst['seconds']:.1f}s")
    for res in sorted(burst["results"], key=lambda r: r["spec"]["name"]):
        r = res["kv_eviction"] or {}
        print(f"  {res['spec']['name']:<22} prompt={r.get('prompt_tokens')} "
              f"kept={r.get('tokens_kept')} freed={r.get('blocks_freed')} "
              f"skip={r.get('skip_reason')} score_ms={r.get('score_ms')}")
    for res in burst["results"]:
        check_record(res, info, model)
    methods = {r["kv_eviction"]["method"] for r in burst["results"]
               if r["kv_eviction"]["compacted"]}
    assert len(methods) == 1


def test_burst_counters_sum_to_per_request_stats(stack, burst):
    b, a = burst["before"], burst["after"]
    recs = [r["kv_eviction"] for r in burst["results"]]
    comp = [r for r in recs if r["compacted"]]

    def delta(name, **labels):
        return total(a, name, model_name=SERVED, **labels) - total(b, name, model_name=SERVED,
                                                                   **labels)

    assert delta(E + "requests_compacted_total") == len(comp)
    for reason in SKIP_REASONS:
        n = sum(1 for r in recs if r["skip_reason"] == reason)
        assert delta(E + "requests_skipped_total", reason=reason) == n, reason
    for field, metric in [("prompt_tokens", "prompt_tokens_total"),
                          ("tokens_kept", "tokens_kept_total"),
                          ("tokens_evicted", "tokens_evicted_total"),
                          ("blocks_before", "blocks_before_total"),
                          ("blocks_freed", "blocks_freed_total"),
                          ("bytes_freed", "bytes_freed_total")]:
        assert delta(E + metric) == sum(r[field] for r in comp), field
    assert delta(E + "kept_fraction_count") == len(comp)
    assert delta(E + "kept_fraction_sum") == pytest.approx(
        sum(r["tokens_kept"] / r["prompt_tokens"] for r in comp), rel=1e-9)
    assert delta(E + "scoring_seconds_sum") == pytest.approx(
        sum(r["score_ms"] for r in comp) / 1000, rel=1e-6, abs=1e-6)
    assert delta(E + "compaction_seconds_sum") == pytest.approx(
        sum(r["compact_ms"] for r in comp) / 1000, rel=1e-6, abs=1e-6)
    # per method label too
    method = comp[0]["method"]
    assert delta(E + "requests_compacted_total", method=method) == len(comp)
    # nothing is running any more: nothing is "saved now"
    assert total(a, E + "blocks_saved", model_name=SERVED) == 0
    assert total(a, E + "bytes_saved", model_name=SERVED) == 0
    assert total(a, E + "num_requests_compacted", model_name=SERVED) == 0
    # vLLM's own request counter agrees on how many requests finished
    assert (total(a, "vllm:request_success_total", model_name=SERVED)
            - total(b, "vllm:request_success_total", model_name=SERVED)) == len(recs)


# --- the dashboard through Prometheus ------------------------------------------------------------

def test_every_dashboard_panel_returns_data(stack, burst):
    server, prom, model = stack
    builder = _builder()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "vllm-defensive.json").read_text())
    # wait until Prometheus has scraped the final counter values
    want = total(burst["after"], E + "requests_compacted_total", model_name=SERVED)
    deadline = time.monotonic() + 30
    while True:
        got = prom.query(f'sum({E}requests_compacted_total{{model_name="{SERVED}"}})')
        if got and float(got[0]["value"][1]) == want:
            break
        assert time.monotonic() < deadline, (got, want)
        time.sleep(0.5)
    # the dashboard's model_name variable finds the served model
    r = httpx.get(prom.url + "/api/v1/label/model_name/values",
                  params={"match[]": "vllm:num_requests_running"}, timeout=10).json()
    assert SERVED in r["data"]
    # the saved-blocks gauge was seen above zero while the burst ran
    peak = prom.query(f"max_over_time(sum({E}blocks_saved)[10m:1s])")
    assert peak and float(peak[0]["value"][1]) > 0

    window = f"{max(60, int(burst['seconds']) + 30)}s"  # covers the whole burst
    empty, no_number = [], []
    n = 0
    for title, ref, expr in builder.iter_targets(dashboard):
        q = builder.render_expr(expr, rate_interval=window, range_="10m", model_name=SERVED)
        result = prom.query(q)
        n += 1
        if not result:
            empty.append(f"{title} [{ref}]: {q}")
            continue
        values = [float(s["value"][1]) for s in result]
        print(f"  {title} [{ref}]: {[round(v, 4) for v in values][:6]}")
        if not any(math.isfinite(v) for v in values):
            no_number.append(f"{title} [{ref}]: {q} -> {values}")
    assert n >= 30
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not no_number, "panels with only NaN/Inf:\n" + "\n".join(no_number)
