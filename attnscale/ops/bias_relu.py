"""``attnscale.ops.bias_relu``: a convolution's bias and the ReLU after it in one pass (CPU and CUDA kernels).

On a GPU PyTorch runs a convolution with a bias as cuDNN's convolution and then a kernel of its own that
adds the bias (``output.add_(bias)``), and ``F.relu`` is a third pass over the map; in backward
``convolution_backward`` reduces the bias gradient in a pass apart from ReLU's masking.  ``bias_relu`` takes
the convolution's output without its bias and gives ``relu(x + bias)`` (the sum rounded to x's dtype, then
torch.relu's value: the same numbers); its backward masks the gradient as F.relu's does
(``out <= 0 ? 0 : grad``) and sums the bias gradient in the same pass (float accumulation, a fixed order:
deterministic).  Under autocast the float32 bias goes in as it is and is rounded to x's dtype inside (the
value autocast's cast gives) and its gradient comes back as the float32 sum: no cast kernel per call.
:class:`attnscale.model.AttentionToScale` uses it on a GPU for every convolution followed by a ReLU
(``fuse_bias_relu``).  Caffe's ReLU backward multiplies by the mask instead, so a non-finite gradient
at a zeroed unit would be NaN there and 0 here (as with F.relu).

In training the Dropout that follows fc6, fc7 and att_conv1's ReLU (Caffe's ``drop6``, ``drop7``,
``att_drop1``: ``top = bottom * mask / (1 - p)``) can run in the same pass (``p``, ``seed``): a unit is
kept with probability 1 - p (Philox4x32-10 of the seed and the element's index in memory order, the same
mask from the CPU and the CUDA kernels) and scaled by ``1 / (1 - p)`` as F.dropout scales it; a dropped unit
is 0.  No mask is stored: the output is positive exactly where a unit was kept and passed the ReLU, so the
backward needs the output alone (``grad * scale`` there, 0 elsewhere: F.relu's and F.dropout's backward).
A dropped NaN gives 0 here (F.dropout: NaN * 0).  The seed is drawn from torch's CPU generator by
:func:`dropout_seed` (so ``torch.manual_seed`` fixes it, and no device synchronisation is needed).
"""
from __future__ import annotations

import torch

from ._ext import has_cuda_kernel, has_extension, in_kernel_layout, require_extension

_REGISTERED = False
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _bias_dtype_ok(x: torch.Tensor, bias_dtype: torch.dtype) -> bool:
    """The op takes a bias of x's dtype, or a float32 one for a float16 / bfloat16 x (rounded inside)."""
    return bias_dtype == x.dtype or (bias_dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def _register() -> None:
    global _REGISTERED
    if _REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::bias_relu")
    def _fake(x, bias, p=0.0, seed=0):
        torch._check(x.dim() == 4 and bias.dim() == 1 and bias.shape[0] == x.shape[1] and _bias_dtype_ok(x, bias.dtype),
                     lambda: f"bias_relu: x {tuple(x.shape)} ({x.dtype}) must be 4-D and bias {tuple(bias.shape)} "
                     f"({bias.dtype}) one value per channel of x's dtype (or float32 for a half-type x)")
        return in_kernel_layout(torch.empty_like(x, memory_format=torch.contiguous_format), x, cpu_too=True)

    @torch.library.register_fake("attnscale::bias_relu_backward")
    def _fake_backward(grad, out, bias_dtype, scale=1.0):
        torch._check(out.dim() == 4 and grad.shape == out.shape and grad.dtype == out.dtype
                     and _bias_dtype_ok(out, bias_dtype),
                     lambda: f"bias_relu_backward: grad {tuple(grad.shape)} and out {tuple(out.shape)} must be 4-D "
                     f"of one shape and dtype, and bias_dtype {bias_dtype} out's dtype or float32")
        return in_kernel_layout(torch.empty_like(out, memory_format=torch.contiguous_format), out,
                                cpu_too=True), out.new_empty(out.shape[1], dtype=bias_dtype)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.bias_dtype = inputs[1].dtype
        p = inputs[2] if len(inputs) > 2 else 0.0
        ctx.scale = 1.0 / (1.0 - p)

    def _backward(ctx, grad):
        out, = ctx.saved_tensors
        gx, gb = torch.ops.attnscale.bias_relu_backward(grad, out, ctx.bias_dtype, ctx.scale)
        return gx, gb, None, None

    torch.library.register_autograd("attnscale::bias_relu", _backward, setup_context=_setup)
    _REGISTERED = True


_register()


def bias_relu_applies(x: torch.Tensor) -> bool:
    """Whether the model fuses the bias and the ReLU after a convolution whose output is like x: x is 4-D on
    CUDA in float32/float64/float16/bfloat16, the extension has the CUDA kernels, and torch.compile is not
    tracing (Inductor fuses the bias add and the ReLU itself)."""
    return (x.device.type == "cuda" and x.dim() == 4 and x.dtype in _CUDA_DTYPES
            and has_cuda_kernel("bias_relu") and not torch.compiler.is_compiling())


def dropout_seed() -> int:
    """A fresh 64-bit Philox key for one dropout call, from torch's default CPU generator."""
    return int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64, device="cpu"))


def bias_relu(x: torch.Tensor, bias: torch.Tensor, p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """``relu(x + bias[None, :, None, None])`` in one pass, differentiable in x and bias.  The bias counts at
    x's dtype (what autocast does to a convolution's bias): a float32 bias of a float16 / bfloat16 x is rounded
    inside the kernel, without a cast kernel (its gradient is the float32 sum), any other is cast first.
    With ``p > 0`` also ``F.dropout(..., p, training=True)`` in the same pass (module docstring); ``seed``
    picks the mask (default: :func:`dropout_seed`)."""
    require_extension()
    if not 0.0 <= p < 1.0:
        raise ValueError(f"bias_relu: the dropout ratio p must be in [0, 1), got {p}")
    b = bias if _bias_dtype_ok(x, bias.dtype) else bias.to(x.dtype)
    if p == 0.0:
        return torch.ops.attnscale.bias_relu(x, b)
    return torch.ops.attnscale.bias_relu(x, b, float(p), dropout_seed() if seed is None else int(seed))
