# The two commands a fresh machine needs: `make demo` (set up, build the demo repository if
# absent, serve it) and `make test` (set up, run the whole test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REPO ?= model-repo

.PHONY: setup demo test bench lint protos clean

setup: $(VENV)/.installed

# torch is pinned to 2.13.0 in pyproject.toml: on a CPU machine pip takes the local CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

demo: setup
	$(BIN)/genserve demo --repo $(REPO)

test: setup
	$(BIN)/python -m pytest

bench: setup
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

protos: setup
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache
