# Set-up and entry points. Each target creates (or reuses) the virtual environment .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo

.PHONY: venv demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m srdd_jax.main --config=configs/tokenizer_demo.py --workdir=$(WORKDIR) --mode=reconstruct

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) workdir .pytest_cache
