"""Build attnscale's CUDA kernel sources for the CPU emulator (emu.h, runtime.cpp) and load them with ctypes.

``load()`` rewrites each ``kernel<<<config>>>(args)`` of the ``csrc/ops/cuda`` files in ``KERNELS`` into
``::emu::launch(::emu::config(config), kernel, args)``, compiles them with the host C++ compiler (``-include
emu.h``: CUDA's built-in variables, qualifiers, barriers, shuffles, ``wmma`` and device intrinsics as host
code, over the CUDA toolkit's own headers for the half types and dim3), links them with ``entry.cpp``'s C
entry points and returns the library.  Built once per source hash under ``build/cuda_emu/``.  Needs the CUDA toolkit's
headers (``nvcc`` on PATH, ``CUDA_HOME`` or ``/usr/local/cuda``) and ``g++``; ``unavailable()`` says what is
missing.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ("max_pool_kernel.cu", "interp_kernel.cu", "bias_relu_kernel.cu", "scale_merge_kernel.cu",
           "dilated_conv_kernel.cu", "dilated_conv_pack_kernel.cu")
SELFTEST = HERE / "selftest_kernel.cu"  # kernels that check the emulator itself
FLAGS = ("-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-Wno-attributes")


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (with cuda_fp16.h), or None."""
    roots = []
    if os.environ.get("CUDA_HOME"):
        roots.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parents[1])
    roots.append(Path("/usr/local/cuda"))
    for r in roots:
        if (r / "include" / "cuda_fp16.h").is_file():
            return r / "include"
    return None


def unavailable() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "no g++"
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h)"
    return None


def _launch_start(src: str, at: int) -> int:
    """Start of the kernel expression that ends just before ``src[at:]`` == '<<<': a name, maybe ::-qualified,
    maybe with template arguments, or a parenthesised expression."""
    i = at
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] in ">)":  # template arguments or a parenthesised expression: back to the match
        close = src[i - 1]
        pair = {close: 1, "<" if close == ">" else "(": -1}
        depth = 0
        while True:
            i -= 1
            depth += pair.get(src[i], 0)
            if depth == 0:
                break
        if close == ")":
            return i
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(src: str, name: str) -> str:
    """``kernel<<<cfg>>>(args)`` -> ``::emu::launch(::emu::config(cfg), "kernel", kernel, args)``; ``extern __shared__``
    arrays -> the launch's dynamic shared memory."""
    out, pos = [], 0
    for m in re.finditer(r"<<<(.*?)>>>\s*\(", src, flags=re.S):
        start = _launch_start(src, m.start())
        kernel = src[start:m.start()].strip()
        if not kernel:
            raise ValueError(f"{name}: no kernel name before the launch at offset {m.start()}")
        out.append(src[pos:start])
        label = " ".join(kernel.split())  # the launch's kernel as written, for the launch log
        out.append(f'::emu::launch(::emu::config({m.group(1)}), "{label}", {kernel}, ')
        pos = m.end()
    out.append(src[pos:])
    text = "".join(out)
    if "<<<" in text:
        raise ValueError(f"{name}: a launch was not rewritten")
    return re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem);", text)


def load() -> ctypes.CDLL:
    """The emulated kernels' library: KERNELS, the self-test kernels and entry.cpp's C entry points (built if
    a source changed)."""
    why = unavailable()
    if why:
        raise RuntimeError(f"CUDA emulator unavailable: {why}")
    inc = cuda_include()
    paths = {k: ROOT / "csrc/ops/cuda" / k for k in KERNELS} | {SELFTEST.name: SELFTEST}
    sources = {k: p.read_text() for k, p in paths.items()}
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc/ops").rglob("*.h")) + sorted((ROOT / "csrc/ops").rglob("*.cuh")):
        digest.update(path.read_bytes())
    for f in ("emu.h", "runtime.cpp", "entry.cpp", "build.py"):
        digest.update((HERE / f).read_bytes())
    for k, text in sources.items():
        digest.update(k.encode() + text.encode())
    out = ROOT / "build" / "cuda_emu" / digest.hexdigest()[:16]
    lib = out / "libattnscale_cuda_emu.so"
    if not lib.is_file():
        work = out / f"tmp-{os.getpid()}"  # objects apart per process: parallel test workers may build at once
        work.mkdir(parents=True, exist_ok=True)
        common = ["g++", *FLAGS, f"-I{ROOT / 'csrc'}", f"-I{inc}", "-include", str(HERE / "emu.h")]
        jobs = [(HERE / "runtime.cpp", work / "runtime.o"), (HERE / "entry.cpp", work / "entry.o")]
        for k, text in sources.items():
            cpp = work / (k[:-3] + ".cpp")
            cpp.write_text(f'#line 1 "{paths[k].relative_to(ROOT)}"\n' + rewrite_launches(text, k))
            jobs.append((cpp, work / (k[:-3] + ".o")))

        def compile_one(job):
            src, obj = job
            r = subprocess.run([*common, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"CUDA emulator: compiling {src.name} failed:\n{r.stderr[-4000:]}")

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(compile_one, jobs))
        tmp = work / lib.name
        r = subprocess.run(["g++", "-shared", "-o", str(tmp), *[str(o) for _, o in jobs]], capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError(f"CUDA emulator: linking failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
        shutil.rmtree(work, ignore_errors=True)
    return ctypes.CDLL(str(lib))
