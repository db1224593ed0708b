#!/usr/bin/env bash
# Prepare, here, what the GPU device machine lacks (it has torch and transformers, no network, no Ray):
#   .whl/   diffusers, peft, pydantic (+ its small dependencies) at the versions this .venv runs
#   .whl/peer/  only for the diffusers peer arm of gpu_truth.py, installed apart and put on the
#           peer subprocess's path alone: accelerate, psutil and torchvision (the wheel matching the
#           device's torch, TORCHVISION=0.(torch minor + 15).0; 0.26.0 for torch 2.11, what the
#           device ran last; several may be given, the run picks the matching one)
#   .peer/  diffusers' train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py and
#           train_dreambooth_lora_flux.py, only carried (ignored by git, never imported, run
#           unmodified as subprocesses by the gpu_truth, gpu_truth_sdxl and flux_row peer arms), from
#           $RAYDB_PEERS_DIR/diffusers (default ../shared/peers beside the repository; set
#           RAYDB_PEERS_DIR when running from a worktree elsewhere)
# for the device's Python 3.12 on x86-64 Linux. Run once before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS=${RAYDB_PEERS_DIR:-../shared/peers}/diffusers
TORCHVISION=${TORCHVISION:-0.26.0}
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
names = ["diffusers", "peft", "pydantic", "pydantic-core", "annotated-types", "typing-extensions",
         "typing-inspection"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
peer_pins=$("$PY" -c 'from importlib.metadata import version as v; print(" ".join(n + "==" + v(n) for n in ("accelerate", "psutil")))')
mkdir -p .whl/peer .peer
get() { dest=$1; shift; "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" "$@"; }
get .whl $pins
get .whl/peer $peer_pins
for v in $TORCHVISION; do
    get .whl/peer "torchvision==$v" || echo "no torchvision $v wheel: the peer arm will record an error"
done
for script in train_dreambooth_lora.py train_dreambooth_lora_sdxl.py train_dreambooth_lora_flux.py; do
    if [ -f "$PEERS/$script" ]; then cp "$PEERS/$script" .peer/; else echo "no peer script at $PEERS/$script"; fi
done
ls -la .whl .whl/peer .peer
du -sh .whl .peer
