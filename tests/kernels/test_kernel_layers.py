"""All layers of a request in one launch == the same kernels layer by layer == the reference.

vLLM keeps one cache tensor per layer and one block table per request; the layered kernels reach
every layer's pages through a table of base addresses. Each layer here gets its own cache
tensor (same layout, different contents) sharing one scattered block table.
"""

import pytest
import torch
from kernel_testutil import attention_inputs
from test_kernel_scoring import check_stats

import vllm_defensive.triton_kernels as tk
from vllm_defensive.policy import scoring
from vllm_defensive.triton_kernels import _scoring, _value_norm

BF16, FP32 = torch.bfloat16, torch.float32


def layered_paged(xs: list[torch.Tensor], block_size: int, layout: str, gen: torch.Generator):
    """Dense [H, N, d] per layer -> one cache per layer ([num_blocks, block_size, H, d] views, in
    vLLM's (num_blocks, 2, block_size, H, d) tensors for "FA") and one shared int32 block table."""
    h, n, d = xs[0].shape
    dev, dtype = xs[0].device, xs[0].dtype
    nblk = -(-n // block_size)
    total = nblk + 3
    ids = torch.randperm(total, generator=gen)[:nblk].to(dev)
    pos = torch.arange(n, device=dev)
    caches = []
    for x in xs:
        if layout == "FA":
            cache = torch.randn(total, 2, block_size, h, d, generator=gen).to(device=dev, dtype=dtype)[:, 0]
        else:
            cache = torch.randn(total, block_size, h, d, generator=gen).to(device=dev, dtype=dtype)
        cache[ids[pos // block_size], pos % block_size] = x.permute(1, 0, 2)
        caches.append(cache)
    table = torch.cat([ids, torch.full((2,), total - 1, device=dev, dtype=ids.dtype)]).to(torch.int32)
    return caches, table


def layer_inputs(layers, hq, hkv, w, n, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    qs, ks = zip(*(attention_inputs(hq, hkv, w, n, d, dtype, device, gen, peaky=1.0 + 0.3 * i)
                   for i in range(layers)))
    return torch.stack(qs), list(ks), gen


@pytest.mark.interp
@pytest.mark.parametrize("layers,hq,hkv,d,bs,n,w,probs_dtype,layout", [
    pytest.param(3, 4, 2, 64, 16, 150, 8, BF16, "FA", id="3layers-g2-bf16probs-fa"),
    pytest.param(2, 7, 1, 64, 32, 97, 4, None, "NHD", id="2layers-g7-fp32probs"),
    pytest.param(4, 2, 2, 128, 16, 70, 8, BF16, "NHD", id="4layers-g1-d128"),
])
def test_window_stats_layers_match_layer_by_layer(kdev, layers, hq, hkv, d, bs, n, w, probs_dtype, layout):
    q, ks, gen = layer_inputs(layers, hq, hkv, w, n, d, BF16, kdev, seed=n + layers)
    caches, table = layered_paged(ks, bs, layout, gen)
    # the same split of the keys: every (layer, head) computes exactly what a lone layer computes
    got = _scoring.window_stats_layers(q, caches, table, n, 5, None, probs_dtype, False, _split_len=64)
    assert got.defensive_max.shape == (layers, hkv, n - w) and got.window_bias.shape == (layers,)
    for i in range(layers):
        one = _scoring.window_stats(q[i], caches[i], table, n, 5, None, probs_dtype, False, _split_len=64)
        for name in ("defensive_max", "snapkv", "unpooled_mean"):
            assert torch.equal(getattr(got, name)[i], getattr(one, name)), (i, name)
        assert float(got.window_bias[i]) == one.window_bias, i
    # and with the automatic split, each layer matches the policy library
    auto = tk.paged_window_stats_layers(q, caches, table, n, probs_dtype=probs_dtype, impl="triton")
    for i in range(layers):
        ref = scoring.window_stats(q[i], ks[i], 5, None, probs_dtype)
        layer = scoring.WindowStats(auto.defensive_max[i], auto.snapkv[i], auto.unpooled_mean[i],
                                    float(auto.window_bias[i]))
        check_stats(layer, ref, probs_dtype)


@pytest.mark.interp
def test_window_stats_layers_mixed_layouts_go_layer_by_layer(kdev):
    """Caches that do not share strides cannot share one launch: same results, layer by layer."""
    q, ks, gen = layer_inputs(2, 4, 2, 8, 90, 64, BF16, kdev, seed=5)
    fa, table = layered_paged(ks, 16, "FA", gen)
    nhd = torch.randn(fa[1].shape, generator=gen).to(device=kdev, dtype=BF16)
    nhd.copy_(fa[1])  # same contents, contiguous strides
    got = tk.paged_window_stats_layers(q, [fa[0], nhd], table, 90, probs_dtype=BF16, impl="triton")
    for i, cache in enumerate((fa[0], nhd)):
        one = tk.paged_window_stats(q[i], cache, table, 90, probs_dtype=BF16, impl="triton")
        assert torch.equal(got.defensive_max[i], one.defensive_max)
        assert torch.equal(got.snapkv[i], one.snapkv)


@pytest.mark.interp
def test_window_stats_layers_torch_path_is_the_reference(kdev):
    q, ks, gen = layer_inputs(2, 4, 2, 8, 80, 64, BF16, kdev, seed=9)
    caches, table = layered_paged(ks, 16, "FA", gen)
    got = tk.paged_window_stats_layers(q, caches, table, 80, probs_dtype=BF16, impl="torch")
    for i in range(2):
        ref = scoring.window_stats(q[i], ks[i], 5, None, BF16)
        assert torch.equal(got.defensive_max[i], ref.defensive_max)
        assert float(got.window_bias[i]) == ref.window_bias


@pytest.mark.interp
@pytest.mark.parametrize("layers,hq,hkv,d,dout,bs,n,layout", [
    pytest.param(3, 4, 2, 64, 96, 16, 150, "FA", id="3layers-g2-fa"),
    pytest.param(2, 7, 1, 64, 64, 32, 77, "NHD", id="2layers-g7"),
])
def test_value_norms_layers_match_layer_by_layer(kdev, layers, hq, hkv, d, dout, bs, n, layout):
    gen = torch.Generator().manual_seed(n)
    vs = [torch.randn(hkv, n, d, generator=gen).to(device=kdev, dtype=BF16) for _ in range(layers)]
    wos = [(torch.randn(dout, hq * d, generator=gen) / (hq * d) ** 0.5).to(device=kdev, dtype=BF16)
           for _ in range(layers)]
    caches, table = layered_paged(vs, bs, layout, gen)
    got = tk.paged_value_norms_layers(caches, table, n, wos, impl="triton")
    assert got.shape == (layers, hkv, n) and got.dtype == FP32
    for i in range(layers):
        assert torch.equal(got[i], _value_norm.value_norms(caches[i], table, n, wos[i]))
        torch.testing.assert_close(got[i], scoring.value_norms(vs[i], wos[i]), rtol=1e-5, atol=1e-6)
    assert torch.equal(tk.paged_value_norms_layers(caches, table, n, wos, impl="torch"),
                       torch.stack([scoring.value_norms(v, wo) for v, wo in zip(vs, wos)]))


def test_layers_inputs_are_checked():
    q = torch.zeros(2, 4, 8, 64, dtype=BF16)
    cache = torch.zeros(8, 16, 2, 64, dtype=BF16)
    table = torch.arange(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="one key cache per layer"):
        tk.paged_window_stats_layers(q, [cache], table, 100)
    with pytest.raises(ValueError, match="o_proj"):
        tk.paged_value_norms_layers([cache, cache], table, 100, [torch.zeros(64, 256)])


SELECT_METHODS = ["snapkv", "pyramidkv", "adakv", "criticalkv", "defensivekv", "layer_defensivekv", "streamingllm"]


@pytest.mark.interp
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("method", SELECT_METHODS)
def test_paged_selection_keeps_the_policy_tokens(kdev, method, impl):
    """The worker's GPU path (every layer measured from the pages at once, then the method's own
    scoring and selection) keeps exactly what the policy library keeps on the gathered layers."""
    from vllm_defensive.integration.scoring import PagedRequest, select_keep_paged
    from vllm_defensive.policy import EvictionConfig, LayerInputs, get_method

    layers, hq, hkv, d, n, w, keep = 3, 8, 2, 64, 180, 16, 50
    gen = torch.Generator().manual_seed(len(method))
    q = torch.randn(layers, hq, w, d, generator=gen).to(kdev)
    ks = [torch.randn(hkv, n, d, generator=gen).to(kdev) for _ in range(layers)]
    vs = [torch.randn(hkv, n, d, generator=gen).to(kdev) for _ in range(layers)]
    wos = [(torch.randn(96, hq * d, generator=gen) / (hq * d) ** 0.5).to(kdev) for _ in range(layers)]
    kc, table = layered_paged(ks, 16, "FA", torch.Generator().manual_seed(1))
    vc, table_v = layered_paged(vs, 16, "FA", torch.Generator().manual_seed(1))
    assert torch.equal(table, table_v)
    cfg = EvictionConfig(method=method, window=w, probs_fp32=True)
    ref = get_method(cfg).compress_uniform_layers(
        [LayerInputs(q[i], ks[i], vs[i], wos[i]) for i in range(layers)], keep)
    req = PagedRequest(q, kc, vc, table, n, wos, None)
    got = select_keep_paged(cfg, req, keep, impl=impl)
    assert got.shape == (layers, hkv, keep)
    assert torch.equal(got.cpu(), ref.cpu())
    full = select_keep_paged(cfg, req, n, impl=impl)  # nothing to evict: everything, in order
    assert torch.equal(full.cpu(), torch.arange(n).expand(layers, hkv, n))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (32, 8, 128)])  # several row blocks / one
def test_scores_are_the_same_on_every_run(hq, hkv, d):
    """No atomics in the exact sums: the same request gives the same bits, hence the same keep
    set and the same generated text, on every run (a served determinism test caught the
    atomics' ulp-level jitter flipping near-ties)."""
    dev, layers, n = torch.device("cuda"), 4, 5000
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(n // 16 + 8, 2, 16, hkv, d, generator=gen).to(dev, BF16) for _ in range(layers)]
    table = torch.randperm(n // 16 + 8, generator=gen)[: -(-n // 16)].to(dev, torch.int32)
    q = torch.randn(layers, hq, 32, d, generator=gen).to(dev, BF16)
    runs = [tk.paged_window_stats_layers(q, [c[:, 0] for c in caches], table, n, probs_dtype=BF16)
            for _ in range(6)]
    for r in runs[1:]:
        for name in ("defensive_max", "snapkv", "unpooled_mean", "window_bias"):
            assert torch.equal(getattr(r, name), getattr(runs[0], name)), name


def test_paged_selection_without_o_proj_weights_uses_unit_norms():
    """A model whose o_proj the worker cannot find scores with value norms of 1, as the policy
    library does for LayerInputs without weights."""
    from vllm_defensive.integration.scoring import PagedRequest, select_keep_paged
    from vllm_defensive.policy import EvictionConfig, LayerInputs, get_method

    layers, hq, hkv, d, n, w, keep = 2, 4, 2, 64, 120, 8, 30
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(layers, hq, w, d, generator=gen)
    ks = [torch.randn(hkv, n, d, generator=gen) for _ in range(layers)]
    kc, table = layered_paged(ks, 16, "NHD", torch.Generator().manual_seed(4))
    for method in ("criticalkv", "defensivekv"):
        cfg = EvictionConfig(method=method, window=w, probs_fp32=True)
        ref = get_method(cfg).compress_uniform_layers([LayerInputs(q[i], ks[i]) for i in range(layers)], keep)
        got = select_keep_paged(cfg, PagedRequest(q, kc, kc, table, n, [None] * layers, None), keep, impl="torch")
        assert torch.equal(got, ref), method
