"""``attnscale.ops.caffe_interp``: DeepLab's ``Interp`` forward on the CPU and on CUDA.

Same values, bit for bit in float32, as the differentiable index_select path of
:func:`attnscale.caffe.interp`, which calls it whenever no gradient is needed: bilinear with aligned
corners, Caffe's float index arithmetic (``csrc/ops/scale_merge_interp.h``), the horizontal blend first and
then the vertical one, as ``caffe_cpu_interp2`` computes them.  The index_select path makes six full-size
temporaries; this kernel blends each needed source row once and each output row from two of them, so
``predict``'s zoom of the scores to 513x513 and the attention head's resize of fc7 cost a few passes less.
No autograd: with a gradient, ``interp`` uses the index_select path (whose autograd Function, on a GPU, runs
this op for its forward: the same values).  On CUDA (float32/float64/float16/bfloat16, NCHW or channels_last,
the output in the input's layout) a thread per output, each product and sum rounded to the dtype as the
index_select path's PyTorch ops round them (for half types after every operation), so the values are that
path's bit for bit there too, from one kernel instead of about a dozen passes over full-size temporaries.
``caffe_interp_backward`` (CPU and CUDA; the GPU backward of interp_gather) sums through the per-axis adjoint
tables of :func:`attnscale.caffe._interp_adjoint_tables` in one kernel.
"""
from __future__ import annotations

import torch

from ._ext import (cpu_inference_kernel_applies, fake_nchw_output, has_cuda_kernel, has_extension,
                   in_kernel_layout, register_forward_only, require_extension)

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::caffe_interp")
    def _fake(x, out_h, out_w):
        return fake_nchw_output("caffe_interp", x, out_h, out_w)

    register_forward_only("caffe_interp", "attnscale.caffe.interp")

    @torch.library.register_fake("attnscale::caffe_interp_backward")
    def _fake_backward(grad, idx_h, coef_h, idx_w, coef_w):
        torch._check(grad.dim() == 4 and idx_h.dim() == 2 and idx_w.dim() == 2,
                     lambda: "caffe_interp_backward: grad must be 4-D and the index tables 2-D")
        return in_kernel_layout(grad.new_empty((grad.shape[0], grad.shape[1], idx_h.shape[1], idx_w.shape[1])), grad)

    _REGISTERED = True


_register()


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # CUDA and CPU inference


def has_cuda_kernels() -> bool:
    """Whether the extension was built with the CUDA kernels of ``caffe_interp`` and its backward."""
    return has_cuda_kernel("caffe_interp") and has_cuda_kernel("caffe_interp_backward")


def caffe_interp_applies(x: torch.Tensor) -> bool:
    """Whether :func:`caffe_interp` can serve an Interp of x without a gradient: 4-D in float32/float64/
    float16/bfloat16 on the CPU (built; the half types rounded after every product and sum, as the
    index_select path's tensor ops round them), or on CUDA with the CUDA kernel built."""
    if x.device.type == "cuda":
        return (x.dim() == 4 and x.dtype in _KERNEL_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
                and has_cuda_kernel("caffe_interp"))
    return cpu_inference_kernel_applies(x, _KERNEL_DTYPES)


def caffe_interp(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Interp of x (N, C, H, W) to ``out_hw`` (bilinear, aligned corners, Caffe's arithmetic).  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_interp(x, int(out_hw[0]), int(out_hw[1]))
