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
# The peers the benchmark and the tests compare with: torchjd, pinned, with every optional solver
# its aggregators need ('full': quadprog/qpsolvers for UPGrad and DualProj, cvxpy/ecos for CAGrad
# and Nash-MTL, scipy for FairGrad). PEERS=0 leaves them out (their columns and tests then skip).
PEERS ?= 1
TORCHJD := "torchjd[full]==0.18.0"
PEER_REQUIREMENTS := $(if $(filter 1,$(PEERS)),$(TORCHJD))

# cuda-check: a second environment with a CUDA build of torch, to compile and link the CUDA kernels.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
# What the CUDA build is tested with on a machine without a GPU: that it holds and registers every
# CUDA kernel, their ptxas report (no spills), the Triton kernels compiled for sm_80/sm_90 within
# shared memory, the ops' registrations through opcheck, and that the CUDA cases collect (they skip
# here; `make gpu-check` runs them). The CPU kernels are the CPU build's, which `make test` covers;
# CUDA_CHECK_TESTS=tests runs the whole suite against this build.
CUDA_CHECK_TESTS ?= tests/test_build.py tests/test_registrations.py tests/test_gpu_resources.py \
	tests/gpu tests/losses/test_opcheck.py tests/multi_tensor/test_contracts.py \
	tests/losses/test_losses_gpu.py tests/linalg

BUILD_TOOLS := "scikit-build-core>=0.10" ninja "cmake>=3.26"
TEST_TOOLS := pytest hypothesis expecttest numpy
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.5
LINTED := python tests bench
PY := $(VENV)/bin/python
CUDA_PY := $(CUDA_VENV)/bin/python

.PHONY: install bench test lint cuda-check gpu-check clean

# One stamp per environment (and PEERS setting): re-run pip only when the Makefile (and so the
# requirements) changed.
$(VENV)/.fusedmtl-deps-peers$(PEERS): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) "$(TORCH)" $(TRITON) $(BUILD_TOOLS) $(TEST_TOOLS) rich matplotlib $(LINT_TOOLS) $(PEER_REQUIREMENTS)
	touch $@

$(CUDA_VENV)/.fusedmtl-deps: Makefile
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install --quiet $(PIP_ARGS) "$(CUDA_TORCH)" $(BUILD_TOOLS) $(TEST_TOOLS)
	touch $@

# No build isolation: the extension must be compiled against the torch installed above.
install: $(VENV)/.fusedmtl-deps-peers$(PEERS)
	FUSEDMTL_CUDA=$(FUSEDMTL_CUDA) $(PY) -m pip install --quiet --no-build-isolation --no-deps .

# Every sweep (losses, multi_tensor, weighting_step, training_step) of bench/, from this checkout;
# e.g. BENCH_ARGS='--quick' or BENCH_ARGS='--sweeps losses --json bench.json' (python -m bench -h).
bench: install
	$(PY) -m bench $(BENCH_ARGS)

test: install
	FUSEDMTL_REQUIRE_PEERS=$(PEERS) $(PY) -m pytest $(PYTEST_ARGS)

# House rules: ruff (pyproject.toml: line length 100, pycodestyle, pyflakes, import order, the
# formatter) and clang-format (.clang-format) over csrc/.
lint: $(VENV)/.fusedmtl-deps-peers$(PEERS)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu')

# Compiles and links the CUDA kernels (nvcc + the CUDA build of torch), proves the extension imports
# on a machine without a GPU, and runs the test suite against that build (GPU tests skip without a GPU).
# The CUDA objects are rebuilt with -Xptxas -v each time, so that the log holds every kernel's
# stack and spill report for tests/test_gpu_resources.py (and build/cuda/ptx their PTX).
cuda-check: $(CUDA_VENV)/.fusedmtl-deps
	mkdir -p build && find build/cuda -name '*.cu.o' -delete 2>/dev/null || true
	SKBUILD_BUILD_DIR=build/cuda FUSEDMTL_CUDA=ON $(CUDA_PY) -m pip install -v --no-build-isolation \
		--no-deps --config-settings=cmake.define.FUSEDMTL_PTXAS_REPORT=ON . > build/cuda-build.log 2>&1 \
		|| (tail -50 build/cuda-build.log; exit 1)
	FUSEDMTL_EXPECT_CUDA=1 FUSEDMTL_PTXAS_LOG=build/cuda-build.log FUSEDMTL_PTX_DIR=build/cuda/ptx \
		FUSEDMTL_TEST_DEVICES=cpu,cuda \
		$(CUDA_PY) -m pytest $(PYTEST_ARGS) $(CUDA_CHECK_TESTS)

# On a machine with one NVIDIA GPU and no network (a CUDA build of torch, triton and pytest in
# $(PYTHON), nvcc, compute-sanitizer and cmake on PATH; nothing is installed): checks those first
# and stops with what is missing, builds in place for that GPU only, runs the CUDA part of the
# suite, the ptxas/Triton resource checks and compute-sanitizer over every kernel side by side, then
# the quick benchmark on cuda, within 8 minutes (GPU_CHECK_BUDGET_S=480); logs and JSON under
# GPU_CHECK_OUT (tests/gpu/gpu_check.sh).
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) PYTHON=$(PYTHON) bash tests/gpu/gpu_check.sh

clean:
	rm -rf build
