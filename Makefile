# The two commands: `make demo` and `make test`. Both create .venv when missing and (re)install the
# project only when pyproject.toml changed. TORCH pins the torch wheel: the default is the CPU build
# this machine image carries; on a GPU box use e.g. `make test TORCH="torch==2.13.0"` with an index.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.raydb-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast mutate install bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raydb demo --config jobs/configs/demo.yaml

# Two pytest processes, whole files each (--dist loadfile keeps a file's session fixtures, such as
# its Ray cluster, in one process): the Ray tiers spend about a quarter of their time waiting on
# process start-up and polling, which the other process fills (measured on 2 cores: 638 s vs 869 s).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The fast tier: every test that starts no Ray (tests using the ray_cluster fixture are marked `ray`
# automatically, and a test that starts Ray without the mark fails). What `make mutate` runs. One torch
# thread per worker: two workers with torch's default threads thrash 2 cores (4 min 27 s vs 1 min 52 s).
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -m "not ray" -n $(TEST_WORKERS) --dist loadfile --durations=10

# Mutation testing (docs/mutation.md): mutmut mutates the modules listed under [tool.mutmut] in
# pyproject.toml and runs the fast-tier tests that cover each mutated function. One worker process,
# one module at a time (MUTATE_MODULES=raydb.train.loss picks one); results accumulate in mutants/,
# `mutmut results` lists the survivors, `mutmut show NAME` shows one.
MUTATE_MODULES ?= raydb.train.loss raydb.train.data raydb.train.step raydb.train.lora \
	raydb.train.evaluate raydb.ids raydb.registry raydb.storage raydb.data.ingest raydb.serving.auth \
	raydb.serving.api raydb.serving.subjects raydb.serving.adapters raydb.serving.retry \
	raydb.serving.engine raydb.serving.batcher raydb.serving.limits raydb.serving.gate raydb.serving.slots \
	raydb.train.graphs raydb.train.prefetch raydb.models.sdxl
MUTATE_CHILDREN ?= 1

mutate: $(STAMP)
	for m in $(MUTATE_MODULES); do OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) "$$m.*" || exit 1; done
	$(VENV)/bin/mutmut results

lint: $(STAMP)
	$(VENV)/bin/ruff check raydb jobs serve tests bench

bench: $(STAMP)
	$(VENV)/bin/python -m bench.train_cache
	$(VENV)/bin/python -m bench.prior_bench

clean:
	rm -rf workspace demo-output mutants
