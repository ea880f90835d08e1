#!/usr/bin/env bash
# `make gpu-check`: everything a machine with one NVIDIA GPU can prove about fusedmtl's CUDA and
# Triton code, with no network (nothing is installed: it uses the python3 that holds a CUDA build
# of torch, nvcc and compute-sanitizer on PATH). Writes logs and summary.json under $GPU_CHECK_OUT.
#
#   1. build: fusedmtl._C in place (build/gpu, then python/fusedmtl/), for the GPU it finds only,
#      with the ptxas report in build.log (tests/test_gpu_resources.py reads it), all cores
#   2. tests: the CUDA part of the suite (pytest -m cuda) against that build
#   3. sanitizer: compute-sanitizer memcheck, racecheck, synccheck and initcheck over
#      tests/gpu/launch_kernels.py (every kernel once)
#   4. bench: the benchmark's quick form on cuda, JSON kept
# A step that fails is recorded and the next runs anyway; the exit status is that of the worst.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu-check-out}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUT/summary.tsv"
: >"$summary"
worst=0

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs to $OUT/NAME.log, records rc and seconds
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%d\t%d\n' "$name" "$rc" "$((SECONDS - start))" >>"$summary"
  echo "   rc=$rc in $((SECONDS - start)) s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" -ne 0 ] && worst=$rc
  return 0
}

arch=$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
"$PYTHON" - >"$OUT/environment.json" <<'EOF'
import json, platform, subprocess, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "python": platform.python_version(), "nvcc": nvcc.splitlines()[-1] if nvcc else None,
}, indent=1))
EOF
cat "$OUT/environment.json"

build() {
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    -DFUSEDMTL_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DFUSEDMTL_PTXAS_REPORT=ON &&
    cmake --build build/gpu -j "$JOBS" -v &&
    cp build/gpu/_C*.so python/fusedmtl/
}
step build 300 build

step tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda --junitxml="$OUT/tests.xml" tests
FUSEDMTL_PTXAS_LOG="$OUT/build.log" FUSEDMTL_PTX_DIR=build/gpu/ptx FUSEDMTL_CUDA_ARCHS="$arch" \
  FUSEDMTL_GPU_RESOURCES=1 \
  step resources 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_resources.py

for tool in memcheck racecheck synccheck initcheck; do
  step "sanitizer-$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PYTHON" tests/gpu/launch_kernels.py --device cuda
done

step bench 240 "$PYTHON" -m bench --quick --device cuda --json "$OUT/bench.json"

"$PYTHON" - "$summary" "$OUT/summary.json" <<'EOF'
import json, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
steps = {name: {"rc": int(rc), "seconds": int(s)} for name, rc, s in rows}
json.dump({"passed": all(v["rc"] == 0 for v in steps.values()), "steps": steps},
          open(sys.argv[2], "w"), indent=1)
for name, v in steps.items():
    print(f"{name:22s} {'ok' if v['rc'] == 0 else 'FAILED rc=%d' % v['rc']:14s} {v['seconds']:4d} s")
EOF
exit "$worst"
