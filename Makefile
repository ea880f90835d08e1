# Set-up, build, tests and benchmarks. `make bench` and `make test` each do all the set-up on a
# fresh machine: a virtual environment, torch, the build tools, and fusedmtl built against that torch.
PYTHON ?= python3
VENV ?= .venv
# The torch to build against and run with: the default is the CPU build on this project's machines;
# TORCH='torch==2.14.1' (or any pip requirement) for a CUDA build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
# Extra arguments for pip, e.g. PIP_ARGS='--index-url https://download.pytorch.org/whl/cu128'.
PIP_ARGS ?=
# CMake switch for the CUDA kernels: auto, ON or OFF.
FUSEDMTL_CUDA ?= auto
PYTEST_ARGS ?=
BENCH_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedmtl-deps

.PHONY: install bench test clean

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(PIP_ARGS) "$(TORCH)" $(TRITON) \
		"scikit-build-core>=0.10" ninja pytest hypothesis expecttest numpy rich matplotlib
	touch $@

# No build isolation: the extension must be compiled against the torch installed above.
install: $(STAMP)
	FUSEDMTL_CUDA=$(FUSEDMTL_CUDA) $(PY) -m pip install --quiet --no-build-isolation --no-deps .

bench: install
	$(PY) bench/bench_losses.py $(BENCH_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build
