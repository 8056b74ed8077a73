"""Async client for any OpenAI-compatible `/v1/completions` endpoint (httpx).

Per-request KV-eviction settings travel in the body as `"vllm_xargs": {...}` (vLLM's field for
extension arguments). Transient failures (connection errors, 408/429/5xx) are retried with
backoff; other 4xx answers are raised at once with the server's message.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request; the message holds the server's answer."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    latency_s: float
    kv_eviction: dict | None = None  # the plugin's per-request eviction record, when the server sends one
    raw_keys: list[str] = field(default_factory=list)


def normalize_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {url!r} must start with http:// or https://")
    for suffix in ("/completions", "/chat/completions"):
        if url.endswith("/v1" + suffix):
            url = url[: -len(suffix)]
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def _find_eviction_record(body: dict) -> dict | None:
    """The plugin's `kv_eviction` field: top level, in the choice, or in usage."""
    for holder in (body, (body.get("choices") or [{}])[0], body.get("usage") or {}):
        rec = holder.get("kv_eviction") if isinstance(holder, dict) else None
        if isinstance(rec, dict):
            return rec
    return None


class CompletionClient:
    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 4, max_connections: int = 64,
                 transport: httpx.AsyncBaseTransport | None = None, retry_delay: float = 1.0):
        self.base_url = normalize_base_url(endpoint)
        self.model = model
        self.retries = retries
        self.retry_delay = retry_delay
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(30.0, timeout)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> "CompletionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                r = await self._http.request(method, path, **kw)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                err = EndpointError(f"{method} {self.base_url}{path}: {type(e).__name__}: {e}", retryable=True)
            else:
                if r.status_code < 400:
                    return r
                retryable = r.status_code in (408, 429) or r.status_code >= 500
                err = EndpointError(f"{method} {self.base_url}{path} -> HTTP {r.status_code}: {_error_text(r)}",
                                    status=r.status_code, retryable=retryable)
            if not err.retryable or attempt == self.retries:
                raise err
            await asyncio.sleep(delay * (1 + random.random() * 0.25))
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    async def served_models(self) -> list[str]:
        r = await self._request("GET", "/models")
        try:
            return [m["id"] for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EndpointError(f"{self.base_url}/models did not answer an OpenAI model list: {r.text[:300]}") from None

    async def resolve_model(self) -> str:
        """Check that the endpoint serves `model` (or pick its only model)."""
        models = await self.served_models()
        if self.model is None:
            if len(models) != 1:
                raise EndpointError(f"the endpoint serves {models or 'no models'}; name one with --model")
            self.model = models[0]
        elif self.model not in models:
            raise EndpointError(f"the endpoint does not serve model {self.model!r}; it serves {models}")
        return self.model

    async def server_version(self) -> str | None:
        root = self.base_url[: -len("/v1")]
        try:
            r = await self._http.get(root + "/version", timeout=10.0)
            if r.status_code == 200:
                return r.json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        return None

    async def complete(self, prompt: str, max_tokens: int, xargs: dict | None = None,
                       temperature: float = 0.0, extra: dict | None = None) -> Completion:
        if self.model is None:
            raise EndpointError("no model chosen: call resolve_model() first or pass model=")
        body = {"model": self.model, "prompt": prompt, "max_tokens": int(max_tokens),
                "temperature": temperature, **(extra or {})}
        if xargs:
            body["vllm_xargs"] = xargs
        t0 = time.perf_counter()
        r = await self._request("POST", "/completions", json=body)
        dt = time.perf_counter() - t0
        try:
            data = r.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"malformed completion response: {r.text[:300]}") from None
        return Completion(text=choice.get("text") or "", prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"), finish_reason=choice.get("finish_reason"),
                          latency_s=dt, kv_eviction=_find_eviction_record(data), raw_keys=sorted(data))


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(body)[:500]
