"""Real vLLM 0.24 on the CPU, real SmolLM2-135M-Instruct.

Engines run in the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can look at the
scheduler and its block pool; test_plugin_server.py covers the multi-process served path.
"""

import os

import pytest
from kvd_helpers import model_path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


@pytest.fixture(scope="session")
def reference_model():
    import torch

    from vllm_defensive.reference import load_model

    torch.manual_seed(0)
    model, _ = load_model(model_path())
    return model
