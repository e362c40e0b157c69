# hf_gns developer entry points. `make test` is the CI path (.ci/run).
PYTHON ?= python3
# Extra arguments, e.g. make test PYTEST_ARGS="-k rmsnorm -x"
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
# e.g. make train ACCELERATE_ARGS="--num_processes 8" TRAIN_ARGS="--max_steps 100"
ACCELERATE_ARGS ?=
TRAIN_ARGS ?=
# NO_INSTALL=1 skips tools/install.sh, for a machine whose environment is already set
# up and that cannot reach a package index (the GPU device machine).
NO_INSTALL ?=

CHECK_DIRS := $(wildcard hf_gns tests recipes benchmarks)
STAMP := .make/installed
INSTALLED := $(if $(NO_INSTALL),,$(STAMP))
# The checkout's hf_gns comes first on sys.path, installed or not.
WITH_REPO := PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"

.PHONY: install test test-gpu quality style bench train clean

# Re-runs tools/install.sh only when the packaging files change (or after `make clean`).
install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install.sh
	PYTHON="$(PYTHON)" bash tools/install.sh
	@mkdir -p $(@D) && touch $@

# CPU suite: Triton kernels run in the interpreter; GPU tests are deselected.
test: $(INSTALLED)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m "not gpu" -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) tests

# GPU tests and benchmarks run on the device machine, which has torch, triton,
# transformers, accelerate and pytest but no package index: they install nothing.
test-gpu:
	$(WITH_REPO) $(PYTHON) -m pytest -m gpu $(PYTEST_ARGS) tests

bench:
	$(WITH_REPO) $(PYTHON) benchmarks/bench_norms.py
	$(WITH_REPO) $(PYTHON) benchmarks/bench_train_step.py

quality: $(INSTALLED)
	$(PYTHON) -m ruff check $(CHECK_DIRS)
	$(PYTHON) -m ruff format --check $(CHECK_DIRS)

style: $(INSTALLED)
	$(PYTHON) -m ruff check --fix $(CHECK_DIRS)
	$(PYTHON) -m ruff format $(CHECK_DIRS)

# recipes/launch.py picks a launch that gives the processes asked for, run by $(PYTHON): the
# recipe itself for one process (CPU or one GPU), torchrun + ACCELERATE_USE_CPU=1 (DDP over
# gloo) for several CPU processes (accelerate launch would start one), accelerate launch for
# GPUs (one process per GPU by default) and for any other accelerate option or --config_file.
train: $(INSTALLED)
	$(WITH_REPO) $(PYTHON) recipes/launch.py $(ACCELERATE_ARGS) recipes/train_gpt2.py $(TRAIN_ARGS)

clean:
	rm -rf .make build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
