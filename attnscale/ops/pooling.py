"""``attnscale.ops.caffe_max_pool2d``: Caffe's MAX ``Pooling`` forward on the CPU and on CUDA, for inference.

Same values as :func:`attnscale.caffe.pool2d` (``method="max"``), which calls it whenever no gradient is
needed: the window clipped to the image (padding never wins), a value replaces the running maximum
only if strictly greater.  PyTorch's NCHW CPU max pooling is a scalar loop (88 ms for DeepLab's pool1 at
513x513 on 2 cores, 16 ms in channels_last); this kernel takes the vertical maximum of whole rows and
splits stride-2 rows into even and odd columns, so its loops vectorise.  On CUDA (float32/float64/float16/
bfloat16, NCHW or channels_last, the output in the input's layout) a thread per output: PyTorch's CUDA max
pooling writes an int64 index per output even without a gradient, twice the bytes of a bfloat16 output.  No autograd: with a gradient,
``pool2d`` uses ``F.max_pool2d``.  NaN inputs: like Caffe, a NaN never replaces a maximum (F.max_pool2d
propagates it); a window of NaNs only gives -inf (Caffe: -FLT_MAX).
"""
from __future__ import annotations

import functools

import torch

from ._ext import (cpu_inference_kernel_applies, fake_nchw_output, has_extension, register_forward_only,
                   require_extension)

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::caffe_max_pool2d")
    def _fake(x, kernel, stride, pad, out_h, out_w):
        return fake_nchw_output("caffe_max_pool2d", x, out_h, out_w)

    register_forward_only("caffe_max_pool2d", "attnscale.caffe.pool2d")
    _REGISTERED = True


_register()


_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _has_cuda_kernel() -> bool:
    return has_extension() and torch._C._dispatch_has_kernel_for_dispatch_key("attnscale::caffe_max_pool2d", "CUDA")


def caffe_max_pool2d_applies(x: torch.Tensor) -> bool:
    """Whether :func:`caffe_max_pool2d` can serve a MAX pooling of x: no gradient has to flow through it, and
    x is 4-D on the CPU in float32/float64, or on CUDA in float32/float64/float16/bfloat16 with the
    extension's CUDA kernel built."""
    if x.device.type == "cuda":
        return (x.dim() == 4 and x.dtype in _CUDA_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
                and _has_cuda_kernel())
    return cpu_inference_kernel_applies(x)


def caffe_max_pool2d(x: torch.Tensor, kernel: int, stride: int, pad: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Caffe MAX pooling of x (N, C, H, W) with a square ``kernel``, ``stride``, ``pad`` into ``out_hw``
    (Caffe's output size, :func:`attnscale.caffe.pool_output_shape`).  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_max_pool2d(x, kernel, stride, pad, int(out_hw[0]), int(out_hw[1]))
