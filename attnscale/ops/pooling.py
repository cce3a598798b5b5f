"""``attnscale.ops.caffe_max_pool2d``: Caffe's MAX ``Pooling`` forward on the CPU, for inference.

Same values as :func:`attnscale.caffe.pool2d` (``method="max"``), which calls it whenever no gradient is
needed: the window clipped to the image (padding never wins), a value replaces the running maximum
only if strictly greater.  PyTorch's NCHW CPU max pooling is a scalar loop (88 ms for DeepLab's pool1 at
513x513 on 2 cores, 16 ms in channels_last); this kernel takes the vertical maximum of whole rows and
splits stride-2 rows into even and odd columns, so its loops vectorise.  No autograd: with a gradient,
``pool2d`` uses ``F.max_pool2d``.  NaN inputs: like Caffe, a NaN never replaces a maximum (F.max_pool2d
propagates it); a window of NaNs only gives -inf (Caffe: -FLT_MAX).
"""
from __future__ import annotations

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


#: Whether :func:`caffe_max_pool2d` can serve a MAX pooling of x (built, 4-D CPU float32/float64, no
#: gradient).
caffe_max_pool2d_applies = cpu_inference_kernel_applies


def caffe_max_pool2d(x: torch.Tensor, kernel: int, stride: int, pad: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Caffe MAX pooling of x (N, C, H, W) with a square ``kernel``, ``stride``, ``pad`` into ``out_hw``
    (Caffe's output size, :func:`attnscale.caffe.pool_output_shape`).  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_max_pool2d(x, kernel, stride, pad, int(out_hw[0]), int(out_hw[1]))
