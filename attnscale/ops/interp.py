"""``attnscale.ops.caffe_interp``: DeepLab's ``Interp`` forward on the CPU, for inference.

Same values, bit for bit in float32, as the differentiable index_select path of
:func:`attnscale.caffe.interp`, which calls it whenever no gradient is needed: bilinear with aligned
corners, Caffe's float index arithmetic (``csrc/ops/scale_merge_interp.h``), the horizontal blend first and
then the vertical one, as ``caffe_cpu_interp2`` computes them.  The index_select path makes six full-size
temporaries; this kernel blends each needed source row once and each output row from two of them, so
``predict``'s zoom of the scores to 513x513 and the attention head's resize of fc7 cost a few passes less.
No autograd: with a gradient, ``interp`` uses the index_select path.
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

    @torch.library.register_fake("attnscale::caffe_interp")
    def _fake(x, out_h, out_w):
        return fake_nchw_output("caffe_interp", x, out_h, out_w)

    register_forward_only("caffe_interp", "attnscale.caffe.interp")
    _REGISTERED = True


_register()


#: Whether :func:`caffe_interp` can serve an Interp of x (built, 4-D CPU float32/float64, no gradient).
caffe_interp_applies = cpu_inference_kernel_applies


def caffe_interp(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Interp of x (N, C, H, W) to ``out_hw`` (bilinear, aligned corners, Caffe's arithmetic).  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_interp(x, int(out_hw[0]), int(out_hw[1]))
