"""Benchmark of the fast path (vllm_defensive.triton_kernels) against the PyTorch reference.

Times, per layer, for Llama-3.1-8B's attention shape (32 query / 8 KV heads, d 128, hidden 4096,
32 layers) and Qwen2.5-0.5B's (14 / 2, d 64, hidden 896, 24 layers), window 32, at 4K, 16K, 32K
and 128K prompt tokens, over vLLM's paged FlashAttention cache (block size 16, shuffled blocks):

  scoring     paged_window_stats (probabilities rounded to bf16 like the official code)
              vs the reference: gather the keys from the pages + policy.scoring.window_stats
  value_norm  paged_value_norms vs gather + policy.scoring.value_norms
  compaction  compact_kv over every layer's K and V (keep 20% per head), in place and into
              fresh pages, vs the PyTorch path (per layer gather + scatter)

Each entry: median time (CUDA events), peak extra device memory, achieved bandwidth as a fraction
of the measured device-to-device copy rate and of the H100 SXM datasheet (3.35 TB/s), and a
roofline (stated in the output). Inputs rotate among copies so that repeated runs do not measure
the L2 cache. Writes kernels.json, summary.json and kernels.png to --out.

    python benchmarks/kernels.py --out benchmarks/results/kernels          # GPU
    python benchmarks/kernels.py --resources                               # no GPU needed:
        compile the kernels for sm_90 offline and print registers / spills / shared memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)  # CuPy's ExternalStream notice, per call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {
    "llama8b": dict(hq=32, hkv=8, d=128, hidden=4096, layers=32),
    "qwen05b": dict(hq=14, hkv=2, d=64, hidden=896, layers=24),
}
WINDOW = 32
BLOCK = 16
H100_SPEC_BW = 3.35e12  # H100 SXM5 HBM3, bytes/s
H100_SPEC_BF16 = 989e12  # dense bf16 tensor-core FLOP/s
SFU_PER_SM_CLK = 16  # exp2 (MUFU.EX2) results per SM per clock on Hopper
DEV = "cuda"  # --dry-cpu: run the whole script on the CPU (Triton interpreter, tiny sizes) to test it


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


class _CpuEvent:
    def __init__(self, **kw):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def _event():
    return torch.cuda.Event(enable_timing=True) if DEV == "cuda" else _CpuEvent()


# --- timing helpers ------------------------------------------------------------------------------
def bench(fn, min_reps=5, max_reps=200, budget_s=1.0, rotate=None):
    """Time fn(i) two ways (CUDA events), after warm-up:
    back-to-back: reps calls in a row, one sync at the end, per-call average (how the plugin calls a
    kernel for layer after layer: host launch work overlaps the device work);
    isolated: median of single calls, each synchronised (host launch time + device time, serial).
    Returns (back_to_back_ms, reps, isolated_ms)."""
    fn(0)
    _sync()
    t0 = time.perf_counter()
    fn(1 % rotate if rotate else 0)
    _sync()
    one = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / 2 / max(one, 1e-6))))
    times = []
    for i in range(min(reps, 25)):
        s, e = _event(), _event()
        s.record()
        fn(i % rotate if rotate else 0)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    s, e = _event(), _event()
    s.record()
    for i in range(reps):
        fn(i % rotate if rotate else 0)
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps, reps, times[len(times) // 2]


def host_ms(fn, reps=None):
    """Median host time to issue one call fn(0) (from an idle device, so the launch queue never
    blocks it): the Python and launch work alone."""
    reps = reps or (20 if DEV == "cuda" else 2)
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(0)
        times.append((time.perf_counter() - t0) * 1e3)
        _sync()
    times.sort()
    return times[len(times) // 2]


def host_ms_triton_dispatch(fn, reps=None):
    """host_ms with every launch through Triton's own dispatch (VLLM_DEFENSIVE_FAST_LAUNCH=0)."""
    from vllm_defensive.triton_kernels import _launch

    old = os.environ.get(_launch.ENV)
    os.environ[_launch.ENV] = "0"
    try:
        fn(0)
        return host_ms(fn, reps)
    finally:
        if old is None:
            os.environ.pop(_launch.ENV, None)
        else:
            os.environ[_launch.ENV] = old


def graph_ms(fn, copies=1):
    """Median ms of CUDA-graph replays of fn(i): device time without Python launch overhead."""
    if DEV != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(copies):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for i in range(copies):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(i)
            graphs.append(g)
        t, _, _ = bench(lambda i: graphs[i].replay(), rotate=copies, budget_s=0.4)
        del graphs
        return t
    except Exception as e:  # capture is a measurement aid, never fatal
        print("graph capture failed:", repr(e)[:200])
        return None


def kernel_breakdown(fn, reps=10):
    """Average device microseconds per kernel name over reps calls (torch.profiler)."""
    if DEV != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile

        fn(0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn(0)
            torch.cuda.synchronize()
        out = {}
        for ev in prof.key_averages():
            tot = getattr(ev, "device_time_total", None)
            if tot is None:
                tot = getattr(ev, "cuda_time_total", 0)
            if tot and ev.count:
                out[ev.key[:60]] = round(tot / reps, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])
    except Exception as e:
        return {"error": repr(e)[:200]}


def peak_extra_mb(fn):
    if DEV != "cuda":
        fn(0)
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


class ClockSampler:
    """SM clock and power while a block runs: `nvidia-smi -lms` in the background (the datasheet
    exp rate assumes the max clock; a long MUFU-bound run may not hold it)."""

    def __init__(self, period_ms=50):
        self.period_ms, self.proc, self.stats = period_ms, None, {}

    def __enter__(self):
        if DEV == "cuda":
            try:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                     f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except Exception:
                self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return False
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except Exception:
            self.proc.kill()
            return False
        clocks, power = [], []
        for line in out.splitlines():
            try:
                c, p = (float(v) for v in line.split(","))
            except ValueError:
                continue
            clocks.append(c)
            power.append(p)
        if clocks:
            clocks.sort()
            power.sort()
            self.stats = {"sm_clock_mhz_median": clocks[len(clocks) // 2], "sm_clock_mhz_min": clocks[0],
                          "sm_clock_mhz_max": clocks[-1], "power_w_median": power[len(power) // 2],
                          "samples": len(clocks)}
        return False


def exp_rate():
    """Measured exp2 throughput (exps/s): a MUFU-bound Triton loop (one MUFU.EX2 and nothing else per
    element and iteration, plus the negation: x <- 2^-x stays in [0.5, 0.71]), run
    for ~0.5 s per repetition, with the SM clock sampled meanwhile. The counterpart of the measured
    copy and matmul rates the other two roofline terms use."""
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_loop(OUT, n_iter, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = offs.to(tl.float32) * 1e-9 + 0.5
        for _ in range(n_iter):
            x = tl.exp2(-x)
        tl.store(OUT + offs, x)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, progs, n_iter = 2048, sms * 16, 4096
    out = torch.empty(progs * block, device=DEV, dtype=torch.float32)

    def run(i=0):
        _exp_loop[(progs,)](out, n_iter, BLOCK=block, num_warps=4)

    with ClockSampler() as clk:
        t, _, _ = bench(run, min_reps=5, max_reps=40, budget_s=3.0)
    rate = progs * block * n_iter / (t * 1e-3)
    return rate, clk.stats


def ceilings():
    if DEV != "cuda":
        return {"copy_bw_Bps": 3e12, "bf16_mm_flops": 8e14, "sm_clock_hz": 1.98e9, "sms": 132,
                "sfu_exp_per_s": SFU_PER_SM_CLK * 132 * 1.98e9, "sfu_exp_measured_per_s": None}
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t, _, _ = bench(lambda i: y.copy_(x), budget_s=0.5)
    bw = 2 * x.numel() / (t * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    t, _, _ = bench(lambda i: a @ b, budget_s=0.5)
    tc = 2 * 8192**3 / (t * 1e-3)
    del a, b
    clock = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        clock = float(out) * 1e6
    except Exception:
        clock = 1.98e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.cuda.empty_cache()
    try:
        exp_measured, exp_clock = exp_rate()
    except Exception as e:  # a measurement aid: the datasheet term stays
        print("exp rate measurement failed:", repr(e)[:200])
        exp_measured, exp_clock = None, {}
    return {"copy_bw_Bps": bw, "bf16_mm_flops": tc, "sm_clock_hz": clock, "sms": sms,
            "sfu_exp_per_s": SFU_PER_SM_CLK * sms * clock, "sfu_exp_measured_per_s": exp_measured,
            "sfu_exp_measured_clock": exp_clock,
            "sfu_exp_measured_per_sm_clk_at_max_clock": (exp_measured / (sms * clock)) if exp_measured else None}


def roofline_exp_terms(exps, ceil):
    """The exp term at the datasheet rate (16 / SM / clock at the max clock) and at the measured one."""
    spec = exps / ceil["sfu_exp_per_s"]
    measured = exps / ceil["sfu_exp_measured_per_s"] if ceil.get("sfu_exp_measured_per_s") else None
    return spec, measured


def versions():
    import triton

    if DEV != "cuda":
        return {"torch": torch.__version__, "triton": triton.__version__}
    v = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
         "python": platform.python_version()}
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
    return v


# --- inputs ------------------------------------------------------------------------------------------
def paged_kv(n, hkv, d, copies, gen_seed=0, layout="FA"):
    """`copies` independent FlashAttention caches (num_blocks, 2, bs, Hkv, d) holding n tokens."""
    nblk = -(-n // BLOCK)
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    out = []
    for _ in range(copies):
        kv = torch.randn(nblk + 8, 2, BLOCK, hkv, d, device=DEV, dtype=torch.bfloat16, generator=g)
        table = torch.randperm(nblk + 8, device=DEV, generator=g)[:nblk].to(torch.int32)
        out.append((kv, table))
    return out


def n_copies(bytes_one, target=256 * 2**20, cap=8):
    return int(max(1, min(cap, math.ceil(target / max(bytes_one, 1)))))


# The CUDA C++ candidate for the compaction copy (csrc/README.md): 16-byte vector copies, one thread
# per 16 bytes of a kept row, all layers / heads / K+V in one launch through a pointer table.
# Built here with NVRTC (CuPy), which gives the same machine code path as nvcc for this kernel and
# costs no ninja/nvcc build of a torch extension on the device.
CUDA_COMPACT_SRC = r"""
extern "C" __global__ void compact_copy(
    const long long* __restrict__ ptrs, const long long* __restrict__ idx,
    const int* __restrict__ src_bt, const int* __restrict__ dst_bt,
    long long sb, long long st, long long sh, int block_size, int k_keep, int vec_per_row,
    long long idx_sl, long long idx_sh) {
  const int h = blockIdx.y, z = blockIdx.z, layer = z >> 1;
  char* base = reinterpret_cast<char*>(ptrs[z]);
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int i = (int)(e / vec_per_row), v = (int)(e % vec_per_row);
  if (i >= k_keep) return;
  const long long s = idx[layer * idx_sl + h * idx_sh + i];
  if (s < 0) return;
  const long long sblk = src_bt[s / block_size], dblk = dst_bt[i / block_size];
  const uint4* src = reinterpret_cast<const uint4*>(base + sblk * sb + (s % block_size) * st + h * sh) + v;
  uint4* dst = reinterpret_cast<uint4*>(base + dblk * sb + (i % block_size) * st + h * sh) + v;
  *dst = *src;
}
"""


def cuda_compaction_fn(kc, vc, kept, src, dst):
    """A callable running the CUDA C++ candidate (disjoint pages), or None without CuPy."""
    try:
        import cupy as cp
        import numpy as np
    except Exception:
        return None
    kern = cp.RawKernel(CUDA_COMPACT_SRC, "compact_copy")
    caches = [c for pair in zip(kc, vc) for c in pair]
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=DEV)
    idx = kept.to(torch.int64).contiguous()
    src, dst = src.contiguous(), dst.contiguous()
    esz = kc[0].element_size()
    sb, st, sh, _ = (x * esz for x in kc[0].stride())
    d = kc[0].shape[3]
    vec = d * esz // 16
    k = idx.shape[-1]
    hkv = idx.shape[-2]
    threads = 256
    grid = ((k * vec + threads - 1) // threads, hkv, len(caches))
    args = (cp.asarray(ptrs), cp.asarray(idx), cp.asarray(src), cp.asarray(dst),
            np.int64(sb), np.int64(st), np.int64(sh), np.int32(kc[0].shape[1]), np.int32(k), np.int32(vec),
            np.int64(idx.stride(0) if idx.dim() == 3 else 0), np.int64(idx.stride(-2)))

    def run(i):
        kern(grid, (threads,), args, stream=cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream))

    return run


# --- benchmarks ----------------------------------------------------------------------------------------
def max_rel_err(a, b):
    """Largest relative error of each score of WindowStats a against b (the reference)."""
    return {f: float(((getattr(a, f) - getattr(b, f)).abs() / (getattr(b, f).abs() + 1e-9)).max())
            for f in ("defensive_max", "snapkv", "unpooled_mean")}


def bench_scoring(name, shp, n, ceil, probs_dtype=torch.bfloat16):
    import vllm_defensive.triton_kernels as tk
    from vllm_defensive.triton_kernels import torch_impl

    hq, hkv, d = shp["hq"], shp["hkv"], shp["d"]
    kbytes = n * hkv * d * 2
    copies = n_copies(kbytes)
    caches = paged_kv(n, hkv, d, copies, gen_seed=n)
    g = torch.Generator(device=DEV).manual_seed(1)
    qs = [torch.randn(hq, WINDOW, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(copies)]

    def kern(i):
        kv, table = caches[i]
        return tk.paged_window_stats(qs[i], kv[:, 0], table, n, probs_dtype=probs_dtype, window_bias_as_tensor=True)

    def ref(i):
        kv, table = caches[i]
        return torch_impl.window_stats(qs[i], kv[:, 0], table, n, probs_dtype=probs_dtype,
                                       window_bias_as_tensor=True)

    # correctness at this size, against the reference (tolerances as in tests/kernels)
    a, b = kern(0), ref(0)
    err = max_rel_err(a, b)
    del a, b
    t_k, reps_k, t_ki = bench(kern, rotate=copies, budget_s=0.6)
    t_h = host_ms(kern)
    t_g = graph_ms(kern, copies)
    brk = kernel_breakdown(kern) if n == 32768 else {}
    mem_k = peak_extra_mb(kern)
    t_r, reps_r, t_ri = bench(ref, rotate=copies, min_reps=3, max_reps=20, budget_s=1.2)
    mem_r = peak_extra_mb(ref)
    p = n - WINDOW
    rows = hq * WINDOW
    bytes_2pass = 2 * kbytes + hkv * p * 4 * 5 + 2 * hq * WINDOW * d * 2
    flops_qk = 2 * (2 * rows * n * d)  # two passes of Q K^T
    exps = rows * n + rows * p  # one exp per (row, key) per pass
    t_mem = bytes_2pass / ceil["copy_bw_Bps"]
    t_tc = flops_qk / ceil["bf16_mm_flops"]
    t_sfu, t_sfu_m = roofline_exp_terms(exps, ceil)
    roof = max(t_mem, t_tc, t_sfu) * 1e3
    roof_m = max(t_mem, t_tc, t_sfu_m) * 1e3 if t_sfu_m else None
    del caches, qs
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {
        "shape": name, "tokens": n, "probs_dtype": str(probs_dtype).replace("torch.", ""),
        "kernel_ms": t_k, "reference_ms": t_r, "speedup": t_r / t_k, "roofline_ms": roof,
        "of_roofline": t_k / roof, "roofline_measured_ms": roof_m,
        "of_roofline_measured": (t_k / roof_m) if roof_m else None, "kernel_graph_ms": t_g, "kernel_isolated_ms": t_ki,
        "kernel_host_ms": t_h, "reference_isolated_ms": t_ri, "speedup_isolated": t_ri / t_ki,
        "graph_of_roofline": (t_g / roof) if t_g else None, "kernel_breakdown_us": brk,
        "roofline_terms_ms": {"memory_2pass": t_mem * 1e3, "tensor_core": t_tc * 1e3, "sfu_exp": t_sfu * 1e3,
                              "memory_1pass_floor": kbytes / ceil["copy_bw_Bps"] * 1e3},
        "extra_memory_mb": mem_k, "reference_extra_memory_mb": mem_r,
        "bytes_moved": bytes_2pass, "achieved_Bps": bytes_2pass / (t_k * 1e-3),
        "bw_frac_measured": bytes_2pass / (t_k * 1e-3) / ceil["copy_bw_Bps"],
        "bw_frac_spec": bytes_2pass / (t_k * 1e-3) / H100_SPEC_BW,
        "tflops_qk": flops_qk / (t_k * 1e-3) / 1e12,
        "max_rel_err_vs_reference": err, "reps": [reps_k, reps_r], "copies": copies,
    }


def layered_inputs(shp, n):
    """One request's window queries [layers, Hq, W, d], every layer's FlashAttention cache (its K
    views) and one shuffled block table, as the worker sees them."""
    hq, hkv, d, layers = shp["hq"], shp["hkv"], shp["d"], shp["layers"]
    nblk = -(-n // BLOCK)
    g = torch.Generator(device=DEV).manual_seed(n + 7)
    caches = [torch.randn(nblk + 8, 2, BLOCK, hkv, d, device=DEV, dtype=torch.bfloat16, generator=g)
              for _ in range(layers)]
    table = torch.randperm(nblk + 8, device=DEV, generator=g)[:nblk].to(torch.int32)
    q = torch.randn(layers, hq, WINDOW, d, device=DEV, dtype=torch.bfloat16, generator=g)
    return q, [c[:, 0] for c in caches], table


def bench_scoring_layers(name, shp, n, ceil, probs_dtype=torch.bfloat16):
    """What the plugin runs per request: every layer's window statistics in one set of launches
    (`paged_window_stats_layers`, one cache tensor per layer, one block table), against the same
    kernels called layer by layer; the roofline is the one-layer roofline times the layers."""
    import vllm_defensive.triton_kernels as tk

    hq, hkv, d, layers = shp["hq"], shp["hkv"], shp["d"], shp["layers"]
    q, keys, table = layered_inputs(shp, n)

    def layered(i=0):
        return tk.paged_window_stats_layers(q, keys, table, n, probs_dtype=probs_dtype)

    def per_layer(i=0):
        return [tk.paged_window_stats(q[j], keys[j], table, n, probs_dtype=probs_dtype, window_bias_as_tensor=True)
                for j in range(layers)]

    a, b = layered(), per_layer()
    same = all(torch.allclose(a.defensive_max[j], b[j].defensive_max, rtol=1e-2, atol=1e-9) for j in range(layers))
    del a, b
    with ClockSampler() as clk:
        t_k, reps_k, t_ki = bench(layered, budget_s=0.6)
        t_g = graph_ms(layered)
    t_l, reps_l, t_li = bench(per_layer, min_reps=3, budget_s=0.6)
    t_h, t_hd = host_ms(layered), host_ms_triton_dispatch(layered)
    mem_k = peak_extra_mb(layered)
    kbytes = n * hkv * d * 2
    p = n - WINDOW
    rows = hq * WINDOW
    t_mem = (2 * kbytes + hkv * p * 4 * 5 + 2 * rows * d * 2) / ceil["copy_bw_Bps"]
    t_tc = 2 * (2 * rows * n * d) / ceil["bf16_mm_flops"]
    t_sfu, t_sfu_m = roofline_exp_terms(rows * n + rows * p, ceil)
    roof = max(t_mem, t_tc, t_sfu) * 1e3 * layers
    roof_m = max(t_mem, t_tc, t_sfu_m) * 1e3 * layers if t_sfu_m else None
    del keys, q
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"shape": name, "tokens": n, "layers": layers, "kernel_ms": t_k, "kernel_ms_per_layer": t_k / layers,
            "layer_by_layer_ms": t_l, "speedup_vs_layer_by_layer": t_l / t_k, "roofline_ms": roof,
            "of_roofline": t_k / roof, "kernel_graph_ms": t_g, "graph_of_roofline": (t_g / roof) if t_g else None,
            "roofline_measured_ms": roof_m, "of_roofline_measured": (t_k / roof_m) if roof_m else None,
            "sm_clock_during": clk.stats, "kernel_host_ms": t_h, "kernel_host_ms_triton_dispatch": t_hd,
            "kernel_isolated_ms": t_ki, "layer_by_layer_isolated_ms": t_li, "extra_memory_mb": mem_k,
            "matches_layer_by_layer": same, "reps": [reps_k, reps_l]}


def bench_value_norm(name, shp, n, ceil):
    import vllm_defensive.triton_kernels as tk
    from vllm_defensive.triton_kernels import torch_impl

    hq, hkv, d, hidden = shp["hq"], shp["hkv"], shp["d"], shp["hidden"]
    vbytes = n * hkv * d * 2
    copies = n_copies(vbytes, target=128 * 2**20, cap=4)
    caches = paged_kv(n, hkv, d, copies, gen_seed=n + 1)
    g = torch.Generator(device=DEV).manual_seed(2)
    wo = (torch.randn(hidden, hq * d, device=DEV, generator=g) / math.sqrt(hq * d)).to(torch.bfloat16)

    def kern(i):
        kv, table = caches[i]
        return tk.paged_value_norms(kv[:, 1], table, n, wo)

    def ref(i):
        kv, table = caches[i]
        return torch_impl.value_norms(kv[:, 1], table, n, wo)

    a, b = kern(0), ref(0)
    err = float(((a - b).abs() / (b.abs() + 1e-9)).max())
    del a, b
    t_k, reps_k, t_ki = bench(kern, rotate=copies, budget_s=0.6)
    t_g = graph_ms(kern, copies)
    mem_k = peak_extra_mb(kern)
    t_r, reps_r, t_ri = bench(ref, rotate=copies, min_reps=2, max_reps=10, budget_s=1.2)
    mem_r = peak_extra_mb(ref)
    flops = 2 * n * hq * d * hidden
    byts = vbytes + wo.numel() * 2 + hkv * n * 4
    t_tc = flops / ceil["bf16_mm_flops"]
    t_mem = byts / ceil["copy_bw_Bps"]
    roof = max(t_tc, t_mem) * 1e3
    del caches
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {
        "shape": name, "tokens": n, "kernel_ms": t_k, "reference_ms": t_r, "speedup": t_r / t_k,
        "roofline_ms": roof, "of_roofline": t_k / roof, "kernel_graph_ms": t_g, "kernel_isolated_ms": t_ki,
        "reference_isolated_ms": t_ri, "graph_of_roofline": (t_g / roof) if t_g else None,
        "roofline_terms_ms": {"tensor_core": t_tc * 1e3, "memory": t_mem * 1e3},
        "extra_memory_mb": mem_k, "reference_extra_memory_mb": mem_r,
        "tflops": flops / (t_k * 1e-3) / 1e12, "tc_frac_measured": t_tc * 1e3 / t_k,
        "bw_frac_measured": byts / (t_k * 1e-3) / ceil["copy_bw_Bps"],
        "bw_frac_spec": byts / (t_k * 1e-3) / H100_SPEC_BW,
        "max_rel_err_vs_reference": err, "reps": [reps_k, reps_r],
    }


def bench_compaction(name, shp, n, ceil, keep=0.2):
    import vllm_defensive.triton_kernels as tk

    hkv, d, layers = shp["hkv"], shp["d"], shp["layers"]
    nblk = -(-n // BLOCK)
    k = int(n * keep)
    kblk = -(-k // BLOCK)
    total = nblk + kblk + 4
    g = torch.Generator(device=DEV).manual_seed(3)
    kvs = [torch.randn(total, 2, BLOCK, hkv, d, device=DEV, dtype=torch.bfloat16, generator=g)
           for _ in range(layers)]
    kc = [kv[:, 0] for kv in kvs]
    vc = [kv[:, 1] for kv in kvs]
    perm = torch.randperm(total, device=DEV, generator=g).to(torch.int32)
    src, dst = perm[:nblk], perm[nblk:nblk + kblk]
    kept = torch.sort(torch.rand(layers, hkv, n, device=DEV, generator=g).argsort(-1)[..., :k], -1).values
    out = []
    byts = 2 * layers * 2 * hkv * k * d * 2  # read + write, K and V
    for mode, dtab in (("in_place", None), ("into_fresh_pages", dst)):
        def kern(i, dtab=dtab):
            tk.compact_kv(kc, vc, kept, src, dtab)

        def ref(i, dtab=dtab):
            tk.compact_kv(kc, vc, kept, src, dtab, impl="torch")

        t_k, reps_k, t_ki = bench(kern, budget_s=0.5)
        t_g = graph_ms(kern)
        mem_k = peak_extra_mb(kern)
        t_r, reps_r, t_ri = bench(ref, min_reps=3, max_reps=20, budget_s=1.0)
        mem_r = peak_extra_mb(ref)
        roof = byts / ceil["copy_bw_Bps"] * 1e3
        extra = {}
        if dtab is not None and DEV == "cuda":
            cu = cuda_compaction_fn(kc, vc, kept, src, dtab)
            if cu is not None:
                t_cu, _, t_cui = bench(cu, budget_s=0.5)
                t_cug = graph_ms(cu)
                ok = True
                try:  # same bytes as the Triton kernel?
                    tk.compact_kv(kc, vc, kept, src, dtab)
                    a = tk.gather_paged(kc[0], dtab, k)
                    cu(0)
                    torch.cuda.synchronize()
                    ok = bool(torch.equal(a, tk.gather_paged(kc[0], dtab, k)))
                except Exception:
                    ok = False
                extra = {"cuda_cpp_ms": t_cu, "cuda_cpp_vs_triton": t_cu / t_k, "cuda_cpp_same_bytes": ok,
                         "cuda_cpp_isolated_ms": t_cui,
                         "cuda_cpp_graph_ms": t_cug,
                         "cuda_cpp_vs_triton_graph": (t_cug / t_g) if (t_cug and t_g) else None,
                         "cuda_cpp_bw_frac_measured": byts / (t_cu * 1e-3) / ceil["copy_bw_Bps"]}
        out.append({**extra, 
            "shape": name, "tokens": n, "mode": mode, "layers": layers, "kept_per_head": k,
            "kernel_ms": t_k, "kernel_ms_per_layer": t_k / layers, "reference_ms": t_r, "kernel_graph_ms": t_g,
            "kernel_isolated_ms": t_ki, "reference_isolated_ms": t_ri,
            "reference_ms_per_layer": t_r / layers, "speedup": t_r / t_k, "roofline_ms": roof,
            "of_roofline": t_k / roof, "launches": 1,
            "extra_memory_mb": mem_k, "reference_extra_memory_mb": mem_r,
            "bw_frac_measured": byts / (t_k * 1e-3) / ceil["copy_bw_Bps"],
            "bw_frac_spec": byts / (t_k * 1e-3) / H100_SPEC_BW, "reps": [reps_k, reps_r],
        })
    del kvs, kc, vc
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


# One change at a time around the tuned per-head-dim defaults (_scoring.CONFIG_BY_HEAD_DIM). Earlier
# sweeps, on earlier designs: results/kernels/sweep_run2.json (H100), h200_2026-12-01/kernels.json,
# h200_2026-12-02/sweep.json, h200_2026-12-02b/sweep*.json (benchmarks/scoring_variants.py).
SWEEP_P1 = [{"p1_bn": 128}, {"p1_stages": 4}, {"p1_maxnreg": 0}]
SWEEP_P2 = [{"p2_colsum_mma": 1}, {"p2_rowsum_mma": 0}, {"p2_rowsum_mma": 1}, {"p2_bn": 64}, {"p2_stages": 3},
            {"p2_maxnreg": 0}, {"p2_programs_per_sm": 4}, {"p2_programs_per_sm": 12}]
SWEEP_BR = {"qwen05b": [{"br": 256, "p1_warps": 8, "p2_warps": 8, "p2_programs_per_sm": 4}, {"br": 64}],
            "llama8b": [{"p2_br": 64}]}


def sweep(ceil, n=32768, shapes=None):
    """Scoring configurations at 32K per shape: every layer of a request in one set of launches
    (the worker's path), device time (CUDA graphs), each a change of the tuned defaults; the best
    pass-1 and pass-2 changes are then combined. Returns (records, best override per shape)."""
    from vllm_defensive.triton_kernels import _scoring

    res, best = [], {}
    for name in shapes or SHAPES:
        shp = SHAPES[name]
        d = shp["d"]
        tuned = dict(_scoring.CONFIG_BY_HEAD_DIM.get(d, {}))

        def run(var):
            _scoring.CONFIG_BY_HEAD_DIM[d] = {**tuned, **var}
            try:
                t = bench_scoring_layers_graph(shp, n)
                res.append({"shape": name, "tokens": n, "config": dict(var), "graph_ms": t})
            except Exception as e:  # a config can fail to compile (shared memory)
                t = float("inf")
                res.append({"shape": name, "tokens": n, "config": dict(var), "error": repr(e)[:300]})
            print("sweep", name, var, res[-1].get("graph_ms", res[-1].get("error")), flush=True)
            return t

        base_t = run({})
        p1 = [(run(v), v) for v in SWEEP_P1]
        p2 = [(run(v), v) for v in SWEEP_P2 + SWEEP_BR.get(name, [])]
        cands = [(base_t, {})] + p1 + p2
        b1, b2 = min(p1, key=lambda x: x[0]), min(p2, key=lambda x: x[0])
        if b1[0] < base_t and b2[0] < base_t:
            comb = {**b1[1], **b2[1]}
            cands.append((run(comb), comb))
        t_best, v_best = min(cands, key=lambda x: x[0])
        best[name] = v_best
        _scoring.CONFIG_BY_HEAD_DIM[d] = {**tuned, **v_best}
        print("sweep best", name, v_best, t_best, flush=True)
    return res, best


def bench_scoring_layers_graph(shp, n, inputs=None):
    """Device time (CUDA graph) of every layer's window statistics in one set of launches, on
    `layered_inputs(shp, n)` or the given (queries, key caches, block table)."""
    import vllm_defensive.triton_kernels as tk

    q, keys, table = inputs if inputs is not None else layered_inputs(shp, n)
    def f(i=0):
        return tk.paged_window_stats_layers(q, keys, table, n, probs_dtype=torch.bfloat16)

    t = graph_ms(f)
    if t is None:  # the CPU dry run
        t, _, _ = bench(f, budget_s=0.2)
    del keys, q
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return t


def sweep_compaction(n=32768):
    """Compaction tile sizes (llama8b, all layers), device time."""
    from vllm_defensive.triton_kernels import _compact

    base = dict(_compact.CONFIG)
    shp = SHAPES["llama8b"]
    res = []
    best = {}
    for inplace in (False, True):
        key_bt, key_w = ("bt_inplace", "warps_inplace") if inplace else ("bt", "warps")
        cands = []
        for bt in (16, 32, 64, 128):
            for w in (2, 4, 8):
                _compact.CONFIG.update(base)
                _compact.CONFIG.update({key_bt: bt, key_w: w})
                t = compaction_graph_ms(shp, n, inplace)
                res.append({"inplace": inplace, key_bt: bt, key_w: w, "graph_ms": t})
                cands.append((t, {key_bt: bt, key_w: w}))
                print("sweep compaction", "inplace" if inplace else "disjoint", bt, w, t, flush=True)
        best.update(min(cands, key=lambda x: x[0])[1])
    _compact.CONFIG.update(base)
    _compact.CONFIG.update(best)
    return res, best


def compaction_graph_ms(shp, n, inplace, keep=0.2):
    import vllm_defensive.triton_kernels as tk

    hkv, d, layers = shp["hkv"], shp["d"], shp["layers"]
    nblk, k = -(-n // BLOCK), int(n * keep)
    kblk = -(-k // BLOCK)
    total = nblk + kblk + 4
    kvs = [torch.randn(total, 2, BLOCK, hkv, d, device=DEV, dtype=torch.bfloat16) for _ in range(layers)]
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    src, dst = perm[:nblk], perm[nblk:nblk + kblk]
    kept = torch.sort(torch.rand(layers, hkv, n, device=DEV).argsort(-1)[..., :k], -1).values
    kc, vc = [x[:, 0] for x in kvs], [x[:, 1] for x in kvs]
    t = graph_ms(lambda i: tk.compact_kv(kc, vc, kept, src, None if inplace else dst))
    del kvs, kc, vc
    torch.cuda.empty_cache()
    return t if t is not None else float("inf")


SUMMARY_KEYS = ("shape", "tokens", "kernel_ms", "reference_ms", "speedup", "roofline_ms", "extra_memory_mb",
                "bw_frac_measured", "bw_frac_spec", "of_roofline", "mode", "kernel_ms_per_layer",
                "reference_ms_per_layer", "kernel_graph_ms", "graph_of_roofline", "kernel_isolated_ms",
                "reference_isolated_ms", "speedup_isolated", "cuda_cpp_ms", "cuda_cpp_graph_ms", "layers",
                "layer_by_layer_ms", "speedup_vs_layer_by_layer", "roofline_measured_ms", "of_roofline_measured",
                "sm_clock_during", "kernel_host_ms", "kernel_host_ms_triton_dispatch")


def targets(results: dict, n: int = 32768) -> dict:
    """The issue's two scoring targets at 32K, read off the measured records: >= 10x the PyTorch
    reference, within 3x of the roofline. One-layer calls back to back are host-bound (five
    Triton launches, ~0.25 ms of Python), so speed is given in device time (CUDA graph) and on the
    worker's layered call against the reference run layer after layer."""
    out = {}
    one = {r["shape"]: r for r in results.get("scoring", []) if r.get("tokens") == n and "error" not in r}
    lay = {r["shape"]: r for r in results.get("scoring_layers", []) if r.get("tokens") == n and "error" not in r}
    for shape in sorted(set(one) | set(lay)):
        t = {}
        if shape in one:
            o = one[shape]
            t["one_layer_back_to_back_speedup"] = o["speedup"]
            if o.get("kernel_graph_ms"):
                t["one_layer_device_time_speedup"] = o["reference_ms"] / o["kernel_graph_ms"]
        if shape in lay:
            r = lay[shape]
            t["all_layers_ms"] = r["kernel_ms"]
            t["all_layers_of_roofline"] = r["of_roofline"]
            if r.get("graph_of_roofline"):
                t["all_layers_graph_of_roofline"] = r["graph_of_roofline"]
            if r.get("of_roofline_measured"):
                t["all_layers_of_roofline_measured_exp_rate"] = r["of_roofline_measured"]
            if shape in one:
                ref_all = r["layers"] * one[shape]["reference_ms"]  # the reference, layer after layer
                t["all_layers_speedup_vs_reference_per_layer"] = ref_all / r["kernel_ms"]
        speed = max(t.get("one_layer_device_time_speedup", 0), t.get("all_layers_speedup_vs_reference_per_layer", 0))
        t["meets_10x"] = speed >= 10 if speed else None
        t["meets_3x_roofline"] = t["all_layers_of_roofline"] <= 3 if "all_layers_of_roofline" in t else None
        out[shape] = t
    return out


def summarize(results: dict) -> dict:
    """summary.json from a kernels.json: the issue's fields per record, and the targets."""
    ceil = results["ceilings"]
    summary = {"device": results["device"], "versions": results["versions"], "roofline": results["roofline"],
               "timing": results["timing"],
               "ceilings": {"copy_TBps": ceil["copy_bw_Bps"] / 1e12, "bf16_mm_TFLOPs": ceil["bf16_mm_flops"] / 1e12,
                            "exp_Tps_datasheet": ceil["sfu_exp_per_s"] / 1e12,
                            "exp_Tps_measured": (ceil["sfu_exp_measured_per_s"] / 1e12)
                            if ceil.get("sfu_exp_measured_per_s") else None},
               "targets_32k": targets(results)}
    for key in ("scoring", "scoring_layers", "value_norm", "compaction"):
        summary[key] = [{k: v for k, v in r.items() if k in SUMMARY_KEYS} for r in results.get(key, [])
                        if "error" not in r]
    return summary


# --- plot -----------------------------------------------------------------------------------------------
def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, key, title in zip(axes, ("scoring", "value_norm", "compaction"),
                              ("window scoring (per layer)", "value norm (per layer)",
                               "compaction (per layer, all layers in one launch)")):
        rows = results.get(key, [])
        for shape, color in (("llama8b", "tab:blue"), ("qwen05b", "tab:orange")):
            sel = [r for r in rows if r["shape"] == shape and r.get("mode", "in_place") == "in_place"]
            if not sel:
                continue
            x = [r["tokens"] for r in sel]
            kk = [r.get("kernel_ms_per_layer", r["kernel_ms"]) for r in sel]
            rr = [r.get("reference_ms_per_layer", r["reference_ms"]) for r in sel]
            rf = [r["roofline_ms"] / (r["layers"] if "layers" in r else 1) for r in sel]
            ax.plot(x, kk, "o-", color=color, label=f"{shape} kernel")
            ax.plot(x, rr, "s--", color=color, alpha=0.6, label=f"{shape} PyTorch reference")
            ax.plot(x, rf, ":", color=color, alpha=0.8, label=f"{shape} roofline")
            for xi, ki, ri in zip(x, kk, rr):
                ax.annotate(f"{ri / ki:.0f}x", (xi, ki), textcoords="offset points", xytext=(0, -12),
                            fontsize=7, color=color, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"vllm-defensive kernels on {results['device']} (window 32, paged bs 16, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- offline resource report (no GPU) -----------------------------------------------------------------
def _sass_loops(sass: str):
    """(instructions per iteration, of them outside forward-branch blocks, async-copy groups left
    in flight at the loop's first wait) of each loop of a SASS listing. The second is the hot path
    of the scoring passes, whose skipped blocks are the few edge tiles' code (causal mask, pooling
    edges, bias columns); the third (`DEPBAR.LE SB0, N`; None without a wait) is how far ahead the
    key tiles are copied: 0 is a copy waited for one iteration after it was issued, at the end of
    the previous one (Triton 3.6 at num_stages 3 with the block-table load in the loop)."""
    import re

    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"^\.(L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1))
    out = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s.*?(L_x_\d+)", text)
        if not (m and labels.get(m.group(1), i + 1) <= i):
            continue
        a = labels[m.group(1)]
        cold = set()
        for j in range(a, i + 1):
            f = re.match(r"@!?P\d\s+BRA\s.*?(L_x_\d+)", ins[j])
            if f and labels.get(f.group(1), -1) > j:
                cold.update(range(j + 1, min(labels[f.group(1)], i + 1)))
        waits = [re.search(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", ins[j]) for j in range(a, i + 1)]
        depth = next((int(w.group(1), 16) for w in waits if w), None)
        out.append((i - a + 1, i - a + 1 - len(cold), depth))
    return out


PROBS = {0: "fp32", 1: "bf16", 2: "fp16"}  # probs_dtype by the kernels' ROUND code


def resources():
    """Compile the kernels for sm_90 without a GPU, with the configurations the host code picks for
    Llama-3.1-8B's and Qwen2.5-0.5B's shapes: registers, spills (stack), shared memory and, for the
    scoring passes, the hot loop's SASS instructions per tile element and thread."""
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_defensive.triton_kernels import _compact, _scoring, _value_norm

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    one = {"sqd", "skd", "svd", "sd", "swi"}  # unit strides: Triton specialises them
    div16 = {"sqh", "sqw", "skb", "skt", "skh", "svb", "svt", "svh", "sb", "st", "sh", "swo", "RP", "HEAD_D",
             "idx_sl", "idx_sh"}

    def comp(fn, types, consts, opts, elems=None, label="", source=ASTSource, largest=False):
        consts = dict(consts, **{n: 1 for n in fn.arg_names if n in one})
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        sig.update({n: "fp32" for n in ("scale_log2", "inv_rows") if n in sig})
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n in div16)}
        src = source(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                                 text=True).stdout
            sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True,
                                  text=True).stdout
        res = " ".join(part for line in res.splitlines() if "REG" in line for part in line.split()
                       if part.split(":")[0] in ("REG", "STACK"))
        hot = ""
        if elems:
            # the tile loops in code order (pass 2 with its interior loop: edge tiles before, the
            # interior, edge tiles after; the interior one is what the long prompts run)
            found = [x for x in _sass_loops(sass) if x[1] >= 64] or [(0, 0, None)]
            if largest:  # (the Gluon pass 1: its interior loop; the others are the exact path's)
                found = [max(found, key=lambda x: x[0])]
            loops = [x[1] for x in found]
            hot = (f" hot loop{'s' if len(loops) > 1 else ''} {' / '.join(map(str, loops))} instr = "
                   f"{' / '.join(f'{n / elems:.1f}' for n in loops)} per element, copies in flight at the wait "
                   f"{' / '.join(str(x[2]) for x in found)}")
        print(f"{fn.__name__:20s} {label:34s} warps={opts['num_warps']} maxnreg={opts.get('maxnreg')} "
              f"smem={k.metadata.shared} {res}{hot}", flush=True)

    for name, shp in SHAPES.items():
        d, g = shp["d"], shp["hq"] // shp["hkv"]
        c = _scoring._cfg(d)
        br = _scoring._row_block(g * WINDOW, c)
        gluon = _scoring._gluon_pass2(c, torch.device("cuda"), 1, 2, d, torch.bfloat16, torch.bfloat16)
        br2 = gluon.ROWS_PER_PROGRAM if gluon else (int(c["p2_br"]) or br)  # as window_stats_layers picks
        rp = max(-(-g * WINDOW // br) * br, -(-g * WINDOW // br2) * br2)
        ptrs = {"Q": "*bf16", "KPTRS": "*i64", "BT": "*i32"}
        common = dict(HALF=2, KPOOL=5, BR=br, BD=d, CDT=tl.bfloat16, KDT=tl.bfloat16, ALIGNED=True, DOT_PREC="tf32",
                      INTERP=False, BS_POW2=True, OFF32=True)
        w1 = _scoring._p1_warps(br, c)
        comp(_scoring._window_pass1, dict(ptrs, PART="*fp32", ZERO="*i32"),
             dict(common, BN=c["p1_bn"], FIXED=bool(c["p1_fixed_offset"]), NPOLY=int(c["p1_npoly"]),
                  PDL=int(c["pdl"])),
             dict(num_warps=w1, num_stages=c["p1_stages"], **_scoring._maxnreg(c["p1_maxnreg"])),
             br * c["p1_bn"] / (32 * w1), f"{name} BR={br} BN={c['p1_bn']}")
        tb2 = int(c["p2_br"]) or br  # the Triton pass 2's row block (CPU, fp32 probabilities, or p2_gluon off)
        w2 = _scoring._warps(tb2, c["p2_warps"])
        t2 = dict(ptrs, ROW="*fp32", PACKED="*i32", UNP="*fp32", PSUMS="*fp32")
        # (probs, p2_colsum_mma, p2_rowsum_mma): the defaults, then each product path the other way
        rs = bool(c["p2_rowsum_mma"])
        cs = bool(c["p2_colsum_mma"])
        for rnd, mma, rsum in ((1, cs, rs), (1, not cs, rs), (1, cs, not rs), (2, cs, rs), (0, False, False)):
            comp(_scoring._window_pass2, t2, dict(common, BR=tb2, BN=c["p2_bn"], ROUND=rnd, EXACT=rnd > 0,
                                                  RBITS=max(1, (rp - 1).bit_length()), COLSUM_MMA=mma,
                                                  ROWSUM_MMA=rsum, INTERIOR=bool(c["p2_interior_loop"])),
                 dict(num_warps=w2, num_stages=c["p2_stages"], **_scoring._maxnreg(c["p2_maxnreg"])),
                 tb2 * c["p2_bn"] / (32 * w2),
                 f"{name} BR={tb2} BN={c['p2_bn']} probs {PROBS[rnd]}{' colsum mma' if mma else ''}"
                 f"{' rowsum mma' if rsum else ''}")
        if gluon:  # the Gluon pass 2, for 16-bit probabilities (where the host code picks it)
            from triton.experimental.gluon._runtime import GluonASTSource

            for rnd, pdt in ((1, tl.bfloat16), (2, tl.float16)):
                comp(gluon.window_pass2_gluon, t2,
                     dict(HALF=2, KPOOL=5, BD=d, RBITS=max(1, (rp - 1).bit_length()), PDT=pdt,
                          KDT=tl.bfloat16, ALIGNED=True, BS_POW2=True, OFF32=True, STAGES=int(c["p2_gluon_stages"]),
                          Q_SMEM=bool(c["p2_gluon_q_smem"]), ATOMIC_MAX=bool(c["p2_gluon_atomic_max"]),
                          MOVM=bool(c["p2_gluon_movm"]), PDL=int(c["pdl"])),
                     dict(num_warps=1, **_scoring._maxnreg(c["p2_gluon_maxnreg"])),
                     gluon.ROWS_PER_PROGRAM * gluon.KEYS_PER_TILE / 32,
                     f"{name} BR={gluon.ROWS_PER_PROGRAM} BN={gluon.KEYS_PER_TILE} probs {PROBS[rnd]}",
                     source=GluonASTSource)
        # the Gluon pass 1 (sm_90; off by default: slower than the Triton one so far), with and
        # without its polynomial exponentials
        from vllm_defensive.triton_kernels import _scoring_gluon_pass1 as g1
        from triton.experimental.gluon._runtime import GluonASTSource

        ng1 = -(-g * WINDOW // g1.ROWS_PER_GROUP)
        for npoly in (0, 1):
            comp(g1.window_pass1_gluon, dict(ptrs, PART="*fp32"),
                 dict(HALF=2, KPOOL=5, BD=d, NG=ng1, KDT=tl.bfloat16, ALIGNED=True, BS_POW2=True, OFF32=True,
                      STAGES=int(c["p1_gluon_stages"]), NPOLY=npoly, AHEAD=bool(c["p1_gluon_ahead"])),
                 dict(num_warps=4, **_scoring._maxnreg(c["p1_gluon_maxnreg"])),
                 ng1 * g1.ROWS_PER_GROUP * g1.KEYS_PER_TILE / 128,
                 f"{name} NG={ng1} BN={g1.KEYS_PER_TILE} npoly {npoly}{'' if c['p1_gluon'] else ' (off)'}",
                 source=GluonASTSource, largest=True)
        # the small kernels around the passes: compiled too (a GPU-only compile error shows here)
        comp(_scoring._window_combine, {"PART": "*fp32", "ROW": "*fp32", "ZERO": "*i32"},
             dict(BR=_scoring.COMBINE_ROWS, BS=_scoring.COMBINE_SPLITS, BZ=_scoring.ZERO_TILE, PDL=int(c["pdl"])),
             dict(num_warps=4), label=name)
        comp(_scoring._window_sums, {"PSUMS": "*fp32", "SUMS": "*fp32"},
             dict(BR=_scoring.SUMS_TILE, BP=_scoring.SUMS_TILE, PDL=int(c["pdl"])), dict(num_warps=1), label=name)
        for rnd in (1, 2, 0):
            comp(_scoring._window_fixup, {n: "*fp32" for n in ("DMAX", "SNAP", "UNP", "UNPP", "ROW", "SUMS", "BIAS",
                                                                "bias_src_off")} | {"PACKEDP": "*i32"},
                 dict(HALF=2, KPOOL=5, BN=256, BRB=min(128, br), RBITS=max(1, (rp - 1).bit_length()), ROUND=rnd,
                      DO_FIX=rnd > 0, INTERP=False, MERGE=br2 < g * WINDOW, PDL=int(c["pdl"])), dict(num_warps=4),
                 label=f"{name} probs {PROBS[rnd]}")
        v = _value_norm.CONFIG
        comp(_value_norm._value_norm_kernel, {"VPTRS": "*i64", "BT": "*i32", "WPTRS": "*i64", "OUT": "*fp32"},
             dict(BTK=v["bt"], BO=v["bo"], BD=d, CDT=tl.bfloat16, VDT=tl.bfloat16, WDT=tl.bfloat16, ALIGNED=True,
                  DOT_PREC="tf32", INTERP=False), dict(num_warps=v["warps"], num_stages=v["stages"]), label=name)
    for inplace in (True, False):
        comp(_compact._compact_kernel, {"PTRS": "*i64", "IDX": "*i64", "SRC_BT": "*i32", "DST_BT": "*i32"},
             dict(ELEM=tl.int16, BTK=_compact.CONFIG["bt_inplace" if inplace else "bt"], BD=128, INPLACE=inplace,
                  ALIGNED=True), dict(num_warps=_compact.CONFIG["warps_inplace" if inplace else "warps"]),
             label="in place" if inplace else "into fresh pages")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernels"))
    ap.add_argument("--tokens", default="4096,16384,32768,131072")
    ap.add_argument("--shapes", default="llama8b,qwen05b")
    ap.add_argument("--only", default="scoring,scoring_layers,value_norm,compaction")
    ap.add_argument("--sweep", action="store_true", help="also time scoring configurations at 32K")
    ap.add_argument("--sweep-compaction", action="store_true", help="and compaction tile sizes")
    ap.add_argument("--config", default="", help="JSON overrides of _scoring.CONFIG")
    ap.add_argument("--resources", action="store_true", help="offline sm_90 resource report, no GPU")
    ap.add_argument("--dry-cpu", action="store_true", help="test this script on the CPU (needs TRITON_INTERPRET=1)")
    ap.add_argument("--summary-from", default="", help="rebuild summary.json (next to it) from a kernels.json; no GPU")
    args = ap.parse_args()
    if args.summary_from:
        with open(args.summary_from) as f:
            summary = summarize(json.load(f))
        with open(os.path.join(os.path.dirname(os.path.abspath(args.summary_from)), "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary["targets_32k"], indent=1))
        return
    if args.resources:
        resources()
        return
    global DEV
    if args.dry_cpu:
        DEV = "cpu"
        os.environ["VLLM_DEFENSIVE_KERNELS"] = "triton"
        SHAPES["llama8b"].update(hq=8, hkv=2, hidden=256, layers=3)
        SHAPES["qwen05b"].update(hq=7, hkv=1, hidden=128, layers=2)
    elif not torch.cuda.is_available():
        sys.exit("needs CUDA (use --resources for the offline compile report)")
    from vllm_defensive.triton_kernels import _scoring

    if args.config:
        _scoring.CONFIG.update(json.loads(args.config))
    os.makedirs(args.out, exist_ok=True)
    ceil = ceilings()
    if ceil.get("sfu_exp_measured_per_s"):
        print(f"exp2 rate: measured {ceil['sfu_exp_measured_per_s'] / 1e12:.3f} T/s against {ceil['sfu_exp_per_s'] / 1e12:.3f} "
              f"(16 / SM / clock at the max clock); clock during it {ceil.get('sfu_exp_measured_clock')}", flush=True)
    dev = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run, interpreter)"
    results = {
        "device": dev, "versions": versions(), "ceilings": ceil,
        "setup": {"window": WINDOW, "block_size": BLOCK, "dtype": "bfloat16", "cache_layout": "FlashAttention "
                  "(num_blocks, 2, block_size, Hkv, d), shuffled block ids", "shapes": SHAPES,
                  "scoring_probs_dtype": "bfloat16 (official rounding)", "compaction_keep": 0.2},
        "timing": ("kernel_ms / reference_ms: back-to-back calls (per-call average of a run of calls with "
                   "one sync at the end, as when the plugin scores layer after layer); *_isolated_ms: median of "
                   "single synchronised calls (host launch time + device time in series); kernel_graph_ms: CUDA-"
                   "graph replay (device time alone); kernel_host_ms: median host time to issue one call from an "
                   "idle device (kernel_host_ms_triton_dispatch: the same with every launch through Triton's "
                   "dispatch, VLLM_DEFENSIVE_FAST_LAUNCH=0). Inputs rotate among copies so L2 does not hold them."),
        "roofline": (
            "scoring: max(memory, tensor core, exp unit) with memory = 2 reads of the layer's keys (the "
            "two-pass design: pass 1 softmax statistics, pass 2 pooled aggregation) + outputs, over the "
            "measured device-to-device copy rate (read+write bytes); tensor core = 2 x (2*Hq*W*L*d) FLOP of "
            "Q K^T over the measured 8192^3 bf16 matmul rate; exp = Hq*W*(L + P) exp2 over 16/SM/clock at the "
            "max SM clock (roofline_ms, of_roofline: the targets are judged on these). roofline_measured_ms / "
            "of_roofline_measured: the exp term over the measured MUFU-bound exp2 rate instead (ceilings."
            "sfu_exp_measured_per_s, with the SM clock sampled during it), like the other two terms' measured "
            "rates. The single-read floor (1 x keys) is listed as memory_1pass_floor. value_norm: "
            "max(2*N*Hq*d*D FLOP / measured bf16 matmul rate, (V + W_o + out) bytes / copy rate). compaction: "
            "2 x kept bytes (read + write, K and V, all layers) / copy rate."),
    }
    shapes = [s for s in args.shapes.split(",") if s]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    only = set(args.only.split(","))
    t_start = time.time()
    if args.sweep:
        results["sweep"], results["sweep_best"] = sweep(ceil, n=32768 if DEV == "cuda" else max(tokens),
                                                         shapes=shapes)
        if args.sweep_compaction and DEV == "cuda":
            results["sweep_compaction"], results["sweep_compaction_best"] = sweep_compaction()
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(results, f, indent=1)
    from vllm_defensive.triton_kernels import _compact, _value_norm

    results["configs_used"] = {"scoring": dict(_scoring.CONFIG), "scoring_by_head_dim": {
        str(k): v for k, v in _scoring.CONFIG_BY_HEAD_DIM.items()}, "compaction": dict(_compact.CONFIG),
        "value_norm": dict(_value_norm.CONFIG)}
    for key, fn in (("scoring", bench_scoring), ("scoring_layers", bench_scoring_layers), ("value_norm", bench_value_norm),
                    ("compaction", bench_compaction)):
        if key not in only:
            continue
        results[key] = []
        for name in shapes:
            for n in tokens:
                try:
                    r = fn(name, SHAPES[name], n, ceil)
                except torch.cuda.OutOfMemoryError as e:
                    r = {"shape": name, "tokens": n, "error": f"OOM: {str(e)[:200]}"}
                    torch.cuda.empty_cache()
                rs = r if isinstance(r, list) else [r]
                results[key].extend(rs)
                for x in rs:
                    print(f"{key:10s} {name:8s} {n:7d} {x.get('mode', ''):16s} kernel {x.get('kernel_ms', float('nan')):9.4f} ms"
                          f"  ref {x.get('reference_ms', float('nan')):9.3f} ms  x{x.get('speedup', float('nan')):7.1f}"
                          f"  roof {x.get('roofline_ms', float('nan')):8.4f} ms ({x.get('of_roofline', float('nan')):4.2f}x)"
                          + (f" measured-exp {x['of_roofline_measured']:4.2f}x" if x.get("of_roofline_measured") else "")
                          + f"  mem {x.get('extra_memory_mb', float('nan')):8.1f} MB"
                          f"  bw {x.get('bw_frac_measured', float('nan')):5.2f}"
                          + (f"  graph {x['kernel_graph_ms']:.4f} ms" if x.get("kernel_graph_ms") else "")
                          + (f"  cuda-c++ {x['cuda_cpp_ms']:.4f} ms graph {x.get('cuda_cpp_graph_ms') or 0:.4f}"
                             if "cuda_cpp_ms" in x else "")
                          + f"  {x.get('error', '')}", flush=True)
                with open(os.path.join(args.out, "kernels.json"), "w") as f:
                    json.dump(results, f, indent=1)
    if "scoring" in only:  # the fp32-probability variant, once at 32K
        results["scoring_fp32probs"] = [bench_scoring(s, SHAPES[s], max(tokens), ceil, probs_dtype=None)
                                        for s in shapes]
    results["wall_s"] = time.time() - t_start
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary = summarize(results)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "kernels.png"))
    except Exception as e:  # the numbers matter more than the picture
        print("plot failed:", e)
    print(f"done in {time.time() - t_start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
