#!/usr/bin/env bash
# Issue 7 on a lent GPU machine (device tool), in few calls.  Phases, run in the order given:
#   build     pip install -e . against the machine's CUDA torch (no downloads: --no-deps), check the CUDA
#             kernels are in, record device / driver / torch versions
#   test      pytest: the CUDA tests (must all run: a skip fails the phase), then the whole suite
#   sanitize  compute-sanitizer memcheck and racecheck on benchmarks/cuda_sanitize.py (one forward and
#             backward of every CUDA op)
#   bench     bench_merge.py, bench_fc6.py, bench_e2e.py (fp32, TF32, bf16; then channels_last) on the GPU
# For example (each device call runs at most 10 minutes; a machine that went back must build again, so
# build here first, at no device time, and carry the result):
#   here: bash benchmarks/gpu_prebuild.sh      (Python 3.12 + torch 2.11.0+cu130 venv, sm_90 build)
#   run: bash benchmarks/gpu_proof.sh build test sanitize   carry: attnscale/_C.cpython-312-x86_64-linux-gnu.so
#   run: bash benchmarks/gpu_proof.sh build bench           (same carry)
# Without a carried build (or if it does not load there) the build phase compiles on the machine, for
# sm_90 only unless ATTNSCALE_CUDA_ARCHS says otherwise.
# Everything goes to $OUT (the folder the device tool returns; ./gpu_out elsewhere): proof.log (all phases),
# build.log and the benchmarks' JSON files.  Exits non-zero if any phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# a carried build is not pip-installed: the scripts in benchmarks/ import this checkout's attnscale
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/proof.log"
failed=()

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run() {  # run a command, its output into the log; record a failure
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { failed+=("$phase: $* (exit $rc)"); say "FAILED ($rc): $*"; }
  return "$rc"
}

for phase in "$@"; do
  say "phase $phase"
  case "$phase" in
    build)
      run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      run "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
      if "$PY" -c 'import sys, attnscale.ops as o; sys.exit(0 if o.has_cuda_kernels() else 1)' 2>>"$LOG"; then
        say "using the carried build: $("$PY" -c 'import attnscale._C as c; print(c.__file__)')"
      else
        say "no carried build that loads here: building (log: build.log)"
        if ! MAX_JOBS=$(nproc) ATTNSCALE_CUDA=1 ATTNSCALE_CUDA_ARCHS=${ATTNSCALE_CUDA_ARCHS:-90} \
            "$PY" -m pip install -v --no-deps --no-build-isolation -e . \
            >"$OUT/build.log" 2>&1; then
          tail -40 "$OUT/build.log" | tee -a "$LOG"
          failed+=("build: pip install")
          break
        fi
        grep -i "attnscale: building" "$OUT/build.log" | tee -a "$LOG"
      fi
      run "$PY" -c 'import attnscale.ops as o; assert o.has_cuda_kernels(), "the CUDA kernels are not built"; print("CUDA kernels: built")' || break
      ;;
    test)
      run "$PY" -m pytest -q -m cuda -rs tests
      if grep -q "skipped" <(tail -3 "$LOG"); then
        failed+=("test: CUDA tests skipped")
        say "FAILED: CUDA tests were skipped"
      fi
      run "$PY" -m pytest -q tests
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        run compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" benchmarks/cuda_sanitize.py
      done
      ;;
    bench)
      run "$PY" benchmarks/bench_merge.py --modes all --json "$OUT/merge.json"
      run "$PY" benchmarks/bench_fc6.py --device cuda --json "$OUT/fc6.json"
      run "$PY" benchmarks/bench_e2e.py --device cuda --json "$OUT/e2e.json"
      run "$PY" benchmarks/bench_e2e.py --device cuda --channels-last --precisions bf16 --json "$OUT/e2e_channels_last.json"
      ;;
    *)
      say "unknown phase '$phase' (build, test, sanitize, bench)"
      failed+=("unknown phase $phase")
      ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  say "${#failed[@]} failure(s):"
  printf '  %s\n' "${failed[@]}" | tee -a "$LOG"
  exit 1
fi
say "all phases passed: $*"
