# The two commands: `make demo` and `make test`. Both create .venv when missing and (re)install the
# project only when pyproject.toml changed. TORCH pins the torch wheel: the default is the CPU build
# this machine image carries; on a GPU box use e.g. `make test TORCH="torch==2.13.0"` with an index.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.raydb-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raydb demo --config jobs/configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check raydb jobs serve tests bench

bench: $(STAMP)
	$(VENV)/bin/python bench/train_cache.py
	$(VENV)/bin/python bench/prior_bench.py

clean:
	rm -rf workspace demo-output
