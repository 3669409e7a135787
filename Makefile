# Two commands do all set-up: `make lab` opens the course, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the CPU build where no NVIDIA GPU is present (set TORCH_INDEX_URL to a CPU wheel index if your
# default index serves CUDA builds), the default build otherwise.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch
TORCH_INDEX_URL ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),$(TORCH_GPU),$(TORCH_CPU))
PIP_TORCH_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
NBVAL := --nbval-lax --nbval-current-env --sanitize-with tests/nbval_sanitize.cfg
export VTP_PROGRESS ?= 0

.PHONY: lab test unit notebooks setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install -e .
	$(PY) -m ipykernel install --sys-prefix --name python3
	touch $@

lab: setup
	VTP_PROGRESS=1 $(VENV)/bin/jupyter lab notebooks

unit: setup
	$(PY) -m pytest -q tests

notebooks: setup
	MPLBACKEND=agg $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope $(NBVAL) notebooks

test: unit notebooks

clean:
	rm -rf $(VENV) .pytest_cache
