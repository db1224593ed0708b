#!/usr/bin/env bash
# Download the wheels the GPU device machine lacks into .whl/ (it has torch and transformers, no
# network, no Ray): diffusers, peft, pydantic and pydantic's small dependencies, at the versions this
# .venv runs, for the device's Python 3.12 on x86-64 Linux. Run here, before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
names = ["diffusers", "peft", "pydantic", "pydantic-core", "annotated-types", "typing-extensions",
         "typing-inspection"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl $pins
ls .whl
