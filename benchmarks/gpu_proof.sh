#!/usr/bin/env bash
# Issue 7 on a lent GPU machine (device tool), in one call.  Phases, run in the order given:
#   build        use the carried build (see below) or pip install -e . against the machine's CUDA torch
#                (no downloads: --no-deps); check the CUDA kernels are in; record device / driver / torch
#   test         pytest -m cuda: every CUDA test must run (a skip fails the phase) and pass
#   sanitize     compute-sanitizer memcheck (without PyTorch's caching allocator), racecheck and synccheck,
#                at once (three processes), on benchmarks/cuda_sanitize.py (one forward and backward of
#                every CUDA kernel path), after checking that compute-sanitizer runs on the machine at all
#   check        test and sanitize at the same time (correctness only: nothing is timed), sanitize's
#                log in sanitize.log; 30 s on the H200 (limits: 200 s); and bench's preflight beside them
#                (gpu_preflight.py, at most 120 s for the features + 60 s for them combined: its log in
#                preflight.log)
#   test_all     the rest of the suite too (CI runs it on every submission; here only if time is left)
#   bench        first gpu_preflight.py (unless check ran it): each of our fast paths with a PyTorch twin
#                (attnscale.switches) checked in its own process; those that fail are turned off for the
#                benchmarks (ATTNSCALE_DISABLE), so one broken kernel does not cost the others' numbers; then
#                the issues' target numbers, the open ones first: bench_e2e.py bf16 channels_last (training
#                and inference, ours vs the references and vs the model without each of our kernels:
#                Interp backward, max pooling, bias + ReLU, the dropout inside it; the inference as a CUDA
#                graph, the scales on side streams or one; a profile of where the time goes),
#                bench_train.py (the product's training loop, bf16 NHWC, images/s, its loader alone and its main
#                thread's time per update by phase: against bench_e2e's "ops+iter3", the same update without the
#                data and the loop's host work; last, the loop once more with the batches as floats),
#                bench_merge.py (attention, vs eager and torch.compile), bench_fc6.py at 1x41 and 10x41
#                (fp32 / TF32 / bf16 vs cuDNN); each under a time limit, 510 s in all
#   fc6          bench_fc6.py, ours (the GEMM path, the CUDA default) vs cuDNN in bf16 and TF32 at 30x41 (issue
#                3's shape: 1.3x and 60 % of the bf16 peak), the step's 30x31 and 30x21, 10x41 and 1x65
#                (inference), with a profile of ours by kernel (150 s)
#   bench_extra  merge_kernels.py (kernel launches and GPU time by the profiler; the pixel layout's class
#                chunks sized for 1 to 524288 threads), bench_merge.py avg / max, bench_e2e.py bf16 NCHW and
#                fp32 / TF32, bench_fc6.py at the other shapes (up to 9 minutes: a call of its own)
# A session has about 15 device minutes, machine start included, and a call at most 10: so one call.
# Build here first, at no device time, and carry the result:
#   here: bash benchmarks/gpu_prebuild.sh      (Python 3.12 + torch 2.11.0+cu130 venv, sm_90 build)
#   run:  bash benchmarks/gpu_proof.sh build check bench     carry: attnscale/_C.cpython-312-x86_64-linux-gnu.so
#         (timeout_s 590; the phases' limits add up to 30 + 200 + 510 = 740 s, but the H100/H200 needed
#         about 5 minutes for them: only a run near every limit would lose the last bench steps, bench_fc6 and the floats loop)
#   then, only in a session with device time left:  bash benchmarks/gpu_proof.sh build bench_extra test_all
# Without a carried build (or if it does not load there, or was built from other sources than csrc/: its
# recorded attnscale.source_hash) the build phase compiles on the machine, for sm_90 only unless
# ATTNSCALE_CUDA_ARCHS says otherwise (minutes: the other phases' limits then cut them).
# Everything goes to $OUT (the folder the device tool returns; ./gpu_out elsewhere): proof.log (all phases
# but sanitize's under check), sanitize.log, build.log and the benchmarks' JSON files.  Exits non-zero if
# any phase failed.
set -uo pipefail
PHASES=(build test sanitize check test_all bench fc6 bench_extra)
if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then  # the comment above is the usage
  sed -n '2,/^set -uo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  [ $# -eq 0 ] && { echo "gpu_proof.sh: name the phases to run, e.g. build check bench" >&2; exit 2; }
  exit 0
fi
SELF=$(realpath "$0")   # check re-runs this script for its sanitize half
cd "$(dirname "$SELF")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# a carried build is not pip-installed: the scripts in benchmarks/ import this checkout's attnscale
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/${PROOF_LOG:-proof.log}"
failed=()
for phase in "$@"; do  # every name checked before any runs: a typo must not come after the build's device time
  case " ${PHASES[*]} " in
    *" $phase "*) ;;
    *) echo "== $(date -u +%H:%M:%S) unknown phase '$phase' (${PHASES[*]}); nothing was run" | tee -a "$LOG"
       exit 1 ;;
  esac
done
preflight_done=  # set when check ran the preflight in this run: bench trusts no older disabled.txt

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run() {  # run a command, its output into the log; record a failure
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { failed+=("$phase: $* (exit $rc)"); say "FAILED ($rc): $*"; }
  return "$rc"
}
cuda_tests() {  # every CUDA test must run (a skip fails the phase) and pass
  run timeout 200 "$PY" -m pytest -q -m cuda -rs tests
  if grep -q "skipped" <(tail -3 "$LOG"); then
    failed+=("$phase: CUDA tests skipped")
    say "FAILED: CUDA tests were skipped"
  fi
}

preflight() {  # each feature of attnscale.switches checked in its own process; the failed ones to disabled.txt
  rm -f "$OUT/disabled.txt"
  timeout 210 "$PY" benchmarks/gpu_preflight.py --timeout 120 --combined-timeout 60 --json "$OUT/preflight.json" \
    --disabled-to "$OUT/disabled.txt"
  local rc=$?
  [ -f "$OUT/disabled.txt" ] || : >"$OUT/disabled.txt"  # no verdict (it did not finish): every feature stays on
  return "$rc"
}

for phase in "$@"; do
  say "phase $phase"
  case "$phase" in
    build)
      run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      run "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
      # the carried build must load, hold the CUDA kernels and come from these very sources (a build left
      # from before a change of csrc/ would run the old kernels under the old schemas)
      if "$PY" -c 'import sys, attnscale.ops as o
from attnscale.ops._ext import stale_build
why = stale_build()
print(why or "", file=sys.stderr)
sys.exit(0 if o.has_cuda_kernels() and not why else 1)' 2>>"$LOG"; then
        say "using the carried build: $("$PY" -c 'import attnscale._C as c; print(c.__file__)')"
      else
        say "no carried build that loads here and matches csrc/: building (log: build.log)"
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
      cuda_tests
      ;;
    test_all)
      run "$PY" -m pytest -q -m "not cuda" tests
      ;;
    sanitize)
      # Does compute-sanitizer work on this machine at all (it refused the device under gVisor)?
      if ! timeout 40 compute-sanitizer --tool memcheck --error-exitcode 86 "$PY" -c \
          'import torch; torch.ones(1, device="cuda").sum().item()' >>"$LOG" 2>&1; then
        failed+=("sanitize: compute-sanitizer does not run on this machine (log: $LOG); kernels not checked")
        say "compute-sanitizer unusable here: sanitize phase skipped"
        continue
      fi
      # The three tools at once, each its own process and log; exit 86: the sanitizer found an error,
      # 1: cuda_sanitize.py's own comparison failed, 124: timeout.  memcheck without PyTorch's caching
      # allocator, whose 2 MB blocks would hide small overruns.  SANITIZE_TIMEOUT=seconds (default 150) limits each tool.
      tmp=$(mktemp -d)
      declare -A pid=()
      for tool in memcheck racecheck synccheck; do
        env $([ $tool = memcheck ] && echo PYTORCH_NO_CUDA_MEMORY_CACHING=1) timeout "${SANITIZE_TIMEOUT:-150}" \
          compute-sanitizer --tool $tool --error-exitcode 86 "$PY" benchmarks/cuda_sanitize.py \
          >"$tmp/$tool.log" 2>&1 &
        pid[$tool]=$!
      done
      for tool in memcheck racecheck synccheck; do
        wait "${pid[$tool]}"; rc=$?
        say "compute-sanitizer --tool $tool: exit $rc"
        cat "$tmp/$tool.log" >>"$LOG"
        [ "$rc" -eq 0 ] || failed+=("sanitize: $tool (exit $rc)")
      done
      rm -rf "$tmp"
      ;;
    check)
      # correctness only, so the sanitizers and bench's preflight may share the GPU with the tests
      PROOF_LOG=sanitize.log bash "$SELF" sanitize >/dev/null 2>&1 &
      spid=$!
      preflight >"$OUT/preflight.log" 2>&1 &
      ppid=$!
      cuda_tests
      wait "$spid" || failed+=("check: sanitize failed (exit $?; log: sanitize.log)")
      grep -E "^== |^  |FAIL|ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log" | tee -a "$LOG"
      wait "$ppid" || failed+=("check: a feature failed gpu_preflight.py (log: preflight.log)")
      preflight_done=1
      cat "$OUT/preflight.log" >>"$LOG"
      ;;
    bench)
      # our fast paths that failed their preflight (check's, else run now) are off for the benchmarks, so that
      # one broken kernel does not cost the numbers of the others
      if [ -z "$preflight_done" ]; then
        preflight 2>&1 | tee -a "$LOG"
        [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("bench: a feature failed gpu_preflight.py")
        preflight_done=1
      fi
      export ATTNSCALE_DISABLE=$(cat "$OUT/disabled.txt" 2>/dev/null)
      say "ATTNSCALE_DISABLE=${ATTNSCALE_DISABLE:-(none: every feature passed its preflight)}"
      # each under a time limit (510 s in all); the JSON files are written as the rows come, so a run stopped
      # by its limit keeps what it measured.  The open targets first (issue 7: training and inference,
      # bench_e2e's variants give the ratio of each of our kernels in the same call), then the product's
      # loop, then the ops' own benchmarks (their targets met or measured before; the merge_kernels sweep
      # is in bench_extra).  channels_last: the faster layout on the H100/H200 in bf16, the one the targets
      # are for; NCHW in bench_extra.
      run timeout 180 "$PY" benchmarks/bench_e2e.py --device cuda --precisions bf16 --channels-last --profile \
        --json "$OUT/e2e.json"
      run timeout 90 "$PY" benchmarks/bench_train.py --device cuda --precision bf16 --channels-last \
        --json "$OUT/train_loop.json"
      run timeout 90 "$PY" benchmarks/bench_merge.py --cuda-only --modes attention --min-run-time 0.3 \
        --json "$OUT/merge.json"
      run timeout 90 "$PY" benchmarks/bench_fc6.py --device cuda --shapes 1x41,10x41 --json "$OUT/fc6.json"
      # the loop with the loader's workers making the floats (as before the twenty-fifth session): the bytes
      # path's gain, within this call
      run timeout 60 "$PY" benchmarks/bench_train.py --device cuda --precision bf16 --channels-last \
        --batches floats --json "$OUT/train_loop_floats.json"
      ;;
    fc6)
      run timeout 150 "$PY" benchmarks/bench_fc6.py --device cuda --shapes 30x41,30x31,30x21,10x41,1x65 \
        --precisions bf16 tf32 \
        --profile --json "$OUT/fc6_gemm.json"
      ;;
    bench_extra)
      # the pixel layout's class chunks (the kernel's rule: about 131072 threads), issue 2's N=1 row
      run timeout 70 "$PY" benchmarks/merge_kernels.py --reps 10 --backward pixel \
        --chunk-threads 1 8192 32768 131072 524288 --json "$OUT/merge_kernels.json"
      run timeout 45 "$PY" benchmarks/bench_merge.py --cuda-only --modes avg,max --no-compile --min-run-time 0.3 \
        --json "$OUT/merge_avg_max.json"
      run timeout 75 "$PY" benchmarks/bench_e2e.py --device cuda --precisions bf16 --json "$OUT/e2e_nchw.json"
      run timeout 180 "$PY" benchmarks/bench_e2e.py --device cuda --precisions fp32 tf32 --json "$OUT/e2e_fp32.json"
      run timeout 180 "$PY" benchmarks/bench_fc6.py --device cuda --shapes 30x41,10x31,10x21,1x65 \
        --json "$OUT/fc6_more.json"
      ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  say "${#failed[@]} failure(s):"
  printf '  %s\n' "${failed[@]}" | tee -a "$LOG"
  exit 1
fi
say "all phases passed: $*"
