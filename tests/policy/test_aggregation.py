"""Defensive aggregation against independent, deliberately naive implementations."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_defensive.policy import aggregate_defensive, aggregate_mean, window_stats


def naive_defensive(probs):
    """Loops over heads and tokens: r = max over (group, rows); s = max(r, mean_j r)."""
    hkv, g, w, p = probs.shape
    out = torch.empty(hkv, p)
    for h in range(hkv):
        r = [max(float(probs[h, q, i, j]) for q in range(g) for i in range(w)) for j in range(p)]
        floor = sum(r) / p
        for j in range(p):
            out[h, j] = max(r[j], floor)
    return out


def naive_window_defensive_max(queries, keys, kernel=5):
    """Per query head and row: explicit causal softmax, explicit zero-padded pooling, mass rescale,
    then the max over the group's heads and rows (no shared code with the library)."""
    hq, w, d = queries.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    p = n - w
    half = kernel // 2
    out = torch.full((hkv, p), -1.0, dtype=torch.float64)
    for qh in range(hq):
        h = qh // g
        for i in range(w):
            pos = p + i
            logits = [float(queries[qh, i].double() @ keys[h, j].double()) / d**0.5 for j in range(pos + 1)]
            mx = max(logits)
            ex = [torch.exp(torch.tensor(x - mx, dtype=torch.float64)) for x in logits]
            z = sum(ex)
            a = [float(e / z) for e in ex][:p]
            pooled = [sum(a[t] for t in range(j - half, j + half + 1) if 0 <= t < p) / kernel for j in range(p)]
            scale = sum(a) / sum(pooled)
            for j in range(p):
                out[h, j] = max(out[h, j], pooled[j] * scale)
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(2, 12), st.integers(0, 10**6))
def test_defensive_aggregation_matches_naive(hkv, g, w, p, seed):
    torch.manual_seed(seed)
    probs = torch.rand(hkv, g, w, p)
    assert torch.allclose(aggregate_defensive(probs), naive_defensive(probs), atol=1e-6)


def test_defensive_floor_ties_tokens_below_the_mean():
    probs = torch.tensor([[[[0.9, 0.1, 0.0, 0.0]]]])
    # max = [0.9, 0.1, 0, 0], mean 0.25 -> floor everything below 0.25
    assert torch.allclose(aggregate_defensive(probs), torch.tensor([[0.9, 0.25, 0.25, 0.25]]))
    assert torch.allclose(aggregate_mean(probs), torch.tensor([[0.9, 0.1, 0.0, 0.0]]))


def test_max_differs_from_mean_on_a_spike():
    # one query row spikes on token 1, the others spread evenly: the mean hides the spike
    probs = torch.full((1, 1, 8, 3), 1 / 3)
    probs[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    d = aggregate_defensive(probs)[0]
    m = aggregate_mean(probs)[0]
    assert d[1] == 1.0 and m[1] < 0.5


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([(1, 1), (3, 1), (4, 2), (6, 3)]), st.integers(1, 4), st.integers(6, 16), st.integers(0, 10**6))
def test_window_defensive_max_matches_naive(heads, w, n, seed):
    hq, hkv = heads
    torch.manual_seed(seed)
    q, k = torch.randn(hq, w, 8, dtype=torch.float64), torch.randn(hkv, n, 8, dtype=torch.float64)
    got = window_stats(q, k, pool_kernel=5).defensive_max
    assert torch.allclose(got.double(), naive_window_defensive_max(q, k), atol=1e-5)
