"""The served path: `vllm serve --kv-eviction defensive --kv-budget 0.2` with the engine core in its
own process (vLLM's default), over HTTP. Issue tests 6 (bad per-request values: HTTP 400 naming
the field, server keeps serving) and 7 (a concurrent burst), and the `kv_eviction` response field."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kvd_helpers import essay_ids, model_path

pytestmark = pytest.mark.slow

MODEL = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_USE_AOT_COMPILE="0")
    log = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model_path(), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
           "--enforce-eager", "--kv-eviction", "defensive", "--kv-budget", "0.2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not start:\n{log.read_text()[-4000:]}")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prompt():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    return tok.decode(essay_ids(tok, 400, 12000))


def post(base, path, body, **kw):
    return httpx.post(f"{base}{path}", json={"model": MODEL, "temperature": 0, **body}, timeout=300, **kw)


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_completion_carries_the_record(server, prompt):
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6})
    assert r.status_code == 200
    body = r.json()
    rec = body["kv_eviction"]
    assert rec["compacted"] and rec["method"] == "defensivekv" and rec["budget"] == 0.2
    assert rec["request_id"].startswith(body["id"])
    assert rec["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert 0.15 < rec["kept_fraction"] < 0.25 and rec["blocks_freed"] >= 1 and rec["bytes_freed"] > 0
    assert body["kv_transfer_params"] is None  # our transport field is cleaned up
    assert body["choices"][0]["text"]


def test_streaming_completion_has_the_record_on_the_final_chunk(server, prompt):
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "stream": True})
    chunks = sse(r.text)
    assert r.status_code == 200 and chunks
    assert "kv_eviction" not in chunks[0]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["kv_eviction"]["compacted"]


def test_chat_with_per_request_overrides(server, prompt):
    body = {"messages": [{"role": "user", "content": prompt + "\nWhat is this text about?"}], "max_tokens": 6,
            "vllm_xargs": {"kv_eviction": "snapkv", "kv_budget": 0.5, "kv_protect_suffix": 12}}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200
    rec = r.json()["kv_eviction"]
    assert rec["compacted"] and rec["method"] == "snapkv" and rec["budget"] == 0.5
    ctx = rec["prompt_tokens"] - 12
    assert rec["tokens_kept"] == int(0.5 * ctx) + 12
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    final = [c for c in sse(r.text) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert final and final[0]["kv_eviction"]["method"] == "snapkv"


def test_request_can_switch_eviction_off(server, prompt):
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "vllm_xargs": {"kv_eviction": "none"}})
    rec = r.json()["kv_eviction"]
    assert rec["skipped"] == "disabled" and not rec["compacted"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("xargs, field", [
    ({"kv_budget": 1.5}, "kv_budget"), ({"kv_budget": "lots"}, "kv_budget"), ({"kv_eviction": "bogus"}, "kv_eviction"),
    ({"kv_budget_tokens": 0}, "kv_budget_tokens"), ({"kv_protect_suffix": -4}, "kv_protect_suffix"),
    ({"kv_budgt": 0.2}, "kv_budgt"),
])
def test_bad_per_request_values_are_http_400_naming_the_field(server, xargs, field, stream):
    r = post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "stream": stream,
                                         "vllm_xargs": xargs})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(field)


def test_protected_suffix_longer_than_the_prompt_is_400(server):
    r = post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2,
                                         "vllm_xargs": {"kv_protect_suffix": 500}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_protect_suffix"
    assert post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2}).status_code == 200


def test_concurrent_burst_completes_and_frees_everything(server, prompt):
    words = prompt.split()
    overrides = [{}, {"kv_budget": 0.1}, {"kv_budget": 0.35}, {"kv_eviction": "none"}, {"kv_eviction": "snapkv"},
                 {"kv_eviction": "streamingllm"}, {"kv_budget_tokens": 48}, {"kv_protect_suffix": 10}]

    async def one(client, i):
        text = " ".join(words[(7 * i) % 50 :][: 120 + 11 * (i % 13)])
        body = {"model": MODEL, "prompt": text, "max_tokens": 4 + i % 3, "temperature": 0, "ignore_eos": True,
                "vllm_xargs": overrides[i % len(overrides)], "stream": i % 4 == 0}
        r = await client.post(f"{server}/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        if body["stream"]:
            chunks = sse(r.text)
            tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"] != "")
            rec = next(c["kv_eviction"] for c in chunks if "kv_eviction" in c)
            return tokens, rec, body
        data = r.json()
        return data["usage"]["completion_tokens"], data["kv_eviction"], body

    async def burst():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(burst())
    assert len(results) == 32
    for tokens, rec, body in results:
        if not body["stream"]:
            assert tokens == body["max_tokens"]
        assert rec["compacted"] == (body["vllm_xargs"].get("kv_eviction") != "none"), rec
    metrics = httpx.get(f"{server}/metrics", timeout=30).text

    def gauge(name):
        return [float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", metrics, re.M)]

    assert gauge("vllm:num_requests_running") == [0.0]
    assert gauge("vllm:kv_cache_usage_perc") == [0.0]  # every block back in the pool
