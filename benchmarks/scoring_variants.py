"""Time scoring configurations on the layered path (every layer of a request, CUDA-graph device
time) with the per-kernel split, one change of the tuned per-head-dim defaults at a time:

    python benchmarks/scoring_variants.py [--tokens 32768] [shape ...]   # writes $OUT/variants.json
    TRITON_INTERPRET=1 python benchmarks/scoring_variants.py --dry-cpu --tokens 100 qwen05b  # CPU check

The 2026-12-02b to h and 2026-12-03 records (results/kernels/h200_2026-12-02b/sweep*.json,
h200_2026-12-02c/sweep_*.json and transposed_*.json, h200_2026-12-02d/ to h200_2026-12-02h/ and
h200_2026-12-03/sweep_*.json, h200_2026-12-03b/, h200_2026-12-03c/) came from this script with the
VARIANTS of that pass (h200_2026-12-03d/ ran those of commit b656572, whose kernel was reverted;
h200_2026-12-03e/ and h200_2026-12-04/ those of commit 5c67cad; h200_2026-12-04b/sweep_final.json the
set below, its other sweeps intermediate code: see its README); edit VARIANTS for the next one.
--check adds each one's largest relative error against the reference."""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as B  # noqa: E402
import torch  # noqa: E402

from vllm_defensive.triton_kernels import _scoring  # noqa: E402

VARIANTS = {
    # the defaults against the Gluon pass 2's interior without its unbounded inner loop, interleaved.
    # The 2026-12-04b sweeps of the kernel before the stores' per-tile bases and of two changes not kept
    # ran this script on intermediate code with flags since removed (see that README)
    "qwen05b": [{}, {"p2_gluon_inner": 0}] * 4,
    "llama8b": [{}, {"p2_gluon_inner": 0}] * 2,
}


def max_rel_err(q, keys, table, n):
    """Layer 0 (the one-layer entry point) against the PyTorch reference."""
    import vllm_defensive.triton_kernels as tk
    from vllm_defensive.triton_kernels import torch_impl

    a = tk.paged_window_stats(q[0], keys[0], table, n, probs_dtype=torch.bfloat16, window_bias_as_tensor=True)
    b = torch_impl.window_stats(q[0], keys[0], table, n, probs_dtype=torch.bfloat16, window_bias_as_tensor=True)
    return B.max_rel_err(a, b)


def main():
    import vllm_defensive.triton_kernels as tk

    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--one-layer", action="store_true", help="time layer 0 alone (the per-layer entry point)")
    ap.add_argument("--check", action="store_true", help="also compare layer 0 with the PyTorch reference")
    ap.add_argument("--dry-cpu", action="store_true", help="test this script on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.dry_cpu:
        B.DEV = "cpu"
    out = []
    for name in args.shapes:
        shp = B.SHAPES[name]
        d = shp["d"]
        tuned = dict(_scoring.CONFIG_BY_HEAD_DIM.get(d, {}))
        for var in VARIANTS[name]:
            _scoring.CONFIG_BY_HEAD_DIM[d] = {**tuned, **var}
            t0 = time.time()
            try:
                q, keys, table = B.layered_inputs(shp, args.tokens)
                if args.one_layer:  # layer 0 alone: what the one-layer entry point launches
                    q, keys = q[:1], keys[:1]
                rec = {"shape": name, "config": var,
                       "graph_ms": B.bench_scoring_layers_graph(shp, args.tokens, inputs=(q, keys, table))}
                if args.check:
                    rec["max_rel_err"] = max_rel_err(q, keys, table, args.tokens)
                rec["kernels"] = B.kernel_breakdown(
                    lambda i=0: tk.paged_window_stats_layers(q, keys, table, args.tokens, probs_dtype=torch.bfloat16))
                del q, keys
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception as e:  # a configuration can fail to compile (shared memory)
                rec = {"shape": name, "config": var, "error": repr(e)[:400]}
            rec["wall_s"] = time.time() - t0
            out.append(rec)
            print(json.dumps(rec), flush=True)
        _scoring.CONFIG_BY_HEAD_DIM[d] = tuned
    dest = os.environ.get("OUT", ".")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "variants.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if B.DEV == "cuda" else "cpu", "versions": B.versions(),
                   "tokens": args.tokens, "records": out}, f, indent=1)


if __name__ == "__main__":
    main()
