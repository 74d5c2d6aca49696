# Every target sets the project up first (a .venv with torch, then the package).
# TORCH_SPEC picks the torch to install (default: the CPU wheel torch==2.13.0);
# a torch already importable in the venv is kept. VENV_ARGS=--system-site-packages
# lets the venv see a torch you installed yourself (e.g. a CUDA build).
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
PY := $(VENV)/bin/python
DEFAULT_TORCH_SPEC := torch==2.13.0
STAMP := $(VENV)/.moe_mlora-installed
DEV_STAMP := $(VENV)/.moe_mlora-dev-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-dev run test lint format bench sweep clean

# install: what running needs (torch, then the package and its runtime dependencies);
# install-dev adds pytest, ruff and ONNX for the tests.
install: $(STAMP)

install-dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then \
		echo "installing $(TORCH_SPEC)"; $(PIP) "$(TORCH_SPEC)"; \
	elif $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(DEFAULT_TORCH_SPEC)"; $(PIP) "$(DEFAULT_TORCH_SPEC)"; \
	fi
	@# pin the torch just installed so no later dependency can replace it
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-constraint.txt
	$(PIP) -c $(VENV)/torch-constraint.txt -e .
	touch $(STAMP)

run: install
	$(PY) -m moe_mlora.run $(ARGS)

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check moe_mlora tests
	$(PY) -m ruff format --check moe_mlora tests

format: install-dev
	$(PY) -m ruff format moe_mlora tests
	$(PY) -m ruff check --fix moe_mlora tests

# A small sweep on generated data (base / MLoRA / MoE-MLoRA x 2 seeds, then MoE-MLoRA with
# 2 and 4 experts per domain) and its report in multirun/demo/report/. ARGS adds overrides,
# e.g. ARGS="hydra/launcher=parallel".
sweep: install
	$(PY) -m moe_mlora.run -m experiment=demo $(ARGS)
	$(PY) -m moe_mlora.run -m experiment=demo method=moe_mlora experts_per_domain=2,4 $(ARGS)
	$(PY) -m moe_mlora.report multirun/demo

bench: install
	$(PY) -m moe_mlora.bench $(ARGS)

# The optional `bench` extra (deepctr-torch, for `python -m moe_mlora.bench parity`), installed
# with the venv's torch pinned so it is never replaced. BENCH_PIP_ARGS="--find-links DIR" to
# install from a local wheel.
.PHONY: install-bench
install-bench: install
	$(PIP) -c $(VENV)/torch-constraint.txt $(BENCH_PIP_ARGS) -e ".[bench]"

# Wheels of the packages a bare GPU machine lacks (hydra-core, omegaconf, antlr4, polars), at
# the versions installed here, for experiments/gpu/run_checks.sh on a machine without network.
# Needs pip to reach the registry here. GPU_PYTHON: the GPU machine's Python (default 3.12).
GPU_PYTHON ?= 3.12
.PHONY: gpu-wheels
gpu-wheels: install
	$(PY) -m moe_mlora.bench.gpu_wheels build/gpu-wheels --python-version $(GPU_PYTHON)

clean:
	rm -rf $(VENV) outputs multirun debug .pytest_cache .ruff_cache wandb *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
