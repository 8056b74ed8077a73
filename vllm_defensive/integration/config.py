"""Server-wide eviction settings and their per-request overrides.

Server settings live in `VllmConfig.additional_config["kv_eviction"]` (the CLI flags write them
there; the offline `LLM(additional_config=...)` API sets them directly), which every vLLM process
receives. Per-request overrides come from `SamplingParams.extra_args` (`vllm_xargs` in the OpenAI
API). Both are validated into the policy library's `EvictionConfig`; errors name the field the
user typed (`--kv-budget`, `kv_budget`, ...).

No vLLM import here: the front end, the engine core and the tests share this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..policy import EvictionConfig

ADDITIONAL_CONFIG_KEY = "kv_eviction"

# Per-request keys accepted in vllm_xargs / SamplingParams.extra_args -> EvictionConfig field.
REQUEST_KEYS = {
    "kv_eviction": "method",
    "kv_budget": "budget",
    "kv_budget_tokens": "budget_tokens",
    "kv_protect_suffix": "protect_suffix",
    "kv_uniform_floor": "uniform_floor",
    "kv_uniform_norm": "uniform_norm",
    "kv_uniform_risk_first": "uniform_risk_first",
}
# The JSON type each request field must have (numbers otherwise): "0.2" or true would be coerced.
REQUEST_TYPES = {"method": (str, "a method name"), "uniform_floor": (bool, "true or false"),
                 "uniform_norm": (str, '"share" or "raw"')}
# CLI flag (argparse dest) -> EvictionConfig field.
CLI_FLAGS = {
    "kv_eviction": "method",
    "kv_budget": "budget",
    "kv_budget_tokens": "budget_tokens",
    "kv_window": "window",
    "kv_sink": "sink_tokens",
    "kv_min_prompt": "min_prompt",
}
CLI_METHODS = ("none", "streamingllm", "snapkv", "pyramidkv", "adakv", "criticalkv", "defensivekv",
               "layer_defensivekv", "defensive", "snap", "critical", "streaming", "off")


class ServerConfig(BaseModel):
    """What `additional_config["kv_eviction"]` may hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "defensivekv"
    budget: float | None = None
    budget_tokens: int | None = None
    window: int = 32
    pool_kernel: int = 5
    sink_tokens: int | None = None
    min_prompt: int = 0
    protect_suffix: int = 0
    # Test/debug only: run the compaction path even when the budget keeps every token, and
    # keep the selected indices in-process (integration.debug) for comparison with references.
    force_compaction: bool = False
    record_keep_sets: bool = False
    # Extra EvictionConfig fields passed through unchanged (mass_threshold, probs_fp32, ...); they
    # may also be given next to the fields above ({"uniform_norm": "share"}), which moves them here.
    policy: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _policy_fields_at_top_level(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        extra = {k: v for k, v in data.items() if k not in cls.model_fields and k in EvictionConfig.model_fields}
        if not extra:
            return data
        rest = {k: v for k, v in data.items() if k not in extra}
        policy = rest.get("policy") or {}
        if not isinstance(policy, dict):
            return data  # let the field's own validation report it
        clash = sorted(set(extra) & set(policy))
        if clash:
            raise ValueError(f"{clash[0]} given twice (top level and policy)")
        return {**rest, "policy": {**policy, **extra}}

    def defaults(self) -> EvictionConfig:
        fields = dict(method=self.method, budget=self.budget, budget_tokens=self.budget_tokens,
                      window=self.window, pool_kernel=self.pool_kernel, sink_tokens=self.sink_tokens,
                      min_prompt=self.min_prompt, protect_suffix=self.protect_suffix, **self.policy)
        return EvictionConfig(**fields)


def _first_error(err: ValidationError) -> tuple[str, str]:
    e = err.errors()[0]
    loc = str(e["loc"][0]) if e.get("loc") else ""
    msg = e.get("msg", str(err))
    return loc, msg.removeprefix("Value error, ")


def enabled(additional_config: Any) -> bool:
    """Cheap test (no validation): is the plugin switched on in this config?"""
    return isinstance(additional_config, dict) and additional_config.get(ADDITIONAL_CONFIG_KEY) is not None


def server_config(additional_config: Any) -> ServerConfig | None:
    """The server's eviction settings, or None when the plugin is not switched on."""
    if not isinstance(additional_config, dict):
        return None
    raw = additional_config.get(ADDITIONAL_CONFIG_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f'additional_config["{ADDITIONAL_CONFIG_KEY}"] must be a dict, got {type(raw).__name__}')
    try:
        cfg = ServerConfig(**raw)
        cfg.defaults()
    except ValidationError as e:
        loc, msg = _first_error(e)
        flag = next((f"--{k.replace('_', '-')}" for k, v in CLI_FLAGS.items() if v == loc), loc)
        raise ValueError(f"{flag}: {msg}") from None
    return cfg


def request_overrides(extra_args: dict | None) -> dict[str, Any]:
    """The kv_* entries of a request's extra_args (unknown kv_* keys are errors)."""
    if not extra_args:
        return {}
    out = {}
    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.startswith("kv_") or key == "kv_transfer_params":
            continue
        if key not in REQUEST_KEYS:
            raise ValueError(f"{key}: unknown per-request eviction field; "
                             f"use one of {', '.join(REQUEST_KEYS)}")
        out[key] = value
    return out


def resolve(server: ServerConfig, extra_args: dict | None) -> EvictionConfig:
    """The request's effective config. ValueError messages start with the request field name."""
    overrides = request_overrides(extra_args)
    base = server.defaults()
    if not overrides:
        return base
    fields = base.model_dump()
    for key, value in overrides.items():
        name = REQUEST_KEYS[key]
        want, what = REQUEST_TYPES.get(name, ((int, float), "a number"))
        if want is bool and not isinstance(value, bool) and value in (0, 1) and isinstance(value, int):
            value = bool(value)  # the OpenAI server's vllm_xargs schema turns JSON true into 1
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ValueError(f"{key}: expected {what}, got {value!r}")
        fields[name] = value
    if "kv_budget" in overrides and "kv_budget_tokens" not in overrides:
        fields["budget_tokens"] = None
    if "kv_budget_tokens" in overrides and "kv_budget" not in overrides:
        fields["budget"] = None
    try:
        return EvictionConfig(**fields)
    except ValidationError as e:
        loc, msg = _first_error(e)
        key = next((k for k, v in REQUEST_KEYS.items() if v == loc and k in overrides),
                   next(iter(overrides)))
        raise ValueError(f"{key}: {msg}") from None


def check_prompt_fields(cfg: EvictionConfig, prompt_len: int, extra_args: dict | None) -> None:
    """Request-level errors that need the prompt length (the protected suffix must fit)."""
    if cfg.method != "none" and cfg.protect_suffix >= prompt_len:
        key = "kv_protect_suffix" if "kv_protect_suffix" in (extra_args or {}) else "protect_suffix"
        raise ValueError(f"{key}: {cfg.protect_suffix} protected tokens leave nothing to evict in a "
                         f"{prompt_len}-token prompt")
