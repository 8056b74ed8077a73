#!/usr/bin/env bash
# Issue 6's measurement: RULER quality of every eviction method through ONE vLLM server per model
# (methods, budgets and protocols travel as per-request vllm_xargs), on the GPU machine.
#
#   1. here, on the CPU machine (needs the local venv and the model folders):
#        benchmarks/quality/run_gpu.sh prepare
#      generates the RULER data for every model/length (nvidia-long-context-eval's generators,
#      each model's own tokenizer) into tmp/quality-data/ (git-ignored) with the tokenizer files,
#      so the GPU machine needs neither the generators nor their data. Carry "tmp/quality-data".
#
#   2. on the GPU machine, one device call per model and length (a call must end within 10 min;
#      the eval stops itself DEADLINE s after the script starts and a rerun resumes), after the
#      vLLM bundle and that model are installed (../shared/gpu/README.md: make-bundle.sh --model
#      qwen05b|smollm2; the last call sources install.sh, which exports GPU_MODEL_DIR):
#        source .gpu/cN/install.sh && KEEP_SERVER=1 benchmarks/quality/run_gpu.sh eval qwen05b 4096
#        source .gpu/cN/install.sh && benchmarks/quality/run_gpu.sh eval qwen05b 8192
#        source .gpu/cN/install.sh && benchmarks/quality/run_gpu.sh eval smollm2 4096
#      (carry ["tmp/quality-data"] with each; with KEEP_SERVER=1 the server outlives the call and
#      the next call on the same warm machine reuses it: the machine stays warm ~30 s.)
#      $OUT gets results.json, summary.json, quality.png, meta.json, samples.jsonl.xz and
#      server.log.xz. A call cut short by DEADLINE resumes when rerun on the same warm machine
#      (results live in $WORK); on a fresh one, carry its samples.jsonl.xz and set RESUME to it.
#
#   3. here again, merge every call's $OUT folder into the committed results:
#        benchmarks/quality/run_gpu.sh report /work/.device/<call1> /work/.device/<call2> ...
#      -> benchmarks/results/quality/{samples.jsonl,results.json,summary.json,quality.png}
#
# Parameters (environment): SAMPLES (per task and length, default 25), SEED (42), CORE_METHODS
# (none,snapkv,criticalkv,defensivekv), EXTRA_METHODS (streamingllm,adakv,pyramidkv,
# layer_defensivekv; empty to skip), BUDGETS (0.1,0.2,0.4), PROTOCOLS (both), TASKS (all),
# CONCURRENCY (128), DEADLINE (default 540 s), PREFIX_CACHING (1: every prompt is prefilled once
# and its later requests hit the prefix cache up to their observation window, which the plugin
# recomputes and scores exactly as without caching (tests/integration/test_engine.py, issue test
# 4); 0 for a cross-check, ~10x more prefill), GPU_MEM_UTIL (0.85), DATA (tmp/quality-data), WORK
# (/tmp/kvd-quality), MODEL_DIR (default $GPU_MODEL_DIR), PORT (8000), KEEP_SERVER (0),
# SERVER_ARGS (extra vllm serve flags), XARGS (a JSON object of more per-request fields for every
# evicting request: a method variant, e.g. '{"kv_uniform_norm": "raw", "kv_uniform_floor": true}')
# with RUN_NAME (its results folder under $WORK, default the model name; the running server is
# reused, so a variant runs on the same server right after the default).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

SAMPLES=${SAMPLES:-25}
SEED=${SEED:-42}
CORE_METHODS=${CORE_METHODS:-none,snapkv,criticalkv,defensivekv}
EXTRA_METHODS=${EXTRA_METHODS-streamingllm,adakv,pyramidkv,layer_defensivekv}
BUDGETS=${BUDGETS:-0.1,0.2,0.4}
PROTOCOLS=${PROTOCOLS:-both}
TASKS=${TASKS:-all}
CONCURRENCY=${CONCURRENCY:-128}
DEADLINE=${DEADLINE:-540}
PREFIX_CACHING=${PREFIX_CACHING:-1}
GPU_MEM_UTIL=${GPU_MEM_UTIL:-0.85}
DATA=${DATA:-tmp/quality-data}
[[ $DATA == /* ]] || DATA="$ROOT/$DATA"  # the eval runs from / (see cmd_eval)
WORK=${WORK:-/tmp/kvd-quality}
RESULTS=${RESULTS:-benchmarks/results/quality}

label() {  # the model's name in every report
  case $1 in
    qwen05b) echo "Qwen2.5-Coder-0.5B-Instruct" ;;
    smollm2) echo "SmolLM2-135M-Instruct" ;;
    *) echo "unknown model '$1' (qwen05b or smollm2)" >&2; return 2 ;;
  esac
}
lengths_of() {  # the issue's lengths per model (LENGTHS overrides)
  [[ -n ${LENGTHS:-} ]] && { echo "$LENGTHS"; return; }
  case $1 in qwen05b) echo "4096,8192" ;; smollm2) echo "4096" ;; esac
}
now() { date +%s; }

cmd_prepare() {
  local py="$ROOT/.venv/bin/python"
  [[ -x $py ]] || { echo "no $ROOT/.venv: run scripts/setup.sh first" >&2; exit 2; }
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  mkdir -p "$DATA/tokenizers"
  for model in ${MODELS:-qwen05b smollm2}; do
    local dir lengths
    dir=$("$py" -m vllm_defensive.models ensure "$model" | tail -1)
    lengths=$(lengths_of "$model")
    "$py" -c "import sys; from vllm_defensive.evaluation.tasks import copy_tokenizer; copy_tokenizer(sys.argv[1], sys.argv[2])" \
      "$dir" "$DATA/tokenizers/$model"
    echo "== $model ($lengths tokens, $SAMPLES samples per task)"
    "$py" -m vllm_defensive.cli_main eval --prepare-only --tokenizer "$DATA/tokenizers/$model" --tasks "$TASKS" \
      --lengths "$lengths" --samples "$SAMPLES" --seed "$SEED" --cache-dir "$DATA/ruler" \
      --prepare-jobs "${PREPARE_JOBS:-2}" --out "$WORK/prepare"
  done
  rm -rf "$DATA/ruler/logs" "$DATA/ruler/nltk_data"
  echo "carry \"$DATA\" ($(du -sh "$DATA" | cut -f1)) to the GPU machine"
}

server_pid=""
stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$server_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}

cmd_eval() {
  local model=${1:?usage: run_gpu.sh eval MODEL [LENGTHS]} lengths=${2:-}
  local name; name=$(label "$model")
  lengths=${lengths:-$(lengths_of "$model")}
  local model_dir=${MODEL_DIR:-${GPU_MODEL_DIR:-}}
  local t0; t0=$(now)
  [[ -n $model_dir && -f $model_dir/config.json ]] || { echo "set MODEL_DIR (or source the bundle's install.sh for GPU_MODEL_DIR)" >&2; exit 2; }
  [[ -d $DATA/tokenizers/$model && -d $DATA/ruler ]] || { echo "no $DATA/tokenizers/$model: run 'run_gpu.sh prepare' on the CPU machine and carry $DATA" >&2; exit 2; }
  python3 -c "import vllm" 2>/dev/null || { echo "vllm is not importable: source the bundle's install.sh first" >&2; exit 2; }
  # The plugin registers through its entry point: install the checkout (once per machine).
  if ! python3 -c "from importlib.metadata import entry_points as e; import sys; sys.exit(0 if any(x.name == 'defensive' for x in e(group='vllm.general_plugins')) else 1)"; then
    python3 -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  fi
  local out="$WORK/${RUN_NAME:-$model}" log="$WORK/server.log" port=${PORT:-8000}
  mkdir -p "$out"
  if [[ -n ${RESUME:-} && ! -s $out/samples.jsonl ]]; then
    python3 -c "import lzma,sys,shutil; shutil.copyfileobj((lzma.open if sys.argv[1].endswith('.xz') else open)(sys.argv[1],'rb'), open(sys.argv[2],'wb'))" "$RESUME" "$out/samples.jsonl"
  fi
  # One max-model-len per model (its longest length), so that calls of one model share a server.
  local max_len; max_len=${MAX_MODEL_LEN:-$(tr ',' '\n' <<<"$lengths,$(lengths_of "$model")" | sort -n | tail -1)}
  local prefix_flag=--no-enable-prefix-caching
  [[ $PREFIX_CACHING == 1 ]] && prefix_flag=--enable-prefix-caching
  local server_flags="--max-model-len $max_len --gpu-memory-utilization $GPU_MEM_UTIL $prefix_flag --kv-eviction none ${SERVER_ARGS:-}"
  if curl -sf "http://127.0.0.1:$port/v1/models" 2>/dev/null | grep -q "\"$name\"" && [[ -s $WORK/server.pid ]] \
     && grep -qx -- "$server_flags" "$WORK/server.flags" 2>/dev/null; then
    server_pid=$(cat "$WORK/server.pid")
    echo "reusing the running server $server_pid ($name)"
  else
    [[ -s $WORK/server.pid ]] && { server_pid=$(cat "$WORK/server.pid"); stop_server; }
    rm -f "$WORK/server.pid"
    echo "$server_flags" >"$WORK/server.flags"
    # Own session, cwd=/ (the checkout's top-level triton_kernels/ must not shadow OpenAI's).
    (cd / && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$WORK/server.pid" \
        python3 -m vllm.entrypoints.cli.main serve "$model_dir" --served-model-name "$name" \
        --host 127.0.0.1 --port "$port" $server_flags >"$log" 2>&1) &
    for _ in $(seq 50); do [[ -s $WORK/server.pid ]] && break; sleep 0.1; done
    server_pid=$(cat "$WORK/server.pid")  # the server's session and process group leader
    echo "server $server_pid starting ($name: $server_flags)"
  fi
  [[ ${KEEP_SERVER:-0} == 1 ]] || trap stop_server EXIT
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { tail -50 "$log"; echo "server died" >&2; exit 1; }
    sleep 1
  done
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null || { tail -50 "$log"; echo "server not ready" >&2; exit 1; }
  echo "server ready after $(( $(now) - t0 )) s"
  local device; device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
  local common=(--endpoint "http://127.0.0.1:$port" --model "$name" --tokenizer "$DATA/tokenizers/$model"
                --cache-dir "$DATA/ruler" --tasks "$TASKS" --lengths "$lengths" --samples "$SAMPLES" --seed "$SEED"
                --protocols "$PROTOCOLS" --out "$out" --concurrency "$CONCURRENCY" --require-eviction
                --no-progress ${device:+--device "$device"} --note "$name server: vllm serve $server_flags")
  [[ -n ${XARGS:-} ]] && common+=(--xargs "$XARGS" --note "every evicting request also sent vllm_xargs $XARGS")
  # Headline first (20% budget, core methods), then the other budgets, then the extra methods:
  # a call cut short by DEADLINE still has the comparison the issue asks for.
  local rc=0 stage
  for stage in "$CORE_METHODS|0.2" "$CORE_METHODS|$BUDGETS" "${EXTRA_METHODS:+none,$EXTRA_METHODS}|$BUDGETS"; do
    local methods=${stage%%|*} budgets=${stage##*|}
    [[ -z $methods ]] && continue
    local left=$(( DEADLINE - ($(now) - t0) ))
    (( left > 20 )) || { echo "deadline reached: rerun to resume"; rc=124; break; }
    echo "== $methods @ $budgets (${left} s left)"
    (cd / && timeout --signal=INT --kill-after=30 "$left" python3 -m vllm_defensive.cli_main eval "${common[@]}" \
        --methods "$methods" --budgets "$budgets") || { rc=$?; echo "eval exited with $rc"; [[ $rc == 124 || $rc == 130 ]] && break; }
  done
  [[ ${KEEP_SERVER:-0} == 1 ]] || stop_server
  (cd / && python3 -m vllm_defensive.cli_main eval --report-only --out "$out" --no-progress) || true
  if [[ -n ${OUT:-} ]]; then
    cp "$out"/{results.json,summary.json,quality.png,meta.json} "$OUT"/ 2>/dev/null || true
    python3 - "$out/samples.jsonl" "$OUT/samples.jsonl.xz" "$log" "$OUT/server.log.xz" <<'PY'
import lzma, os, sys
for src, dst, tail in ((sys.argv[1], sys.argv[2], None), (sys.argv[3], sys.argv[4], 2_000_000)):
    if os.path.isfile(src):
        with open(src, "rb") as f:
            if tail and os.path.getsize(src) > tail:
                f.seek(-tail, os.SEEK_END)
            data = f.read()
        with lzma.open(dst, "wb") as g:
            g.write(data)
PY
  fi
  echo "done in $(( $(now) - t0 )) s (exit $rc)"
  return $rc
}

cmd_report() {
  (( $# )) || { echo "usage: run_gpu.sh report DIR... (folders holding samples.jsonl.xz + meta.json)" >&2; exit 2; }
  "$ROOT/.venv/bin/python" -m vllm_defensive.cli_main eval --report-only --out "$RESULTS" --merge "$@"
}

case ${1:-} in
  prepare) shift; cmd_prepare "$@" ;;
  eval) shift; cmd_eval "$@" ;;
  report) shift; cmd_report "$@" ;;
  *) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
