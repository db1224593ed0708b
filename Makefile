# The two commands: `make demo` and `make test`. Both create .venv when missing and install it from
# the committed lock (requirements/test.lock, through uv) only when the lock or pyproject.toml changed.
# torch is not in the lock: TORCH is installed first, from TORCH_FIND_LINKS / TORCH_INDEX when set
# (default: the CPU wheel this machine image carries in $PIP_FIND_LINKS). On a GPU box:
# `make test TORCH_FIND_LINKS=` takes PyPI's CUDA build of the same version (requirements/README.md).
PYTHON ?= python3
UV_VERSION ?= 0.13.9
TORCH ?= torch==2.13.0
# where pip finds local wheels ($PIP_FIND_LINKS, else pip's own config): the image's CPU build of torch
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_INDEX ?=
VENV := .venv
STAMP := $(VENV)/.raydb-installed
DEV_STAMP := $(VENV)/.raydb-dev-installed
UV := $(VENV)/bin/uv
TORCH_SOURCES := $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) $(if $(TORCH_INDEX),--index $(TORCH_INDEX))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-lowest mutate install lock bench lint clean digits-base browser

# uv itself comes from PyPI through pip, once per venv; everything else through uv. torch's own
# dependencies are held to the lock's versions (-c), then the lock is installed exactly (--no-deps,
# every file's hash checked) and `uv pip check` proves the result consistent.
$(UV):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "uv==$(UV_VERSION)"

# --compile-bytecode: the .pyc files are written at install time (~25 s here). Where the machine sets
# PYTHONDONTWRITEBYTECODE (this image does), Python never writes them itself, and every process —
# each of the test suite's hundreds of Ray workers — compiled torch, diffusers, transformers and Ray
# from source as it imported them: 15 s instead of 6 s to import the serving module, and a fresh
# clone's Ray tests took about twice as long as in a venv that had the .pyc files.
$(STAMP): pyproject.toml requirements/test.lock | $(UV)
	$(UV) pip install -q --python $(VENV)/bin/python --compile-bytecode $(TORCH_SOURCES) -c requirements/test.lock "$(TORCH)"
	$(UV) pip install -q --python $(VENV)/bin/python --compile-bytecode --no-deps --require-hashes -r requirements/test.lock
	$(UV) pip install -q --python $(VENV)/bin/python --no-deps -e .
	$(UV) pip check --python $(VENV)/bin/python
	touch $(STAMP)

# ruff, mutmut and uv (the `dev` extra) on top, for lint / mutate / lock.
$(DEV_STAMP): $(STAMP) requirements/dev.lock
	$(UV) pip install -q --python $(VENV)/bin/python --no-deps --require-hashes -r requirements/dev.lock
	touch $(DEV_STAMP)

install: $(STAMP)

# Re-resolve the three locks after a change to pyproject.toml's dependencies, keeping every pin that
# still fits (LOCK_UPGRADE=--upgrade: take the newest releases). Linux x86_64, Python 3.11: what CI,
# the cluster's nodes (cluster.yaml) and the Ray image (deploy/kuberay) run. runtime.lock is what a
# node needs; test.lock adds the `test` extra at the same versions; dev.lock adds the `dev` extra.
# The resolution sees torch's CPU build (requirements/lock-torch.txt) and leaves torch out.
LOCK_UPGRADE ?=
LOCK_FLAGS = -q --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--no-emit-package torch --override requirements/lock-torch.txt $(TORCH_SOURCES) $(LOCK_UPGRADE)

lock: | $(UV)
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) -o requirements/runtime.lock
	$(UV) pip compile pyproject.toml --extra test $(LOCK_FLAGS) -c requirements/runtime.lock -o requirements/test.lock
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -c requirements/test.lock -o requirements/dev.lock

# CI's second leg: the fast tier against the LOWEST versions pyproject.toml allows for each direct
# dependency (uv's lowest-direct resolution; their own dependencies at the newest that fit), so a
# lower bound the code has outgrown fails here instead of at a user's. torch stays at $(TORCH): its
# old releases on PyPI are CUDA builds of several GB, so its bound is the one this leg cannot check.
LOWEST_VENV := .venv-lowest
LOWEST_TESTS ?=  # a subset of the fast tier (files or node ids); default: all of it

test-lowest: | $(UV)
	rm -rf $(LOWEST_VENV) && $(PYTHON) -m venv $(LOWEST_VENV)
	echo "$(TORCH)" > $(LOWEST_VENV)/torch.txt
	$(UV) pip compile -q pyproject.toml --extra test --resolution lowest-direct --python $(LOWEST_VENV)/bin/python \
		--override $(LOWEST_VENV)/torch.txt $(TORCH_SOURCES) --no-header --no-annotate -o $(LOWEST_VENV)/lowest.txt
	$(UV) pip install -q --python $(LOWEST_VENV)/bin/python --compile-bytecode $(TORCH_SOURCES) --no-deps -r $(LOWEST_VENV)/lowest.txt
	$(UV) pip install -q --python $(LOWEST_VENV)/bin/python --no-deps -e .
	$(UV) pip check --python $(LOWEST_VENV)/bin/python
	@echo "lowest direct versions:" $$($(UV) pip freeze --python $(LOWEST_VENV)/bin/python | grep -iE \
		'^(torch|diffusers|transformers|peft|huggingface.hub|ray|numpy|pyarrow|boto3|botocore|pydantic|pillow|safetensors|pyyaml|tqdm|matplotlib|fastapi|starlette|python.multipart)==')
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(LOWEST_VENV)/bin/python -m pytest -q -rfE -m "not ray" -n $(TEST_WORKERS) \
		--dist loadfile -p no:cacheprovider $(LOWEST_TESTS)

demo: $(STAMP)
	$(VENV)/bin/raydb demo --config jobs/configs/demo.yaml

# Two pytest processes side by side (tests/lanes.py): the Ray tier in one, its files one after
# another on one Ray cluster, and everything else in the other; output lines prefixed [ray] / [rest].
# Two Ray files at once on 2 cores took several times as long as one after the other; the Ray lane
# waits on process start-up and polling, which the other lane fills. One torch thread per process,
# as in test-fast: two processes with torch's default threads thrash 2 cores (Ray's workers get
# one thread per CPU they hold either way). TEST_WORKERS: xdist processes of test-fast/test-lowest.
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/python tests/lanes.py --durations=15

# The browser the console's tests drive (tests/console): Debian's chromium + chromium-driver, installed
# when missing (apt, as root or through sudo), a no-op when present. CI (.ci/run) runs it before
# `make test`; elsewhere those tests skip and say why when no Chromium is installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "browser: $$(chromium --version 2>/dev/null | head -1)"; \
	else \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
			--no-install-recommends chromium chromium-driver fonts-liberation; \
	fi

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
	raydb.train.graphs raydb.train.prefetch raydb.models.sdxl \
	raydb.trainings.validate raydb.trainings.photo_uris raydb.trainings.store raydb.trainings.queue \
	raydb.trainings.service raydb.trainings.retention raydb.trainings.job raydb.export
MUTATE_CHILDREN ?= 1

mutate: $(DEV_STAMP)
	for m in $(MUTATE_MODULES); do OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) "$$m.*" || exit 1; done
	$(VENV)/bin/mutmut results

# Retrain the shipped digits base model from its seeded recipe (raydb/models/digits_recipe.py; about
# 20-60 min on 2 cores) into DIGITS_OUT, and check the weights equal the shipped ones byte for byte.
DIGITS_OUT ?= digits-base

digits-base: $(STAMP)
	$(VENV)/bin/python -m raydb.models.digits_recipe --output $(DIGITS_OUT) --compare raydb/models/weights/digits

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check raydb jobs serve tests bench

bench: $(STAMP)
	$(VENV)/bin/python -m bench.train_cache
	$(VENV)/bin/python -m bench.prior_bench

clean:
	rm -rf workspace demo-output mutants digits-base $(LOWEST_VENV)
