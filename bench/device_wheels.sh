#!/usr/bin/env bash
# Prepare, here, what the GPU device machine lacks (it has torch and transformers, no network, no Ray):
#   .whl/   diffusers, peft, pydantic (+ its small dependencies) at the versions this .venv runs
#   .whl/peer/  only for the diffusers peer arm of gpu_truth.py, installed apart and put on the
#           peer subprocess's path alone: accelerate, psutil and torchvision (the wheel matching the
#           device's torch, TORCHVISION=0.(torch minor + 15).0; 0.26.0 for torch 2.11, what the
#           device ran last; several may be given, the run picks the matching one)
#   .peer/  diffusers' train_dreambooth_lora.py and train_dreambooth_lora_flux.py, only carried
#           (ignored by git, never imported, run unmodified as subprocesses by
#           `gpu_truth.py --peer-script` / `flux_row.py --peer-script`)
# for the device's Python 3.12 on x86-64 Linux. Run once before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEER=${PEER:-../shared/peers/diffusers/train_dreambooth_lora.py}
[ -f "$PEER" ] || PEER=/work/shared/peers/diffusers/train_dreambooth_lora.py  # from a worktree
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
if [ -f "$PEER" ]; then cp "$PEER" .peer/train_dreambooth_lora.py; else echo "no peer script at $PEER"; fi
FLUX_PEER=$(dirname "$PEER")/train_dreambooth_lora_flux.py
if [ -f "$FLUX_PEER" ]; then cp "$FLUX_PEER" .peer/; else echo "no Flux peer script at $FLUX_PEER"; fi
ls -la .whl .whl/peer .peer
du -sh .whl .peer
