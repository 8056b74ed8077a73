"""The `vllm-defensive` command. Each subcommand lives in its own module and registers itself here.

    vllm-defensive eval ...      RULER quality of KV eviction through a served endpoint

To add a subcommand, write `add_parser(subparsers)` in its module (setting `func` to a callable
that takes the parsed namespace and returns an exit code) and list the module in SUBCOMMANDS.
Subcommand modules keep their heavy imports inside the functions they run, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import vllm_defensive

# module path -> subcommand name; each module defines add_parser(subparsers)
SUBCOMMANDS = {
    "vllm_defensive.evaluation.cli": "eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-defensive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"vllm-defensive {vllm_defensive.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
