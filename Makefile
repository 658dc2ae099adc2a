# The two commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both bootstrap .venv with Python 3.11 on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n auto

.PHONY: test demo install tpu-plugin tpu-gate bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so nothing pulls a CUDA build; natten (pure Python) needs torch at
# build time, hence --no-build-isolation after it. libtpu goes into its own directory (the TPU
# gate puts it on sys.path in its worker processes only, so a plain `import jax` never probes
# for a TPU): XLA's TPU compiler and Mosaic, no TPU needed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,train,convert]"
	$(BIN)/python -m pip install -q --no-build-isolation natten==0.21.7
	$(MAKE) --no-print-directory VENV=$(VENV) tpu-plugin
	touch $@

# The libtpu that jax[tpu] of the venv's jax pins (e.g. 0.0.42.* for jax 0.10.2).
tpu-plugin:
	spec=$$($(BIN)/python -c "import importlib.metadata as m; print(next(r.split(';')[0] \
		.replace(' ', '') for r in m.requires('jax') if r.startswith('libtpu')))") && \
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/tpu-plugin "$$spec"

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Trains a small DiNAT on scikit-learn's digits (>= 98% validation top-1), then reloads the
# checkpoint and predicts held-out images. Re-running resumes; delete workdir/digits to retrain.
demo: $(VENV)/.installed
	$(BIN)/nat-jax train --config digits --workdir workdir/digits

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/na_ops.py

# The whole TPU compile gate: every pallas_tpu kernel configuration on v5e-8 and v4-8 (the xla
# path beside it), then the NAT/DiNAT train steps and inference forwards at recipe batch.
tpu-gate: $(VENV)/.installed
	$(BIN)/python -m nat_jax.kernels.tpu_gate --json benchmarks/results/tpu_kernel_gate.json
	$(BIN)/python -m nat_jax.train.deviceless_tpu --config nat_mini,dinat_mini \
		--json benchmarks/results/tpu_gate_models.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
