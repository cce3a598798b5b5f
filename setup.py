"""Build attnscale and its C++/CUDA extension ``attnscale._C``.

The CPU kernels (csrc/**/*.cpp outside cuda/) are always built.  The CUDA
kernels (csrc/**/cuda/*.cu and their csrc/**/cuda/*.cpp glue) are built when
the installed torch is a CUDA build and nvcc is found; ``ATTNSCALE_CUDA=0``
or ``=1`` forces the choice.  ``ATTNSCALE_NATIVE=0`` builds with no ``-march`` at all;
``ATTNSCALE_MARCH=x86-64-v3`` (say) builds for that target instead of ``native``, for a build that
runs on another machine (benchmarks/gpu_prebuild.sh).  ``ATTNSCALE_CUDA_ARCHS`` lists
the compute capabilities to build for (default ``80,90``; the last one's PTX is
embedded too, so newer GPUs JIT the kernels).
"""
import glob
import importlib.util
import os
import platform
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home() -> None:
    """torch guesses CUDA_HOME as the folder above the ``nvcc`` on PATH.  Where that ``nvcc`` is a
    symlink or a wrapper script (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``)
    the guess has no ``include/cuda_runtime.h`` and the build fails deep inside torch's headers.
    Unless the user set CUDA_HOME / CUDA_PATH, follow the link, or else ask nvcc itself where its
    toolkit is (the ``TOP`` of ``nvcc --dryrun``)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    has_headers = lambda home: os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))  # noqa: E731
    if has_headers(os.path.dirname(os.path.dirname(nvcc))):  # torch's own guess works
        return
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run([nvcc, "-x", "cu", "-E", "--dryrun", os.devnull], capture_output=True,
                             text=True, timeout=60)
        candidates += [os.path.normpath(line[len("#$ TOP="):].strip())
                       for line in (out.stdout + out.stderr).splitlines() if line.startswith("#$ TOP=")]
    except (OSError, subprocess.SubprocessError):
        pass
    for home in candidates:
        if has_headers(home):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)


def _want_cuda() -> bool:
    forced = os.environ.get("ATTNSCALE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _gencode(archs: str) -> list:
    """nvcc flags for the compute capabilities in ``archs`` ("80,90"): machine code for each, and the
    last one's PTX, so that newer GPUs JIT the kernels."""
    caps = [a.strip().replace(".", "") for a in archs.split(",") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise SystemExit(f"attnscale: ATTNSCALE_CUDA_ARCHS must list compute capabilities such as 80,90; got {archs!r}")
    ptx = f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"
    return [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps] + [ptx]


def _source_hash_header() -> str:
    """build/generated/attnscale_source_hash.h: the sources' digest (attnscale/source_hash.py), which
    csrc/module.cpp compiles in (``attnscale._C.source_hash()``).  Rewritten only when it changes, so that
    only module.cpp is recompiled then.  Returns its folder (an include directory)."""
    spec = importlib.util.spec_from_file_location("_attnscale_source_hash",
                                                  os.path.join(ROOT, "attnscale", "source_hash.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = os.path.join(ROOT, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "attnscale_source_hash.h")
    text = f'#pragma once\n#define ATTNSCALE_SOURCE_HASH "{mod.source_hash(ROOT)}"\n'
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


def _extension():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    all_cpp = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    cpu_sources = rel(p for p in all_cpp if f"{os.sep}cuda{os.sep}" not in p)
    cuda_sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "**", "cuda", "*.cu"), recursive=True)
        + glob.glob(os.path.join(ROOT, "csrc", "**", "cuda", "*.cpp"), recursive=True)
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    march = os.environ.get("ATTNSCALE_MARCH", "native")
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("ATTNSCALE_NATIVE", "1") == "1" and march:
        cxx.append(f"-march={march}")
    include_dirs = [os.path.join(ROOT, "csrc"), _source_hash_header()]
    if _want_cuda():
        archs = os.environ.get("ATTNSCALE_CUDA_ARCHS", "80,90")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + _gencode(archs)
        print("attnscale: building C++ CPU kernels AND CUDA kernels "
              f"({len(cuda_sources)} CUDA sources, CUDA_HOME={cpp_extension.CUDA_HOME}, compute capabilities "
              f"{archs}, host {' '.join(cxx[3:]) or 'generic'})")
        return cpp_extension.CUDAExtension(
            "attnscale._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("ATTNSCALE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    print("attnscale: building C++ CPU kernels only (no CUDA torch or nvcc; ATTNSCALE_CUDA=1 forces CUDA)")
    return cpp_extension.CppExtension(
        "attnscale._C", cpu_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="attnscale",
    version="0.1.0",
    description="Attention to Scale (Chen et al., CVPR 2016) reproduced in PyTorch, Caffe-faithful",
    packages=find_packages(include=["attnscale", "attnscale.*", "prototxt_import", "prototxt_import.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
