#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: real vLLM on the CPU, real small models.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/policy -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_HOST_IP=127.0.0.1 VLLM_USE_AOT_COMPILE=0
# Run pytest from the venv, never `python -m pytest` from the repo root: that would put ./ on
# sys.path and shadow OpenAI's top-level `triton_kernels` (imported by vLLM) with our folder.
exec "$ROOT/.venv/bin/pytest" "$@"
