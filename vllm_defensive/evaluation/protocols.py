"""Methods, budgets and the two evaluation protocols, as per-request overrides (`vllm_xargs`).

* query_aware (the serving default): the whole prompt is context; the question, at the end of
  the prompt, sits inside the observation window, so the scorer sees it.
* query_agnostic (the paper's protocol): the question part (everything after the context) is
  protected with `kv_protect_suffix` = its token count: it is never evicted and never used as
  observation window, so the cache is compressed without knowing the question.

Method `none` (full cache) ignores the budget and the protocol; its results are shared by both
protocols (`FULL_CACHE`).
"""

from __future__ import annotations

import math

# Mirrors vllm_defensive.policy.config (not imported: it pulls in torch). A test keeps them equal.
METHOD_NAMES: tuple[str, ...] = (
    "none", "streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "defensivekv", "layer_defensivekv",
)
ALIASES = {"defensive": "defensivekv", "layer_defensive": "layer_defensivekv", "critical": "criticalkv",
           "snap": "snapkv", "streaming": "streamingllm", "off": "none", "full": "none"}
PROTOCOLS: tuple[str, ...] = ("query_aware", "query_agnostic")
FULL_CACHE = "none"
FULL_BUDGET = 1.0


def canonical_method(name: str) -> str:
    m = ALIASES.get(name.strip().lower(), name.strip().lower())
    if m not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return m


def parse_methods(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [t for t in text.replace(" ", ",").split(",") if t]
    out: list[str] = []
    for item in items:
        names = list(METHOD_NAMES) if item == "all" else [canonical_method(item)]
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("no methods given")
    return out


def parse_budgets(text: str | list) -> list[float]:
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", ",").split(",") if t]
    out: list[float] = []
    for item in items:
        try:
            b = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"budget {item!r} is not a number") from None
        if not math.isfinite(b) or not 0.0 < b <= 1.0:
            raise ValueError(f"budget {item!r} must be a fraction of the context kept, 0 < budget <= 1")
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("no budgets given")
    return sorted(out)


def parse_protocols(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [t for t in text.replace(" ", ",").split(",") if t]
    aliases = {"aware": "query_aware", "agnostic": "query_agnostic", "both": "both"}
    out: list[str] = []
    for item in items:
        p = aliases.get(item.strip().lower(), item.strip().lower().replace("-", "_"))
        names = list(PROTOCOLS) if p == "both" else [p]
        for n in names:
            if n not in PROTOCOLS:
                raise ValueError(f"unknown protocol {item!r}; choose from {', '.join(PROTOCOLS)} (or both)")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no protocols given")
    return out


def is_full_cache(method: str, budget: float) -> bool:
    return method == FULL_CACHE or budget >= FULL_BUDGET


def request_overrides(method: str, budget: float, protocol: str, question_tokens: int) -> dict:
    """The `vllm_xargs` of one request."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    if method == FULL_CACHE:
        return {"kv_eviction": "none"}
    protect = question_tokens if protocol == "query_agnostic" else 0
    if protocol == "query_agnostic" and protect <= 0:
        raise ValueError("query_agnostic needs the question's token count (> 0)")
    return {"kv_eviction": method, "kv_budget": float(budget), "kv_protect_suffix": int(protect)}
