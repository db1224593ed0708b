#!/usr/bin/env bash
# One device call (no Ray there): the compile parity check, then the GPU benchmark, results in $OUT.
#   bash bench/device_wheels.sh                       # here, once: .whl/
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=540)
# BUDGET_S bounds gpu_truth (it stops starting measurements after that; default leaves time for a
# rerun within a 15-minute device budget). Extra arguments go to gpu_truth.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raydb-device-out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# does compile=full + inductor give eager's LoRA gradients on CUDA? (it does not on CPU)
timeout 150 python3 bench/compile_parity.py --compile full --backend inductor \
    > "$OUT/compile_parity_full.json" 2> "$OUT/compile_parity_full.log"
echo "compile parity (full, inductor): exit $?"; tail -n 25 "$OUT/compile_parity_full.json"
timeout $(( ${BUDGET_S:-330} + 60 )) python3 bench/gpu_truth.py --budget-s "${BUDGET_S:-330}" \
    --options-batch 8 --out "$OUT/gpu_truth.json" "$@"
echo "gpu_truth: exit $?"
