# Two commands do all set-up: `make lab` opens the course, `make test` runs every test.
# `make lab PORT=8890 LAB_IP=0.0.0.0`: another port / listen on every interface (containers, remote machines).
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
# lessons that load a teacher another lesson saves: 07 and 08 load lesson 06's (checkpoints/teacher_<mode>), 11
# loads lesson 10's scenes teacher (checkpoints/scenes_teacher_<mode>); they run in the second call, after the
# first has run 06 and 10 (in one call 10 and 11 could both find no checkpoint and both train it)
AFTER_06 := notebooks/07_train_pruner.ipynb notebooks/08_why_accuracy_drops.ipynb notebooks/11_pruning_at_576.ipynb
export VTP_PROGRESS ?= 0
# JupyterLab: port, address, and the git-ignored working copy of notebooks/ it opens (the committed lessons and
# their outputs stay untouched). As root (most containers) JupyterLab needs --allow-root; a normal user does not.
PORT ?= 8888
LAB_IP ?= localhost
LAB_DIR ?= lab
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab lab-files test unit notebooks setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install -e .
	$(PY) -m ipykernel install --sys-prefix --name python3
	touch $@

# Copy each lesson into $(LAB_DIR)/ once: later runs add new lessons and keep the learner's edited copies.
lab-files:
	@mkdir -p $(LAB_DIR)
	@for nb in notebooks/*.ipynb; do [ -e "$(LAB_DIR)/$${nb##*/}" ] || cp "$$nb" "$(LAB_DIR)/"; done

lab: setup lab-files
	@echo "Opening JupyterLab on $(LAB_DIR)/ (your copy of notebooks/): http://$(LAB_IP):$(PORT)/lab"
	@echo "(the full URL with its access token follows; stop the server with Ctrl-C)"
	VTP_PROGRESS=1 $(VENV)/bin/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(PORT) \
		--ServerApp.port_retries=0 $(ALLOW_ROOT) --ServerApp.root_dir=$(LAB_DIR)

unit: setup
	$(PY) -m pytest -q tests

notebooks: setup
	# one thread per notebook kernel: two kernels with two threads each on two cores spin against each other
	# (measured: a 40-step teacher run took 20 s instead of 1.6 s)
	# lessons 07 and 08 load the teacher that lesson 06 saves (checkpoints/teacher_<mode>): they run after it, never
	# beside it (lesson 06 could replace the checkpoint between a lesson's loading it and its jobs' loading it);
	# lesson 11 likewise runs after lesson 10, which saves the scenes teacher it loads
	OMP_NUM_THREADS=1 MPLBACKEND=agg $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope $(NBVAL) \
		$(filter-out $(AFTER_06),$(wildcard notebooks/*.ipynb))
	OMP_NUM_THREADS=1 MPLBACKEND=agg $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope $(NBVAL) $(AFTER_06)

test: unit notebooks

clean:
	rm -rf $(VENV) .pytest_cache
