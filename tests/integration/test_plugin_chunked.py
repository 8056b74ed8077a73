"""One in-process engine with chunked prefill (96 tokens a step) and a tiny KV cache (39 usable
blocks of 32 tokens): issue test 5, and test 3's abort mid-prefill and preemption."""

from __future__ import annotations

import pytest
import torch

from vllm_defensive.integration import debug
from vllm_defensive.policy import EvictionConfig

from kvd_helpers import block_pool, essay_ids, make_llm, owned_blocks, params, run_until_done

pytestmark = pytest.mark.slow

CHUNK = 96


@pytest.fixture(scope="module")
def llm():
    engine = make_llm({"method": "defensive", "budget": 0.2, "record_keep_sets": True},
                      max_model_len=1024, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
                      enable_prefix_caching=True, num_gpu_blocks_override=40, max_num_seqs=8)
    yield engine
    debug.clear()


def run_one(llm, request_id, prompt, sp):
    llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, sp)
    return run_until_done(llm)[request_id]


@pytest.mark.parametrize("suffix", [0, 20])
def test_chunked_prefill_selects_the_one_shot_keep_sets(llm, tok, reference_model, pool_start, suffix):
    """The 32-token window straddles a chunk boundary (576 = 6 x 96); its queries come from two
    steps. The selection must equal a one-shot prefill's (the HF reference computes one-shot)."""
    from vllm_defensive.reference import decode, keep_sets_from, prefill

    p = essay_ids(tok, 600 + suffix, 20000)
    assert llm.reset_prefix_cache()
    sp = params(8, kv_protect_suffix=suffix) if suffix else params(8)
    out = run_one(llm, f"chunked-{suffix}", p, sp)
    assert out.kv_eviction["compacted"]
    keep = debug.find(out.request_id)
    pre = prefill(reference_model, p, len(p) - suffix, 32)  # one-shot, full attention
    ref = keep_sets_from(pre, EvictionConfig(budget=0.2, protect_suffix=suffix))
    same = sum(bool(torch.equal(a, b)) for a, b in zip(keep, ref))
    assert same == len(ref), f"{same}/{len(ref)} layers equal"
    assert list(out.outputs[0].token_ids) == decode(reference_model, pre, 8, keep=keep)
    assert block_pool(llm).get_num_free_blocks() == pool_start


def test_abort_mid_prefill_returns_every_block(llm, tok, pool_start):
    engine = llm.llm_engine
    rid = engine.add_request("abort-mid", {"prompt_token_ids": essay_ids(tok, 600, 50000)}, params(8))
    engine.step()
    engine.step()
    sched = engine.engine_core.engine_core.scheduler
    assert 0 < sched.requests[rid].num_computed_tokens < 600
    assert owned_blocks(llm, rid) > 0
    engine.abort_request([rid], internal=True)
    run_until_done(llm)
    assert block_pool(llm).get_num_free_blocks() == pool_start
    assert rid not in sched._kvd.states


def test_preempted_compacted_request_recomputes_to_the_same_tokens(llm, tok, pool_start):
    """Plain requests admitted first fill most of the 39-block cache; the compacted request comes
    last, so when the others' decoding needs blocks it is the one preempted (FCFS preempts the
    newest). It is recomputed: prompt re-prefilled and compacted again, its earlier outputs
    recomputed against the compacted cache, and its tokens equal those of the same request run
    alone, uninterrupted."""
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    victim = essay_ids(tok, 120, 7000)
    assert llm.reset_prefix_cache()
    alone = run_one(llm, "victim-alone", victim, params(40))
    assert llm.reset_prefix_cache()
    fillers = [(400, 40)] + [(100, 48)] * 5
    for i, (n, m) in enumerate(fillers):
        engine.add_request(f"filler-{i}", {"prompt_token_ids": essay_ids(tok, n, 30000 + 4000 * i)},
                           params(m, kv_eviction="none"))
    rid = engine.add_request("victim", {"prompt_token_ids": victim}, params(40))
    history, outs = [], {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
        state = sched._kvd.states.get(rid)
        if rid in sched.requests and state is not None:
            now = (sched.requests[rid].num_preemptions, state.status)
            if not history or history[-1] != now:
                history.append(now)
    # compacted, preempted (back to pending), compacted again
    assert (0, "compacted") in history and (1, "pending") in history and (1, "compacted") in history, history
    got = outs["victim"]
    assert got.kv_eviction["compacted"]
    assert list(got.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    assert block_pool(llm).get_num_free_blocks() == pool_start
