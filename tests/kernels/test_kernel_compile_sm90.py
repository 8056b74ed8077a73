"""Every Triton kernel compiles for the GPU (sm_90, Hopper) on this CPU-only machine.

The interpreter tests run the kernels' Python, not the compiler: an error that only the GPU
compile path raises (a type clash between the branches of an `if`, a register or shared-memory
limit, bad inline PTX) would otherwise first show on the GPU machine. The offline report compiles
each kernel with the configuration the host code picks for Llama-3.1-8B's and Qwen2.5-0.5B's
shapes (ptxas included) and prints registers, spills and the scoring passes' hot-loop size.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = ["_window_pass1", "window_pass1_gluon", "_window_pass2", "window_pass2_gluon", "_window_combine", "_window_sums", "_window_fixup",
           "_value_norm_kernel", "_compact_kernel"]


def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--resources"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    for name in KERNELS:
        assert any(ln.startswith(name) for ln in lines), f"{name} missing:\n{out.stdout}"
    # every compile reported its registers; the scoring passes their hot loop (pass 2: 3 probability
    # types and each tensor-core sum the other way round, two shapes)
    assert all(" REG:" in ln for ln in lines), out.stdout
    assert sum(ln.startswith("_window_pass2") and "hot loop" in ln for ln in lines) == 10, out.stdout
    # the Gluon pass 2 (which the GPU runs for 16-bit probabilities): both shapes, bf16 and fp16, no spills
    gl = [ln for ln in lines if ln.startswith("window_pass2_gluon")]
    assert len(gl) == 4 and all("hot loops" in ln and "STACK:0" in ln for ln in gl), gl
    # the Gluon pass 1 (off by default): both shapes, with and without the polynomial exponentials,
    # its interior loop measured
    g1 = [ln for ln in lines if ln.startswith("window_pass1_gluon")]
    assert len(g1) == 4 and all("hot loop " in ln for ln in g1), g1
    # pass 1's key tiles are double-buffered two tiles ahead (p1_stages 5): at 3 or 4 stages Triton
    # 3.6 single-buffers them and waits at each iteration's top for the copy the previous one issued
    # last (H200, 32K: pass 1 9% slower)
    # (two interior loops: against the fixed offset, and with the running maximum for the splits that
    # need it; the first is the shorter)
    p1 = [ln for ln in lines if ln.startswith("_window_pass1")]
    assert len(p1) == 2 and all(ln.endswith("copies in flight at the wait 2 / 2") for ln in p1), p1
    for ln in p1:
        fixed, running = (int(x) for x in re.search(r"hot loops (\d+) / (\d+) instr", ln).groups())
        assert fixed < running, ln
