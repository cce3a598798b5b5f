"""``attnscale.ops.caffe_max_pool2d``: Caffe's MAX ``Pooling`` forward on the CPU and on CUDA, for inference;
``caffe_max_pool2d_train``: the same with a gradient.

Same values as :func:`attnscale.caffe.pool2d` (``method="max"``), which calls it whenever no gradient is
needed: the window clipped to the image (padding never wins), a value replaces the running maximum
only if strictly greater.  PyTorch's NCHW CPU max pooling is a scalar loop (88 ms for DeepLab's pool1 at
513x513 on 2 cores, 16 ms in channels_last); this kernel takes the vertical maximum of whole rows and
splits stride-2 rows into even and odd columns, so its loops vectorise.  On CUDA (float32/float64/float16/
bfloat16, NCHW or channels_last, the output in the input's layout) a thread per output: PyTorch's CUDA max
pooling writes an int64 index per output even without a gradient, twice the bytes of a bfloat16 output.  On
the CPU the half types are compared in float32 (exact: a maximum is one of the inputs); PyTorch's CPU
bfloat16 max pooling took 209 of the 957 ms of a 513x513 bfloat16-autocast inference on 2 cores.  No
autograd: with a gradient, ``pool2d`` uses ``caffe_max_pool2d_train`` on a GPU and ``F.max_pool2d`` on the
CPU.  NaN inputs: like Caffe, a NaN never replaces a maximum (F.max_pool2d propagates it); a window of NaNs
only gives -inf (Caffe: -FLT_MAX).

``caffe_max_pool2d_train`` is the differentiable twin that ``pool2d`` takes on a GPU when a gradient is needed
(``caffe_max_pool2d_with_mask`` + ``caffe_max_pool2d_backward``, CPU and CUDA kernels): it saves a one-byte
window offset per output where ``F.max_pool2d`` writes and reads back an int64 index (8x the bytes), and its
backward is Caffe's gather.
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

    @torch.library.register_fake("attnscale::caffe_max_pool2d")
    def _fake(x, kernel, stride, pad, out_h, out_w):
        return fake_nchw_output("caffe_max_pool2d", x, out_h, out_w)

    register_forward_only("caffe_max_pool2d", "attnscale.caffe.pool2d")

    @torch.library.register_fake("attnscale::caffe_ave_pool2d")
    def _fake_ave(x, kernel, stride, pad, out_h, out_w):
        return fake_nchw_output("caffe_ave_pool2d", x, out_h, out_w)

    register_forward_only("caffe_ave_pool2d", "attnscale.caffe.pool2d")

    @torch.library.register_fake("attnscale::caffe_max_pool2d_with_mask")
    def _fake_mask(x, kernel, stride, pad, out_h, out_w):
        k = min(kernel, max(x.shape[-2:]) + pad)  # the C++ checks clip it so
        torch._check(k * k <= _MASK_NONE, lambda: f"caffe_max_pool2d_with_mask: kernel {k} is more than 15")
        out = fake_nchw_output("caffe_max_pool2d_with_mask", x, out_h, out_w)
        return out, in_kernel_layout(out.new_empty(out.shape, dtype=torch.uint8), x)

    @torch.library.register_fake("attnscale::caffe_max_pool2d_backward")
    def _fake_backward(grad, mask, kernel, stride, pad, in_h, in_w):
        torch._check(grad.dim() == 4 and grad.shape == mask.shape and mask.dtype == torch.uint8,
                     lambda: f"caffe_max_pool2d_backward: grad {tuple(grad.shape)} and mask {tuple(mask.shape)} "
                     f"({mask.dtype}) must be 4-D of one shape, the mask uint8")
        return in_kernel_layout(grad.new_empty((grad.shape[0], grad.shape[1], in_h, in_w)), mask)

    def _setup(ctx, inputs, output):
        x, kernel, stride, pad, _, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.geometry = (kernel, stride, pad, x.shape[-2], x.shape[-1])

    def _backward(ctx, grad, _grad_mask):
        mask, = ctx.saved_tensors
        gx = torch.ops.attnscale.caffe_max_pool2d_backward(grad, mask, *ctx.geometry)
        return gx, None, None, None, None, None

    torch.library.register_autograd("attnscale::caffe_max_pool2d_with_mask", _backward, setup_context=_setup)
    _REGISTERED = True


#: csrc/ops/max_pool_window.h kMaskNone: the mask value of a window without a winner
_MASK_NONE = 255

_register()


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # CUDA and CPU inference




def caffe_max_pool2d_applies(x: torch.Tensor) -> bool:
    """Whether :func:`caffe_max_pool2d` can serve a MAX pooling of x: no gradient has to flow through it, and
    x is 4-D in float32/float64/float16/bfloat16 on the CPU (the half types compared in float32: CPU
    autocast's maps), or on CUDA with the extension's CUDA kernel built."""
    if x.device.type == "cuda":
        return (x.dim() == 4 and x.dtype in _KERNEL_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
                and has_cuda_kernel("caffe_max_pool2d"))
    return cpu_inference_kernel_applies(x, _KERNEL_DTYPES)


def caffe_ave_pool2d_applies(x: torch.Tensor) -> bool:
    """Whether :func:`caffe_ave_pool2d` can serve an AVE pooling of x: no gradient, x 4-D on the CPU in
    float32/float64/float16/bfloat16 and not channels_last (the kernel reads NCHW planes; ``F.avg_pool2d`` is
    fast in channels_last and keeps the layout).  A GPU keeps ``F.avg_pool2d`` and the division: pool5a is a
    small layer there."""
    return (cpu_inference_kernel_applies(x, _KERNEL_DTYPES)
            and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))


def caffe_ave_pool2d(x: torch.Tensor, kernel: int, stride: int, pad: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Caffe AVE pooling of x (N, C, H, W) on the CPU, Caffe's AvePoolingForward in its float order: the window
    clipped to the image summed rows then columns from 0 (float32 for the half types), divided by the window
    clipped to [-pad, H + pad) x [-pad, W + pad): Caffe's float32 results bit for bit (as the ``F.avg_pool2d``
    path's are), the half types rounded once (that path rounds the sums, then the quotient), 3.3x faster than
    that path at pool5a.  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_ave_pool2d(x, kernel, stride, pad, int(out_hw[0]), int(out_hw[1]))


def caffe_max_pool2d_train_applies(x: torch.Tensor, kernel: int) -> bool:
    """Whether :func:`caffe_max_pool2d_train` serves a MAX pooling of x: x is 4-D on CUDA in float32/float64/
    float16/bfloat16, the extension has the CUDA kernels, and the window offsets fit the one-byte mask
    (kernel <= 15).  On the CPU training keeps ``F.max_pool2d`` (the op's CPU kernels are plain loops, its
    twin for the tests)."""
    return (x.device.type == "cuda" and x.dim() == 4 and x.dtype in _KERNEL_DTYPES and kernel * kernel <= _MASK_NONE
            and has_cuda_kernel("caffe_max_pool2d_with_mask"))


def caffe_max_pool2d_train(x: torch.Tensor, kernel: int, stride: int, pad: int,
                           out_hw: tuple[int, int]) -> torch.Tensor:
    """Caffe MAX pooling with a gradient: ``caffe_max_pool2d_with_mask`` (the output and a uint8 mask, the
    winner's offset in its window: Caffe's row-major scan, strict ``>``) and, in backward,
    ``caffe_max_pool2d_backward`` (Caffe's MaxPoolBackward: each input sums the gradients of the covering
    outputs whose mask names it).  The same values and gradients as ``F.max_pool2d`` on finite inputs, with a
    byte of mask per output where PyTorch saves an int64 index."""
    require_extension()
    return torch.ops.attnscale.caffe_max_pool2d_with_mask(x, kernel, stride, pad, int(out_hw[0]), int(out_hw[1]))[0]


def caffe_max_pool2d(x: torch.Tensor, kernel: int, stride: int, pad: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Caffe MAX pooling of x (N, C, H, W) with a square ``kernel``, ``stride``, ``pad`` into ``out_hw``
    (Caffe's output size, :func:`attnscale.caffe.pool_output_shape`).  Forward only."""
    require_extension()
    return torch.ops.attnscale.caffe_max_pool2d(x, kernel, stride, pad, int(out_hw[0]), int(out_hw[1]))
