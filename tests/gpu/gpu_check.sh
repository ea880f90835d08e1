#!/usr/bin/env bash
# `make gpu-check`: everything a machine with one NVIDIA GPU can prove about fusedmtl's CUDA and
# Triton code, with no network (nothing is installed: it uses the python3 that holds a CUDA build
# of torch, nvcc and compute-sanitizer on PATH). Writes logs and summary.json under $GPU_CHECK_OUT.
#
#   0. prerequisites: $PYTHON imports a CUDA build of torch that sees a GPU, triton and pytest;
#      nvcc, compute-sanitizer and cmake on PATH. Whatever is missing is listed at once and the
#      script stops before the build (GPU_CHECK_PREREQUISITES_ONLY=1 stops there in any case).
#   1. build: fusedmtl._C in place (build/gpu, then python/fusedmtl/), for the GPU it finds only,
#      with the ptxas report in build.log (tests/test_gpu_resources.py reads it), all cores
#   2. at the same time (the GPU and 16 cores have room for all of them; one after the other where
#      the GPU is in an exclusive compute mode, or with GPU_CHECK_SERIAL=1):
#      tests: the CUDA part of the suite (pytest -m cuda) against that build, the large tests
#        (FUSEDMTL_LARGE_TESTS=1: a 2^31+17-element loss, ~13 GB) where the GPU has the memory
#      resources: the build's ptxas report, and the Triton kernels compiled for this GPU's
#        architecture only, against its shared memory (CPU only; plus the build's registrations)
#      sanitizer-*: compute-sanitizer memcheck, racecheck, synccheck and initcheck over
#        tests/gpu/launch_kernels.py (every kernel once), one process per tool
#   3. bench: the benchmark's quick form on cuda, JSON kept (alone on the GPU: it times things)
# The whole run has a budget of GPU_CHECK_BUDGET_S seconds (480: 8 minutes), prerequisites
# included: each stage runs under `timeout` with the smaller of its own limit and what is left, a
# stage that runs out says so in its log and here, and a stage with no time left is not started.
# A stage that fails is recorded and the others run anyway; the exit status is the worst one.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET_S))
BENCH_RESERVE_S=75 # kept for the benchmark when the tests and sanitizer stages are started
OUT=${GPU_CHECK_OUT:-gpu-check-out}
JOBS=${JOBS:-$(nproc)}

# -- stages ----------------------------------------------------------------------------------

# step_until DEADLINE NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` for at most LIMIT_S and
# not past DEADLINE (in $SECONDS), output in $OUT/NAME.log; appends NAME, exit status, seconds,
# the limit it ran under and a note to $OUT/summary.tsv. A stage that runs out of time gets exit
# status 124 and a note (in its log, the summary and here) saying which limit it hit; one not
# started for want of time gets 125. LAST_RC is the exit status (in the caller's shell).
step_until() {
  local deadline=$1 name=$2 limit=$3
  shift 3
  local left=$((deadline - SECONDS)) which="its own limit of ${limit} s"
  if ((left < limit)); then
    limit=$left which="the time left in the ${BUDGET_S}-second budget of gpu-check"
  fi
  if ((left < 5)); then # (too little to start python, let alone run something)
    local note="not started: the ${BUDGET_S}-second budget of gpu-check is spent"
    echo "== $name: $note"
    echo "gpu-check: $name $note" >"$OUT/$name.log"
    printf '%s\t%d\t%d\t%d\t%s\n' "$name" 125 0 0 "$note" >>"$OUT/summary.tsv"
    LAST_RC=125
    return 0
  fi
  local start=$SECONDS note=""
  local shown=${STEP_LABEL:-}
  [ -n "$shown" ] || shown=$(printf '%s ' "$@" | tr -s ' \n' ' ')
  echo "== $name (at most $limit s): ${shown:0:160}"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if ((rc == 124 || rc == 137)); then
    rc=124
    note="ran out of time: stopped after $((SECONDS - start)) s by ${which}"
    echo "gpu-check: $name $note" >>"$OUT/$name.log"
  fi
  printf '%s\t%d\t%d\t%d\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$note" \
    >>"$OUT/summary.tsv"
  echo "   $name: rc=$rc in $((SECONDS - start)) s${note:+ ($note)} (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed "s/^/   $name | /"
  LAST_RC=$rc
  return 0
}

step() { step_until "$DEADLINE" "$@"; }

# -- prerequisites ---------------------------------------------------------------------------

# Prints one line per missing prerequisite (nothing when all are there). Only the probe's own
# lines count (its stderr, where torch may warn, does not); "probed" says that it got to its end.
missing_prerequisites() {
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "python: '$PYTHON' is not found (PYTHON= names the python that holds a CUDA torch)"
  else
    local probe
    probe=$("$PYTHON" - "$PYTHON" 2>/dev/null <<'EOF'
import sys
python = sys.argv[1]
try:
    import torch
except Exception as error:
    print(f"torch: {python} cannot import torch ({type(error).__name__}: {error})")
else:
    if torch.version.cuda is None:
        print(f"torch: {python} has torch {torch.__version__}, not a CUDA build of torch")
    elif not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        print(f"gpu: no GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
              "torch.cuda.is_available() is False (the driver? CUDA_VISIBLE_DEVICES?)")
for module in ("triton", "pytest"):
    try:
        __import__(module)
    except Exception as error:
        print(f"{module}: {python} cannot import {module} ({type(error).__name__}: {error})")
print("probed")
EOF
    )
    if [ "$(printf '%s\n' "$probe" | tail -n 1)" != probed ]; then
      echo "python: '$PYTHON' failed while importing torch, triton and pytest"
    fi
    printf '%s\n' "$probe" | grep -v '^probed$'
  fi
  local tool
  for tool in nvcc compute-sanitizer cmake; do
    command -v "$tool" >/dev/null 2>&1 || echo "$tool: $tool is not on PATH"
  done
}

# -- main ------------------------------------------------------------------------------------

main() {
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  : >"$OUT/summary.tsv"
  local missing
  missing=$(missing_prerequisites)
  if [ -n "$missing" ]; then
    {
      echo "gpu-check: this machine lacks what gpu-check needs (nothing was built or run):"
      printf '%s\n' "$missing" | sed 's/^/  - /'
    } | tee "$OUT/prerequisites.log" >&2
    return 2
  fi
  echo "gpu-check: prerequisites met ($PYTHON, nvcc, compute-sanitizer, cmake, triton, pytest)" |
    tee "$OUT/prerequisites.log"
  [ "${GPU_CHECK_PREREQUISITES_ONLY:-0}" = 1 ] && return 0

  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  local arch memory_gib
  arch=$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
  memory_gib=$("$PYTHON" -c \
    'import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)')
  "$PYTHON" - >"$OUT/environment.json" <<'EOF'
import json, platform, subprocess, torch
import triton
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() or None
except OSError:
    driver = None
print(json.dumps({
    "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
    "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "python": platform.python_version(), "nvcc": nvcc.splitlines()[-1] if nvcc else None,
    "driver": driver,
}, indent=1))
EOF
  cat "$OUT/environment.json"
  echo "gpu-check: building and compiling for sm_$arch only (this GPU), budget ${BUDGET_S} s"

  # 1. The build, for this GPU's architecture only (a script of its own: `timeout` runs commands,
  # not shell functions). The CUDA objects are rebuilt each time so that build.log holds every
  # kernel's ptxas report (an up-to-date object prints none).
  local build_script='
    set -e
    arch=$1 python=$2 jobs=$3 generator=
    command -v ninja >/dev/null 2>&1 && generator="-G Ninja"
    find build/gpu -name "*.cu.o" -delete 2>/dev/null || true
    cmake -S . -B build/gpu $generator -DPython_EXECUTABLE="$(command -v "$python")" \
      -DFUSEDMTL_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
      -DFUSEDMTL_PTXAS_REPORT=ON
    cmake --build build/gpu -j "$jobs" -v
    cp build/gpu/_C*.so python/fusedmtl/'
  STEP_LABEL="cmake, then cmake --build -j $JOBS, for sm_$arch" \
    step build 240 bash -c "$build_script" build "$arch" "$PYTHON" "$JOBS"
  if [ "$LAST_RC" != 0 ]; then
    echo "gpu-check: the build failed: nothing else can run (log: $OUT/build.log)" >&2
  else
    # 2. Tests, resource checks and sanitizers at once, leaving the benchmark its share; one after
    # the other where other processes cannot open the GPU while one holds it.
    local until=$((DEADLINE - BENCH_RESERVE_S)) large=0 workers=() serial=${GPU_CHECK_SERIAL:-0}
    if command -v nvidia-smi >/dev/null 2>&1 &&
      nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | grep -qi exclusive; then
      serial=1
      echo "gpu-check: the GPU is in an exclusive compute mode: the stages run one at a time"
    fi
    # (the stages of this group in the background, or one by one)
    in_group() { if [ "$serial" = 1 ]; then "$@"; else "$@" & fi; }
    # The large tests need ~13 GB at once (the 2^31+17-element loss) beside what the other
    # stages hold; they take seconds on such a GPU, so they fit the budget where they fit the card.
    if ((memory_gib >= 32)); then
      large=1
    else
      echo "gpu-check: FUSEDMTL_LARGE_TESTS off: ${memory_gib} GiB of GPU memory (they need 32)"
    fi
    # With pytest-xdist (if installed), a few workers share the GPU: the suite is thousands of
    # small cases, each bound by Python and launch latency.
    if "$PYTHON" -c 'import xdist' 2>/dev/null && [ "${GPU_CHECK_TEST_WORKERS:-4}" != 0 ]; then
      workers=(-n "${GPU_CHECK_TEST_WORKERS:-4}")
    fi
    # (--durations: where the GPU suite's time goes, for the next trim of its parametrization)
    FUSEDMTL_LARGE_TESTS=$large in_group step_until "$until" tests 330 "$PYTHON" -m pytest -q \
      -p no:cacheprovider -m cuda ${workers[@]+"${workers[@]}"} --durations=25 \
      --junitxml="$OUT/tests.xml" tests
    # The Triton kernels compiled for this architecture only: the test's other case compiles
    # them all for the other one (minutes of CPU that prove nothing about this GPU).
    FUSEDMTL_PTXAS_LOG="$OUT/build.log" FUSEDMTL_PTX_DIR=build/gpu/ptx FUSEDMTL_CUDA_ARCHS="$arch" \
      FUSEDMTL_GPU_RESOURCES=1 FUSEDMTL_EXPECT_CUDA=1 \
      in_group step_until "$until" resources 300 "$PYTHON" -m pytest -q -p no:cacheprovider \
      -k "not test_triton_kernels_fit_the_gpu_shared_memory or sm_$arch" \
      tests/test_gpu_resources.py tests/test_build.py tests/test_registrations.py
    local tool
    for tool in memcheck racecheck synccheck initcheck; do
      in_group step_until "$until" "sanitizer-$tool" 300 compute-sanitizer --tool "$tool" \
        --error-exitcode 1 "$PYTHON" tests/gpu/launch_kernels.py --device cuda
    done
    wait
    # 3. The benchmark, alone.
    step bench 180 "$PYTHON" -m bench --quick --device cuda --json "$OUT/bench.json"
  fi

  "$PYTHON" - "$OUT/summary.tsv" "$OUT/summary.json" "$BUDGET_S" "$SECONDS" "sm_$arch" <<'EOF'
import json, sys
tsv, out, budget, elapsed, arch = sys.argv[1:]
rows = [line.split("\t") for line in open(tsv).read().splitlines()]
steps = {name: {"rc": int(rc), "seconds": int(s), "limit_s": int(limit), "note": note}
         for name, rc, s, limit, note in rows}
json.dump({"passed": bool(steps) and all(v["rc"] == 0 for v in steps.values()),
           "budget_s": int(budget), "elapsed_s": int(elapsed), "arch": arch, "steps": steps},
          open(out, "w"), indent=1)
for name, v in steps.items():
    status = "ok" if v["rc"] == 0 else f"FAILED rc={v['rc']}"
    print(f"{name:20s} {status:14s} {v['seconds']:4d} s  {v['note']}")
print(f"{'total':20s} {'':14s} {int(elapsed):4d} s  (budget {budget} s)")
EOF
  # The worst exit status of the stages.
  return "$(cut -f2 "$OUT/summary.tsv" | sort -n | tail -n 1)"
}

# Sourced (tests/gpu/test_gpu_check.py), it only defines the functions above.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
  exit $?
fi
