"""Properties every method must hold, on random layers (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_defensive.policy import METHOD_NAMES, EvictionConfig, LayerInputs, get_method, mask_to_indices
from vllm_defensive.policy.selection import adakv_counts, global_layer_totals, pyramid_budgets, ranking_key
from vllm_defensive.policy.aggregation import prior_risk_floor

EVICTING = [m for m in METHOD_NAMES if m != "none"]


def make_layers(n_layers, hq, hkv, n, w, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        LayerInputs(
            queries=torch.randn(hq, w, d, generator=g).to(dtype),
            keys=torch.randn(hkv, n, d, generator=g).to(dtype),
            values=torch.randn(hkv, n, d, generator=g).to(dtype),
            o_proj_weight=torch.randn(16, hq * d, generator=g).to(dtype),
        )
        for _ in range(n_layers)
    ]


layer_shapes = st.tuples(
    st.sampled_from([(1, 1), (2, 2), (3, 1), (6, 2), (9, 3), (14, 2)]),  # (Hq, Hkv)
    st.integers(2, 8),  # window
    st.integers(12, 80),  # context
    st.floats(0.05, 1.0),  # budget
    st.integers(0, 10**6),
)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHOD_NAMES), layer_shapes)
def test_uniform_selection_properties(method, shape):
    (hq, hkv), w, n, budget, seed = shape
    cfg = EvictionConfig(method=method, budget=budget, window=w)
    (layer,) = make_layers(1, hq, hkv, n, w, seed=seed)
    idx = get_method(cfg).compress_uniform(layer)
    k = cfg.keep_per_head(n)
    assert idx.shape == (hkv, k)  # exact budget
    for row in idx:
        assert torch.equal(row, torch.sort(row).values)  # sorted
        assert len(set(row.tolist())) == k  # no duplicates
        kept = set(row.tolist())
        assert set(range(n - w, n)) <= kept  # window protected
        assert set(range(min(cfg.sinks, n))) <= kept  # sinks protected
    again = get_method(cfg).compress_uniform(layer)
    assert torch.equal(idx, again)  # deterministic


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(EVICTING), layer_shapes, st.integers(1, 4))
def test_method_allocation_totals(method, shape, n_layers):
    (hq, hkv), w, n, budget, seed = shape
    cfg = EvictionConfig(method=method, budget=budget, window=w)
    layers = make_layers(n_layers, hq, hkv, n, w, seed=seed)
    masks = get_method(cfg).compress(layers)
    k = cfg.keep_per_head(n)
    totals = [int(m.sum()) for m in masks]
    if k >= n:
        assert totals == [hkv * n] * n_layers
    elif method == "layer_defensivekv":
        assert sum(totals) == hkv * k * n_layers  # one budget over all layers
    elif method == "pyramidkv":
        assert sum(totals) >= hkv * k * n_layers - hkv * n_layers
    else:
        assert totals == [hkv * k] * n_layers  # fixed per layer, adaptive (or not) across heads
    for m in masks:
        assert bool(m[:, n - w :].all())  # window kept in every layer, every head
        for row in mask_to_indices(m):
            assert len(set(row.tolist())) == len(row)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_budget_one_keeps_everything(method):
    cfg = EvictionConfig(method=method, budget=1.0, window=4)
    layers = make_layers(2, 6, 2, 30, 4)
    assert all(bool(m.all()) for m in get_method(cfg).compress(layers))
    assert torch.equal(get_method(cfg).compress_uniform(layers[0]), torch.arange(30).expand(2, 30))


def test_budget_tokens_is_an_absolute_count():
    cfg = EvictionConfig(method="defensivekv", budget_tokens=13, window=4)
    (layer,) = make_layers(1, 6, 2, 50, 4)
    assert get_method(cfg).compress_uniform(layer).shape == (2, 13)


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "pyramidkv"])
def test_uniform_methods_are_invariant_to_head_batching(method):
    """Scoring KV heads together or one at a time keeps the same tokens per head."""
    cfg = EvictionConfig(method=method, budget=0.3, window=4)
    (layer,) = make_layers(1, 6, 3, 40, 4)
    together = get_method(cfg).compress_uniform(layer)
    for h in range(3):
        alone = LayerInputs(layer.queries[2 * h : 2 * h + 2], layer.keys[h : h + 1], layer.values[h : h + 1])
        assert torch.equal(get_method(cfg).compress_uniform(alone)[0], together[h])


def test_defensive_risk_is_invariant_to_head_batching():
    from vllm_defensive.policy import window_stats

    (layer,) = make_layers(1, 6, 3, 40, 4)
    together = window_stats(layer.queries, layer.keys).defensive_max
    for h in range(3):
        alone = window_stats(layer.queries[2 * h : 2 * h + 2], layer.keys[h : h + 1]).defensive_max
        assert torch.allclose(alone[0], together[h])


@pytest.mark.parametrize("method", ["snapkv", "defensivekv", "criticalkv"])
def test_gqa_group_of_identical_queries_equals_mha(method):
    """A group of G identical query heads scores like a single head (max and mean agree)."""
    cfg = EvictionConfig(method=method, budget=0.3, window=4)
    (mha,) = make_layers(1, 2, 2, 40, 4)
    gqa = LayerInputs(
        queries=mha.queries.repeat_interleave(3, dim=0),
        keys=mha.keys,
        values=mha.values,
        o_proj_weight=mha.o_proj_weight.view(16, 2, 8).repeat_interleave(3, dim=1).reshape(16, 48),
    )
    assert torch.equal(get_method(cfg).compress_uniform(mha), get_method(cfg).compress_uniform(gqa))


def test_gqa_group_max_is_over_its_own_query_heads():
    from vllm_defensive.policy import window_stats

    (layer,) = make_layers(1, 4, 2, 20, 2)
    full = window_stats(layer.queries, layer.keys).defensive_max
    # KV head 1 uses query heads 2 and 3 only
    alone = window_stats(layer.queries[2:], layer.keys[1:]).defensive_max
    assert torch.allclose(full[1], alone[0])


def test_streamingllm_keeps_sinks_and_recent_tokens():
    cfg = EvictionConfig(method="streamingllm", budget_tokens=10, window=3)
    (layer,) = make_layers(1, 2, 1, 30, 3)
    assert get_method(cfg).compress_uniform(layer)[0].tolist() == [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]


def test_defensive_prefers_worst_case_tokens_over_mean_ones():
    """A token that one window query needs badly survives DefensiveKV but not SnapKV."""
    d, n, w = 16, 40, 4
    torch.manual_seed(0)
    keys = torch.randn(1, n, d) * 0.01
    queries = torch.randn(1, w, d) * 0.01
    spike = torch.zeros(d)
    spike[0] = 1.0
    keys[0, 7] = spike * 2
    queries[0, 0] = spike * 2  # only window row 0 attends to token 7
    keys[0, 20:26] = torch.randn(6, d) * 0.01 + 0.5  # attractive to every other row
    queries[0, 1:] += 0.5
    layer = LayerInputs(queries, keys)
    snap = get_method(EvictionConfig(method="snapkv", budget_tokens=6, window=w, pool_kernel=1)).compress_uniform(layer)
    assert 7 not in snap[0].tolist()
    for floor in (False, True):
        cfg = EvictionConfig(method="defensivekv", budget_tokens=6, window=w, pool_kernel=1, uniform_floor=floor)
        assert 7 in get_method(cfg).compress_uniform(layer)[0].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_uniform_defensive_ranks_below_the_floor_by_raw_risk(seed):
    """Same count per head: the unforced picks are the top unfloored scores (risk x value-norm
    share); with `uniform_floor` the floored ones, where tokens below the mean tie."""
    (layer,) = make_layers(1, 4, 2, 300, 8, seed=seed)
    k = 60
    for floor in (False, True):
        m = get_method(EvictionConfig(method="defensivekv", budget_tokens=k, window=8, uniform_floor=floor,
                                      uniform_norm="share"))
        scored = m.score_layer(layer, k)
        kept = m.compress_uniform(layer, k)
        unfloored = scored.extra["stats"].defensive_max * scored.extra["share"]
        p = unfloored.shape[1]
        ranking = unfloored if not floor else scored.scores[:, :p]
        for h in range(2):
            forced = scored.forced[h, :p].nonzero().flatten().tolist()
            free = [t for t in kept[h].tolist() if t < p and t not in forced]
            cand = ranking[h].clone()
            cand[scored.forced[h, :p]] = -1
            best = cand.topk(len(free)).values
            got = ranking[h, free].sort(descending=True).values
            assert torch.allclose(got, best), (floor, h)


def test_adakv_alpha_floor_and_total():
    key = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    counts = adakv_counts(key, per_head=2, alpha=0.5)  # each head keeps >= 1
    assert counts.tolist() == [3, 1]
    assert adakv_counts(key, per_head=2, alpha=0.0).tolist() == [4, 0]


def test_pyramid_budgets_fall_linearly_and_sum():
    b = pyramid_budgets(4, 100, beta=20, lo=0, hi=1000)
    assert b[0] > b[1] > b[2] > b[3] and sum(b) == 400
    assert b[0] == pytest.approx(195, abs=1) and b[-1] == pytest.approx(5, abs=1)


def test_global_layer_totals_follow_scores():
    hi = torch.full((2, 5), 10.0)
    lo = torch.zeros(2, 5)
    assert global_layer_totals([lo, hi], 10) == [0, 10]
    assert global_layer_totals([hi, lo, hi], 12) == [10, 0, 2]


def test_layer_defensive_keeps_each_layers_window_even_when_its_scores_are_low():
    layers = make_layers(3, 2, 1, 40, 4)
    layers[1] = LayerInputs(layers[1].queries * 0.0, layers[1].keys, layers[1].values, layers[1].o_proj_weight)
    masks = get_method(EvictionConfig(method="layer_defensivekv", budget=0.2, window=4)).compress(layers)
    assert all(bool(m[:, -4:].all()) for m in masks)


def test_bf16_inputs_are_scored():
    (layer,) = make_layers(1, 6, 2, 40, 4, dtype=torch.bfloat16)
    idx = get_method(EvictionConfig(method="defensivekv", budget=0.25, window=4)).compress_uniform(layer)
    assert idx.shape == (2, 10)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(EVICTING), layer_shapes, st.booleans())
def test_all_layers_at_once_keep_what_each_layer_keeps_alone(method, shape, bf16):
    """The plugin scores a request's layers in one batched pass (`compress_uniform_layers`, fed
    lazily by a generator); every layer must keep exactly what scoring it alone keeps."""
    (hq, hkv), w, n, budget, seed = shape
    if w >= n:
        return
    cfg = EvictionConfig(method=method, budget=budget, window=w)
    layers = make_layers(3, hq, hkv, n, w, seed=seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    together = get_method(cfg).compress_uniform_layers(x for x in layers)
    assert together.shape[0] == 3 and together.dtype == torch.long
    for i, layer in enumerate(layers):
        assert torch.equal(together[i], get_method(cfg).compress_uniform(layer)), i


def test_layers_of_different_lengths_are_refused():
    a, b = make_layers(1, 2, 1, 40, 4) + make_layers(1, 2, 1, 41, 4)
    with pytest.raises(ValueError, match="context length"):
        get_method(EvictionConfig(method="snapkv", budget=0.3, window=4)).compress_uniform_layers([a, b])


@pytest.mark.parametrize("floor", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_uniform_defensive_raw_norm_ranks_by_risk_times_own_value_norm(seed, floor):
    """`uniform_norm="raw"` (the default, with the floor): the unforced picks of each head are its
    top (floored) max-risk x ||v W_o||."""
    (layer,) = make_layers(1, 4, 2, 300, 8, seed=seed)
    k = 60
    cfg = EvictionConfig(method="defensivekv", budget_tokens=k, window=8, uniform_floor=floor)
    assert cfg.uniform_norm == "raw" and EvictionConfig().uniform_floor
    m = get_method(cfg)
    scored = m.score_layer(layer, k)
    kept = m.compress_uniform(layer, k)
    risk = scored.extra["stats"].defensive_max
    ranking = (prior_risk_floor(risk) if floor else risk) * scored.extra["norms"]
    p = ranking.shape[1]
    for h in range(2):
        forced = scored.forced[h, :p]
        free = [t for t in kept[h].tolist() if t < p and not bool(forced[t])]
        cand = ranking[h].masked_fill(forced, -1)
        assert torch.allclose(ranking[h, free].sort(descending=True).values, cand.topk(len(free)).values)


def test_uniform_defensive_share_and_raw_norm_rank_differently():
    differs = []
    for seed in range(3):
        (layer,) = make_layers(1, 4, 2, 300, 8, seed=seed)
        a, b = (get_method(EvictionConfig(method="defensivekv", budget_tokens=60, window=8, uniform_norm=n))
                .compress_uniform(layer, 60) for n in ("share", "raw"))
        differs.append(not torch.equal(a, b))
    assert any(differs)


def test_uniform_risk_first_fills_part_of_each_head_by_the_unfloored_risk():
    """`uniform_risk_first=f`: f x the count per head goes first to the top unfloored worst-case
    risks (window and sinks included), the rest to the floored ranking; 0 is that ranking alone
    and 0.5 the default."""
    (layer,) = make_layers(1, 4, 2, 300, 8, seed=5)
    k = 60
    base = EvictionConfig(method="defensivekv", budget_tokens=k, window=8, uniform_risk_first=0.0)
    plain = get_method(base).compress_uniform(layer, k)  # the floored ranking alone
    assert EvictionConfig(method="defensivekv").uniform_risk_first == 0.5  # the default
    for frac in (0.5, 1.0):
        m = get_method(base.model_copy(update={"uniform_risk_first": frac}))
        kept = m.compress_uniform(layer, k)
        scored = m.score_layer(layer, k)
        risk = m._pad_window(scored.extra["stats"].defensive_max, 300)
        first = int(frac * k)
        for h in range(2):
            top = ranking_key(risk, scored.forced)[h].topk(first).indices.tolist()
            assert set(top) <= set(kept[h].tolist()), (frac, h)
    assert not torch.equal(get_method(base.model_copy(update={"uniform_risk_first": 1.0})).compress_uniform(layer, k), plain)
