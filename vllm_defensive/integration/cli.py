"""`vllm serve` flags: an argument group (`vllm serve --help=KVEviction`) that lands in
`additional_config["kv_eviction"]`, which every vLLM process receives.

vLLM loads general plugins before it builds the serve parser (`AsyncEngineArgs.add_cli_args`
calls `load_general_plugins()` first), so wrapping `EngineArgs.add_cli_args` adds our group to
`vllm serve --help`; wrapping `EngineArgs.from_cli_args` moves the parsed values into the config.
"""

from __future__ import annotations

import argparse
import math

from . import compat
from .config import ADDITIONAL_CONFIG_KEY, CLI_FLAGS, CLI_METHODS, server_config

# vLLM lists groups as "Title  description" and finds them with --help=<title>: one word.
GROUP = "KVEviction"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction with 0 < F <= 1, got {text}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def add_arguments(parser) -> None:
    if any(getattr(a, "dest", None) == "kv_eviction" for a in parser._actions):
        return
    group = parser.add_argument_group(
        GROUP,
        "KV eviction (vllm-defensive): after prefill, keep the budget of each request's KV cache "
        "and free the rest. Per request (vllm_xargs): kv_eviction, kv_budget, kv_budget_tokens, "
        "kv_protect_suffix.")
    group.add_argument("--kv-eviction", type=str.lower, choices=CLI_METHODS, default=None,
                       help="Eviction method for every request (none: off unless a request asks). "
                            "Default: the plugin stays off.")
    group.add_argument("--kv-budget", type=_fraction, default=None,
                       help="Fraction of the prompt (context) kept per KV head, 0 < F <= 1 (default 0.2).")
    group.add_argument("--kv-budget-tokens", type=_int_at_least(1), default=None,
                       help="Absolute number of context tokens kept per KV head (instead of --kv-budget).")
    group.add_argument("--kv-window", type=_int_at_least(1), default=None,
                       help="Observation window: the last N context tokens whose queries score the rest "
                            "(always kept; default 32).")
    group.add_argument("--kv-sink", type=_int_at_least(0), default=None,
                       help="Leading tokens always kept (default: 4 for streamingllm, else 0).")
    group.add_argument("--kv-min-prompt", type=_int_at_least(0), default=None,
                       help="Prompts shorter than this are left alone (default 0).")


def config_from_args(args: argparse.Namespace) -> dict | None:
    given = {dest: getattr(args, dest) for dest in CLI_FLAGS if getattr(args, dest, None) is not None}
    if not given:
        return None
    if "kv_eviction" not in given:
        flags = ", ".join(f"--{d.replace('_', '-')}" for d in given)
        raise ValueError(f"{flags} given without --kv-eviction: add --kv-eviction METHOD "
                         "(e.g. --kv-eviction defensive)")
    if "kv_budget" in given and "kv_budget_tokens" in given:
        raise ValueError("--kv-budget and --kv-budget-tokens are exclusive: give one")
    return {CLI_FLAGS[dest]: value for dest, value in given.items()}


def install() -> None:
    EngineArgs = compat.ENGINE_ARGS.resolve()

    def add_cli_args(orig):
        fn = orig.__func__ if isinstance(orig, staticmethod) else orig

        def add(parser, *args, **kwargs):
            parser = fn(parser, *args, **kwargs)
            add_arguments(parser)
            return parser

        return staticmethod(add)

    def from_cli_args(orig):
        fn = orig.__func__ if isinstance(orig, classmethod) else orig

        def from_args(cls, args):
            engine_args = fn(cls, args)
            ours = config_from_args(args)
            if ours is not None:
                extra = dict(engine_args.additional_config or {})
                merged = {**extra.get(ADDITIONAL_CONFIG_KEY, {}), **ours}
                extra[ADDITIONAL_CONFIG_KEY] = merged
                server_config(extra)  # fail now, with the flag's name
                engine_args.additional_config = extra
                # With --api-server-count > 1 the API-server processes re-read this same `args`
                # object before plugins load in them; carrying the settings in
                # args.additional_config lets vLLM's own --additional-config handling deliver them.
                if hasattr(args, "additional_config"):
                    args.additional_config = extra
            return engine_args

        return classmethod(from_args)

    compat.patch(EngineArgs, "add_cli_args", add_cli_args)
    compat.patch(EngineArgs, "from_cli_args", from_cli_args)
