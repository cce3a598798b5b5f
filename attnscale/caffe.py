"""Caffe's (DeepLab-v2 fork's) arithmetic, in one place.

Every function names the Caffe rule it follows.  Sources of the rules: ``PoolingLayer`` (``pooling_layer.cpp``,
Reshape and Forward_cpu), DeepLab's ``InterpLayer`` (``interp_layer.cpp``) and its ``caffe_cpu_interp2``
(``util/interp.cpp``), ``SoftmaxWithLossLayer`` (normalisation ``VALID``) and DeepLab's data layer
(``mean_value: 104.008 116.669 122.675`` in BGR order, test-time padding with the mean).

Nothing here depends on the model: the prototxt importer and the model both import these functions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import switches
from .ops.interp import caffe_interp, caffe_interp_applies
from .ops.interp import has_cuda_kernels as interp_has_cuda_kernels
from .ops.pooling import (caffe_ave_pool2d, caffe_ave_pool2d_applies, caffe_max_pool2d, caffe_max_pool2d_applies,
                           caffe_max_pool2d_train, caffe_max_pool2d_train_applies)

__all__ = [
    "MEAN_BGR", "IGNORE_LABEL",
    "pool_output_size", "pool_output_shape", "ave_pool_divisor", "pool2d",
    "InterpParams", "interp_output_size", "interp_output_shape", "interp_coefficients", "interp",
    "scale_interp_params", "scaled_input_shape",
    "shrink_label", "label_sample_indices",
    "preprocess_bgr", "rgb_to_bgr",
    "FILLER_FIELDS", "check_filler", "caffe_fill",
]

#: DeepLab's per-channel mean, **BGR** order (``mean_value`` in every DeepLab data layer).
MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)
#: ``loss_param { ignore_label: 255 }``.
IGNORE_LABEL = 255


# ----------------------------------------------------------------------------------------- Pooling
def _check_pool_args(kernel: int, stride: int, pad: int) -> None:
    for name, v in (("kernel", kernel), ("stride", stride), ("pad", pad)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"Pooling: {name} must be an int, got {v!r}")
    if kernel < 1 or stride < 1 or pad < 0:
        raise ValueError(f"Pooling: need kernel >= 1, stride >= 1, pad >= 0 (got kernel={kernel}, "
                         f"stride={stride}, pad={pad})")
    if pad >= kernel:  # Caffe: CHECK_LT(pad_h_, kernel_h_)
        raise ValueError(f"Pooling: Caffe requires pad < kernel (got pad={pad}, kernel={kernel})")


def pool_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe ``PoolingLayer::Reshape`` output size along one axis.

    ``out = int(ceil(float(size + 2*pad - kernel) / stride)) + 1`` (Caffe always rounds *up*), and, only
    when ``pad > 0``, ``if ((out - 1) * stride >= size + pad) --out`` so that the last window starts inside
    the image or its *leading* padding, never in the trailing padding.  (Caffe then CHECKs
    ``(out - 1) * stride < size + pad``.)  With ``pad == 0`` Caffe does not decrement.
    """
    _check_pool_args(kernel, stride, pad)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"Pooling: input size must be a positive int, got {size!r}")
    span = size + 2 * pad - kernel
    if span < 0:
        raise ValueError(f"Pooling: kernel {kernel} larger than the padded input {size}+2*{pad}")
    out = -(-span // stride) + 1  # ceil for a non-negative numerator == Caffe's float ceil
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return int(out)


def pool_output_shape(hw: Sequence[int], kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """:func:`pool_output_size` for (H, W) with a square kernel/stride/pad."""
    return (pool_output_size(hw[0], kernel, stride, pad), pool_output_size(hw[1], kernel, stride, pad))


def ave_pool_divisor(size: int, kernel: int, stride: int, pad: int) -> list[int]:
    """Caffe AVE pooling's per-axis ``pool_size`` factor for every output position.

    Caffe ``Forward_cpu`` (AVE): ``hstart = ph*stride - pad; hend = min(hstart + kernel, H + pad);
    pool_size = (hend - hstart) * (wend - wstart)`` computed *before* clipping to the image, i.e. the
    divisor counts padding cells that lie inside ``[-pad, H + pad)`` but never cells beyond ``H + pad``
    (which exist when ceil rounding makes the last window overrun).  The 2-D divisor is the outer product
    of the two per-axis lists.
    """
    out = pool_output_size(size, kernel, stride, pad)
    res = []
    for p in range(out):
        start = p * stride - pad
        end = min(start + kernel, size + pad)
        res.append(end - start)
    return res


def _window_reach(size: int, out: int, kernel: int, stride: int, pad: int) -> int:
    """Cells of trailing padding needed so that every window ``[o*stride - pad, +kernel)`` fits."""
    return max(0, (out - 1) * stride - pad + kernel - size)


def pool2d(x: torch.Tensor, kernel: int, stride: int, pad: int, method: str = "max") -> torch.Tensor:
    """Caffe ``Pooling`` (MAX or AVE, square kernel), exact including the borders.

    - Output size: :func:`pool_output_size` (ceil rounding + the ``pad > 0`` decrement rule).
    - MAX: the window is clipped to the image (``hstart = max(hstart, 0)``, ``hend = min(hend, H)``), i.e.
      padding never wins (equivalent to ``-inf`` padding); ties go to the first maximum in row-major scan
      order (Caffe compares with strict ``>``), which is where the gradient goes.
    - AVE: sum over the window clipped to the image divided by :func:`ave_pool_divisor` (padding cells up
      to ``H + pad`` count, cells beyond do not).

    AVE without a gradient on an NCHW CPU tensor runs :func:`attnscale.ops.pooling.caffe_ave_pool2d` (Caffe's
    float sums in Caffe's order, the same bits as this path's in float32; the half types rounded once;
    12.3 -> 3.7 ms for pool5a over the three scales at 513x513 on 2 cores).
    MAX without a gradient runs :func:`attnscale.ops.pooling.caffe_max_pool2d` (the same values; PyTorch's
    NCHW CPU max pooling is a scalar loop, and its CUDA one writes an int64 index per output); with one on a
    GPU :func:`attnscale.ops.pooling.caffe_max_pool2d_train` (a byte of mask per output, Caffe's backward
    gather).  Otherwise this is
    ``F.max_pool2d`` / ``F.avg_pool2d(divisor_override=1)`` on an explicitly padded input
    whenever torch's own ceil-mode size could differ from Caffe's; AVE always divides the window sums by
    the explicit Caffe divisor map, so it never relies on torch's ``count_include_pad`` rules.
    """
    if method not in ("max", "ave"):
        raise ValueError(f"Pooling: method must be 'max' or 'ave', got {method!r}")
    if x.dim() != 4:
        raise ValueError(f"Pooling: expected an (N,C,H,W) tensor, got shape {tuple(x.shape)}")
    H, W = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = pool_output_shape((H, W), kernel, stride, pad)
    for name, s, o in (("height", H, oh), ("width", W, ow)):
        if (o - 1) * stride - pad >= s:  # only possible with pad == 0 and stride > kernel
            raise ValueError(f"Pooling: with {name} {s}, kernel {kernel}, stride {stride}, pad {pad} Caffe's "
                             "last window lies entirely outside the input (Caffe would emit -FLT_MAX or an "
                             "undefined average); refusing")
    # torch's ceil_mode size; equal to Caffe's when pad > 0 (same decrement rule) and pad <= kernel // 2.
    torch_ok = 2 * pad <= kernel and all(
        _torch_ceil_size(s, kernel, stride, pad) == o for s, o in ((H, oh), (W, ow)))
    if method == "max":
        if not switches.uses_torch("pool"):
            if caffe_max_pool2d_applies(x):  # inference (CPU or CUDA): our kernel
                return caffe_max_pool2d(x, kernel, stride, pad, (oh, ow))
            if caffe_max_pool2d_train_applies(x, kernel):  # training on a GPU: our kernels, a byte of mask
                return caffe_max_pool2d_train(x, kernel, stride, pad, (oh, ow))
        if torch_ok:
            return F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)
        xp = F.pad(x, (pad, _window_reach(W, ow, kernel, stride, pad),
                       pad, _window_reach(H, oh, kernel, stride, pad)), value=-math.inf)
        return F.max_pool2d(xp, kernel, stride, 0)[..., :oh, :ow]
    if caffe_ave_pool2d_applies(x) and not switches.uses_torch("pool"):  # inference on the CPU: Caffe's order
        return caffe_ave_pool2d(x, kernel, stride, pad, (oh, ow))
    if torch_ok:
        sums = F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, divisor_override=1)
    else:
        xp = F.pad(x, (pad, _window_reach(W, ow, kernel, stride, pad),
                       pad, _window_reach(H, oh, kernel, stride, pad)))
        sums = F.avg_pool2d(xp, kernel, stride, 0, divisor_override=1)[..., :oh, :ow]
    divisor, = host_constants(_ave_divisor_map, H, W, kernel, stride, pad, x.dtype, device=x.device)
    return sums / divisor


def torch_max_pool():
    """Within the block :func:`pool2d` always takes ``F.max_pool2d`` / ``F.avg_pool2d`` (the same values, NaNs
    and AVE's summation order aside), never our kernels (:func:`attnscale.ops.pooling.caffe_max_pool2d`,
    ``caffe_max_pool2d_train``, ``caffe_ave_pool2d``): for benchmarks/bench_e2e.py's comparison
    (``ATTNSCALE_DISABLE=pool`` everywhere: :mod:`attnscale.switches`)."""
    return switches.torch_path("pool")


def _ave_divisor_map(H: int, W: int, kernel: int, stride: int, pad: int, dtype: torch.dtype):
    """The (oh, ow) map of Caffe's AVE divisors: the outer product of :func:`ave_pool_divisor`'s lists."""
    dh = torch.tensor(ave_pool_divisor(H, kernel, stride, pad), dtype=torch.float64, device="cpu")
    dw = torch.tensor(ave_pool_divisor(W, kernel, stride, pad), dtype=torch.float64, device="cpu")
    return ((dh[:, None] * dw[None, :]).to(dtype),)  # integers: exact up to 256 in bfloat16, 2048 in half


def host_constants(build, *args, device=None) -> tuple:
    """``build(*args)``, a tuple of CPU tensors computed on the host (as Caffe computes such tables), moved to
    ``device`` and cached per (build, args, device): the tensors are shared, never modify them in place.

    On a GPU this keeps a forward free of host-to-device copies after its first call: such a copy of a
    fresh CPU tensor synchronises the stream (the GPU drains its queue while the host waits), and it cannot
    be captured in a CUDA graph.  Built as plain tensors whatever mode the first caller is in
    (inference_mode, no_grad); built inline, uncached, while torch.compile traces or a dispatch mode is
    active (FakeTensorMode, make_fx), so that no fake tensor is cached nor a cached real one traced.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:  # "cuda": the current device, not whichever was
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return tuple(t.to(device) for t in build(*args))
    return _host_constants_cached(build, args, device)


@functools.lru_cache(maxsize=1024)
def _host_constants_cached(build, args: tuple, device: torch.device) -> tuple:
    with torch.inference_mode(False), torch.no_grad():
        return tuple(t.to(device) for t in build(*args))


def _torch_ceil_size(size: int, kernel: int, stride: int, pad: int) -> int:
    out = (size + 2 * pad - kernel + stride - 1) // stride + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


# ------------------------------------------------------------------------------------------ Interp
@dataclass(frozen=True)
class InterpParams:
    """DeepLab's ``interp_param`` (``InterpParameter``): None = field not set."""

    zoom_factor: int | None = None
    shrink_factor: int | None = None
    height: int | None = None
    width: int | None = None
    pad_beg: int = 0
    pad_end: int = 0


def _interp_axis(size_in: int, p: InterpParams, explicit: int | None) -> tuple[int, int]:
    """(in_eff, out) along one axis following ``InterpLayer::Reshape``."""
    if p.pad_beg > 0 or p.pad_end > 0:  # CHECK_LE(pad_beg_, 0) "Only supports non-pos padding (cropping)"
        raise ValueError(f"Interp: pad_beg/pad_end must be <= 0 (cropping only), got {p.pad_beg}/{p.pad_end}")
    eff = size_in + p.pad_beg + p.pad_end
    if eff <= 0:  # CHECK_GT(height_in_eff_, 0)
        raise ValueError(f"Interp: input size {size_in} with pad_beg={p.pad_beg}, pad_end={p.pad_end} "
                         "leaves nothing")
    z, s = p.zoom_factor, p.shrink_factor
    if z is not None and z < 1:
        raise ValueError(f"Interp: zoom_factor must be >= 1, got {z}")
    if s is not None and s < 1:
        raise ValueError(f"Interp: shrink_factor must be >= 1, got {s}")
    # Caffe's if-chain order: zoom only, shrink only, explicit height & width, shrink then zoom.
    if z is not None and s is None:
        out = eff + (eff - 1) * (z - 1)
    elif s is not None and z is None:
        out = (eff - 1) // s + 1
    elif p.height is not None and p.width is not None:
        out = explicit
    elif z is not None and s is not None:
        out = (eff - 1) // s + 1
        out = out + (out - 1) * (z - 1)
    else:
        raise ValueError("Interp: output size needs zoom_factor, shrink_factor or both height and width")
    if out is None or out <= 0:  # CHECK_GT(height_out_, 0)
        raise ValueError(f"Interp: output size must be positive, got {out}")
    return eff, int(out)


def interp_output_shape(hw: Sequence[int], params: InterpParams) -> tuple[int, int]:
    """``InterpLayer::Reshape``: output (H, W) for an input (H, W).

    ``in_eff = in + pad_beg + pad_end`` (pads <= 0 crop); zoom only: ``in_eff + (in_eff-1)*(zoom-1)``;
    shrink only: ``(in_eff-1)/shrink + 1`` (integer division); explicit ``height``/``width``; both factors:
    shrink first, then zoom.  When several are set Caffe's precedence is zoom-only, shrink-only, explicit,
    both.
    """
    return (_interp_axis(int(hw[0]), params, params.height)[1],
            _interp_axis(int(hw[1]), params, params.width)[1])


def interp_output_size(size: int, params: InterpParams) -> int:
    """One-axis version of :func:`interp_output_shape` (uses ``params.height`` as the explicit size)."""
    return _interp_axis(int(size), params, params.height)[1]


def interp_coefficients(size_in: int, size_out: int, device=None):
    """Per-axis sampling of ``caffe_cpu_interp2`` (align corners), in float32 as Caffe computes it.

    ``rheight = (out > 1) ? float(in - 1) / (out - 1) : 0.f; h1r = rheight * h2; h1 = int(h1r);
    h1p = (h1 < in - 1) ? 1 : 0; lambda1 = h1r - h1; lambda0 = 1 - lambda1``.
    Returns ``(i0, i1 = i0 + h1p, lambda0, lambda1)``: two int64 index tensors and two float32 tensors,
    on ``device``, shared (:func:`host_constants`: do not modify them in place).  They are computed on the
    CPU, as Caffe's GPU Interp also takes ``rheight`` from the host (on a GPU PyTorch divides a tensor by a
    Python number as a product with its reciprocal, which can be 1 ulp off the quotient).
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"Interp: sizes must be positive, got in={size_in}, out={size_out}")
    return host_constants(_interp_coefficients_cpu, int(size_in), int(size_out), device=device)


def _interp_coefficients_cpu(size_in: int, size_out: int):
    if size_out > 1:
        r = torch.tensor(float(size_in - 1), dtype=torch.float32, device="cpu") / float(size_out - 1)
    else:
        r = torch.zeros((), dtype=torch.float32, device="cpu")
    pos = r * torch.arange(size_out, dtype=torch.float32, device="cpu")
    i0 = pos.to(torch.int64)  # C++ int truncation (pos >= 0)
    i1 = i0 + (i0 < size_in - 1).to(torch.int64)
    lam1 = pos - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    return i0, i1, lam0, lam1


def _resolve_interp(hw: tuple[int, int], spec) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """-> ((crop_top, crop_left, eff_h, eff_w), (out_h, out_w))."""
    if isinstance(spec, InterpParams):
        eff_h, out_h = _interp_axis(hw[0], spec, spec.height)
        eff_w, out_w = _interp_axis(hw[1], spec, spec.width)
        return (-spec.pad_beg, -spec.pad_beg, eff_h, eff_w), (out_h, out_w)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        size = (int(spec), int(spec))
    elif isinstance(spec, (tuple, list, torch.Size)) and len(spec) == 2:
        size = (int(spec[0]), int(spec[1]))
    else:
        raise TypeError(f"interp: size must be an int, an (H, W) pair or InterpParams, got {spec!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"interp: output size must be positive, got {size}")
    return (0, 0, hw[0], hw[1]), size


def interp(x: torch.Tensor, size) -> torch.Tensor:
    """DeepLab ``Interp`` layer forward: bilinear with aligned corners, Caffe's float arithmetic.

    ``size``: an int / (H, W) output size, or :class:`InterpParams` (zoom/shrink/explicit size and
    ``pad_beg``/``pad_end`` cropping: the input window ``[-pad_beg, in + pad_end)`` is resized).
    Follows ``caffe_cpu_interp2``: if the (cropped) input already has the output size the values are
    copied; otherwise ``out = l0h * (l0w * x[h0,w0] + l1w * x[h0,w1]) + l1h * (l0w * x[h1,w0] + l1w * x[h1,w1])``
    with the coefficients of :func:`interp_coefficients` (computed in float32 even for double inputs, as
    Caffe does, then cast to the input dtype; ``l0 = 1 - l1`` in the input dtype).  Differentiable (gather;
    backward scatters like Caffe).  Without a gradient it runs :func:`attnscale.ops.interp.caffe_interp`
    (the same values, from a C++ or CUDA kernel); with one on a GPU that kernel serves
    :func:`interp_gather`'s forward (neither within :func:`torch_interp`).
    """
    if x.dim() != 4:
        raise ValueError(f"interp: expected an (N,C,H,W) tensor, got shape {tuple(x.shape)}")
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    (top, left, eh, ew), (oh, ow) = _resolve_interp(hw, size)
    if (top, left, eh, ew) != (0, 0) + hw:
        x = x[..., top:top + eh, left:left + ew]
    if (eh, ew) == (oh, ow):
        return x.clone()
    if caffe_interp_applies(x) and not switches.uses_torch("interp"):  # inference: our kernel, same values
        return caffe_interp(x, (oh, ow))
    return interp_gather(x, (oh, ow))


def interp_gather(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The differentiable pure-PyTorch body of :func:`interp` (no cropping, sizes differ): two index_selects
    per axis and Caffe's blends, on any device.  The backward is Caffe's ``caffe_cpu_interp2_backward``
    (every tap of every output pixel adds ``lambda * diff`` to its source, zero-weight taps included, so a
    non-finite gradient spreads as in Caffe) written as a gather, per axis: each source index sums its
    few (at most 3-5 at the model's ratios) outputs' contributions through index tables, in the outputs'
    order, without atomics: deterministic, and faster on a GPU than autograd's own backward of the gathers
    (``index_add_``, float atomics: 12.7 of the 93 ms of a bf16 training step on an H100, which ran 1.14x
    faster without it; :func:`torch_interp` restores it, for comparison).  On a GPU the forward
    is :func:`attnscale.ops.interp.caffe_interp`'s CUDA kernel (the same values in one kernel) and the
    backward ``caffe_interp_backward``'s (the same tables and order of sums, with fused multiply-adds, in one
    kernel instead of a padded copy and a gather and a multiply-add per slot and axis).  While torch.compile
    traces, the index_select forward and autograd's backward (the tables are built by data-dependent Python
    loops, which it cannot trace; it generates its own code for the scatter)."""
    if switches.uses_torch("interp") or torch.compiler.is_compiling():
        return _interp_blend(x, out_hw)
    return _InterpGather.apply(x, out_hw)


def _interp_blend(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    (eh, ew), (oh, ow) = x.shape[-2:], out_hw
    h0, h1, _, lh1 = interp_coefficients(eh, oh, x.device)
    w0, w1, _, lw1 = interp_coefficients(ew, ow, x.device)
    lh1, lw1 = lh1.to(x.dtype), lw1.to(x.dtype)
    lh0, lw0 = 1 - lh1, 1 - lw1  # Caffe: Dtype h0lambda = Dtype(1.) - h1lambda, in the blob's dtype
    r0 = x.index_select(-2, h0)
    r1 = x.index_select(-2, h1)
    top_row = lw0 * r0.index_select(-1, w0) + lw1 * r0.index_select(-1, w1)
    bot_row = lw0 * r1.index_select(-1, w0) + lw1 * r1.index_select(-1, w1)
    return lh0[:, None] * top_row + lh1[:, None] * bot_row


def torch_interp():
    """Within the block no Interp kernel of ours: :func:`interp` without a gradient takes the index_select
    path, and :func:`interp_gather` its index_select forward and autograd's own backward of the gathers
    (``index_add_``: float atomics on a GPU, the order of additions not fixed): the same values and sums,
    for benchmarks/bench_e2e.py's comparison (``ATTNSCALE_DISABLE=interp`` everywhere)."""
    return switches.torch_path("interp")


def _interp_adjoint_tables(size_in: int, size_out: int, dtype: torch.dtype):
    """The Interp's transpose along one axis as tables (size_in, T): for source index k, the output indices
    whose taps read it (both taps of the last output where ``i1 == i0``), in output order, and their weights
    (``lambda1`` in ``dtype``, ``lambda0 = 1 - lambda1`` in ``dtype``, as the forward's blends use them);
    unused slots point at index ``size_out`` (a zero appended to the gradient) with weight 0.  For half and
    bfloat16 the weights are stored in float32 (the same values), so that the sums run in float32."""
    i0, i1, _, lam1 = _interp_coefficients_cpu(size_in, size_out)
    l1 = lam1.to(dtype)
    l0 = 1 - l1
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    refs: list[list[tuple[int, float]]] = [[] for _ in range(size_in)]
    for o in range(size_out):
        refs[int(i0[o])].append((o, l0[o].item()))
        refs[int(i1[o])].append((o, l1[o].item()))
    T = max(len(r) for r in refs)
    idx = torch.full((size_in, T), size_out, dtype=torch.int64)
    coef = torch.zeros((size_in, T), dtype=dtype)
    for k, r in enumerate(refs):
        for t, (o, c) in enumerate(r):
            idx[k, t] = o
            coef[k, t] = c
    return idx.t().contiguous(), coef.t().contiguous()  # (T, size_in): one row per slot


def _interp_adjoint(g: torch.Tensor, dim: int, size_in: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the Interp along ``dim`` (-1 or -2) from its output gradient ``g``: per source index the
    sum over its slots of ``weight * g[output]`` (:func:`_interp_adjoint_tables` for the forward's
    ``dtype``; in float32 for half / bfloat16, whatever ``g``'s dtype)."""
    size_out = g.shape[dim]
    idx, coef = host_constants(_interp_adjoint_tables, size_in, size_out, dtype, device=g.device)
    gp = F.pad(g, (0, 1) if dim == -1 else (0, 0, 0, 1))  # the zero the unused slots read
    shape = (-1,) if dim == -1 else (-1, 1)
    acc = gp.index_select(dim, idx[0]) * coef[0].view(shape)
    for t in range(1, idx.shape[0]):
        acc.addcmul_(gp.index_select(dim, idx[t]), coef[t].view(shape))
    return acc


class _InterpGather(torch.autograd.Function):
    @staticmethod
    def forward(x, out_hw):
        if x.is_cuda and x.dtype in _CUDA_FLOATS and interp_has_cuda_kernels():  # the same values, one kernel
            return caffe_interp(x, out_hw)
        return _interp_blend(x, out_hw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.in_hw = tuple(inputs[0].shape[-2:])
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, g):
        (eh, ew), dt = ctx.in_hw, ctx.dtype
        if (g.is_cuda and not torch.is_grad_enabled() and (g.dtype == torch.float64) == (dt == torch.float64)
                and g.dtype in _CUDA_FLOATS and interp_has_cuda_kernels()):
            # one kernel: the same tables, slots and order, fused multiply-adds (not differentiable again:
            # a double backward takes the path below)
            ih, ch = host_constants(_interp_adjoint_tables, eh, g.shape[-2], dt, device=g.device)
            iw, cw = host_constants(_interp_adjoint_tables, ew, g.shape[-1], dt, device=g.device)
            return torch.ops.attnscale.caffe_interp_backward(g, ih, ch, iw, cw), None
        # half / bfloat16: both axes summed in float32 (float32 weights), rounded to the dtype once
        return _interp_adjoint(_interp_adjoint(g, -1, ew, dt), -2, eh, dt).to(g.dtype), None


_CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------ scales of the input
def scale_interp_params(scale: float, hw: Sequence[int] | None = None) -> InterpParams | None:
    """The ``Interp`` that makes an input scale, as in the attention prototxts.

    1 → None (no layer); 0.75 → ``shrink_factor: 4 zoom_factor: 3`` (``shrink_res075``);
    0.5 → ``shrink_factor: 2`` (``shrink_res05``).  Any other scale ``s`` has no prototxt counterpart: we use
    the explicit size ``floor((in - 1) * s) + 1`` per axis (aligned corners keep both borders; for s = 0.75
    and in = 4k + 1, e.g. 321 and 513, this equals the factor rule), which needs ``hw``.
    """
    if not (0 < scale <= 1):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale == 1:
        return None
    if scale == 0.75:
        return InterpParams(shrink_factor=4, zoom_factor=3)
    if scale == 0.5:
        return InterpParams(shrink_factor=2)
    if hw is None:
        raise ValueError(f"scale {scale}: an explicit Interp size needs the input size hw")
    return InterpParams(height=int(math.floor((hw[0] - 1) * scale)) + 1,
                        width=int(math.floor((hw[1] - 1) * scale)) + 1)


def scaled_input_shape(hw: Sequence[int], scale: float) -> tuple[int, int]:
    """(H, W) of the input at ``scale`` (see :func:`scale_interp_params`)."""
    p = scale_interp_params(scale, hw)
    return (int(hw[0]), int(hw[1])) if p is None else interp_output_shape(hw, p)


# ------------------------------------------------------------------------------------------- labels
def label_sample_indices(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """Source row/column of every label pixel after :func:`shrink_label` (align-corners nearest).

    Position ``p = float(in-1)/(out-1) * o`` in float32 exactly as the Interp layer computes it, then
    ``int(p + 0.5)`` (nearest, ties up).  When ``(in - 1)`` is a multiple of ``(out - 1)`` (321→41, 321→21,
    513→65, 513→33: every DeepLab training/test size) ``p`` is an integer, so this is the very pixel Caffe's
    bilinear Interp copies (its lambda is exactly 0).
    """
    i0, i1, _, lam1 = interp_coefficients(size_in, size_out, device)
    return torch.where(lam1 >= 0.5, i1, i0)


def shrink_label(labels: torch.Tensor, size) -> torch.Tensor:
    """Downsample an (N,H,W) or (N,1,H,W) integer label map to ``size`` (int or (h, w)), DeepLab style.

    DeepLab's released training nets (to our knowledge; not verifiable from the shared files) shrink the
    ground truth with an ``Interp`` layer (``shrink_factor: 8``) whose sampling grid is aligned-corners; at
    integral ratios (321→41, 513→65, and 321→21 for scale 0.5) that
    bilinear resize *copies* one label per output pixel (lambda = 0), so no class ids are mixed and 255 stays
    255.  ``attention3_train_esupv.prototxt`` takes the three labels as input blobs (``label`` 41x41,
    ``label_res075`` 31x31, ``label_res05`` 21x21), so whoever feeds Caffe must make them: this function is
    the rule.  At non-integral ratios (321→31 for scale 0.75) a bilinear resize of ids would produce
    meaningless mixed values (e.g. 0.5*255 + 0.5*15 = 135, which Caffe would truncate to an invalid class),
    so we take the *nearest* sample of the same aligned-corners grid (:func:`label_sample_indices`).
    Returns int64 with the input's leading shape.
    """
    squeeze = False
    if labels.dim() == 4:
        if labels.shape[1] != 1:
            raise ValueError(f"shrink_label: (N,1,H,W) labels expected, got shape {tuple(labels.shape)}")
        labels, squeeze = labels[:, 0], True
    if labels.dim() != 3:
        raise ValueError(f"shrink_label: labels must be (N,H,W) or (N,1,H,W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError("shrink_label: labels must be an integer tensor (class ids, 255 = ignore)")
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    oh, ow = int(size[0]), int(size[1])
    hi = label_sample_indices(int(labels.shape[-2]), oh, labels.device)
    wi = label_sample_indices(int(labels.shape[-1]), ow, labels.device)
    out = labels.index_select(-2, hi).index_select(-1, wi).long()
    return out[:, None] if squeeze else out


# -------------------------------------------------------------------------------------- image input
def rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    """Reverse the channel axis of an HxWx3 image (RGB ↔ BGR)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, ::-1])


def subtract_mean(image: np.ndarray, mean=MEAN_BGR, scale: float = 1.0) -> np.ndarray:
    """``DataTransformer::TransformImgAndSeg``'s last step on an HxWx3 image (uint8, or float64 after
    padding): ``(pixel - mean[c]) * scale`` with ``Dtype`` = float32 throughout, as Caffe computes it
    (``mean_values_`` is a ``vector<float>`` read from the proto's ``float mean_value``; a float64
    subtraction differs from it by one ulp for about 40 % of the (pixel, channel) pairs).  Returns
    float32 HxWx3, channel order kept."""
    out = np.asarray(image).astype(np.float32) - np.asarray(mean, dtype=np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def preprocess_bgr(image_bgr: np.ndarray) -> torch.Tensor:
    """DeepLab data layer: HxWx3 **BGR** uint8 (OpenCV order, as Caffe reads it) → (1,3,H,W) float32
    ``pixel - MEAN_BGR`` (``mean_value: 104.008 116.669 122.675``; no scaling, channel order kept BGR),
    by :func:`subtract_mean`."""
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"preprocess_bgr: expected an HxWx3 numpy image, got "
                         f"{getattr(image_bgr, 'shape', type(image_bgr))}")
    return torch.from_numpy(subtract_mean(image_bgr).transpose(2, 0, 1)[None].copy())


# ----------------------------------------------------------------------------------------- Fillers
#: ``FillerParameter`` fields each of Caffe's fillers reads (``filler.hpp``), with their defaults.
FILLER_FIELDS: dict[str, dict] = {
    "constant": {"value": 0.0},
    "uniform": {"min": 0.0, "max": 1.0},
    "gaussian": {"mean": 0.0, "std": 1.0, "sparse": -1},
    "positive_unitball": {},
    "xavier": {"variance_norm": "FAN_IN"},
    "msra": {"variance_norm": "FAN_IN"},
    "bilinear": {},
}


def check_filler(spec: dict, where: str) -> dict:
    """A filler spec ``{"type": ..., field: value}`` with every field its type reads (defaults filled in),
    or a ValueError naming ``where``.  Caffe's ``GetFiller`` stops on an unknown type, and its constant and
    uniform fillers on ``sparse`` ("Sparsity not supported by this Filler")."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type", "constant"), str):
        raise ValueError(f"{where}: a filler is an object {{\"type\": ..., ...}}, got {spec!r}")
    kind = spec.get("type", "constant")
    if kind not in FILLER_FIELDS:
        raise ValueError(f"{where}: unknown filler type {kind!r} (Caffe's: {', '.join(FILLER_FIELDS)})")
    unknown = sorted(set(spec) - {"type"} - set(FILLER_FIELDS[kind]))
    if unknown:
        raise ValueError(f"{where}: the {kind} filler takes {sorted(FILLER_FIELDS[kind]) or 'no fields'}, "
                         f"not {unknown}")
    out = {"type": kind, **FILLER_FIELDS[kind], **spec}
    for k, v in out.items():
        if k == "variance_norm":
            if v not in ("FAN_IN", "FAN_OUT", "AVERAGE"):
                raise ValueError(f"{where}: variance_norm must be FAN_IN, FAN_OUT or AVERAGE, got {v!r}")
        elif k == "sparse":
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ValueError(f"{where}: sparse must be an integer >= -1, got {v!r}")
        elif k != "type" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{where}: {k} must be a finite number, got {v!r}")
    # caffe_rng_gaussian: CHECK_GT(sigma, 0); caffe_rng_uniform: CHECK_LE(a, b)
    if kind == "gaussian" and not out["std"] > 0:
        raise ValueError(f"{where}: the gaussian filler's std must be > 0 (Caffe checks it), got {out['std']}")
    if kind == "uniform" and not np.float32(out["min"]) <= np.float32(out["max"]):
        raise ValueError(f"{where}: the uniform filler needs min <= max (Caffe checks it), got {out['min']}, "
                         f"{out['max']}")
    return out


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """Xavier / MSRA: ``fan_in = count / num``, ``fan_out = count / channels`` with Blob's legacy axes (a
    bias of shape (O,) has channels 1)."""
    count = math.prod(shape)
    return count // shape[0], count // (shape[1] if len(shape) > 1 else 1)


def caffe_fill(t: torch.Tensor, spec: dict) -> torch.Tensor:
    """Fill ``t`` in place as Caffe's filler ``spec`` does (``filler.hpp``), drawing from torch's RNG (the same
    distributions, not Caffe's draws).  Scales are formed in float, as Caffe's ``Dtype`` arithmetic."""
    spec = check_filler(spec, "filler")
    kind, f32 = spec["type"], np.float32
    with torch.no_grad():
        if kind == "constant":
            t.fill_(float(f32(spec["value"])))
        elif kind == "uniform":
            t.uniform_(float(f32(spec["min"])), float(f32(spec["max"])))
        elif kind == "gaussian":
            t.normal_(float(f32(spec["mean"])), float(f32(spec["std"])))
            if spec["sparse"] >= 0:   # each weight kept with probability sparse / num_outputs
                p = float(f32(spec["sparse"]) / f32(t.shape[0]))
                if p > 1:
                    raise ValueError(f"gaussian filler: sparse {spec['sparse']} > the blob's {t.shape[0]} outputs "
                                     "(Caffe's caffe_rng_bernoulli checks p <= 1)")
                t.mul_(torch.bernoulli(torch.full_like(t, p)))
        elif kind == "positive_unitball":
            t.uniform_(0, 1)
            rows = t.view(t.shape[0], -1)
            rows.div_(rows.sum(1, keepdim=True))
        elif kind in ("xavier", "msra"):
            fan_in, fan_out = _fans(t.shape)
            n = {"FAN_IN": f32(fan_in), "FAN_OUT": f32(fan_out),
                 "AVERAGE": (f32(fan_in) + f32(fan_out)) / f32(2)}[spec["variance_norm"]]
            if kind == "xavier":
                scale = float(np.sqrt(f32(3) / n))
                t.uniform_(-scale, scale)
            else:
                t.normal_(0.0, float(np.sqrt(f32(2) / n)))
        else:  # bilinear: the upsampling kernel of a deconvolution, every (out, in) channel pair alike
            if t.dim() != 4 or t.shape[2] != t.shape[3]:
                raise ValueError(f"bilinear filler: needs a 4-D blob with a square kernel, got {tuple(t.shape)}")
            k = t.shape[3]
            f = math.ceil(k / 2.0)
            # BVLC's Dtype c = (width - 1) / (2. * f), x / f and the product in float (older Caffes'
            # c = (2f - 1 - f % 2) / 2f agrees for even k)
            c = f32((k - 1) / (2.0 * f))
            r = f32(1) - np.abs(np.arange(k, dtype=np.float32) / f32(f) - c)
            t.copy_(torch.from_numpy(r[:, None] * r[None, :]).to(t.dtype).expand_as(t))
    return t
