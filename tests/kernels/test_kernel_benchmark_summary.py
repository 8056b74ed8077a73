"""The kernel benchmark's summary.json is what its kernels.json says: rebuilt offline from the
committed H200 run, it equals the committed summary, and its targets are read off the records."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "benchmarks", "results", "kernels", "h200_2026-12-04b")


def test_summary_is_rebuilt_from_the_records(tmp_path):
    shutil.copy(os.path.join(RUN, "kernels.json"), tmp_path / "kernels.json")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--summary-from",
                          str(tmp_path / "kernels.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rebuilt = json.loads((tmp_path / "summary.json").read_text())
    with open(os.path.join(RUN, "summary.json")) as f:
        assert rebuilt == json.load(f)
    with open(os.path.join(ROOT, "benchmarks", "results", "kernels", "summary.json")) as f:
        assert rebuilt == json.load(f)  # the top-level summary is this run

    records = json.loads((tmp_path / "kernels.json").read_text())
    layered = {r["shape"]: r for r in records["scoring_layers"] if r["tokens"] == 32768}
    one = {r["shape"]: r for r in records["scoring"] if r["tokens"] == 32768}
    for shape, t in rebuilt["targets_32k"].items():
        assert t["all_layers_of_roofline"] == layered[shape]["of_roofline"]
        assert t["one_layer_device_time_speedup"] == one[shape]["reference_ms"] / one[shape]["kernel_graph_ms"]
        assert t["meets_3x_roofline"] == (layered[shape]["of_roofline"] <= 3)
        # the exp term over the measured exp2 rate: a roofline no lower than the datasheet one
        r = layered[shape]
        assert t["all_layers_of_roofline_measured_exp_rate"] == r["of_roofline_measured"]
        assert r["roofline_measured_ms"] >= r["roofline_ms"]
        assert abs(r["of_roofline_measured"] - r["kernel_ms"] / r["roofline_measured_ms"]) < 1e-9
        assert r["sm_clock_during"]["samples"] > 0
    # the host time of a layered call, with the launch fast path and through Triton's dispatch
    host = [(r["kernel_host_ms"], r["kernel_host_ms_triton_dispatch"]) for r in records["scoring_layers"]]
    assert host and all(a > 0 and b > 0 for a, b in host)
    assert sum(a < b for a, b in host) >= 0.75 * len(host)
    ceil = records["ceilings"]
    assert 0 < ceil["sfu_exp_measured_per_s"] <= ceil["sfu_exp_per_s"]
    assert rebuilt["ceilings"]["exp_Tps_measured"] == ceil["sfu_exp_measured_per_s"] / 1e12
    # the fields, per scoring record
    need = {"shape", "tokens", "kernel_ms", "reference_ms", "speedup", "roofline_ms", "extra_memory_mb"}
    assert rebuilt["scoring"] and all(need <= set(r) for r in rebuilt["scoring"])
    assert rebuilt["device"] == "NVIDIA H200" and rebuilt["versions"]["triton"] == "3.6.0"
