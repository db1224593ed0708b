#!/usr/bin/env bash
# One device call per MODE (no Ray there), results in $OUT. Prepare once, here: bash bench/device_wheels.sh
#   run(command="bash bench/device_run.sh", carry=[".whl", ".peer"], timeout_s=540)
# MODE=engine (default; issues 13 and 30, <= 8 minutes): gpu_truth's engine arms (eager, eager +
#   prefetch, graphs at 1, 4 and 8 instance + as many class images per step), diffusers' script on
#   the same model folder at 1 + 1 and 4 + 4, then graphs + compile at 8 + 8 in two fresh processes
#   (cold, then warm from the workspace compile cache).
# MODE=serve: the serving engine at SD 1.5 size (bench/serve_engine_gpu.py), <= 9 minutes.
# MODE=sdxl: the SDXL rows (train, engine, generation) and diffusers' SDXL script, <= 9 minutes.
# MODE=prior: prior.mode's cost at SD 1.5 size (bench/prior_cost.py, issue 26): prior-stage images/s,
#   training ms/step in image and model mode (graphs, and model mode eager), end-to-end totals; <= 8 minutes.
# MODE=flux (issue 27): the FLUX.1-dev-size row (bench/flux_row.py, <= 9 minutes): build and save
#   the 12 B random-weight model, raydb's shipped loop at 1024 px bf16 rank 16 1 + 1, then
#   diffusers' Flux DreamBooth script on the same folder:
#     run(command="MODE=flux bash bench/device_run.sh", carry=[".whl", ".peer"], timeout_s=580)
# MODE=truth: the earlier full benchmark (compile parity, training, options, generation).
# BUDGET_S bounds the benchmark (it starts no measurement it cannot finish). Extra arguments go to
# the benchmark module. Every benchmark runs as `python3 -m bench.<name>` from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raydb-device-out}
MODE=${MODE:-engine}
SITE=${SITE:-/tmp/site} PEER_SITE=${PEER_SITE:-/tmp/peer-site}  # where the carried wheels install
mkdir -p "$OUT"
pip install -q --no-deps --target "$SITE" .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 2; }
# the peer's extra packages apart ($PEER_SITE, on the peer subprocess's path only), torchvision
# matching the device's torch (0.(minor + 15))
tv=$(python3 -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.')")
peer_wheels=$(ls .whl/peer/*.whl 2>/dev/null | grep -v '/torchvision-'; ls .whl/peer/torchvision-"$tv"*.whl 2>/dev/null)
pip install -q --no-deps --target "$PEER_SITE" $peer_wheels >/dev/null 2>&1 || echo "peer wheel install failed"
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=$PEER_SITE:$PYTHONPATH python3 -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    || echo "no matching torchvision (torch minor -> $tv): the peer arm will record an error"
case "$MODE" in
flux)
    timeout $(( ${BUDGET_S:-500} + 40 )) python3 -m bench.flux_row --budget-s "${BUDGET_S:-500}" \
        --peer --peer-script .peer/train_dreambooth_lora_flux.py --peer-site "$PEER_SITE" \
        --workdir /tmp/flux-row --out "$OUT/flux_row.json" "$@" 2>&1 | tee "$OUT/flux_row.log" | grep -v Warning
    echo "flux_row: exit ${PIPESTATUS[0]}"
    python3 -m bench.flux_row --render "$OUT/flux_row.json" > "$OUT/flux_row.md"
    exit 0
    ;;
truth)
    # does compile=full + inductor give eager's LoRA gradients on CUDA? (it does not on CPU)
    timeout 150 python3 -m bench.compile_parity --compile full --backend inductor \
        > "$OUT/compile_parity_full.json" 2> "$OUT/compile_parity_full.log"
    echo "compile parity (full, inductor): exit $?"; tail -n 25 "$OUT/compile_parity_full.json"
    timeout $(( ${BUDGET_S:-330} + 60 )) python3 -m bench.gpu_truth --budget-s "${BUDGET_S:-330}" \
        --sections train generation options --options-batch 8 --out "$OUT/gpu_truth.json" "$@"
    ;;
serve)
    timeout $(( ${BUDGET_S:-500} + 40 )) python3 -m bench.serve_engine_gpu --budget-s "${BUDGET_S:-500}" \
        --seconds 4 --out "$OUT/serve_engine.json" "$@" 2>&1 | tee "$OUT/serve_engine.log" | grep -v Warning
    echo "serve_engine_gpu: exit ${PIPESTATUS[0]}"
    exit 0
    ;;
prior)
    timeout $(( ${BUDGET_S:-420} + 40 )) python3 -m bench.prior_cost --budget-s "${BUDGET_S:-420}" \
        --out "$OUT/prior_cost.json" "$@" 2>&1 | tee "$OUT/prior_cost.log" | grep -v Warning
    echo "prior_cost: exit ${PIPESTATUS[0]}"
    python3 -m bench.prior_cost --render "$OUT/prior_cost.json" > "$OUT/prior_cost.md"
    exit 0
    ;;
sdxl)
    timeout $(( ${BUDGET_S:-480} + 40 )) python3 -m bench.gpu_truth_sdxl --budget-s "${BUDGET_S:-480}" \
        --peer --peer-script .peer/train_dreambooth_lora_sdxl.py --peer-site "$PEER_SITE" \
        --out "$OUT/gpu_truth_sdxl.json" "$@" 2>&1 | tee "$OUT/gpu_truth_sdxl.log" | grep -v Warning
    echo "gpu_truth_sdxl: exit ${PIPESTATUS[0]}"
    python3 -m bench.gpu_truth_sdxl --render "$OUT/gpu_truth_sdxl.json" > "$OUT/gpu_truth_sdxl.md"
    exit 0
    ;;
*)
    timeout $(( ${BUDGET_S:-410} + 40 )) python3 -m bench.gpu_truth --budget-s "${BUDGET_S:-410}" \
        --sections engine peer compile --peer-script .peer/train_dreambooth_lora.py --peer-site "$PEER_SITE" \
        --out "$OUT/gpu_truth.json" "$@" 2>&1 | tee "$OUT/gpu_truth.log" | grep -v Warning
    ;;
esac
echo "gpu_truth: exit ${PIPESTATUS[0]}"
python3 -m bench.gpu_truth --render "$OUT/gpu_truth.json" > "$OUT/gpu_truth.md" && cat "$OUT/gpu_truth.md"
