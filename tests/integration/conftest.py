"""Real vLLM 0.24 on the CPU, real SmolLM2-135M-Instruct.

Engines run in the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can look at the
scheduler and its block pool; test_plugin_server.py covers the multi-process served path.
"""

import os

import pytest
from kvd_helpers import block_pool, model_path

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


# Each test module defines its own module-scoped `llm` engine; these build on whichever it is.
@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def pool_start(llm):
    """The pool's free blocks once the module's engine is up: every test must return to it."""
    return block_pool(llm).get_num_free_blocks()
