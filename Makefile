# The two commands: `make demo` (the main job) and `make test` (the suite CI runs).
# Both bootstrap .venv with Python 3.11 on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n auto
# The GPU compile gate on the newest jax GPU users run (Python 3.12 gets jax 0.11/0.12).
NEWEST_JAX ?= 0.12.0.1
# (A pyenv shim is on PATH even where it cannot run without PYENV_VERSION: ask the interpreter.)
PY312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo "env PYENV_VERSION=3.12.1 python3.12")
VENV_NEW := .venv-jax$(NEWEST_JAX)
# ptxas for the GPU gate when the CUDA toolkit is not on PATH (a pip wheel; no GPU needed).
NVCC_WHEEL := nvidia-cuda-nvcc==13.0.88

.PHONY: test test-all demo install cuda-plugin tpu-plugin bench gpu-gate gpu-gate-newest tpu-gate clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so nothing pulls a CUDA build; natten (pure Python) needs torch at
# build time, hence --no-build-isolation after it. The CUDA plugin of exactly jax's version goes
# into its own directory (the GPU gate puts it on sys.path in its worker processes only, so a
# plain `import jax` never probes for a GPU): XLA's Triton and GPU compiler, no GPU needed.
# libtpu goes into its own directory the same way (XLA's TPU compiler and Mosaic, no TPU).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,train,convert]"
	$(BIN)/python -m pip install -q --no-build-isolation natten==0.21.7
	$(MAKE) --no-print-directory VENV=$(VENV) cuda-plugin
	$(MAKE) --no-print-directory VENV=$(VENV) tpu-plugin
	touch $@

# The CUDA plugin wheels matching the venv's jax, and ptxas if the toolkit's is not on PATH.
cuda-plugin:
	v=$$($(BIN)/python -c "import jax; print(jax.__version__)") && \
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/cuda-plugin \
		jax-cuda13-plugin==$$v jax-cuda13-pjrt==$$v
	command -v ptxas >/dev/null || $(BIN)/python -m pip install -q --no-deps --upgrade \
		--target $(VENV)/cuda-plugin $(NVCC_WHEEL)

# The libtpu that jax[tpu] of the venv's jax pins (e.g. 0.0.42.* for jax 0.10.2).
tpu-plugin:
	spec=$$($(BIN)/python -c "import importlib.metadata as m; print(next(r.split(';')[0] \
		.replace(' ', '') for r in m.requires('jax') if r.startswith('libtpu')))") && \
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/tpu-plugin "$$spec"

install: $(VENV)/.installed

# malloc with transparent huge pages for XLA:CPU's buffers (nat_jax/host.py): faster steps.
HUGE_PAGES = GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

# The default tier: every feature, sampled sweeps and gates (~15 min on 2 cores).
test: $(VENV)/.installed
	$(HUGE_PAGES) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything: the full sweeps, every compile gate, the long model and training runs.
test-all: $(VENV)/.installed
	$(HUGE_PAGES) NAT_JAX_TIER=all $(BIN)/python -m pytest $(PYTEST_ARGS)

# Trains a small DiNAT on scikit-learn's digits (>= 98% validation top-1), then reloads the
# checkpoint and predicts held-out images. Re-running resumes; delete workdir/digits to retrain.
demo: $(VENV)/.installed
	$(BIN)/nat-jax train --config digits --workdir workdir/digits

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/na_ops.py

# The whole GPU compile gate (every dispatchable kernel, sm_80 + sm_90) with this venv's jax.
gpu-gate: $(VENV)/.installed
	$(BIN)/python -m nat_jax.kernels.gpu_gate --json \
		benchmarks/results/gpu_gate_jax$$($(BIN)/python -c "import jax; print(jax.__version__)").json

# The same gate on Python 3.12 with the newest jax and its CUDA plugin.
$(VENV_NEW)/.installed: pyproject.toml
	$(PY312) -m venv $(VENV_NEW)
	$(VENV_NEW)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEW)/bin/python -m pip install -q -e . "jax==$(NEWEST_JAX)" "jaxlib==$(NEWEST_JAX)"
	$(MAKE) --no-print-directory VENV=$(VENV_NEW) cuda-plugin
	touch $@

gpu-gate-newest: $(VENV_NEW)/.installed
	$(VENV_NEW)/bin/python -m nat_jax.kernels.gpu_gate --json \
		benchmarks/results/gpu_gate_jax$(NEWEST_JAX).json

# The whole TPU compile gate: every pallas_tpu kernel configuration on v5e-8 and v4-8 (the xla
# path beside it), then the NAT/DiNAT train steps and inference forwards at recipe batch.
tpu-gate: $(VENV)/.installed
	$(BIN)/python -m nat_jax.kernels.tpu_gate --json benchmarks/results/tpu_kernel_gate.json
	$(BIN)/python benchmarks/deviceless_tpu.py --config nat_mini,dinat_mini

clean:
	rm -rf $(VENV) $(VENV_NEW) .pytest_cache build *.egg-info
