"""Formulas of the scoring module on small hand-computed cases."""

import math

import pytest
import torch

from vllm_defensive.policy.scoring import (
    avg_pool,
    mass_prefix_counts,
    pool_mass_preserving,
    top_rank_mask,
    value_norm_share,
    value_norms,
    window_attention_probs,
    window_stats,
)


def test_softmax_over_all_keys_with_causal_window():
    # d=1, keys all zero: every visible key gets the same logit.
    q = torch.ones(1, 2, 1)
    k = torch.zeros(1, 3, 1)
    p = window_attention_probs(q, k)[0, 0]  # [W=2, L=3]
    # row 0 sits at position 1: sees keys 0,1; row 1 at position 2 sees all three
    assert torch.allclose(p, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_softmax_uses_scale_and_gqa_mapping():
    # 2 query heads share 1 KV head; head 1's query is larger -> sharper distribution
    k = torch.tensor([[[0.0], [1.0]]])  # [1, L=2, 1]
    q = torch.tensor([[[1.0]], [[2.0]]])  # [Hq=2, W=1, 1]
    p = window_attention_probs(q, k, scale=1.0)[0]  # [G=2, 1, 2]
    e = math.exp(1.0)
    assert torch.allclose(p[0, 0], torch.tensor([1 / (1 + e), e / (1 + e)]))
    e2 = math.exp(2.0)
    assert torch.allclose(p[1, 0], torch.tensor([1 / (1 + e2), e2 / (1 + e2)]))


def test_probs_dtype_rounds_like_the_model_dtype():
    q, k = torch.randn(2, 4, 8), torch.randn(1, 10, 8)
    p = window_attention_probs(q, k, probs_dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16
    assert torch.allclose(p.float(), window_attention_probs(q, k), atol=4e-3)


def test_avg_pool_counts_zero_padding():
    x = torch.tensor([3.0, 0.0, 0.0, 0.0, 6.0])
    assert torch.allclose(avg_pool(x, 3), torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0]))
    assert torch.equal(avg_pool(x, 1), x)


def test_mass_preserving_pool_keeps_row_mass_and_closed_form():
    a = torch.tensor([0.1, 0.2, 0.05, 0.15, 0.3, 0.1])
    pooled = avg_pool(a, 5)
    m = a.sum()
    # closed form of algorithm.md §3.4: sum(pooled) = m - (2a0 + a1 + a_{P-2} + 2a_{P-1}) / 5
    assert torch.isclose(pooled.sum(), m - (2 * a[0] + a[1] + a[-2] + 2 * a[-1]) / 5)
    kept = pool_mass_preserving(a, 5)
    assert torch.isclose(kept.sum(), m)
    assert torch.allclose(kept, pooled / pooled.sum() * m)


def test_value_norms_hand_case():
    v = torch.tensor([[[2.0]]])  # Hkv=1, N=1, d=1
    wo = torch.tensor([[1.0, -3.0], [2.0, 4.0]])  # D=2, Hq*d=2
    # head 0 uses column 0: |2*1| + |2*2| = 6; head 1 column 1: |2*-3| + |2*4| = 14; mean 10
    assert torch.allclose(value_norms(v, wo), torch.tensor([[10.0]]))


def test_value_norms_chunking_is_invisible():
    v, wo = torch.randn(2, 37, 8), torch.randn(12, 4 * 8)
    assert torch.allclose(value_norms(v, wo, chunk=5), value_norms(v, wo, chunk=4096), rtol=1e-5)


def test_value_norm_share_sums_to_one_per_token():
    share = value_norm_share(torch.tensor([[1.0, 3.0], [3.0, 1.0]]))
    assert torch.allclose(share, torch.tensor([[0.25, 0.75], [0.75, 0.25]]))
    assert torch.allclose(value_norm_share(torch.rand(1, 5) + 0.1), torch.ones(1, 5))  # MQA: constant


def test_stage1_counts_exclude_the_crossing_token_and_respect_the_cap():
    mean = torch.tensor([[0.2, 0.5, 0.3]])  # shares 0.5, 0.3, 0.2 sorted
    assert mass_prefix_counts(mean, 0.9, cap=10).tolist() == [2]  # 0.5, 0.8 < 0.9; 1.0 crosses
    assert mass_prefix_counts(mean, 0.9, cap=1).tolist() == [1]
    assert mass_prefix_counts(mean, 0.9, cap=-4).tolist() == [0]  # negative cap clamps at 0


def test_top_rank_mask_breaks_ties_toward_lower_index():
    s = torch.tensor([[1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    m = top_rank_mask(s, torch.tensor([2, 3]))
    assert m.tolist() == [[False, True, True, False], [True, True, True, False]]


def test_window_bias_faithful_and_fixed():
    q, k = torch.randn(2, 4, 8), torch.randn(1, 20, 8)
    p = window_attention_probs(q, k)
    faithful = window_stats(q, k, fix_window_bias=False).window_bias
    fixed = window_stats(q, k, fix_window_bias=True).window_bias
    # official: mass on the last W *prefix* columns [P-W, P); fixed: on the window itself
    assert faithful == pytest.approx(float(p[..., 12:16].sum(-1).mean()), rel=1e-5)
    assert fixed == pytest.approx(float(p[..., 16:].sum(-1).mean()), rel=1e-5)
