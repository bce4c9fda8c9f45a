# fastdiff: `make test` and `make demo` do all the set-up on a fresh machine.
#
#   make test                   creates .venv, installs torch (pinned CPU build, only if no torch
#                               is importable), fastdiff with its test extras, builds fastdiff._C,
#                               runs the whole suite (tests and benchmarks in quick mode)
#   make demo                   the same set-up, then the main job: fastdiff info, and a grid of
#                               digits from the embedded model (digits.png) with the fused engine
#   make test PYTHON=python3    reuse an existing interpreter (a GPU machine with CUDA torch,
#                               triton and nvcc, no network): installs fastdiff alone, no deps

PYTHON ?= .venv/bin/python
VENV_PY := .venv/bin/python
TORCH_PIN := torch==2.13.0
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

ifeq ($(PYTHON),$(VENV_PY))
SETUP_DEPS := $(VENV_PY)
# Build requirements first, so the editable build can run without an isolated environment.
INSTALL = $(PIP) install -q setuptools wheel pybind11 ninja \
	&& $(PIP) install -q --no-build-isolation -e ".[test]" \
	&& $(PIP) install -q --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
else
SETUP_DEPS :=
INSTALL = $(PIP) install --no-build-isolation --no-deps -e .
endif

.PHONY: install test demo lint clean

$(VENV_PY):
	python3 -m venv .venv
	$(VENV_PY) -m pip install -q --upgrade pip

# torch is installed only where none is importable, and then as the pinned CPU-capable build:
# an unpinned torch would pull several GB of CUDA wheels onto a machine without a GPU.
install: $(SETUP_DEPS)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(INSTALL)
	$(PYTHON) -c "import fastdiff._C"

# Parallel (pytest-xdist) only without a GPU: on one GPU, concurrent workers would share the
# device under the graph-capture tests and the quick benchmarks; there the suite runs serially.
XDIST = $$($(PYTHON) -c "import torch, xdist; print('' if torch.cuda.is_available() else '-n auto --dist worksteal')" 2>/dev/null)

test: install
	$(PYTHON) -m pytest -q $(XDIST) $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m fastdiff info
	$(PYTHON) -m fastdiff sample --out digits.png

lint: install
	$(PYTHON) -m ruff check .

clean:
	rm -rf build *.egg-info fastdiff/_C*.so .pytest_cache .benchmarks
