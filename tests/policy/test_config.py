"""Configuration validation: precise errors that name the field."""

import math

import pytest
from pydantic import ValidationError

from vllm_defensive.policy import EvictionConfig


@pytest.mark.parametrize("bad", [0, -1, 1.5, math.nan, math.inf])
def test_bad_budgets_name_the_field(bad):
    with pytest.raises(ValidationError) as e:
        EvictionConfig(budget=bad)
    assert "budget" in str(e.value)


def test_unknown_method_names_the_field_and_the_choices():
    with pytest.raises(ValidationError) as e:
        EvictionConfig(method="h2o")
    msg = str(e.value)
    assert "method" in msg and "defensivekv" in msg


def test_aliases_and_defaults():
    c = EvictionConfig(method="defensive")
    assert c.method == "defensivekv" and c.budget == 0.2 and c.window == 32 and c.pool_kernel == 5
    assert EvictionConfig(method="streamingllm").sinks == 4
    assert EvictionConfig(method="adakv").alpha == 0.2 and EvictionConfig().alpha == 0.0


def test_window_longer_than_the_prompt_names_the_field():
    with pytest.raises(ValueError, match="window"):
        EvictionConfig(window=64).check_prompt(50)
    with pytest.raises(ValueError, match="protect_suffix"):
        EvictionConfig(protect_suffix=50).check_prompt(50)
    with pytest.raises(ValueError, match="window .* after protect_suffix"):
        EvictionConfig(window=32, protect_suffix=20).check_prompt(50)
    EvictionConfig(window=32).check_prompt(33)


@pytest.mark.parametrize("field,value", [("pool_kernel", 4), ("window", 0), ("budget_tokens", 0),
                                         ("mass_threshold", 0), ("head_alpha", 1.5), ("sink_tokens", -1)])
def test_other_bad_fields_name_themselves(field, value):
    with pytest.raises(ValidationError) as e:
        EvictionConfig(**{field: value})
    assert field in str(e.value)


def test_unknown_fields_and_double_budgets_are_rejected():
    with pytest.raises(ValidationError, match="budgett"):
        EvictionConfig(budgett=0.2)
    with pytest.raises(ValidationError, match="budget_tokens"):
        EvictionConfig(budget=0.2, budget_tokens=10)


def test_keep_per_head():
    c = EvictionConfig(budget=0.2, window=32)
    assert c.keep_per_head(1000) == 200
    assert c.keep_per_head(100) == 32  # raised to the protected window
    assert EvictionConfig(budget=1.0).keep_per_head(77) == 77
    assert EvictionConfig(method="none").keep_per_head(77) == 77
    assert EvictionConfig(budget_tokens=5000).keep_per_head(300) == 300
