# Set-up and entry points. Each target creates (or reuses) the virtual environment .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/fashion_mnist
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: venv data demo tokenizer-demo test clean

# What running needs: srdd_jax and its dependencies, no extra. (The test extra brings libtpu, and with
# libtpu installed every run on a CPU first prints TPU-initialisation warnings.)
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# What the tests need besides: the test extra (pytest, pytest-xdist, the GCS emulator, and libtpu,
# jax[tpu] ~137 MB from PyPI, for the ahead-of-time TPU compile test).
$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian's dataset-fashion-mnist: the IDX files, offline. Installed when missing and we may.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is not in $(FASHION_MNIST) and installing it needs root:"; \
	       echo "  sudo apt-get install dataset-fashion-mnist"; exit 1; fi; fi

# The embedded default, every stage: tokenizer, token cache, transformer, samples, proxy metrics.
demo: venv data
	$(PY) -m srdd_jax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR) --mode=all

# The demo's tokenizer trained from scratch, by the recipe of the one the repository carries
# (assets/fashion_mnist_tokenizer, docs/TOKENIZER.md).
tokenizer-demo: venv data
	$(PY) -m srdd_jax.main --config=configs/fashion_mnist.py --workdir=workdir/fashion_mnist_tokenizer --mode=train_tokenizer

# Two pytest workers, one test file each at a time (--dist loadfile keeps a file's module fixtures and
# compiled programs in one process): much of the suite is XLA compiles that use one core, so two cores
# run two of them at once. TEST_WORKERS=N for more cores. A cold run on 2 cores: docs/TESTS.md (448 s
# on 2026-12-05).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) workdir .pytest_cache
