#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on one H100/H200): the training path in bf16 with
# DeepSpeed ZeRO-3 (throughput, MFU, peak memory; gradient accumulation; HF export), then the
# generation benchmark on vLLM when it is installed. Prints tables; paste them in the issue note.
#
#   bash bench/gpu_check.sh
#
# It uses the Python that has the project installed (.venv if present, else python3); on a
# machine with network access it installs the GPU extra first (`pip install -e '.[gpu]'`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "gpu_check: no GPU here (nvidia-smi failed)"; exit 1; }
if ! "$PY" -c "import deepspeed, transformers" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[gpu]'
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/tuna-ray/torch_extensions}
timeout 420 "$PY" bench/gpu_check.py
if "$PY" -c "import vllm" 2>/dev/null && [ -f bench/generation.py ]; then
  timeout 240 "$PY" bench/generation.py --quick || echo "gpu_check: generation benchmark failed"
fi
