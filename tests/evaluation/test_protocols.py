"""Methods, budgets and protocols -> per-request overrides."""

from __future__ import annotations

import pytest

from vllm_defensive.evaluation import protocols


def test_method_names_match_the_policy_library():
    from vllm_defensive.policy.config import ALIASES, METHOD_NAMES

    assert protocols.METHOD_NAMES == METHOD_NAMES
    for alias, name in ALIASES.items():
        assert protocols.canonical_method(alias) == name


def test_overrides_per_protocol():
    assert protocols.request_overrides("none", 1.0, "query_agnostic", 40) == {"kv_eviction": "none"}
    assert protocols.request_overrides("snapkv", 0.2, "query_aware", 40) == {
        "kv_eviction": "snapkv", "kv_budget": 0.2, "kv_protect_suffix": 0}
    assert protocols.request_overrides("defensivekv", 0.1, "query_agnostic", 40) == {
        "kv_eviction": "defensivekv", "kv_budget": 0.1, "kv_protect_suffix": 40}
    with pytest.raises(ValueError, match="question's token count"):
        protocols.request_overrides("snapkv", 0.2, "query_agnostic", 0)
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.request_overrides("snapkv", 0.2, "sideways", 3)


def test_parsers():
    assert protocols.parse_methods("none,defensive,snap,snapkv") == ["none", "defensivekv", "snapkv"]
    assert protocols.parse_methods("all") == list(protocols.METHOD_NAMES)
    assert protocols.parse_budgets("0.4,0.1,0.2,0.1") == [0.1, 0.2, 0.4]
    assert protocols.parse_protocols("both") == ["query_aware", "query_agnostic"]
    assert protocols.parse_protocols("query-agnostic") == ["query_agnostic"]
    for bad in ("0", "-0.1", "1.01", "nan", "inf"):
        with pytest.raises(ValueError, match="0 < budget <= 1"):
            protocols.parse_budgets(bad)
    assert protocols.is_full_cache("none", 0.2) and protocols.is_full_cache("snapkv", 1.0)
    assert not protocols.is_full_cache("snapkv", 0.4)
