"""``attnscale.ops.winograd_conv2d``: 3x3, stride-1 convolution by Winograd's F(2x2, 3x3) or F(4x4, 3x3), CPU.

The same function as Caffe's ``Convolution`` with ``kernel_size: 3``, ``pad: p``, stride 1, no dilation
(every DeepLab trunk layer conv1_1 .. conv4_3, and the attention head's 3x3 layer): output size
``H + 2p - 2`` per axis, zero padding.  Each 2x2 output tile takes 16 multiplies per channel pair
instead of 36 (``Y = A^T [(G g G^T) . (B^T d B)] A``), so on a CPU, where oneDNN's direct
convolution already runs near the FMA peak, it does 2.25x less arithmetic.  Float32 rounding is no
worse than the direct convolution's: F(2x2, 3x3) uses only the interpolation points 0, +-1 and
infinity, whose transforms have entries 0, +-1/2 and +-1 (tests/test_winograd_conv.py measures it
against float64).  ``tile=4`` selects F(4x4, 3x3): 36 multiplies per 4x4 tile (4x less than direct),
points 0, +-1, +-2, infinity, whose larger transform entries (up to 8, 1/24) give float32 errors
several times the direct convolution's (about 1e-5 relative on VGG-like layers; the tests bound it).

CPU only (float32, float64): on CUDA, cuDNN already picks Winograd kernels itself.  The weight
transform is its own op (:func:`winograd_weight`) so that a caller transforms a weight once and
reuses it (the model does, across its scales).  Differentiable in x, weight and bias: d/dx is the
3x3 convolution of the output gradient with the flipped, transposed weight (this op again when
``p <= 2``), d/dweight is oneDNN's.
"""
from __future__ import annotations

import weakref

import torch

from ._ext import MAX_GEOMETRY, autocast_dtype, has_extension, require_extension

_OPS_REGISTERED = False
TILES = (2, 4)  # F(2x2, 3x3) and F(4x4, 3x3)


def _out_size(size: int, padding: int, dilation: int = 1) -> int:
    return size + 2 * padding - 2 * dilation


def _check(x, weight, bias, padding, weight_winograd, tile=None, dilation=1) -> None:
    """Argument checks with messages naming the argument (the C++ kernel repeats them)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"winograd_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("weight_winograd", weight_winograd)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"winograd_conv2d: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise TypeError(f"winograd_conv2d: padding must be an int, got {padding!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"winograd_conv2d: dilation must be an int >= 1, got {dilation!r}")
    if x.dim() != 4:
        raise ValueError(f"winograd_conv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_conv2d: weight must be (out, in, 3, 3), got shape {tuple(weight.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"winograd_conv2d: x is on {x.device}; the op is CPU only (on CUDA use F.conv2d: "
                         "cuDNN picks Winograd kernels itself)")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"winograd_conv2d: x must be float32 or float64, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("weight_winograd", weight_winograd)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"winograd_conv2d: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"winograd_conv2d: {name} is on {t.device} but x is on {x.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"winograd_conv2d: weight has {weight.shape[1]} input channels (dim 1) "
                         f"but x has {x.shape[1]} channels")
    if weight.shape[0] == 0:
        raise ValueError(f"winograd_conv2d: weight has no output channel (shape {tuple(weight.shape)}); "
                         "F.conv2d refuses that too")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"winograd_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tile is not None and tile not in TILES:
        raise ValueError(f"winograd_conv2d: tile must be one of {TILES}, got {tile!r}")
    planes = (16, 36) if tile is None else ((tile + 2) ** 2,)
    if weight_winograd is not None and (weight_winograd.dim() != 3 or weight_winograd.shape[0] not in planes
                                        or tuple(weight_winograd.shape[1:]) != tuple(weight.shape[:2])):
        raise ValueError(f"winograd_conv2d: weight_winograd must be winograd_weight(weight, tile), of shape "
                         f"({' or '.join(map(str, planes))}, {weight.shape[0]}, {weight.shape[1]}), "
                         f"got {tuple(weight_winograd.shape)}")
    if not 0 <= padding <= MAX_GEOMETRY:
        raise ValueError(f"winograd_conv2d: padding must be in [0, {MAX_GEOMETRY}], got {padding}")
    if dilation > MAX_GEOMETRY:
        raise ValueError(f"winograd_conv2d: dilation must be in [1, {MAX_GEOMETRY}], got {dilation}")
    if padding % dilation:
        raise ValueError(f"winograd_conv2d: padding ({padding}) must be a multiple of the dilation ({dilation})")
    if dilation > 1 and not _component_sizes_ok(x.shape[2], x.shape[3], padding, dilation):
        raise ValueError(f"winograd_conv2d: x of spatial size {tuple(x.shape[2:])} with dilation {dilation} and "
                         f"padding {padding} leaves a polyphase component without output; use F.conv2d")
    ho, wo = _out_size(x.shape[2], padding, dilation), _out_size(x.shape[3], padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"winograd_conv2d: output size H + 2*padding - 2*dilation is ({ho}, {wo}) for x of spatial "
                         f"size {tuple(x.shape[2:])}, padding {padding} and dilation {dilation}; it must be >= 1")


# id(weight) -> (weak reference to it, its version, tile, flipped transposed weight, its transform)
_FLIPPED: dict[int, tuple] = {}


def _flipped(weight: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight for d/dx (flipped in both spatial axes, in and out swapped) and its transform.  Kept per
    weight and version, so that the calls of one backward (one per scale in the share-net) transform it
    once; not kept when the backward itself is differentiated (create_graph), where it must track
    ``weight``."""
    if torch.is_grad_enabled():
        wt = weight.flip(2, 3).transpose(0, 1).contiguous()
        with torch.no_grad():
            return wt, torch.ops.attnscale.winograd_weight(wt, tile)
    hit = _FLIPPED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == tile:
        return hit[3], hit[4]
    wt = weight.flip(2, 3).transpose(0, 1).contiguous()
    ut = torch.ops.attnscale.winograd_weight(wt, tile)
    for k in [k for k, v in _FLIPPED.items() if v[0]() is None]:  # weights that no longer exist
        del _FLIPPED[k]
    _FLIPPED[id(weight)] = (weakref.ref(weight), weight._version, tile, wt, ut)
    return wt, ut


def _register() -> None:
    """Fake + autograd registrations of the C++ ops (once, when the extension is loaded)."""
    global _OPS_REGISTERED
    if _OPS_REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::winograd_weight")
    def _weight_fake(weight, tile=2):
        torch._check(tile in (2, 4), lambda: f"winograd_weight: tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got {tile}")
        torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and weight.is_floating_point(),
                     lambda: f"winograd_weight: weight must be a floating-point (out, in, 3, 3), got {tuple(weight.shape)} "
                     f"{weight.dtype}")
        return weight.new_empty(((tile + 2) ** 2, weight.shape[0], weight.shape[1]))

    @torch.library.register_fake("attnscale::winograd_conv2d")
    def _conv_fake(x, weight, weight_winograd, bias=None, padding=1, relu=False, dilation=1):
        _check(x, weight, bias, padding, weight_winograd, dilation=dilation)
        return x.new_empty((x.shape[0], weight.shape[0], _out_size(x.shape[2], padding, dilation),
                            _out_size(x.shape[3], padding, dilation)))

    def _setup_context(ctx, inputs, output):
        x, weight, weight_winograd, bias, padding, relu, dilation = inputs
        ctx.save_for_backward(x, weight, output if relu else None)
        ctx.has_bias = bias is not None
        ctx.padding, ctx.dilation = padding, dilation
        ctx.tile = 2 if weight_winograd.shape[0] == 16 else 4

    def _backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        if out is not None:  # the fused ReLU: torch.relu's gradient (zero where the output is zero)
            grad_out = grad_out * (out > 0).to(grad_out.dtype)
        p, d = ctx.padding, ctx.dilation
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and x.shape[1] == 0:
            gx = torch.zeros_like(x)
        elif ctx.needs_input_grad[0]:
            # a 3x3 convolution, dilation d, padding 2d - p, gives back H = Ho + 2 (2d - p) - 2d; each of its
            # components has an output where the forward's had an input
            if p <= 2 * d and _component_sizes_ok(grad_out.shape[2], grad_out.shape[3], 2 * d - p, d):
                wt, ut = _flipped(weight, ctx.tile)
                gx = torch.ops.attnscale.winograd_conv2d(grad_out.contiguous(), wt, ut, None, 2 * d - p, False, d)
            else:
                gx = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, padding=p, dilation=d)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, padding=p, dilation=d)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, None, gb, None, None, None

    torch.library.register_autograd("attnscale::winograd_conv2d", _backward, setup_context=_setup_context)
    _OPS_REGISTERED = True


_register()


def winograd_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """The Winograd transform ``U = G g G^T`` of a (out, in, 3, 3) weight for F(tile x tile, 3x3), as
    ((tile + 2)^2, out, in): ``U[n a + b, o, c] = (G w[o, c] G^T)[a, b]`` with n = tile + 2 and
    ``G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]`` (tile 2) or
    ``[1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]`` (tile 4), computed in
    float64 and rounded once.  Not differentiable (the convolution's gradient goes to ``weight``)."""
    require_extension()
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError("winograd_weight: weight must be a (out, in, 3, 3) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if tile not in TILES:
        raise ValueError(f"winograd_weight: tile must be one of {TILES}, got {tile!r}")
    with torch.no_grad():
        return torch.ops.attnscale.winograd_weight(weight.detach(), tile)


def _component_sizes_ok(h: int, w: int, padding: int, dilation: int) -> bool:
    """Every polyphase component x[..., a::d, b::d] (ceil((H - a) / d) rows) has an output, with
    padding p / d: at least one row and column each."""
    d, q = dilation, padding // dilation
    return all(-(-(n - a) // d) + 2 * q - 2 >= 1 for n in (h, w) for a in range(d))


def winograd_applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv(x)`` is a computation :func:`winograd_conv2d` does: a CPU float32/float64 input,
    a 3x3 kernel, stride 1, one group, zero padding and dilation equal on both axes, the padding a
    multiple of the dilation (DeepLab: conv1_1 .. conv4_3 pad 1, conv5_x dilation 2 pad 2)."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1] and conv.dilation[0] == conv.dilation[1]
            and conv.padding[0] % conv.dilation[0] == 0 and conv.weight.dtype == x.dtype):
        return False
    return _component_sizes_ok(x.shape[2], x.shape[3], conv.padding[0], conv.dilation[0])


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 1,
                    weight_winograd: torch.Tensor | None = None, dilation: int = 1, tile: int | None = None,
                    relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, dilation=dilation)`` for a 3x3 weight, computed by
    Winograd F(tile x tile, 3x3).

    ``x`` (N, C, H, W) on the CPU, float32 or float64; ``weight`` (O, C, 3, 3); ``bias`` (O,) or None;
    ``weight_winograd``: ``winograd_weight(weight, tile)`` when the caller keeps it (else computed here);
    ``tile``: 2 (F(2x2, 3x3), the default) or 4 (F(4x4, 3x3): 2.25 instead of 4 multiplies per output,
    float32 errors a few times the direct convolution's); implied by ``weight_winograd`` when given.
    Returns (N, O, H + 2p - 2d, W + 2p - 2d).  A dilation d > 1 needs p = d q: the output pixels (i, j)
    with i = a, j = b mod d read only the input's polyphase component x[..., a::d, b::d], so the op runs
    undilated with padding q on each of the d^2 components (each must have an output), reading and writing
    them in place, all components' tiles in the same products.  ``relu=True``
    returns ``F.relu`` of the convolution, fused into the output transform.  Inside a CPU
    ``torch.autocast`` region the inputs run in float32."""
    require_extension()
    dt = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        weight_winograd = None if weight_winograd is None else weight_winograd.to(dt)
    _check(x, weight, bias, padding, weight_winograd, tile, dilation)
    if not isinstance(relu, bool):
        raise TypeError(f"winograd_conv2d: relu must be a bool, got {relu!r}")
    if weight_winograd is None:
        weight_winograd = winograd_weight(weight, tile or 2)
    return torch.ops.attnscale.winograd_conv2d(x, weight, weight_winograd, bias, padding, relu, dilation)
