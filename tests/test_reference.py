"""The HF reference path on a real model (SmolLM2-135M-Instruct)."""

import pytest
import torch

from vllm_defensive.models import ensure_model
from vllm_defensive.policy import EvictionConfig
from vllm_defensive.reference import greedy, keep_sets, load_model


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model(ensure_model("smollm2"))


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    text = ("Paris is the capital of France. The Seine flows through it. " * 12
            + "The secret code is 4417. " + "Bread and cheese are popular. " * 10
            + "Question: what is the secret code? Answer: The secret code is")
    return tok(text)["input_ids"]


def test_reference_attention_matches_hf_generate(smollm2, prompt):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    plain = AutoModelForCausalLM.from_pretrained(ensure_model("smollm2"), dtype=torch.float32)
    want = plain.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert greedy(model, prompt, 8) == want


@pytest.mark.parametrize("method", ["defensivekv", "snapkv", "streamingllm"])
def test_budget_one_is_exactly_full_cache(smollm2, prompt, method):
    model, _ = smollm2
    keep = keep_sets(model, prompt, EvictionConfig(method=method, budget=1.0))
    assert all(bool(k.all()) for k in keep)
    assert greedy(model, prompt, 8, keep) == greedy(model, prompt, 8)


def test_keep_sets_shape_budget_and_protected_suffix(smollm2, prompt):
    model, _ = smollm2
    cfg = EvictionConfig(method="defensivekv", budget=0.2, protect_suffix=10)
    keep = keep_sets(model, prompt, cfg)
    n = len(prompt)
    ctx = n - 10
    assert len(keep) == model.config.num_hidden_layers
    for k in keep:
        assert k.shape == (model.config.num_key_value_heads, n)
        assert bool(k[:, ctx:].all())  # protected suffix
        assert bool(k[:, ctx - 32 : ctx].all())  # observation window
        assert (k[:, :ctx].sum(-1) == cfg.keep_per_head(ctx)).all()


def test_eviction_changes_what_decode_sees(smollm2, prompt):
    """A keep set that hides almost everything must change the continuation (the mask is live)."""
    model, _ = smollm2
    keep = keep_sets(model, prompt, EvictionConfig(method="streamingllm", budget_tokens=36))
    full = greedy(model, prompt, 8)
    assert greedy(model, prompt, 8, keep) != full
