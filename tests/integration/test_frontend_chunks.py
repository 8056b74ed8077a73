"""The streaming tagger: kv_eviction lands on the chunk that finishes a choice, and only there."""

import json

RECORD = {0: {"method": "defensivekv", "compacted": True, "skip_reason": None}}


def _tag_chunk(chunk_text, records, per_prompt):
    # imported here, not at module level: vLLM imports Triton, which must not be imported before
    # tests/kernels/conftest.py sets TRITON_INTERPRET (the kernel tests would all skip)
    from vllm_defensive.integration.frontend import _tag_chunk as tag

    return tag(chunk_text, records, per_prompt)


def chunk(text: str, finish, index: int = 0) -> str:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}], "usage": None}
    return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"


def test_only_the_finishing_chunk_gets_the_record():
    mid, last = chunk(" the", None), chunk(".", "length")
    assert _tag_chunk(mid, RECORD, 1) is mid  # per-token chunks pass through untouched
    tagged = json.loads(_tag_chunk(last, RECORD, 1)[len("data: "):])
    assert tagged["kv_eviction"]["compacted"] and tagged["choices"][0]["finish_reason"] == "length"


def test_text_that_quotes_a_finish_reason_is_not_a_finish():
    tricky = chunk('"finish_reason":"stop"', None)  # escaped inside the JSON string
    assert _tag_chunk(tricky, RECORD, 1) is tricky


def test_choices_map_to_their_prompt_and_the_sentinel_passes():
    records = {0: {"compacted": True}, 1: {"compacted": False, "skip_reason": "prompt_too_short"}}
    second_prompt = json.loads(_tag_chunk(chunk("x", "stop", index=2), records, 2)[len("data: "):])
    assert second_prompt["kv_eviction"] == {"skipped": "prompt_too_short", **records[1]}
    assert _tag_chunk("data: [DONE]\n\n", records, 2) == "data: [DONE]\n\n"
    assert _tag_chunk(chunk("x", "stop"), {}, 1) == chunk("x", "stop")  # nothing recorded yet
