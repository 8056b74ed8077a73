"""Compaction copy: kept tokens' K and V of every layer, source pages -> destination pages."""

import pytest
import torch
from kernel_testutil import make_paged

import vllm_defensive.triton_kernels as tk

BF16 = torch.bfloat16


def kept_indices(gen, layers, hkv, n, k, ragged=False, device="cpu"):
    """Sorted kept token ids per (layer, head); ragged: some heads keep fewer (padded with -1)."""
    out = torch.full((layers, hkv, k), -1, dtype=torch.long)
    for lay in range(layers):
        for h in range(hkv):
            kk = k if not ragged else int(torch.randint(1, k + 1, (1,), generator=gen))
            out[lay, h, :kk] = torch.sort(torch.randperm(n, generator=gen)[:kk]).values
    return out.to(device)


def build(device, layers, hkv, d, bs, n, dtype, layout, gen, pool_extra=4):
    """Per-layer caches sharing one block table (as in vLLM), plus the dense originals."""
    dense_k, dense_v, kc, vc = [], [], [], []
    nblk = -(-n // bs)
    total = nblk * 2 + pool_extra
    ids = torch.randperm(total, generator=gen)
    src = ids[:nblk].to(torch.int32).to(device)
    free = ids[nblk:].to(torch.int32).to(device)
    for _ in range(layers):
        if layout == "FA":
            kv = torch.randn(total, 2, bs, hkv, d, generator=gen).to(device=device, dtype=dtype)
            k_c, v_c = tk.split_kv_cache(kv)
        elif layout == "HND":
            k_c = torch.randn(total, hkv, bs, d, generator=gen).to(device=device, dtype=dtype).permute(0, 2, 1, 3)
            v_c = torch.randn(total, hkv, bs, d, generator=gen).to(device=device, dtype=dtype).permute(0, 2, 1, 3)
        else:
            k_c = torch.randn(total, bs, hkv, d, generator=gen).to(device=device, dtype=dtype)
            v_c = torch.randn(total, bs, hkv, d, generator=gen).to(device=device, dtype=dtype)
        kc.append(k_c)
        vc.append(v_c)
        dense_k.append(tk.gather_paged(k_c, src, n))
        dense_v.append(tk.gather_paged(v_c, src, n))
    return kc, vc, dense_k, dense_v, src, free


def check_roundtrip(kc, vc, dense_k, dense_v, kept, dst_table):
    for lay in range(len(kc)):
        idx = kept[lay] if kept.dim() == 3 else kept
        for cache, dense in ((kc[lay], dense_k[lay]), (vc[lay], dense_v[lay])):
            got = tk.gather_paged(cache, dst_table, idx.shape[1])
            for h in range(idx.shape[0]):
                valid = idx[h] >= 0
                assert torch.equal(got[h][valid], dense[h][idx[h][valid]]), f"layer {lay} head {h}"


@pytest.mark.interp
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "disjoint"])
@pytest.mark.parametrize("layers,hkv,d,bs,n,k,dtype,layout,ragged,per_layer", [
    pytest.param(3, 2, 64, 16, 150, 37, BF16, "FA", False, False, id="fa-bs16-shared-kept"),
    pytest.param(2, 3, 128, 32, 300, 61, torch.float16, "HND", True, True, id="hnd-bs32-ragged-per-layer"),
    pytest.param(2, 1, 64, 128, 260, 140, torch.float32, "NHD", False, True, id="nhd-bs128-fp32"),
    pytest.param(2, 2, 64, 64, 90, 20, torch.float8_e4m3fn, "NHD", True, True, id="fp8-cache"),
])
def test_compaction_roundtrip(kdev, inplace, layers, hkv, d, bs, n, k, dtype, layout, ragged, per_layer):
    gen = torch.Generator().manual_seed(n + k)
    if dtype == torch.float8_e4m3fn:
        kc, vc, dk, dv, src, free = build(kdev, layers, hkv, d, bs, n, BF16, layout, gen)
        kc = [c.to(dtype) for c in kc]
        vc = [c.to(dtype) for c in vc]
        dk = [tk.gather_paged(c, src, n) for c in kc]
        dv = [tk.gather_paged(c, src, n) for c in vc]
    else:
        kc, vc, dk, dv, src, free = build(kdev, layers, hkv, d, bs, n, dtype, layout, gen)
    kept = kept_indices(gen, layers, hkv, n, k, ragged, kdev)
    if not per_layer:
        kept = kept[0]
    dst = None if inplace else free
    before = [c.clone() for c in kc + vc]
    tk.compact_kv(kc, vc, kept, src, dst, impl="triton", check=inplace)
    check_roundtrip(kc, vc, dk, dv, kept, src if inplace else dst)
    # and byte-identical to the PyTorch path on the same input
    kc2, vc2 = before[:layers], before[layers:]
    tk.compact_kv(kc2, vc2, kept, src, dst, impl="torch")
    for a, b in zip(kc + vc, kc2 + vc2):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.interp
def test_compaction_one_launch_and_stacked(kdev):
    from vllm_defensive.triton_kernels import _compact

    gen = torch.Generator().manual_seed(11)
    layers, hkv, d, bs, n, k = 3, 2, 64, 16, 70, 25
    nblk = -(-n // bs)
    stacked = torch.randn(layers, 2 * nblk + 1, 2, bs, hkv, d, generator=gen).to(kdev, BF16)
    kc = [stacked[i][:, 0] for i in range(layers)]
    vc = [stacked[i][:, 1] for i in range(layers)]
    src = torch.arange(nblk, dtype=torch.int32, device=kdev) * 2  # every other block
    dst = src + 1
    dk = [tk.gather_paged(c, src, n) for c in kc]
    dv = [tk.gather_paged(c, src, n) for c in vc]
    kept = kept_indices(gen, layers, hkv, n, k, device=kdev)
    assert _compact.compact_kv(kc, vc, kept, src, dst) == 1  # all layers, K and V: one launch
    check_roundtrip(kc, vc, dk, dv, kept, dst)
    # a stacked [layers, blocks, bs, H, d] tensor is accepted too
    kst = torch.randn(layers, nblk * 2, bs, hkv, d, generator=gen).to(kdev, BF16)
    vst = torch.randn(layers, nblk * 2, bs, hkv, d, generator=gen).to(kdev, BF16)
    dk = [tk.gather_paged(kst[i], src, n) for i in range(layers)]
    dv = [tk.gather_paged(vst[i], src, n) for i in range(layers)]
    tk.compact_kv(kst, vst, kept, src, dst, impl="triton")
    check_roundtrip(list(kst), list(vst), dk, dv, kept, dst)


@pytest.mark.interp
def test_compaction_mixed_layouts_fall_back_per_cache(kdev):
    from vllm_defensive.triton_kernels import _compact

    gen = torch.Generator().manual_seed(2)
    kc, vc, dk, dv, src, free = build(kdev, 1, 2, 64, 16, 50, BF16, "NHD", gen)
    total = kc[0].shape[0]
    kc2 = [torch.randn(total, 2, 16, 64, generator=gen).to(kdev, BF16).permute(0, 2, 1, 3)]  # HND strides
    vc2 = [torch.randn(total, 2, 16, 64, generator=gen).to(kdev, BF16).permute(0, 2, 1, 3)]
    dk2 = [tk.gather_paged(kc2[0], src, 50)]
    dv2 = [tk.gather_paged(vc2[0], src, 50)]
    kept = kept_indices(gen, 2, 2, 50, 12, device=kdev)
    assert _compact.compact_kv(kc + kc2, vc + vc2, kept, src, free) == 4
    check_roundtrip(kc + kc2, vc + vc2, dk + dk2, dv + dv2, kept, free)


def test_torch_path_roundtrip_and_inplace_check():
    gen = torch.Generator().manual_seed(4)
    kc, vc, dk, dv, src, free = build(torch.device("cpu"), 2, 2, 64, 16, 80, BF16, "FA", gen)
    kept = kept_indices(gen, 2, 2, 80, 30, ragged=True)
    tk.compact_kv(kc, vc, kept, src, None, impl="torch", check=True)
    check_roundtrip(kc, vc, dk, dv, kept, src)
    bad = kept.clone()
    bad[0, 0, :2] = bad[0, 0, :2].flip(0)
    with pytest.raises(ValueError):
        tk.compact_kv(kc, vc, bad, src, None, impl="torch", check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "disjoint"])
@pytest.mark.parametrize("layers,hkv,d,bs,n,layout", [
    pytest.param(32, 8, 128, 16, 32768, "FA", id="llama8b-32k-32layers"),
    pytest.param(4, 2, 64, 32, 131072, "HND", id="qwen05b-128k"),
])
def test_compaction_real_sizes(inplace, layers, hkv, d, bs, n, layout):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(n)
    kc, vc, dk, dv, src, free = build(dev, layers, hkv, d, bs, n, BF16, layout, gen)
    kept = kept_indices(gen, layers, hkv, n, n // 5, ragged=True, device=dev)
    tk.compact_kv(kc, vc, kept, src, None if inplace else free, check=inplace)
    torch.cuda.synchronize()
    check_roundtrip(kc, vc, dk, dv, kept, src if inplace else free)
    del kc, vc, dk, dv
    torch.cuda.empty_cache()
