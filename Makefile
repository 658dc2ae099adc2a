# The two commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both bootstrap .venv with Python 3.11 on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n auto

.PHONY: test demo install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so nothing pulls a CUDA build; natten (pure Python) needs torch at
# build time, hence --no-build-isolation after it.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,train,convert]"
	$(BIN)/python -m pip install -q --no-build-isolation natten==0.21.7
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Trains a small DiNAT on scikit-learn's digits (>= 98% validation top-1), then reloads the
# checkpoint and predicts held-out images. Re-running resumes; delete workdir/digits to retrain.
demo: $(VENV)/.installed
	$(BIN)/nat-jax train --config digits --workdir workdir/digits

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/na_ops.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
