#!/usr/bin/env bash
# One device call (no Ray there), results in $OUT. Prepare once, here: bash bench/device_wheels.sh
#   run(command="bash bench/device_run.sh", carry=[".whl", ".peer"], timeout_s=540)
# Default (issue 13, <= 8 minutes): gpu_truth's engine arms (eager, eager + prefetch, graphs at 1, 4
# and 8 instance + as many class images per step), diffusers' script on the same model folder at
# 1 + 1 and 4 + 4, then graphs + compile at 8 + 8 in two fresh processes (cold, then warm from
# the workspace compile cache). BUDGET_S bounds gpu_truth (it starts no measurement it cannot
# finish). MODE=truth runs the earlier full benchmark (compile parity, training, options,
# generation) instead. MODE=flux runs the FLUX.1-dev-size row instead (bench/flux_row.py, about 8
# minutes: build and save the 12 B random-weight model, raydb's shipped loop at 1024 px bf16 rank 16
# 1 + 1, then diffusers' Flux DreamBooth script on the same folder):
#   run(command="MODE=flux bash bench/device_run.sh", carry=[".whl", ".peer"], timeout_s=560)
# Extra arguments go to gpu_truth.py (flux_row.py under MODE=flux).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raydb-device-out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 2; }
# the peer's extra packages apart (/tmp/peer-site, on the peer subprocess's path only), torchvision
# matching the device's torch (0.(minor + 15))
tv=$(python3 -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.')")
peer_wheels=$(ls .whl/peer/*.whl 2>/dev/null | grep -v '/torchvision-'; ls .whl/peer/torchvision-"$tv"*.whl 2>/dev/null)
pip install -q --no-deps --target /tmp/peer-site $peer_wheels >/dev/null 2>&1 || echo "peer wheel install failed"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=/tmp/peer-site:$PYTHONPATH python3 -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    || echo "no matching torchvision (torch minor -> $tv): the peer arm will record an error"
if [ "${MODE:-engine}" = flux ]; then
    timeout 540 python3 bench/flux_row.py --out "$OUT/flux_row.json" --workdir /tmp/flux-row --peer \
        --peer-script .peer/train_dreambooth_lora_flux.py --peer-site /tmp/peer-site "$@" 2>&1 \
        | tee "$OUT/flux_row.log" | grep -v Warning
    echo "flux_row: exit ${PIPESTATUS[0]}"
    exit 0
elif [ "${MODE:-engine}" = truth ]; then
    # does compile=full + inductor give eager's LoRA gradients on CUDA? (it does not on CPU)
    timeout 150 python3 bench/compile_parity.py --compile full --backend inductor \
        > "$OUT/compile_parity_full.json" 2> "$OUT/compile_parity_full.log"
    echo "compile parity (full, inductor): exit $?"; tail -n 25 "$OUT/compile_parity_full.json"
    timeout $(( ${BUDGET_S:-330} + 60 )) python3 bench/gpu_truth.py --budget-s "${BUDGET_S:-330}" \
        --sections train generation options --options-batch 8 --out "$OUT/gpu_truth.json" "$@"
else
    timeout $(( ${BUDGET_S:-410} + 40 )) python3 bench/gpu_truth.py --budget-s "${BUDGET_S:-410}" \
        --sections engine peer compile --peer-script .peer/train_dreambooth_lora.py --peer-site /tmp/peer-site \
        --out "$OUT/gpu_truth.json" "$@" 2>&1 | tee "$OUT/gpu_truth.log" | grep -v Warning
fi
echo "gpu_truth: exit ${PIPESTATUS[0]}"
python3 bench/gpu_truth.py --render "$OUT/gpu_truth.json" > "$OUT/gpu_truth.md" && cat "$OUT/gpu_truth.md"
