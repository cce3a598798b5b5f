"""Loads the compiled extension ``attnscale._C`` that registers ``torch.ops.attnscale.*``."""
from __future__ import annotations

import functools

import torch

#: bound on padding / dilation / kernel / stride / sizes given to the ops (csrc/ops/limits.h kMaxGeometry)
MAX_GEOMETRY = 1 << 24

_BUILD_HINT = (
    "attnscale's C++/CUDA extension (attnscale._C) is not built. Build it with\n"
    "    pip install -e . --no-build-isolation\n"
    "from the repository root (see README.md), or pass use_reference_ops=True (--reference-ops) / call the\n"
    "pure-PyTorch reference in attnscale.ops.reference explicitly."
)

try:
    from attnscale import _C  # noqa: F401  (loading registers the ops)

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    EXTENSION_ERROR = exc


def has_extension() -> bool:
    return EXTENSION_ERROR is None


def stale_build() -> str | None:
    """Why the loaded ``attnscale._C`` does not match this checkout's ``csrc/`` (it was built from other
    sources: rebuild it), or None when it does, or when there is nothing to compare (no build, no csrc/)."""
    from attnscale.source_hash import source_hash

    if EXTENSION_ERROR is not None:
        return None
    here = source_hash()
    built = _C.source_hash() if hasattr(_C, "source_hash") else "(none recorded)"
    if here is None or built == here:
        return None
    return (f"attnscale._C ({_C.__file__}) was built from other sources than this checkout's csrc/ "
            f"(built {built[:12]}, csrc/ {here[:12]}): rebuild it (pip install -e . --no-build-isolation, "
            "or benchmarks/gpu_prebuild.sh for the GPU machines' build)")


def require_extension() -> None:
    """Raise a clear error naming the build command if the extension is missing."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"{_BUILD_HINT}\n(import error: {EXTENSION_ERROR})")


#: the CPU GEMM backend of the Winograd and fc6 kernels, mirrored here so that torch.compile reads a
#: constant (set_cpu_gemm keeps both in step)
_CPU_GEMM = _C.cpu_gemm() if EXTENSION_ERROR is None else "blas"


def cpu_gemm() -> str:
    """The backend of the large float32 GEMMs in our CPU kernels (Winograd's products, fc6's live-tap
    products): ``"onednn"`` (oneDNN's AVX-512 JIT kernels, through PyTorch's ``mkldnn::_linear_pointwise``) or
    ``"blas"`` (``at::mm``: MKL on the x86 wheels).  Default: oneDNN on CPUs with AVX-512, where MKL runs
    its AVX2 code on AMD CPUs (2.1x slower GEMMs on a Zen 5 EPYC), else the BLAS;
    ``ATTNSCALE_CPU_GEMM=blas|onednn`` overrides it (csrc/ops/cpu/gemm.h)."""
    return _CPU_GEMM


def set_cpu_gemm(backend: str) -> str:
    """Switch :func:`cpu_gemm` for this process (``"onednn"`` or ``"blas"``); returns the previous one.
    Models built before keep running; their ``auto`` choices follow the new backend."""
    global _CPU_GEMM
    require_extension()
    prev = _C.set_cpu_gemm(backend)
    _CPU_GEMM = backend
    return prev


#: every op with CUDA kernels (their backward ops live in the same files)
CUDA_OPS = ("scale_merge", "scale_merge_backward", "dilated_conv2d", "dilated_conv2d_backward_input",
            "dilated_conv2d_backward_weight", "caffe_max_pool2d", "caffe_max_pool2d_with_mask",
            "caffe_max_pool2d_backward", "bias_relu", "bias_relu_backward", "caffe_interp", "caffe_interp_backward")


@functools.lru_cache(maxsize=None)
def has_cuda_kernel(op: str) -> bool:
    """True when the extension registers a CUDA kernel for ``attnscale::<op>``."""
    if not has_extension():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"attnscale::{op}", "CUDA")
    except RuntimeError:  # op not registered (built before the op existed)
        return False


def has_cuda_kernels() -> bool:
    """True when the extension was built with the CUDA kernels of every op."""
    return all(has_cuda_kernel(op) for op in CUDA_OPS)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype our kernels run in inside an enabled ``torch.autocast`` region, else None.

    On CUDA the region's dtype (bfloat16/float16, the kernels accumulate in fp32); on CPU float32,
    since the CPU kernels are float32/float64 only (autocast's CPU bfloat16 would be rejected).
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if device_type == "cuda" else torch.float32


def register_forward_only(op: str, alternative: str) -> None:
    """An autograd formula for an inference-only op ``attnscale::<op>`` that raises on a backward, so a
    gradient is never silently dropped; ``alternative`` names the differentiable function to use."""
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{op} is forward only (inference); for a gradient use {alternative}, which takes "
                           "a differentiable path whenever one is needed")

    torch.library.register_autograd(f"attnscale::{op}", backward, setup_context=setup)


def cpu_inference_kernel_applies(x: torch.Tensor, dtypes=(torch.float32, torch.float64)) -> bool:
    """Whether a forward-only CPU kernel (``caffe_interp``, ``caffe_max_pool2d``) can serve x: the
    extension is built, x is a 4-D CPU tensor of one of ``dtypes``, and no gradient has to flow through it."""
    return (has_extension() and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in dtypes and not (torch.is_grad_enabled() and x.requires_grad))


def in_kernel_layout(t: torch.Tensor, like: torch.Tensor, cpu_too: bool = False) -> torch.Tensor:
    """t (a fake result) in the memory layout our CUDA kernels give their outputs: channels_last when like's
    strides suggest it, by the rule of the kernels' own ``layout_of`` (csrc/ops/memory_format.h:
    ``Tensor.suggest_memory_format()``, whose Python twin torch keeps in ``_prims_common``; so a sliced
    channels_last map or an (N, C, 1, 1) one with channels_last strides counts too), on CUDA (the CPU
    kernels write NCHW, except those that keep the layout: ``cpu_too``)."""
    from torch._prims_common import suggest_memory_format

    if ((cpu_too or like.device.type == "cuda") and like.dim() == 4
            and suggest_memory_format(like) == torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def fake_nchw_output(op: str, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """The fake-tensor result of an op that maps x (N, C, H, W) to (N, C, out_h, out_w), in the kernels'
    layout (:func:`in_kernel_layout`)."""
    torch._check(x.dim() == 4 and out_h >= 1 and out_w >= 1,
                 lambda: f"{op}: x must be 4-D and the output size positive, got {x.dim()}-D and ({out_h}, {out_w})")
    return in_kernel_layout(x.new_empty((x.shape[0], x.shape[1], out_h, out_w)), x)
