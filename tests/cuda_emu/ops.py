"""Python calls of the emulated CUDA launchers (build.load()), shaped like the CUDA glue's
(csrc/ops/cuda/*_cuda.cpp): the same layouts, output allocation and launcher arguments, on CPU tensors.

Every buffer a kernel reads or writes sits inside a larger one whose margins hold a sentinel (NaN-like bytes):
a write outside the tensor fails the call (:func:`_Guarded.check`), a read outside it brings the sentinel into
the result.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from . import build

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # attnscale::DType
MERGE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # scale_merge::cuda::DType
MERGE_MODES = {"attention": 0, "avg": 1, "max": 2}
MARGIN = 256  # bytes each side
SENTINEL = 0xFF  # all-ones bytes: a NaN in every float type, 255 (kMaskNone) in a mask


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    return build.load()


class _Guarded:
    """A tensor of ``shape`` / ``dtype`` in NCHW or channels_last order inside a sentinel-filled buffer."""

    def __init__(self, shape, dtype, channels_last=False, fill=None, misalign=0):
        n = 1
        for s in shape:
            n *= s
        esize = torch.empty((), dtype=dtype).element_size()
        self.lo = MARGIN + misalign * esize
        self.hi = self.lo + n * esize
        self.raw = torch.full((self.hi + MARGIN,), SENTINEL, dtype=torch.uint8)
        flat = self.raw[self.lo:self.hi].view(dtype)
        if channels_last and len(shape) == 4:
            N, C, H, W = shape
            self.t = flat.view(N, H, W, C).permute(0, 3, 1, 2)
        else:
            self.t = flat.view(shape)
        if fill is not None:
            self.t.copy_(fill)

    def ptr(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(self.t.data_ptr())

    def check(self, name: str) -> None:
        for part, where in ((self.raw[:self.lo], "before"), (self.raw[self.hi:], "after")):
            bad = (part != SENTINEL).nonzero()
            if bad.numel():
                raise AssertionError(f"{name}: the kernel wrote {bad.numel()} bytes {where} the tensor")


def _arg(t: torch.Tensor, channels_last: bool, misalign: int = 0) -> _Guarded:
    return _Guarded(tuple(t.shape), t.dtype, channels_last, fill=t, misalign=misalign)


def _call(fn: str, *args) -> None:
    rc = getattr(lib(), fn)(*args)
    if rc != 0:
        msg = lib().emu_message
        msg.restype = ctypes.c_char_p
        raise RuntimeError(f"{fn}: returned {rc} {msg().decode()}")


def launches() -> list[str]:
    """The kernels launched since the last call (as the launches name them, template arguments included)."""
    fn = lib().emu_launches
    fn.restype = ctypes.c_char_p
    return fn().decode().splitlines()


def _i64(v) -> ctypes.c_int64:
    return ctypes.c_int64(int(v))


def _i32(v) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def caffe_max_pool2d(x, k, s, p, oh, ow, channels_last=False, misalign=0):
    """misalign (here and below): elements by which every tensor starts off a 16-byte boundary."""
    N, C, H, W = x.shape
    xg, y = _arg(x, channels_last, misalign), _Guarded((N, C, oh, ow), x.dtype, channels_last, misalign=misalign)
    _call("emu_max_pool2d", _i32(DTYPES[x.dtype]), xg.ptr(), y.ptr(), _i64(N), _i64(C), *map(_i32, (H, W, oh, ow, k, s, p)),
          _i32(channels_last))
    y.check("emu_max_pool2d")
    return y.t.clone()


def caffe_max_pool2d_with_mask(x, k, s, p, oh, ow, channels_last=False, misalign=0, mask_misalign=None):
    """The glue passes the kernel clipped as Caffe's k_eff is (max_pool.cpp); so do the callers here.
    mask_misalign: bytes by which the mask starts off a 16-byte boundary (default: misalign)."""
    N, C, H, W = x.shape
    xg = _arg(x, channels_last, misalign)
    y = _Guarded((N, C, oh, ow), x.dtype, channels_last, misalign=misalign)
    m = _Guarded((N, C, oh, ow), torch.uint8, channels_last, misalign=misalign if mask_misalign is None else mask_misalign)
    _call("emu_max_pool2d_with_mask", _i32(DTYPES[x.dtype]), xg.ptr(), y.ptr(), m.ptr(), _i64(N), _i64(C),
          *map(_i32, (H, W, oh, ow, k, s, p)), _i32(channels_last))
    y.check("emu_max_pool2d_with_mask out")
    m.check("emu_max_pool2d_with_mask mask")
    return y.t.clone(), m.t.clone()


def caffe_max_pool2d_backward(g, mask, k, s, p, H, W, channels_last=False, misalign=0, mask_misalign=None):
    N, C, oh, ow = g.shape
    gg = _arg(g, channels_last, misalign)
    mg = _arg(mask, channels_last, misalign if mask_misalign is None else mask_misalign)
    gx = _Guarded((N, C, H, W), g.dtype, channels_last, misalign=misalign)
    _call("emu_max_pool2d_backward", _i32(DTYPES[g.dtype]), gg.ptr(), mg.ptr(), gx.ptr(), _i64(N), _i64(C),
          *map(_i32, (H, W, oh, ow, k, s, p)), _i32(channels_last))
    gx.check("emu_max_pool2d_backward")
    return gx.t.clone()


def caffe_interp(x, oh, ow, channels_last=False, misalign=0):
    N, C, H, W = x.shape
    xg, y = _arg(x, channels_last, misalign), _Guarded((N, C, oh, ow), x.dtype, channels_last, misalign=misalign)
    _call("emu_interp", _i32(DTYPES[x.dtype]), xg.ptr(), y.ptr(), _i64(N), _i64(C), *map(_i32, (H, W, oh, ow)),
          _i32(channels_last))
    y.check("emu_interp")
    return y.t.clone()


def caffe_interp_backward(g, idx_h, coef_h, idx_w, coef_w, channels_last=False, slice_of=0, tail=None):
    """slice_of > 0: g is read in place as channels [slice_of, slice_of + C) of a tensor of slice_of + C + tail
    channels (tail: slice_of unless given; the others NaN): a channel slice of a concatenation's gradient, as
    the glue passes it."""
    N, C, oh, ow = g.shape
    H, W = idx_h.shape[1], idx_w.shape[1]
    gg = _Guarded((N, slice_of + C + (slice_of if tail is None else tail), oh, ow), g.dtype, channels_last)
    view = gg.t[:, slice_of:slice_of + C]
    view.copy_(g)
    strides = (ctypes.c_int64 * 4)(*view.stride())
    tabs = [_Guarded(tuple(t.shape), t.dtype, fill=t) for t in (idx_h, coef_h, idx_w, coef_w)]
    gx = _Guarded((N, C, H, W), g.dtype, channels_last)
    _call("emu_interp_backward", _i32(DTYPES[g.dtype]), ctypes.c_void_p(view.data_ptr()), strides, tabs[0].ptr(),
          tabs[1].ptr(), _i32(idx_h.shape[0]),
          tabs[2].ptr(), tabs[3].ptr(), _i32(idx_w.shape[0]), gx.ptr(), _i64(N), _i64(C),
          *map(_i32, (H, W, oh, ow)), _i32(channels_last))
    gx.check("emu_interp_backward")
    return gx.t.clone()


def bias_relu_plan(dtype, N, C, HW, channels_last, aligned16):
    f = (ctypes.c_int64 * 9)()
    lib().emu_bias_relu_plan(_i32(DTYPES[dtype]), _i64(N), _i64(C), _i64(HW), _i32(channels_last), _i32(aligned16), f)
    keys = ("vec", "block_x", "block_y", "grid_x", "grid_y", "span", "chunks", "partials", "workspace_bytes")
    return dict(zip(keys, list(f)))


def bias_relu(x, bias, channels_last=False, misalign=0, p=0.0, seed=0):
    """misalign: elements by which x and the output are moved off a 16-byte boundary (the scalar path); p, seed:
    the fused dropout."""
    N, C, H, W = x.shape
    xg, bg = _arg(x, channels_last, misalign), _arg(bias, False)
    y = _Guarded((N, C, H, W), x.dtype, channels_last, misalign=misalign)
    _call("emu_bias_relu", _i32(DTYPES[x.dtype]), xg.ptr(), bg.ptr(), _i32(bias.dtype != x.dtype), y.ptr(), _i64(N),
          _i64(C), _i64(H * W), _i32(channels_last), _i32(misalign == 0), ctypes.c_double(p),
          ctypes.c_uint64(seed & 0xFFFFFFFFFFFFFFFF))
    y.check("emu_bias_relu")
    return y.t.clone()


def bias_relu_backward(g, out, bias_dtype, channels_last=False, misalign=0, scale=1.0):
    N, C, H, W = g.shape
    aligned = misalign == 0
    plan = bias_relu_plan(g.dtype, N, C, H * W, channels_last, aligned)
    gg, og = _arg(g, channels_last, misalign), _arg(out, channels_last, misalign)
    gx = _Guarded((N, C, H, W), g.dtype, channels_last, misalign=misalign)
    gb = _Guarded((C,), bias_dtype)
    ws = _Guarded((max(plan["workspace_bytes"], 1),), torch.uint8)
    _call("emu_bias_relu_backward", _i32(DTYPES[g.dtype]), gg.ptr(), og.ptr(), gx.ptr(), gb.ptr(),
          _i32(bias_dtype != g.dtype), ws.ptr(), _i64(N), _i64(C), _i64(H * W), _i32(channels_last), _i32(aligned),
          ctypes.c_double(scale))
    for t, name in ((gx, "grad x"), (gb, "grad bias"), (ws, "workspace")):
        t.check(f"emu_bias_relu_backward {name}")
    return gx.t.clone(), gb.t.clone(), plan


def _sizes(scores):
    S = len(scores)
    return S, (ctypes.c_int * S)(*[s.shape[2] for s in scores]), (ctypes.c_int * S)(*[s.shape[3] for s in scores])


def _ptrs(guarded):
    return (ctypes.c_void_p * len(guarded))(*[g.t.data_ptr() for g in guarded])


def scale_merge(scores, logits, mode):
    S, Hs, Ws = _sizes(scores)
    N, C, H0, W0 = scores[0].shape
    sg = [_arg(s.contiguous(), False) for s in scores]
    lg = _arg(logits.contiguous(), False) if logits is not None else None
    merged, weights = _Guarded((N, C, H0, W0), scores[0].dtype), _Guarded((N, S, H0, W0), scores[0].dtype)
    _call("emu_scale_merge", _i32(MERGE_DTYPES[scores[0].dtype]), _i32(MERGE_MODES[mode]), _i32(S), _i64(N), _i64(C),
          Hs, Ws, _ptrs(sg), lg.ptr() if lg else None, merged.ptr(), weights.ptr())
    merged.check("emu_scale_merge merged")
    return merged.t.clone(), weights.t.clone()


def scale_merge_backward(grad_merged, grad_weights, scores, logits, mode, weights=None, layout=1):
    S, Hs, Ws = _sizes(scores)
    sg = [_arg(s.contiguous(), False) for s in scores]
    gsc = [_Guarded(tuple(s.shape), s.dtype) for s in scores]
    lg = _arg(logits.contiguous(), False) if logits is not None else None
    glog = _Guarded(tuple(logits.shape), logits.dtype) if logits is not None else None
    gm = _arg(grad_merged.contiguous(), False)
    gw = _arg(grad_weights.contiguous(), False) if grad_weights is not None else None
    wg = _arg(weights.contiguous(), False) if weights is not None else None
    N, C = scores[0].shape[:2]
    _call("emu_scale_merge_backward", _i32(MERGE_DTYPES[scores[0].dtype]), _i32(MERGE_MODES[mode]), _i32(S), _i64(N),
          _i64(C), Hs, Ws, _i32(layout), gm.ptr(), gw.ptr() if gw else None, _ptrs(sg), lg.ptr() if lg else None,
          wg.ptr() if wg else None, _ptrs(gsc), glog.ptr() if glog else None)
    for i, g in enumerate(gsc):
        g.check(f"emu_scale_merge_backward grad scores[{i}]")
    if glog:
        glog.check("emu_scale_merge_backward grad logits")
    return [g.t.clone() for g in gsc], (glog.t.clone() if glog else None)


CONV_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # dilated_conv::CudaDType


def _conv_shape(x_shape, w_shape, dilation, padding):
    N, C, H, W = x_shape
    O, _, KH, KW = w_shape
    Ho, Wo = H + 2 * padding - dilation * (KH - 1), W + 2 * padding - dilation * (KW - 1)
    return (ctypes.c_int64 * 11)(N, C, H, W, O, KH, KW, Ho, Wo, dilation, padding), (N, O, Ho, Wo)


def dilated_conv2d(x, weight, bias, dilation, padding, tensor_cores):
    """The direct kernels' forward, as dilated_conv_cuda.cpp calls them (weights packed [KH][KW][O][C])."""
    shape, out_shape = _conv_shape(x.shape, weight.shape, dilation, padding)
    xg, wg = _arg(x.contiguous(), False), _arg(weight.permute(2, 3, 0, 1).contiguous(), False)
    bg = _arg(bias, False) if bias is not None else None
    out = _Guarded(out_shape, x.dtype)
    _call("emu_dilated_conv_forward", _i32(CONV_DTYPES[x.dtype]), xg.ptr(), wg.ptr(), bg.ptr() if bg else None,
          out.ptr(), shape, _i32(tensor_cores))
    out.check("emu_dilated_conv_forward")
    return out.t.clone()


def dilated_conv2d_backward_input(grad_out, weight, x_shape, dilation, padding, tensor_cores):
    shape, _ = _conv_shape(x_shape, weight.shape, dilation, padding)
    gg, wg = _arg(grad_out.contiguous(), False), _arg(weight.permute(2, 3, 1, 0).contiguous(), False)
    gx = _Guarded(tuple(x_shape), grad_out.dtype)
    _call("emu_dilated_conv_backward_input", _i32(CONV_DTYPES[grad_out.dtype]), gg.ptr(), wg.ptr(), gx.ptr(), shape,
          _i32(tensor_cores))
    gx.check("emu_dilated_conv_backward_input")
    return gx.t.clone()


def dilated_conv2d_backward_weight(grad_out, x, kernel, dilation, padding, tensor_cores):
    w_shape = (grad_out.shape[1], x.shape[1], kernel, kernel)
    shape, _ = _conv_shape(x.shape, w_shape, dilation, padding)
    dt = _i32(CONV_DTYPES[x.dtype])
    lib().emu_dilated_conv_workspace.restype = ctypes.c_int64
    ws = _Guarded((max(lib().emu_dilated_conv_workspace(dt, shape, _i32(tensor_cores)), 1),), torch.float32)
    gg, xg = _arg(grad_out.contiguous(), False), _arg(x.contiguous(), False)
    gw, gb = _Guarded(w_shape, x.dtype), _Guarded((w_shape[0],), x.dtype)
    _call("emu_dilated_conv_backward_weight", dt, gg.ptr(), xg.ptr(), gw.ptr(), gb.ptr(), ws.ptr(), shape,
          _i32(tensor_cores))
    for t, name in ((gw, "grad weight"), (gb, "grad bias"), (ws, "workspace")):
        t.check(f"emu_dilated_conv_backward_weight {name}")
    return gw.t.clone(), gb.t.clone()


# ------------------------------------------------------------------ dilated_conv2d's GEMM path (its copies)
def _gemm_geometry(N, C, H, W, O, KH, KW, dilation, pad_y, pad_x):
    Ho, Wo = H + 2 * pad_y - dilation * (KH - 1), W + 2 * pad_x - dilation * (KW - 1)
    return (ctypes.c_int64 * 12)(N, C, H, W, O, Ho, Wo, KH, KW, dilation, pad_y, pad_x), (Ho, Wo)


def _gemm_layout(geometry):
    cap = 5 + 6 * 64
    buf = (ctypes.c_int64 * cap)()
    fn = lib().emu_gemm_layout
    fn.restype = ctypes.c_int64
    n = fn(geometry, buf, _i64(cap))
    assert n > 0, "emu_gemm_layout: the blocks exceed the copies' limits"
    v = list(buf[:n])
    groups = [dict(zip(("members", "m", "k", "col", "prod", "part"), v[5 + 6 * i:11 + 6 * i])) for i in range(v[4])]
    return {"col": v[0], "prod": v[1], "part": v[2], "covered": v[3], "groups": groups}


def _weight_view(w, adjoint):
    """dilated_conv_gemm.cpp's weight_view: w as it is, or flipped and transposed (the adjoint's kernel)."""
    so, sc, sy, sx = w.stride()
    kh, kw = w.shape[2:]
    view = (0, so, sc, sy, sx) if not adjoint else ((kh - 1) * sy + (kw - 1) * sx, sc, so, -sy, -sx)
    return (ctypes.c_int64 * 5)(*view)


def _guarded_like(t, misalign=0):
    """t's storage as it is (any strides) inside a sentinel-guarded buffer: a copy of the bytes it spans."""
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 1
    g = _Guarded((span,), t.dtype, misalign=misalign)
    g.t.as_strided(t.shape, t.stride()).copy_(t)
    return g


def _gemm(dtype, a, b):
    """cuBLAS's batched GEMM as the op calls it: products accumulated in float32 (float64 for float64),
    each result rounded once to dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.bmm(a.to(acc), b.to(acc))


def gemm_convolve(x, weight, bias, dilation, pad_y, pad_x, adjoint=False, misalign=0):
    """dilated_conv_gemm.cpp's convolve with its copies by the emulated CUDA kernels: x (N, C, H, W) with
    weight (O, C, KH, KW), or adjoint with weight (C, O, KH, KW) flipped and transposed; the result
    channels_last.  misalign shifts x, the weight and out by one element (the copies' narrow paths)."""
    N, C, H, W = x.shape
    O = weight.shape[1 if adjoint else 0]
    KH, KW = weight.shape[2:]
    geom, (Ho, Wo) = _gemm_geometry(N, C, H, W, O, KH, KW, dilation, pad_y, pad_x)
    lay = _gemm_layout(geom)
    dt = _i32(CONV_DTYPES[x.dtype])
    xg = _arg(x, True, misalign)
    wg = _guarded_like(weight, misalign)
    cols, wbuf = _Guarded((max(lay["col"], 1),), x.dtype), _Guarded((max(lay["part"], 1),), x.dtype)
    prod = _Guarded((max(lay["prod"], 1),), x.dtype)
    _call("emu_gemm_columns", dt, xg.ptr(), cols.ptr(), geom)
    _call("emu_gemm_weights", dt, wg.ptr(), _weight_view(weight, adjoint), wbuf.ptr(), geom)
    for g in lay["groups"]:
        n, m, k = g["members"], g["m"], g["k"]
        a = cols.t[g["col"]:g["col"] + n * m * k].view(n, m, k)
        b = wbuf.t[g["part"]:g["part"] + n * O * k].view(n, O, k).transpose(1, 2)
        prod.t[g["prod"]:g["prod"] + n * m * O].copy_(_gemm(x.dtype, a, b).flatten())
    fill = bias.view(1, O, 1, 1).expand(N, O, Ho, Wo) if bias is not None else torch.zeros(N, O, Ho, Wo)
    out = _Guarded((N, O, Ho, Wo), x.dtype, channels_last=True, misalign=misalign,
                   fill=fill if lay["covered"] < Ho * Wo else None)
    bg = _arg(bias, False) if bias is not None else None
    _call("emu_gemm_scatter", dt, prod.ptr(), bg.ptr() if bg else None, out.ptr(), geom)
    for t, name in ((cols, "columns"), (wbuf, "weights"), (prod, "products"), (out, "out")):
        t.check(f"gemm_convolve {name}")
    return out.t.clone()


def gemm_backward_weight(grad_out, x, KH, KW, dilation, padding, misalign=0):
    """dilated_conv_gemm.cpp's gemm_backward_weight with its copies by the emulated CUDA kernels: the
    weight gradient (O, KH, KW, C), float32 for bfloat16 / float16, and the bias gradient where the
    gather sums it (one plan covering every output, a device that can: else None, ATen's sum).  misalign
    shifts grad_output by one element."""
    N, C, H, W = x.shape
    O = grad_out.shape[1]
    geom, (Ho, Wo) = _gemm_geometry(N, C, H, W, O, KH, KW, dilation, padding, padding)
    lay = _gemm_layout(geom)
    dt = _i32(CONV_DTYPES[x.dtype])
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg, gg = _arg(x, True), _arg(grad_out, True, misalign)
    cols, gprod = _Guarded((max(lay["col"], 1),), x.dtype), _Guarded((max(lay["prod"], 1),), x.dtype)
    parts = _Guarded((max(lay["part"], 1),), acc_dtype)
    acc = _Guarded((O, KH, KW, C), acc_dtype)
    _call("emu_gemm_columns", dt, xg.ptr(), cols.ptr(), geom)
    fn = lib().emu_gemm_gather_sum_workspace
    fn.restype = ctypes.c_int64
    ws = fn(dt, gg.ptr(), gprod.ptr(), geom) if lay["covered"] == Ho * Wo else 0
    bias = None
    if ws > 0:
        work, bias = _Guarded((ws,), torch.float32), _Guarded((O,), x.dtype)
        _call("emu_gemm_gather_sum", dt, gg.ptr(), gprod.ptr(), work.ptr(), bias.ptr(), geom)
        for t, name in ((work, "partial sums"), (bias, "bias gradient")):
            t.check(f"gemm_backward_weight {name}")
    else:
        _call("emu_gemm_gather", dt, gg.ptr(), gprod.ptr(), geom)
    for g in lay["groups"]:
        n, m, k = g["members"], g["m"], g["k"]
        gi = gprod.t[g["prod"]:g["prod"] + n * m * O].view(n, m, O).transpose(1, 2)
        ci = cols.t[g["col"]:g["col"] + n * m * k].view(n, m, k)
        parts.t[g["part"]:g["part"] + n * O * k].copy_(_gemm(x.dtype, gi, ci).flatten())
    _call("emu_gemm_weight_gradient", _i32(CONV_DTYPES[acc_dtype]), parts.ptr(), acc.ptr(), geom)
    for t, name in ((cols, "columns"), (gprod, "products"), (parts, "parts"), (acc, "weight gradient")):
        t.check(f"gemm_backward_weight {name}")
    return acc.t.clone(), None if bias is None else bias.t.clone()
