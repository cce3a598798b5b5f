"""``attnscale.ops.dilated_conv2d``: stride-1 dilated convolution that skips taps on zero padding.

Follows Caffe's ``Convolution`` layer with ``stride: 1``, ``dilation: d``, ``pad: p`` and zero
padding (DeepLab-LargeFOV's fc6 is 3x3, d=12, p=12, 512 -> 1024): output size
``H + 2p - d*(k-1)`` per axis, ``out[n,o,y,x] = bias[o] + sum_{c,ky,kx} w[o,c,ky,kx] *
in[n,c,y-p+ky*d,x-p+kx*d]`` with out-of-image reads equal to zero.  The CPU kernels
(``torch.ops.attnscale.dilated_conv2d`` and its two backward ops) never touch those zero reads; the CUDA
tensor-core kernels skip a tap where it reads only padding over a whole 8x8 output tile and multiply
the zeros where it is live for part of the tile, so with a non-finite weight on such a tap the padded
outputs of that tile become NaN, as they would with ``F.conv2d`` (finite values agree either way).

Autograd and fake (meta) implementations are registered here with ``torch.library``.
"""
from __future__ import annotations

import os

import torch

from ._ext import MAX_GEOMETRY, autocast_dtype, has_extension, in_kernel_layout, require_extension

_OPS_REGISTERED = False


def _out_size(size: int, k: int, dilation: int, padding: int) -> int:
    return size + 2 * padding - dilation * (k - 1)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
           padding: int) -> None:
    """Argument checks with messages naming the argument (the C++ kernels repeat them)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dilated_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"dilated_conv2d: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, v in (("dilation", dilation), ("padding", padding)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"dilated_conv2d: {name} must be an int, got {v!r}")
    if x.dim() != 4:
        raise ValueError(f"dilated_conv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"dilated_conv2d: weight must be 4-D (out, in, kh, kw), got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"dilated_conv2d: x must be floating point, got {x.dtype}")
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        if t.dtype != x.dtype:
            raise TypeError(f"dilated_conv2d: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"dilated_conv2d: {name} is on {t.device} but x is on {x.device}")
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dilated_conv2d: x must be float32 or float64 on CPU, got {x.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"dilated_conv2d: weight has {weight.shape[1]} input channels (dim 1) "
                         f"but x has {x.shape[1]} channels")
    kh, kw = weight.shape[2], weight.shape[3]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"dilated_conv2d: weight must have odd kernel sizes (kh, kw), got ({kh}, {kw})")
    if not 1 <= dilation <= MAX_GEOMETRY:
        raise ValueError(f"dilated_conv2d: dilation must be in [1, {MAX_GEOMETRY}], got {dilation}")
    if not 0 <= padding <= MAX_GEOMETRY:
        raise ValueError(f"dilated_conv2d: padding must be in [0, {MAX_GEOMETRY}], got {padding}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"dilated_conv2d: bias must have shape ({weight.shape[0]},) to match weight's "
                         f"out channels, got {tuple(bias.shape)}")
    ho, wo = (_out_size(x.shape[2], kh, dilation, padding), _out_size(x.shape[3], kw, dilation, padding))
    if ho < 1 or wo < 1:
        raise ValueError(f"dilated_conv2d: output size H + 2*padding - dilation*(k-1) is ({ho}, {wo}) for "
                         f"x of spatial size {tuple(x.shape[2:])}, kernel ({kh}, {kw}), dilation {dilation}, "
                         f"padding {padding}; it must be >= 1")


def _check_backward(grad_output, ref_name: str, ref, channels: int | None, kh: int, kw: int, dilation: int,
                    padding: int) -> None:
    """The C++ backward ops' checks, for their fake kernels (tracing must refuse what running refuses)."""
    torch._check(grad_output.dim() == 4 and ref.dim() == 4, lambda: "dilated_conv2d backward: grad_output and "
                 f"{ref_name} must be 4-D, got {grad_output.dim()}-D and {ref.dim()}-D")
    torch._check(grad_output.dtype == ref.dtype and grad_output.device == ref.device,
                 lambda: f"dilated_conv2d backward: grad_output ({grad_output.dtype}, {grad_output.device}) and "
                 f"{ref_name} ({ref.dtype}, {ref.device}) must have one dtype and device")
    torch._check(channels is None or grad_output.shape[1] == channels, lambda: f"dilated_conv2d backward: grad_output has "
                 f"{grad_output.shape[1]} channels, {ref_name} gives {channels}")
    torch._check(1 <= kh <= MAX_GEOMETRY and 1 <= kw <= MAX_GEOMETRY and kh % 2 == 1 and kw % 2 == 1,
                 lambda: f"dilated_conv2d: weight must have odd kernel sizes (kh, kw), got ({kh}, {kw})")
    torch._check(1 <= dilation <= MAX_GEOMETRY and 0 <= padding <= MAX_GEOMETRY, lambda: "dilated_conv2d "
                 f"backward: dilation must be in [1, {MAX_GEOMETRY}] and padding in [0, {MAX_GEOMETRY}], got "
                 f"{dilation}, {padding}")


def _column_count(x: torch.Tensor, o, kh: int, kw: int, dilation: int, padding: int):
    """Elements of the column blocks that ``dilated_conv2d_with_columns`` keeps for x and an (o, C, kh, kw)
    kernel, laid out as the C++ op lays them (``column_groups``: each group of blocks starts at a multiple of 16
    elements).  Symbolic in x's batch and channel counts, so that torch.compile keeps them dynamic (the plane's
    size, the kernel and the geometry fix the groups and are taken as they are)."""
    from attnscale import _C

    n, c, h, w = x.shape
    if o == 0:
        return 0
    total = 0
    for members, pixels, taps in _C.dilated_conv_column_groups(int(h), int(w), int(kh), int(kw), int(dilation),
                                                               int(padding)):
        total = (total + 15) // 16 * 16 + members * n * pixels * taps * c
    return total


def _keeps_columns(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a forward keeps its column blocks for the weight gradient: the weight needs a gradient and the
    call takes the GEMM path (the C++ ``use_gemm`` rule: ``ATTNSCALE_DILATED_CONV_ALGO``, unset meaning GEMMs
    on CUDA; a bad value is left for the op to refuse)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return False
    algo = os.environ.get("ATTNSCALE_DILATED_CONV_ALGO", "")
    return algo == "gemm" or (algo == "" and x.device.type == "cuda")


def _register() -> None:
    """Fake + autograd registrations of the C++ ops (once, when the extension is loaded)."""
    global _OPS_REGISTERED
    if _OPS_REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::dilated_conv2d")
    def _fwd_fake(x, weight, bias=None, dilation=12, padding=12):
        _check(x, weight, bias, dilation, padding)
        kh, kw = weight.shape[2], weight.shape[3]
        ho, wo = _out_size(x.shape[2], kh, dilation, padding), _out_size(x.shape[3], kw, dilation, padding)
        return in_kernel_layout(x.new_empty((x.shape[0], weight.shape[0], ho, wo)), x)

    @torch.library.register_fake("attnscale::dilated_conv2d_with_columns")
    def _fwd_columns_fake(x, weight, bias=None, dilation=12, padding=12):
        out = _fwd_fake(x, weight, bias, dilation, padding)
        o, _, kh, kw = weight.shape
        return out, x.new_empty((_column_count(x, o, kh, kw, dilation, padding),))

    @torch.library.register_fake("attnscale::dilated_conv2d_backward_input")
    def _bwd_input_fake(grad_output, weight, dilation, padding):
        kh, kw = weight.shape[2], weight.shape[3]
        _check_backward(grad_output, "weight", weight, weight.shape[0], kh, kw, dilation, padding)
        h = grad_output.shape[2] - 2 * padding + dilation * (kh - 1)
        w = grad_output.shape[3] - 2 * padding + dilation * (kw - 1)
        torch._check(h >= 1 and w >= 1, lambda: f"dilated_conv2d backward: grad_output spatial size "
                     f"{tuple(grad_output.shape)} implies an input size ({h}, {w}) < 1")
        return in_kernel_layout(grad_output.new_empty((grad_output.shape[0], weight.shape[1], h, w)), grad_output)

    @torch.library.register_fake("attnscale::dilated_conv2d_backward_weight")
    def _bwd_weight_fake(grad_output, x, kernel_h, kernel_w, dilation, padding, columns=None):
        _check_backward(grad_output, "x", x, None, kernel_h, kernel_w, dilation, padding)
        ho, wo = (_out_size(x.shape[2], kernel_h, dilation, padding), _out_size(x.shape[3], kernel_w, dilation, padding))
        torch._check(ho >= 1 and wo >= 1, lambda: f"dilated_conv2d: output size H + 2*padding - dilation*(k-1) "
                     f"is ({ho}, {wo}) for x of spatial size {tuple(x.shape[2:])}; it must be >= 1")
        torch._check((grad_output.shape[0], grad_output.shape[2], grad_output.shape[3]) == (x.shape[0], ho, wo),
                     lambda: f"dilated_conv2d backward: grad_output has shape {tuple(grad_output.shape)} but x "
                     f"{tuple(x.shape)} gives an output of ({x.shape[0]}, {grad_output.shape[1]}, {ho}, {wo})")
        o = grad_output.shape[1]
        if columns is not None:
            n = _column_count(x, o, kernel_h, kernel_w, dilation, padding)
            torch._check(columns.dim() == 1 and columns.shape[0] == n and columns.is_contiguous()
                         and columns.dtype == x.dtype and columns.device == x.device,
                         lambda: "dilated_conv2d backward: columns must be the 1-D contiguous column blocks of x "
                         f"{tuple(x.shape)} ({n} elements of {x.dtype} on {x.device}), got {tuple(columns.shape)} "
                         f"({columns.dtype} on {columns.device})")
        return (grad_output.new_empty((o, x.shape[1], kernel_h, kernel_w)), grad_output.new_empty((o,)))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, dilation, padding = inputs
        columns = None
        if isinstance(output, tuple):  # dilated_conv2d_with_columns
            columns = output[1]
            ctx.mark_non_differentiable(columns)
        ctx.save_for_backward(x, weight, columns)
        ctx.has_bias = bias is not None
        ctx.dilation, ctx.padding = dilation, padding

    def _backward(ctx, grad_out, _grad_columns=None):
        x, weight, columns = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.attnscale.dilated_conv2d_backward_input(grad_out, weight, ctx.dilation, ctx.padding)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gw, gb = torch.ops.attnscale.dilated_conv2d_backward_weight(
                grad_out, x, weight.shape[2], weight.shape[3], ctx.dilation, ctx.padding, columns)
            if not ctx.needs_input_grad[1]:
                gw = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                gb = None
        return gx, gw, gb, None, None

    torch.library.register_autograd("attnscale::dilated_conv2d", _backward, setup_context=_setup_context)
    torch.library.register_autograd("attnscale::dilated_conv2d_with_columns", _backward,
                                    setup_context=_setup_context)

    # Double backward: both backward ops are bilinear, so their derivatives are the three ops again.
    def _bwd_input_setup(ctx, inputs, output):
        grad_output, weight, ctx.dilation, ctx.padding = inputs
        ctx.save_for_backward(grad_output, weight)

    def _bwd_input_backward(ctx, ggx):  # gx = B_in(g, w): <ggx, gx> = <F(ggx, w), g>
        g, w = ctx.saved_tensors
        ggx = ggx.contiguous()
        d_g = d_w = None
        if ctx.needs_input_grad[0]:
            d_g = torch.ops.attnscale.dilated_conv2d(ggx, w, None, ctx.dilation, ctx.padding)
        if ctx.needs_input_grad[1]:
            d_w = torch.ops.attnscale.dilated_conv2d_backward_weight(
                g, ggx, w.shape[2], w.shape[3], ctx.dilation, ctx.padding)[0]
        return d_g, d_w, None, None

    def _bwd_weight_setup(ctx, inputs, output):
        # columns (if given) are x's column blocks, a function of x: the derivatives go to x alone
        grad_output, x, ctx.kh, ctx.kw, ctx.dilation, ctx.padding, _columns = inputs
        ctx.save_for_backward(grad_output, x)

    def _bwd_weight_backward(ctx, ggw, ggb):  # (gw, gb) = B_w(g, x): <ggw, gw> + <ggb, gb> = <g, F(x, ggw, ggb)>
        g, x = ctx.saved_tensors
        if ggw is None:
            ggw = g.new_zeros((g.shape[1], x.shape[1], ctx.kh, ctx.kw))
        ggw = ggw.contiguous()
        d_g = d_x = None
        if ctx.needs_input_grad[0]:
            d_g = torch.ops.attnscale.dilated_conv2d(x, ggw, ggb, ctx.dilation, ctx.padding)
        if ctx.needs_input_grad[1]:
            d_x = torch.ops.attnscale.dilated_conv2d_backward_input(g, ggw, ctx.dilation, ctx.padding)
        return d_g, d_x, None, None, None, None, None

    torch.library.register_autograd("attnscale::dilated_conv2d_backward_input", _bwd_input_backward,
                                    setup_context=_bwd_input_setup)
    torch.library.register_autograd("attnscale::dilated_conv2d_backward_weight", _bwd_weight_backward,
                                    setup_context=_bwd_weight_setup)
    _OPS_REGISTERED = True


_register()


def dilated_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   dilation: int = 12, padding: int = 12) -> torch.Tensor:
    """Stride-1 dilated convolution (Caffe ``Convolution``, zero padding) that skips padded taps.

    ``x`` (N, C, H, W), ``weight`` (O, C, kh, kw) with odd kh, kw, ``bias`` (O,) or None; returns
    (N, O, H + 2p - d(kh-1), W + 2p - d(kw-1)).  CPU: float32/float64.  CUDA: float32 (TF32 when the
    running library's flag allows it: ``torch.backends.cuda.matmul.allow_tf32`` for the GEMM path,
    ``torch.backends.cudnn.allow_tf32`` for the direct kernels; else exact), bfloat16/float16 (tensor
    cores, fp32 accumulation), float64.  Differentiable in x, weight and bias; on the GEMM path (CUDA) a
    forward whose weight needs a gradient keeps its column blocks (x's live taps, about 5.8x the bytes of x
    for fc6 at 41x41) until the backward, which then multiplies them instead of gathering them again.  Inside
    ``torch.autocast`` the inputs are cast to the region's dtype on CUDA and to float32 on CPU.
    """
    require_extension()
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    _check(x, weight, bias, dilation, padding)
    if _keeps_columns(x, weight):
        return torch.ops.attnscale.dilated_conv2d_with_columns(x, weight, bias, dilation, padding)[0]
    return torch.ops.attnscale.dilated_conv2d(x, weight, bias, dilation, padding)
