"""One small run of every kernel, for `compute-sanitizer --tool memcheck` on the GPU machine:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tests/kernels/memcheck_run.py

(no caching allocator, so an out-of-bounds access leaves the tensor's own allocation). Ragged
lengths (not multiples of any tile), scattered blocks, ragged kept lists: the masks are exercised.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_testutil import attention_inputs, make_paged  # noqa: E402

if not torch.cuda.is_available():  # a CPU check of this script: the interpreter, explicitly
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_DEFENSIVE_KERNELS", "triton")
import vllm_defensive.triton_kernels as tk  # noqa: E402
from vllm_defensive.triton_kernels import torch_impl  # noqa: E402


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: set TRITON_INTERPRET=1
    gen = torch.Generator().manual_seed(0)
    # (Qwen's shape: seven pass-2 row blocks, merged by the fixup, with fp32 and 16-bit probabilities)
    cases = ((8, 2, 128, 301, torch.bfloat16), (14, 2, 64, 333, None), (14, 2, 64, 333, torch.bfloat16))
    for hq, hkv, d, n, pd in cases:
        q, k = attention_inputs(hq, hkv, 32, n, d, torch.bfloat16, dev, gen)
        cache, table = make_paged(k, 16, "FA", gen=gen)
        got = tk.paged_window_stats(q, cache, table, n, probs_dtype=pd)
        ref = torch_impl.window_stats(q, cache, table, n, probs_dtype=pd)
        err = float(((got.defensive_max - ref.defensive_max).abs() / (ref.defensive_max.abs() + 1e-9)).max())
        print(f"scoring hq={hq} d={d} n={n} probs={pd}: max rel err {err:.2e}")
        v = torch.randn(hkv, n, d, generator=gen).to(dev, torch.bfloat16)
        vcache, vtable = make_paged(v, 32, "HND", gen=gen)
        wo = (torch.randn(200, hq * d, generator=gen) / 30).to(dev, torch.bfloat16)
        a, b = tk.paged_value_norms(vcache, vtable, n, wo), torch_impl.value_norms(vcache, vtable, n, wo)
        print(f"value_norm: max rel err {float(((a - b).abs() / b.abs()).max()):.2e}")
    layers, hkv, d, bs, n, kk = 3, 2, 128, 16, 150, 37
    nblk = -(-n // bs)
    kvs = [torch.randn(2 * nblk + 1, 2, bs, hkv, d, generator=gen).to(dev, torch.bfloat16) for _ in range(layers)]
    kc, vc = [x[:, 0] for x in kvs], [x[:, 1] for x in kvs]
    src = torch.arange(nblk, dtype=torch.int32, device=dev) * 2
    kept = torch.full((layers, hkv, kk), -1, dtype=torch.long)
    for lay in range(layers):
        for h in range(hkv):
            m = kk - (lay + h)
            kept[lay, h, :m] = torch.sort(torch.randperm(n, generator=gen)[:m]).values
    kept = kept.to(dev)
    dense = [torch_impl.gather_paged(c, src, n) for c in kc + vc]
    tk.compact_kv(kc, vc, kept, src, src + 1)  # into fresh pages
    tk.compact_kv(kc, vc, kept, src, None)  # in place
    for i, c in enumerate(kc + vc):
        lay = i % layers
        for dst in (src, src + 1):
            got = torch_impl.gather_paged(c, dst, kk)
            for h in range(hkv):
                ok = kept[lay, h] >= 0
                assert torch.equal(got[h][ok], dense[i][h][kept[lay, h][ok]])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("compaction: round trip exact")
    print("memcheck_run: done")


if __name__ == "__main__":
    main()
