"""One small ``nn.Module`` per supported Caffe layer type, each with its Caffe ``Reshape`` rule.

Every builder takes the layer's ``LayerParameter`` and the shapes of its bottoms and returns the
module plus the shapes of its tops; shape errors are Caffe's CHECK failures, raised as
:class:`~prototxt_import.errors.CaffeImportError` naming the layer by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnscale import caffe as caffe_math

from .errors import CaffeImportError

Shape = tuple[int, ...]


class LayerError(Exception):
    """Raised inside builders; the net builder re-raises it as CaffeImportError with the layer."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LayerError(msg)


@dataclass
class BuildContext:
    """What builders share: parameter sharing by ``param { name }`` and the op selection."""
    use_ops: bool = False
    phase: str = "TEST"
    shared: dict[str, nn.Parameter] = field(default_factory=dict)
    generator: torch.Generator | None = None
    #: parameters (values) still allowed to be allocated: a lying prototxt cannot exhaust memory
    param_budget: int = 1 << 30


# --------------------------------------------------------------------------- parameters & fillers
def _fill(shape: Shape, filler, ctx: BuildContext) -> torch.Tensor:
    """Caffe's fillers (``filler.hpp``): constant, gaussian, uniform, xavier, msra; the default
    ``FillerParameter`` is constant 0."""
    t = torch.empty(shape, dtype=torch.float32)
    kind = filler.type if filler is not None else "constant"
    count = math.prod(shape) if shape else 1
    fan_in = count // shape[0] if shape and shape[0] else 1
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else 1
    g = ctx.generator
    if kind == "constant":
        t.fill_(filler.value if filler is not None else 0.0)
    elif kind == "gaussian":
        t.normal_(filler.mean, filler.std, generator=g)
    elif kind == "uniform":
        t.uniform_(filler.min, filler.max, generator=g)
    elif kind in ("xavier", "msra"):
        norm = filler.variance_norm  # FAN_IN=0, FAN_OUT=1, AVERAGE=2
        n = fan_in if norm == 0 else fan_out if norm == 1 else (fan_in + fan_out) / 2.0
        if kind == "xavier":
            scale = math.sqrt(3.0 / n)
            t.uniform_(-scale, scale, generator=g)
        else:
            t.normal_(0.0, math.sqrt(2.0 / n), generator=g)
    else:
        raise LayerError(f"unsupported filler type {kind!r}")
    return t


def _param(lp, index: int, shape: Shape, filler, ctx: BuildContext) -> nn.Parameter:
    """Blob ``index`` of layer ``lp``: a fresh parameter, or the one already owned under the same
    ``param { name }`` (Caffe ``Net::AppendParam``: STRICT mode needs equal shapes, PERMISSIVE
    equal counts)."""
    spec = lp.param[index] if index < len(lp.param) else None
    name = spec.name if spec is not None and spec.name else ""
    if name and name in ctx.shared:
        owner = ctx.shared[name]
        if tuple(owner.shape) != tuple(shape):
            permissive = spec.share_mode == 1
            _check(permissive and owner.numel() == math.prod(shape),
                   f"shared parameter {name!r} has shape {tuple(owner.shape)} in its owner but "
                   f"{tuple(shape)} here")
            raise LayerError(f"shared parameter {name!r}: PERMISSIVE sharing between different "
                             "shapes is not supported")
        return owner
    count = math.prod(shape)
    if count > ctx.param_budget:
        raise LayerError(f"blob {index} of shape {tuple(shape)} would exceed the parameter budget "
                         f"({ctx.param_budget} values left; raise max_param_count to allow it)")
    ctx.param_budget -= count
    p = nn.Parameter(_fill(shape, filler, ctx))
    if name:
        ctx.shared[name] = p
    return p


# --------------------------------------------------------------------------------- shape helpers
def _spatial(values, h, w, default: int, what: str) -> tuple[int, int]:
    """Caffe's ``kernel_size``/``pad``/``stride``/``dilation`` rule for 2-D: ``*_h``/``*_w`` when
    given, else the repeated field (one value for both axes or one per axis), else ``default``."""
    if h is not None or w is not None:
        _check(h is not None and w is not None and not len(values),
               f"{what}: give either {what}_h and {what}_w together or {what}, not a mix")
        return int(h), int(w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    _check(len(values) == 2, f"{what} has {len(values)} values; a 2-D layer takes 1 or 2")
    return int(values[0]), int(values[1])


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def _axis(axis: int, ndim: int, what: str) -> int:
    _check(-ndim <= axis < ndim, f"{what} {axis} out of range for a {ndim}-axis blob")
    return axis % ndim


@dataclass(frozen=True)
class ConvGeometry:
    """A ``convolution_param`` as Caffe reads it (``BaseConvolutionLayer::LayerSetUp``), 2-D."""
    num_output: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    group: int
    bias_term: bool


def conv_geometry(lp) -> ConvGeometry:
    cp = lp.convolution_param
    _check(cp.axis in (1, -3), "only 2-D convolution on (N,C,H,W) blobs (axis 1) is supported")
    kernel = _spatial(cp.kernel_size, _opt(cp, "kernel_h"), _opt(cp, "kernel_w"), 0, "kernel")
    _check(min(kernel) > 0, "kernel size must be given and positive")
    stride = _spatial(cp.stride, _opt(cp, "stride_h"), _opt(cp, "stride_w"), 1, "stride")
    pad = _spatial(cp.pad, _opt(cp, "pad_h"), _opt(cp, "pad_w"), 0, "pad")
    dilation = _spatial(cp.dilation, None, None, 1, "dilation")
    _check(min(stride) > 0 and min(dilation) > 0, "stride and dilation must be positive")
    num_output, group = int(cp.num_output), int(cp.group)
    _check(num_output > 0, "num_output must be positive")
    _check(group > 0 and num_output % group == 0, f"num_output {num_output} must be a multiple of group {group}")
    return ConvGeometry(num_output, kernel, stride, pad, dilation, group, bool(cp.bias_term))


@dataclass(frozen=True)
class PoolGeometry:
    """A ``pooling_param`` as Caffe reads it (``PoolingLayer::LayerSetUp``), square windows only."""
    method: str  # "max" | "ave"
    kernel: int
    stride: int
    pad: int
    global_pooling: bool


def pool_geometry(lp) -> PoolGeometry:
    pp = lp.pooling_param
    _check(pp.pool in (0, 1), "only MAX and AVE pooling are supported (STOCHASTIC is not)")
    method = "max" if pp.pool == 0 else "ave"
    if pp.global_pooling:
        _check(not pp.HasField("kernel_size") and not pp.HasField("kernel_h"),
               "with global_pooling, kernel size cannot be specified")
        _check(pp.pad == 0 and pp.pad_h == 0 and pp.pad_w == 0 and pp.stride == 1,
               "with global_pooling, pad must be 0 and stride 1")
        return PoolGeometry(method, 0, 1, 0, True)
    if pp.HasField("kernel_size"):
        _check(not pp.HasField("kernel_h") and not pp.HasField("kernel_w"),
               "give either kernel_size or kernel_h/kernel_w")
        kh = kw = pp.kernel_size
    else:
        _check(pp.HasField("kernel_h") and pp.HasField("kernel_w"),
               "kernel_size or both kernel_h and kernel_w are required")
        kh, kw = pp.kernel_h, pp.kernel_w
    ph, pw = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") or pp.HasField("pad_w") else (pp.pad, pp.pad)
    if pp.HasField("stride_h") or pp.HasField("stride_w"):
        sh, sw = pp.stride_h, pp.stride_w
    else:
        sh = sw = pp.stride
    _check(kh == kw and ph == pw and sh == sw, "only square pooling (kernel, pad, stride) is supported")
    return PoolGeometry(method, int(kh), int(sh), int(ph), False)


def interp_params(lp) -> "caffe_math.InterpParams":
    """An ``interp_param`` with unset fields as None (``InterpLayer`` tells set from default)."""
    ip = lp.interp_param
    return caffe_math.InterpParams(
        zoom_factor=_opt(ip, "zoom_factor"), shrink_factor=_opt(ip, "shrink_factor"),
        height=_opt(ip, "height"), width=_opt(ip, "width"), pad_beg=int(ip.pad_beg), pad_end=int(ip.pad_end))


# ----------------------------------------------------------------------------------------- layers
class Convolution(nn.Module):
    """Caffe ``Convolution`` (2-D, ``group``, ``dilation``, ``bias_term``); output size
    ``(in + 2*pad - (dilation*(k-1)+1)) / stride + 1`` (integer division, ``BaseConvolutionLayer``).
    Dilated stride-1 ungrouped convolutions with odd kernels use :func:`attnscale.ops.dilated_conv2d` when
    ``ctx.use_ops`` is set (DeepLab-v1's 4x4 ``hole: 4`` fc6 runs ``F.conv2d``)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) >= 1, "Convolution needs a bottom")
        g = conv_geometry(lp)
        _check(all(len(s) == 4 for s in in_shapes), "only 2-D convolution on (N,C,H,W) blobs is supported")
        n, c, h, w = in_shapes[0]
        _check(all(s == in_shapes[0] for s in in_shapes), "all bottoms must have the same shape")
        self.kernel, self.stride, self.pad, self.dilation, self.group = g.kernel, g.stride, g.pad, g.dilation, g.group
        num_output = g.num_output
        _check(c % self.group == 0, f"channels {c} must be a multiple of group {self.group}")
        cp = lp.convolution_param
        wshape = (num_output, c // self.group) + self.kernel
        self.weight = _param(lp, 0, wshape, cp.weight_filler if cp.HasField("weight_filler") else None, ctx)
        if g.bias_term:
            self.bias = _param(lp, 1, (num_output,), cp.bias_filler if cp.HasField("bias_filler") else None, ctx)
        else:
            self.bias = None
        outs = []
        for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.pad, self.dilation):
            o = (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            _check(o > 0, f"output size {o} <= 0 (input {size}, kernel {k}, stride {s}, pad {p}, "
                          f"dilation {d})")
            outs.append(o)
        self.out_shapes = [(n, num_output, outs[0], outs[1])] * len(in_shapes)
        self.use_ops = (ctx.use_ops and self.stride == (1, 1) and self.group == 1   # the op's odd kernels only
                        and self.dilation[0] == self.dilation[1] > 1 and self.pad[0] == self.pad[1]
                        and self.kernel[0] % 2 == 1 and self.kernel[1] % 2 == 1)

    def forward(self, *xs):
        outs = []
        for x in xs:
            if self.use_ops:
                from attnscale.ops import dilated_conv2d
                outs.append(dilated_conv2d(x, self.weight, self.bias, dilation=self.dilation[0],
                                           padding=self.pad[0]))
            else:
                outs.append(F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation,
                                     self.group))
        return outs

    def blobs(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])


class InnerProduct(nn.Module):
    """Caffe ``InnerProduct``: flattens axes ``axis..`` (K values), weight (N, K) — (K, N) with
    ``transpose`` — and optional bias (N,)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        ip = lp.inner_product_param
        _check(len(in_shapes) == 1, "InnerProduct takes one bottom")
        shape = in_shapes[0]
        self.axis = _axis(ip.axis, len(shape), "axis")
        k = math.prod(shape[self.axis:])
        n = int(ip.num_output)
        _check(n > 0, "num_output must be positive")
        self.transpose = bool(ip.transpose)
        wshape = (k, n) if self.transpose else (n, k)
        self.weight = _param(lp, 0, wshape, ip.weight_filler if ip.HasField("weight_filler") else None, ctx)
        self.bias = (_param(lp, 1, (n,), ip.bias_filler if ip.HasField("bias_filler") else None, ctx)
                     if ip.bias_term else None)
        self.out_shapes = [tuple(shape[:self.axis]) + (n,)]

    def forward(self, x):
        x = x.flatten(self.axis)
        w = self.weight.t() if self.transpose else self.weight
        return [F.linear(x, w, self.bias)]

    def blobs(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])


class ReLU(nn.Module):
    """Caffe ``ReLU``: ``max(x, 0) + negative_slope * min(x, 0)``."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 1, "ReLU takes one bottom")
        self.slope = float(lp.relu_param.negative_slope)
        self.out_shapes = [in_shapes[0]]

    def forward(self, x):
        return [F.relu(x) if self.slope == 0 else F.leaky_relu(x, self.slope)]


class Pooling(nn.Module):
    """Caffe ``Pooling`` MAX / AVE with Caffe's ceil rounding and border rules
    (:func:`attnscale.caffe.pool2d`; square kernel/stride/pad), or ``global_pooling``."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 1 and len(in_shapes[0]) == 4, "Pooling takes one (N,C,H,W) bottom")
        g = pool_geometry(lp)
        n, c, h, w = in_shapes[0]
        self.method, self.global_pool = g.method, g.global_pooling
        if self.global_pool:
            self.out_shapes = [(n, c, 1, 1)]
            return
        self.kernel, self.pad, self.stride = g.kernel, g.pad, g.stride
        try:
            oh, ow = caffe_math.pool_output_shape((h, w), self.kernel, self.stride, self.pad)
        except (ValueError, TypeError) as exc:
            raise LayerError(str(exc)) from None
        self.out_shapes = [(n, c, oh, ow)]

    def forward(self, x):
        if self.global_pool:
            y = x.amax(dim=(2, 3), keepdim=True) if self.method == "max" else x.mean(dim=(2, 3), keepdim=True)
            return [y]
        return [caffe_math.pool2d(x, self.kernel, self.stride, self.pad, self.method)]


class Dropout(nn.Module):
    """Caffe ``Dropout``: identity in the TEST phase; in TRAIN (and ``.train()``) inverted dropout
    with scale ``1 / (1 - ratio)``."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 1, "Dropout takes one bottom")
        self.ratio = float(lp.dropout_param.dropout_ratio)
        _check(0.0 <= self.ratio < 1.0, f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.train_phase = ctx.phase == "TRAIN"
        self.out_shapes = [in_shapes[0]]

    def forward(self, x):
        if self.train_phase and self.training:
            return [F.dropout(x, self.ratio, True)]
        return [x]


class Interp(nn.Module):
    """DeepLab ``Interp`` (zoom / shrink / height+width / pad_beg / pad_end), sizes and values from
    :func:`attnscale.caffe.interp_output_shape` and :func:`attnscale.caffe.interp`."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 1 and len(in_shapes[0]) == 4,
               "Interp takes one (N,C,H,W) bottom (a second 'size' bottom is not supported)")
        self.params = interp_params(lp)
        n, c, h, w = in_shapes[0]
        try:
            oh, ow = caffe_math.interp_output_shape((h, w), self.params)
        except (ValueError, TypeError) as exc:
            raise LayerError(str(exc)) from None
        self.out_shapes = [(n, c, oh, ow)]

    def forward(self, x):
        return [caffe_math.interp(x, self.params)]


def crf_params(lp) -> "CRFParams":
    """A ``DenseCRF`` layer's ``dense_crf_param`` as :class:`attnscale.crf.CRFParams`, with the layer's CHECKs
    (three bottoms: its Reshape reads the image's regardless; one value of each per kernel; bilateral kernels
    to use the image)."""
    from attnscale.crf import CRFParams

    _check(len(lp.bottom) == 3, f"DenseCRF needs 3 bottoms (scores, data_dim, image), got {len(lp.bottom)}: "
           "DeepLab's layer reads the third (the image) in Reshape even without bilateral kernels")
    cp = lp.dense_crf_param
    _check(cp.output_probability, "dense_crf_param { output_probability: false } is not supported "
           "(attnscale returns the marginals, the layer's default)")
    _check(len(cp.bi_w) > 0, "has an image bottom but no bilateral parameters (bi_w): Caffe's CHECK fails")
    try:
        return CRFParams(max_iter=int(cp.max_iter), pos_w=tuple(cp.pos_w), pos_xy_std=tuple(cp.pos_xy_std),
                         bi_w=tuple(cp.bi_w), bi_xy_std=tuple(cp.bi_xy_std), bi_rgb_std=tuple(cp.bi_rgb_std))
    except ValueError as exc:
        raise LayerError(f"dense_crf_param: {exc}") from None


class DenseCRF(nn.Module):
    """DeepLab's ``DenseCRF`` (bottoms: the zoomed scores, ``data_dim`` (N, 1, 1, 2) = each image's real
    height and width, the image): the label marginals from :func:`attnscale.crf.dense_crf` on each image's
    real corner (the padded size where the image is larger, as the layer), 0 elsewhere.  Refused where
    DeepLab's layer does not do what it says: without the image bottom (its Reshape reads a third bottom
    regardless) and for a batch of more than one image (it reads every image's colours from image 0)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        self.params = crf_params(lp)
        _check(all(len(s) == 4 for s in in_shapes), "DenseCRF's bottoms must be 4-D")
        n, m, h, w = in_shapes[0]
        _check(n == 1, f"a batch of {n} images: DeepLab's layer takes every image's colours from the first "
               "(no per-image offset into its image bottom), so only a batch of 1 (DeepLab's test nets') is right")
        _check(in_shapes[1][0] == n and math.prod(in_shapes[1][1:]) >= 2,
               f"data_dim {in_shapes[1]} must hold (height, width) for each of the {n} images")
        _check(in_shapes[2] == (n, 3, h, w), f"the image {in_shapes[2]} must be (N, 3, H, W) = {(n, 3, h, w)}: "
               "\"Can Only support color images\", at the scores' size")
        self.out_shapes = [in_shapes[0]]

    def forward(self, scores, dims, image):
        from attnscale.crf import dense_crf

        H, W = scores.shape[-2:]
        out = []
        for b, (rh, rw) in enumerate(dims.reshape(dims.shape[0], -1)[:, :2].tolist()):
            if not (math.isfinite(rh) and math.isfinite(rw)):
                raise ValueError(f"DenseCRF: data_dim ({rh}, {rw}) of image {b} is not a size")
            rh, rw = int(rh), int(rw)    # the layer reads them into ints
            if rh < 1 or rw < 1:
                raise ValueError(f"DenseCRF: data_dim ({rh}, {rw}) of image {b} is not a positive size")
            if H <= rh and W <= rw:
                size = (H, W)            # the image was cropped: the layer runs on the whole map
            elif rh <= H and rw <= W:
                size = (rh, rw)
            else:
                raise ValueError(f"DenseCRF: data_dim ({rh}, {rw}) of image {b} is larger than the map ({H}, {W}) "
                                 "along one axis only (Caffe would read past its buffers)")
            out.append(dense_crf(scores[b:b + 1], image[b:b + 1], self.params, size=size))
        return [torch.cat(out).to(scores.device, scores.dtype)]


class Softmax(nn.Module):
    """Caffe ``Softmax`` over ``axis`` (default 1)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 1, "Softmax takes one bottom")
        self.axis = _axis(lp.softmax_param.axis, len(in_shapes[0]), "axis")
        self.out_shapes = [in_shapes[0]]

    def forward(self, x):
        return [torch.softmax(x, dim=self.axis)]


class SpatialProduct(nn.Module):
    """DeepLab ``SpatialProduct``: bottom0 (N,C,H,W) times bottom1 (N,1,H,W), broadcast over C."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        _check(len(in_shapes) == 2, "SpatialProduct takes two bottoms")
        a, b = in_shapes
        _check(len(a) == 4 and len(b) == 4 and b[1] == 1 and (a[0], a[2], a[3]) == (b[0], b[2], b[3]),
               f"bottom shapes {a} and {b}: need (N,C,H,W) and (N,1,H,W)")
        self.out_shapes = [a]

    def forward(self, a, b):
        return [a * b]


class Eltwise(nn.Module):
    """Caffe ``Eltwise``: SUM (with ``coeff``, one per bottom), PROD, MAX with the CPU layer's rule: bottom
    1 wins over bottom 0 unless bottom 0 is greater (``a > b ? 0 : 1``), a later bottom only when strictly
    greater; the gradient goes to the winner, as Caffe's mask does.  (Caffe's GPU kernel gives a tie to
    the last tied bottom instead.)"""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        ep = lp.eltwise_param
        _check(len(in_shapes) >= 2, "Eltwise needs at least two bottoms")
        _check(all(s == in_shapes[0] for s in in_shapes), f"bottom shapes differ: {in_shapes}")
        self.op = {0: "PROD", 1: "SUM", 2: "MAX"}[ep.operation]
        _check(not len(ep.coeff) or (self.op == "SUM" and len(ep.coeff) == len(in_shapes)),
               "coeff needs one value per bottom and only applies to SUM")
        self.coeff = [float(c) for c in ep.coeff] or [1.0] * len(in_shapes)
        self.out_shapes = [in_shapes[0]]

    def forward(self, *xs):
        if self.op == "SUM":
            out = xs[0] * self.coeff[0] if self.coeff[0] != 1.0 else xs[0]
            for c, x in zip(self.coeff[1:], xs[1:]):
                out = out + (x * c if c != 1.0 else x)
            return [out]
        if self.op == "PROD":
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return [out]
        out = torch.where(xs[0] > xs[1], xs[0], xs[1])
        for x in xs[2:]:
            out = torch.where(x > out, x, out)
        return [out]


class Concat(nn.Module):
    """Caffe ``Concat`` along ``axis`` (legacy ``concat_dim`` honoured)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        cp = lp.concat_param
        _check(len(in_shapes) >= 1, "Concat needs bottoms")
        nd = len(in_shapes[0])
        axis = cp.concat_dim if cp.HasField("concat_dim") else cp.axis
        self.axis = _axis(axis, nd, "axis")
        for s in in_shapes:
            _check(len(s) == nd and all(s[i] == in_shapes[0][i] for i in range(nd) if i != self.axis),
                   f"bottom shapes {in_shapes} differ outside axis {self.axis}")
        out = list(in_shapes[0])
        out[self.axis] = sum(s[self.axis] for s in in_shapes)
        self.out_shapes = [tuple(out)]

    def forward(self, *xs):
        return [torch.cat(xs, dim=self.axis) if len(xs) > 1 else xs[0]]


class Slice(nn.Module):
    """Caffe ``Slice`` along ``axis`` (legacy ``slice_dim``) at ``slice_point``s, or into equal
    parts when none are given."""

    def __init__(self, lp, in_shapes, ctx, n_tops=1):
        super().__init__()
        sp = lp.slice_param
        _check(len(in_shapes) == 1, "Slice takes one bottom")
        shape = in_shapes[0]
        axis = sp.slice_dim if sp.HasField("slice_dim") else sp.axis
        self.axis = _axis(axis, len(shape), "axis")
        dim = shape[self.axis]
        if len(sp.slice_point):
            _check(len(sp.slice_point) == n_tops - 1,
                   f"{len(sp.slice_point)} slice_point(s) for {n_tops} tops (need tops - 1)")
            points = [0] + [int(p) for p in sp.slice_point] + [dim]
            _check(all(points[i] < points[i + 1] for i in range(len(points) - 1)),
                   f"slice_points {list(sp.slice_point)} must increase strictly inside (0, {dim})")
            self.sizes = [points[i + 1] - points[i] for i in range(n_tops)]
        else:
            _check(dim % n_tops == 0, f"axis {self.axis} size {dim} does not split into {n_tops} equal parts")
            self.sizes = [dim // n_tops] * n_tops
        self.out_shapes = []
        for s in self.sizes:
            o = list(shape)
            o[self.axis] = s
            self.out_shapes.append(tuple(o))

    def forward(self, x):
        return list(torch.split(x, self.sizes, dim=self.axis))


class Split(nn.Module):
    """Caffe ``Split``: every top is the bottom."""

    def __init__(self, lp, in_shapes, ctx, n_tops=1):
        super().__init__()
        _check(len(in_shapes) == 1, "Split takes one bottom")
        self.n = n_tops
        self.out_shapes = [in_shapes[0]] * n_tops

    def forward(self, x):
        return [x] * self.n


class Crop(nn.Module):
    """Caffe ``Crop``: bottom0 cropped to bottom1's shape on axes ``axis..``, at ``offset`` (one
    value for all cropped axes, or one per axis; default 0)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        cp = lp.crop_param
        _check(len(in_shapes) == 2, "Crop takes two bottoms")
        a, b = in_shapes
        _check(len(a) == len(b), f"bottoms {a} and {b} have different numbers of axes")
        start = _axis(cp.axis, len(a), "axis")
        n_crop = len(a) - start
        offs = [int(o) for o in cp.offset]
        _check(len(offs) in (0, 1, n_crop), f"{len(offs)} offsets for {n_crop} cropped axes")
        self.slices = []
        out = []
        for i in range(len(a)):
            if i < start:
                self.slices.append(slice(None))
                out.append(a[i])
                continue
            o = 0 if not offs else offs[0] if len(offs) == 1 else offs[i - start]
            _check(a[i] - o >= b[i], f"axis {i}: crop of size {b[i]} at offset {o} exceeds {a[i]}")
            self.slices.append(slice(o, o + b[i]))
            out.append(b[i])
        self.out_shapes = [tuple(out)]

    def forward(self, a, b):
        return [a[tuple(self.slices)]]


class Silence(nn.Module):
    """Caffe ``Silence``: consumes its bottoms, produces nothing."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        self.out_shapes = []

    def forward(self, *xs):
        return []


class Flatten(nn.Module):
    """Caffe ``Flatten`` (axes ``axis..end_axis`` into one)."""

    def __init__(self, lp, in_shapes, ctx):
        super().__init__()
        fp = lp.flatten_param
        _check(len(in_shapes) == 1, "Flatten takes one bottom")
        s = in_shapes[0]
        self.start = _axis(fp.axis, len(s), "axis")
        self.end = _axis(fp.end_axis, len(s), "end_axis")
        _check(self.start <= self.end, "axis must not come after end_axis")
        self.out_shapes = [tuple(s[:self.start]) + (math.prod(s[self.start:self.end + 1]),) + tuple(s[self.end + 1:])]

    def forward(self, x):
        return [x.flatten(self.start, self.end)]


#: layer types that compute something at deploy time
BUILDERS = {
    "Convolution": Convolution, "InnerProduct": InnerProduct, "ReLU": ReLU, "Pooling": Pooling,
    "Dropout": Dropout, "Interp": Interp, "Softmax": Softmax, "SpatialProduct": SpatialProduct,
    "Eltwise": Eltwise, "Concat": Concat, "Slice": Slice, "Split": Split, "Crop": Crop,
    "Flatten": Flatten, "Silence": Silence, "DenseCRF": DenseCRF,
}
#: builders that need the number of tops
NEEDS_TOPS = {"Slice", "Split"}
#: layer types whose tops are net inputs
DATA_TYPES = {"Input", "Data", "ImageData", "ImageSegData", "MemoryData", "HDF5Data", "DummyData",
              "WindowData", "MatRead"}
#: layer types ignored at deploy (losses, accuracies, sinks)
IGNORED_TYPES = {"SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "HingeLoss",
                 "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy",
                 "SegAccuracy", "MatWrite", "HDF5Output"}


def data_layer_shapes(lp) -> list[Shape | None]:
    """Shapes of a data layer's tops where the prototxt fixes them (``Input``: ``input_param``;
    ``MemoryData``; DeepLab ``ImageSegData``: batch_size x 3 x crop x crop, label batch x 1 x
    crop x crop, data_dim batch x 1 x 1 x 2; ``DummyData``), else None (pass ``input_shapes``)."""
    n = len(lp.top)
    t = lp.type
    if t == "Input":
        shapes = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
        _check(len(shapes) in (0, 1, n), f"{len(shapes)} input_param shapes for {n} tops")
        if len(shapes) == 1:
            return shapes * n
        return shapes or [None] * n
    if t == "MemoryData":
        _check(n == 2, f"MemoryData has {n} tops: Caffe's layer produces exactly 2 (data, label)")
        mp = lp.memory_data_param
        return [(mp.batch_size, mp.channels, mp.height, mp.width), (mp.batch_size, 1, 1, 1)]
    if t == "ImageSegData":
        b = lp.image_data_param.batch_size
        tp = lp.transform_param
        ch, cw = (tp.crop_height, tp.crop_width) if tp.crop_height and tp.crop_width else (tp.crop_size, tp.crop_size)
        if not ch:
            return [None] * n
        return ([(b, 3, ch, cw), (b, 1, ch, cw), (b, 1, 1, 2)] + [None] * n)[:n]
    if t == "DummyData":
        dp = lp.dummy_data_param
        if len(dp.shape):
            shapes = [tuple(int(d) for d in s.dim) for s in dp.shape]
        else:
            shapes = [tuple(int(v) for v in dims) for dims in zip(dp.num, dp.channels, dp.height, dp.width)]
        if len(shapes) == 1:
            return shapes * n
        return (shapes + [None] * n)[:n]
    return [None] * n


def wrap_error(exc: Exception, source: str, lp) -> CaffeImportError:
    return CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): {exc}")
