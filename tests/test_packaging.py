"""The package layout promises of the design card."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    # From a neutral directory, so the repo root is not on sys.path.
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout


def test_kernels_install_under_our_namespace_never_top_level():
    out = run(
        "import importlib.util, vllm_defensive.triton_kernels as t;"
        "s = importlib.util.find_spec('triton_kernels');"
        "print(t.__name__); print(s.origin if s else None)"
    )
    name, top = out.split()
    assert name == "vllm_defensive.triton_kernels"
    # a top-level triton_kernels may exist (OpenAI's), but it must never be our folder
    assert top == "None" or not top.startswith(str(REPO / "triton_kernels"))


def test_importing_the_package_and_policy_does_not_import_vllm():
    out = run("import sys, vllm_defensive, vllm_defensive.policy, vllm_defensive.stats;"
              "print('vllm' in sys.modules)")
    assert out.strip() == "False"


def test_plugin_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("defensive") == "vllm_defensive.plugin:register"
