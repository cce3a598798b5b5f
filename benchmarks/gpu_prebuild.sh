#!/usr/bin/env bash
# Build attnscale._C for the lent GPU machines HERE, on a CPU machine, so that a device call spends its
# minutes testing and measuring, not compiling (issue 7).  Their image (the device tool's KINDS.md):
# Python 3.12, torch 2.11.0+cu130, an H100 or H200 (compute capability 9.0), an x86-64 CPU of another
# model, nothing to download.  So this builds, in a Python 3.12 venv with torch 2.11.0 (PyPI's Linux
# wheel is the cu130 build), the CUDA kernels for sm_90 (+ its PTX) only and the CPU kernels for
# x86-64-v3 (AVX2 + FMA) instead of this machine's -march=native, then checks that the CUDA kernels
# load and are registered.  The result, attnscale/_C.cpython-312-x86_64-linux-gnu.so, lies beside the
# local build (another ABI tag) and git ignores it: name it in the device call's carry, and
# gpu_proof.sh's build phase uses it (it builds there only if the carried one does not load).
#
#   bash benchmarks/gpu_prebuild.sh          # venv in .gpu_prebuild/venv, kept: later runs only rebuild
#   bash benchmarks/gpu_prebuild.sh --check  # and run the op and benchmark smoke tests under that torch
#
# GPU_VENV=path picks the venv, GPU_PYTHON=path the interpreter (default: a Python 3.12 found on PATH or
# under pyenv).  Exit status 3: pip found no torch 2.11.0 wheel (no index or network here); 2: no Python
# 3.12, or a cp312 build it did not make is in the way (GPU_PREBUILD_FORCE=1 replaces it).
set -euo pipefail
case "${*:-}" in
  ""|--check) ;;
  -h|--help) sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_prebuild.sh: unknown argument(s) '$*' (only --check; --help for more); nothing was done" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
TORCH=2.11.0
VENV=${GPU_VENV:-.gpu_prebuild/venv}
WORK=.gpu_prebuild
mkdir -p "$WORK"

find_python() {
  local c
  for c in ${GPU_PYTHON:-} python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$c"; return; }
  done
  return 1
}

# a venv is ready when it holds that torch and the other requirements (an interrupted set-up is redone)
if ! "$VENV/bin/python" -c "import sys, torch, numpy, scipy, h5py, cv2, google.protobuf, pytest, hypothesis
sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  PY=$(find_python) || { echo "gpu_prebuild: no Python 3.12 here (the GPU machines run 3.12); set GPU_PYTHON" >&2; exit 2; }
  echo "== gpu_prebuild: venv $VENV ($("$PY" --version)), torch $TORCH"
  "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install -q "torch==$TORCH" >"$WORK/pip-torch.log" 2>&1; then
    tail -20 "$WORK/pip-torch.log" >&2
    grep -q "No matching distribution found" "$WORK/pip-torch.log" && exit 3
    echo "gpu_prebuild: installing torch $TORCH failed" >&2
    exit 1
  fi
  grep -v '^torch' requirements.txt >"$WORK/requirements-no-torch.txt"
  "$VENV/bin/python" -m pip install -q -r "$WORK/requirements-no-torch.txt"
fi

SO=attnscale/_C.cpython-312-x86_64-linux-gnu.so
# On a machine whose own Python is 3.12 the local build has this very name: never replace it unasked.
if [ -f "$SO" ] && ! sha256sum -c --status "$WORK/stamp" 2>/dev/null && [ "${GPU_PREBUILD_FORCE:-0}" != 1 ]; then
  echo "gpu_prebuild: $SO exists and was not made by this script (a local Python 3.12 build?);" \
       "GPU_PREBUILD_FORCE=1 replaces it" >&2
  exit 2
fi
echo "== gpu_prebuild: building attnscale._C (CUDA sm_90, CPU x86-64-v3; log: $WORK/build.log)"
rm -f attnscale/_C.cpython-312-*.so
if ! ATTNSCALE_CUDA=1 ATTNSCALE_CUDA_ARCHS=90 ATTNSCALE_MARCH=x86-64-v3 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py build_ext --inplace --build-temp "$WORK/build" --build-lib "$WORK/lib" \
    >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log" >&2
  echo "gpu_prebuild: build failed" >&2
  exit 1
fi
grep "attnscale: building" "$WORK/build.log"
sha256sum "$SO" >"$WORK/stamp"
"$VENV/bin/python" - <<'PY'
import torch
import attnscale.ops as o
import attnscale._C as c
assert c.__file__.endswith(".cpython-312-x86_64-linux-gnu.so"), c.__file__
from attnscale.ops._ext import CUDA_OPS, has_cuda_kernel
missing = [op for op in CUDA_OPS if not has_cuda_kernel(op)]
assert not missing, f"attnscale._C was built without the CUDA kernels of {missing}"
print("torch", torch.__version__, "| CUDA kernels built and registered |", c.__file__)
PY
if [ "${1:-}" = "--check" ]; then
  # the op tests, and smoke runs of the benchmark scripts and cuda_sanitize.py that gpu_proof.sh runs there
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_scale_merge.py tests/test_dilated_conv.py \
    tests/test_benchmarks.py
fi
echo "== gpu_prebuild: done; carry attnscale/_C.cpython-312-x86_64-linux-gnu.so in the device call"
