"""attnscale.caffe: Caffe/DeepLab arithmetic against hand-computed numbers and literal transcriptions of
Caffe's loops (PoolingLayer::Forward_cpu, caffe_cpu_interp2)."""
import contextlib
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnscale import caffe
from attnscale.caffe import InterpParams
from attnscale.ops import has_extension


# ------------------------------------------------------------------------- literal Caffe transcriptions
def caffe_pool_loop(x: np.ndarray, k: int, s: int, p: int, method: str):
    """PoolingLayer::Forward_cpu, line by line (one channel), plus the MAX argmax for backward."""
    H, W = x.shape
    ph_n = int(math.ceil(float(H + 2 * p - k) / s)) + 1
    pw_n = int(math.ceil(float(W + 2 * p - k) / s)) + 1
    if p:
        if (ph_n - 1) * s >= H + p:
            ph_n -= 1
        if (pw_n - 1) * s >= W + p:
            pw_n -= 1
    out = np.zeros((ph_n, pw_n), np.float64)
    arg = np.full((ph_n, pw_n), -1)
    for ph in range(ph_n):
        for pw in range(pw_n):
            hstart, wstart = ph * s - p, pw * s - p
            if method == "max":
                hend, wend = min(hstart + k, H), min(wstart + k, W)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                best = -np.finfo(np.float32).max
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        if x[h, w] > best:
                            best, arg[ph, pw] = x[h, w], h * W + w
                out[ph, pw] = best
            else:
                hend, wend = min(hstart + k, H + p), min(wstart + k, W + p)
                pool_size = (hend - hstart) * (wend - wstart)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                hend, wend = min(hend, H), min(wend, W)
                acc = 0.0
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        acc += x[h, w]
                out[ph, pw] = acc / pool_size
    return out, arg


def caffe_interp_taps(size_in: int, size_out: int):
    """caffe_cpu_interp2's per-axis taps in its float32 arithmetic: for each output index (i0, i1, lambda1)."""
    f32 = np.float32
    r = f32(size_in - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
    taps = []
    for o in range(size_out):
        pos = f32(r * f32(o))
        i0 = int(pos)
        taps.append((i0, i0 + (1 if i0 < size_in - 1 else 0), f32(pos - f32(i0))))
    return taps


def caffe_interp_loop(x: np.ndarray, oh: int, ow: int):
    """caffe_cpu_interp2 (one channel, no crop), float32 coefficient arithmetic."""
    ih, iw = x.shape
    if (ih, iw) == (oh, ow):
        return x.copy()
    out = np.zeros((oh, ow), np.float32)
    for h2, (h0, h1, l1h) in enumerate(caffe_interp_taps(ih, oh)):
        l0h = np.float32(1) - l1h
        for w2, (w0, w1, l1w) in enumerate(caffe_interp_taps(iw, ow)):
            l0w = np.float32(1) - l1w
            out[h2, w2] = l0h * (l0w * x[h0, w0] + l1w * x[h0, w1]) + l1h * (l0w * x[h1, w0] + l1w * x[h1, w1])
    return out


# --------------------------------------------------------------------------------------- pool sizes
@pytest.mark.parametrize("size,k,s,p,expected", [
    (321, 3, 2, 1, 161),   # ceil(320/2)+1
    (161, 3, 2, 1, 81),
    (81, 3, 2, 1, 41),
    (41, 3, 1, 1, 41),
    (500, 3, 2, 1, 251),   # ceil(499/2)+1 = 251: (250)*2 = 500 < 501, no decrement
    (126, 3, 2, 1, 64),    # ceil(125/2)+1 = 64
    (6, 3, 2, 1, 4),       # ceil(5/2)+1
    (5, 3, 3, 1, 2),       # ceil(4/3)+1 = 3, (3-1)*3 = 6 >= 5+1 -> decremented to 2
    (3, 2, 2, 1, 2),       # ceil(3/2)+1 = 3, (3-1)*2 = 4 >= 3+1 -> 2
    (6, 1, 3, 0, 3),       # pad 0: ceil(5/3)+1 = 3, Caffe does NOT decrement although 2*3 >= 6
    (7, 2, 2, 0, 4),       # ceil(5/2)+1, the last window overruns by one
])
def test_pool_output_size_hand_cases(size, k, s, p, expected):
    assert caffe.pool_output_size(size, k, s, p) == expected


def test_pool_output_size_rejects_bad_args():
    with pytest.raises(ValueError, match="pad < kernel"):
        caffe.pool_output_size(10, 3, 1, 3)
    with pytest.raises(ValueError, match="kernel"):
        caffe.pool_output_size(2, 5, 1, 1)
    with pytest.raises(ValueError):
        caffe.pool_output_size(0, 3, 1, 1)
    with pytest.raises(TypeError):
        caffe.pool_output_size(10, 3.0, 1, 1)


# ------------------------------------------------------------------------------------- pool values
def test_ave_divisor_hand_case():
    # H=6, k=3, s=2, p=1: out 4, windows start -1,1,3,5 and end min(start+3, 7) = 2,4,6,7
    assert caffe.ave_pool_divisor(6, 3, 2, 1) == [3, 3, 3, 2]
    y = caffe.pool2d(torch.ones(1, 1, 6, 6), 3, 2, 1, "ave")[0, 0]
    assert y[0, 0].item() == pytest.approx(4 / 9)   # 2x2 valid cells / 3x3 (top-left padding counts)
    assert y[3, 0].item() == pytest.approx(2 / 6)   # 1x2 valid / (2 rows up to H+p) x 3
    assert y[3, 3].item() == pytest.approx(1 / 4)   # 1x1 valid / 2x2
    assert y[1, 1].item() == pytest.approx(1.0)


def test_max_pool_padding_never_wins():
    x = -torch.arange(1, 26, dtype=torch.float32).reshape(1, 1, 5, 5)
    y = caffe.pool2d(x, 3, 2, 1, "max")[0, 0]
    assert y.shape == (3, 3)
    assert y[0, 0].item() == -1.0 and y[2, 2].item() == -19.0


CONFIGS = [(3, 2, 1), (3, 1, 1), (2, 2, 1), (3, 3, 2), (4, 3, 2), (2, 3, 1), (3, 2, 0), (2, 2, 0), (5, 2, 2)]


@pytest.mark.parametrize("k,s,p", CONFIGS)
@pytest.mark.parametrize("method", ["max", "ave"])
def test_pool2d_equals_caffe_loop(k, s, p, method):
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    for H, W in [(5, 7), (6, 6), (9, 4), (8, 11)]:
        out_h, out_w = caffe.pool_output_size(H, k, s, p), caffe.pool_output_size(W, k, s, p)
        if (out_h - 1) * s - p >= H or (out_w - 1) * s - p >= W:
            continue  # empty last window (pad 0, stride > kernel): refused, tested below
        x = rng.standard_normal((H, W)).astype(np.float32)
        xt = torch.from_numpy(x)[None, None].requires_grad_(True)
        y = caffe.pool2d(xt, k, s, p, method)
        ref, arg = caffe_pool_loop(x.astype(np.float64), k, s, p, method)
        assert y.shape[-2:] == ref.shape
        np.testing.assert_allclose(y[0, 0].detach().numpy(), ref, rtol=1e-6, atol=1e-6)
        if method == "max":
            g = torch.from_numpy(rng.standard_normal(ref.shape).astype(np.float32))
            y.backward(g[None, None])
            expect = np.zeros(H * W, np.float32)
            np.add.at(expect, arg.ravel(), g.numpy().ravel())
            np.testing.assert_allclose(xt.grad[0, 0].numpy().ravel(), expect, rtol=1e-6, atol=1e-6)


def _caffe_ave_float32(x: np.ndarray, k: int, s: int, p: int, oh: int, ow: int) -> np.ndarray:
    """AvePoolingForward in float32 arithmetic, Caffe's order: a sum from 0 over rows then columns, then /=."""
    f32 = np.float32
    H, W = x.shape
    out = np.zeros((oh, ow), f32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, H + p), min(ws + k, W + p)
            pool_size = (he - hs) * (we - ws)
            acc = f32(0)
            for h in range(max(hs, 0), min(he, H)):
                for w in range(max(ws, 0), min(we, W)):
                    acc = f32(acc + x[h, w])
            out[i, j] = f32(acc / f32(pool_size))
    return out


@pytest.mark.parametrize("k,s,p", CONFIGS)
def test_ave_pool_inference_is_caffes_float_arithmetic(k, s, p):
    """Without a gradient on the CPU, AVE pooling (caffe_ave_pool2d; the F.avg_pool2d path without the
    extension, which gives the same float32 bits) gives Caffe's float32 results bit for bit (its sums in its
    order, then the division); float64 likewise in double; with the kernel the half types are the float32
    computation rounded once.  With a gradient the F.avg_pool2d path stays (close, tested above)."""
    rng = np.random.default_rng(5 + k * 100 + s * 10 + p)
    for H, W in [(5, 7), (6, 6), (9, 4), (8, 11), (1, 1), (2, 13)]:
        try:
            oh, ow = caffe.pool_output_shape((H, W), k, s, p)
        except ValueError:
            continue
        if (oh - 1) * s - p >= H or (ow - 1) * s - p >= W:
            continue
        x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            y = caffe.pool2d(xt, k, s, p, "ave")
        for n in range(2):
            for c in range(3):
                np.testing.assert_array_equal(y[n, c].numpy(), _caffe_ave_float32(x[n, c], k, s, p, oh, ow))
        with torch.no_grad():
            y64 = caffe.pool2d(xt.double(), k, s, p, "ave")
            for dt in (torch.bfloat16, torch.float16) if has_extension() else ():
                xh = xt.to(dt)
                assert torch.equal(caffe.pool2d(xh, k, s, p, "ave"), caffe.pool2d(xh.float(), k, s, p, "ave").to(dt))
        np.testing.assert_array_equal(y64[0, 0].numpy(), caffe_pool_loop(x[0, 0].astype(np.float64), k, s, p, "ave")[0])


def test_max_pool_tie_goes_to_first_in_scan_order():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    caffe.pool2d(x, 3, 2, 1, "max").sum().backward()
    ref, arg = caffe_pool_loop(np.zeros((4, 4)), 3, 2, 1, "max")
    expect = np.zeros(16)
    np.add.at(expect, arg.ravel(), 1.0)
    np.testing.assert_array_equal(x.grad.numpy().ravel(), expect)
    # window [0,2)x[0,2) -> first cell (0,0) wins; (0,2) is never the first cell of a window
    assert expect[0] == 1 and expect[2] == 0 and expect.sum() == 9


def test_pool2d_refuses_empty_windows_and_bad_input():
    with pytest.raises(ValueError, match="entirely outside"):
        caffe.pool2d(torch.zeros(1, 1, 6, 6), 1, 3, 0)
    with pytest.raises(ValueError, match="method"):
        caffe.pool2d(torch.zeros(1, 1, 6, 6), 3, 1, 1, "min")
    with pytest.raises(ValueError, match="N,C,H,W"):
        caffe.pool2d(torch.zeros(6, 6), 3, 1, 1)


# ------------------------------------------------------------------------------------- interp sizes
@pytest.mark.parametrize("hw,params,expected", [
    ((65, 65), InterpParams(zoom_factor=8), (513, 513)),             # 65 + 64*7
    ((41, 41), InterpParams(zoom_factor=8), (321, 321)),
    ((321, 321), InterpParams(shrink_factor=8), (41, 41)),           # (320)/8 + 1
    ((321, 321), InterpParams(shrink_factor=4, zoom_factor=3), (241, 241)),  # 81 -> 81 + 80*2
    ((513, 500), InterpParams(shrink_factor=4, zoom_factor=3), (385, 373)),  # 129->385, 125->373
    ((321, 321), InterpParams(shrink_factor=2), (161, 161)),
    ((31, 31), InterpParams(zoom_factor=4, shrink_factor=3), (41, 41)),      # shrink first: 11 -> 41
    ((49, 49), InterpParams(zoom_factor=4, shrink_factor=3), (65, 65)),      # 17 -> 65
    ((21, 33), InterpParams(zoom_factor=2), (41, 65)),
    ((10, 10), InterpParams(height=7, width=9), (7, 9)),
    ((10, 12), InterpParams(shrink_factor=2, pad_beg=-1, pad_end=-2), (4, 5)),  # eff 7 -> 4, eff 9 -> 5
    ((10, 10), InterpParams(zoom_factor=2, pad_beg=-2), (15, 15)),           # eff 8 -> 15
    ((10, 10), InterpParams(zoom_factor=2, height=3, width=3), (19, 19)),    # zoom-only branch first
    ((10, 10), InterpParams(zoom_factor=2, shrink_factor=2, height=3, width=4), (3, 4)),  # explicit before both
])
def test_interp_output_shape_hand_cases(hw, params, expected):
    assert caffe.interp_output_shape(hw, params) == expected
    x = torch.zeros(1, 1, *hw)
    assert tuple(caffe.interp(x, params).shape[-2:]) == expected


def test_interp_size_errors():
    with pytest.raises(ValueError, match="pad_beg"):
        caffe.interp_output_shape((10, 10), InterpParams(zoom_factor=2, pad_beg=1))
    with pytest.raises(ValueError, match="needs zoom_factor"):
        caffe.interp_output_shape((10, 10), InterpParams(height=3))
    with pytest.raises(ValueError, match="leaves nothing"):
        caffe.interp_output_shape((3, 3), InterpParams(zoom_factor=2, pad_beg=-2, pad_end=-1))
    with pytest.raises(ValueError, match="zoom_factor"):
        caffe.interp_output_shape((3, 3), InterpParams(zoom_factor=0))
    with pytest.raises(TypeError):
        caffe.interp(torch.zeros(1, 1, 3, 3), "big")


# ------------------------------------------------------------------------------------ interp values
def test_interp_values_hand_cases():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    expect = torch.tensor([[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]])
    assert torch.equal(caffe.interp(x, 3)[0, 0], expect)
    row = torch.tensor([0.0, 10.0, 20.0, 40.0])[None, None, None]
    # 4 -> 3: r = 3/2, positions 0, 1.5, 3 -> 0, 15, 40
    assert caffe.interp(row, (1, 3))[0, 0, 0].tolist() == [0.0, 15.0, 40.0]
    # shrink_factor 2 on 5 samples picks 0, 2, 4 exactly
    line = torch.arange(5.0)[None, None, None]
    assert caffe.interp(line, InterpParams(shrink_factor=2))[0, 0, 0].tolist() == [0.0, 2.0, 4.0]
    # pad_beg=-1, pad_end=-1 crops [1, 5) then zoom 2: 1, 1.5, ..., 4
    six = torch.arange(6.0)[None, None].expand(1, 1, 6, 6)
    got = caffe.interp(six, InterpParams(zoom_factor=2, pad_beg=-1, pad_end=-1))
    assert got.shape[-2:] == (7, 7)
    assert got[0, 0, 0].tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    # out == 1: rheight = 0 -> first sample
    assert caffe.interp(row, (1, 1)).item() == 0.0


def test_interp_float32_coefficients_like_caffe():
    # 2 -> 42: r = float(1)/41 (float32); r*41 = 0.99999994 -> h1 = 0, lambda = 0.99999994,
    # whereas exact arithmetic would give h1 = 1, lambda = 0 (Caffe computes in float32).
    i0, i1, l0, l1 = caffe.interp_coefficients(2, 42)
    pos = np.float32(np.float32(1) / np.float32(41)) * np.float32(41)
    assert pos < 1.0
    assert i0[41].item() == 0 and i1[41].item() == 1
    assert l1[41].item() == float(np.float32(pos)) and l0[41].item() == float(np.float32(1) - np.float32(pos))
    y = caffe.interp(torch.tensor([0.0, 1.0])[None, None, None], (1, 42))
    assert y[0, 0, 0, 41].item() == float(np.float32(pos)) != 1.0


def test_host_constants_cached_as_plain_tensors():
    """Interp coefficients and AVE divisors are computed once per (arguments, device) and shared; a first
    call under inference_mode still caches ordinary tensors, so a training forward after it can save them."""
    caffe._host_constants_cached.cache_clear()
    with torch.inference_mode():
        first = caffe.interp_coefficients(7, 13)
        caffe.interp(torch.randn(1, 1, 7, 7), (13, 13))
        with caffe.torch_max_pool():  # the F.avg_pool2d path (without it: caffe_ave_pool2d, no divisor map)
            caffe.pool2d(torch.randn(1, 1, 7, 7), 3, 1, 1, "ave")
    assert caffe._host_constants_cached.cache_info().currsize == 2
    assert not any(t.is_inference() for t in first)
    assert all(a is b for a, b in zip(first, caffe.interp_coefficients(7, 13)))
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: caffe.pool2d(t, 3, 1, 1, "ave"), (x,))
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: caffe.interp_gather(t, (13, 13)), (x,))
    with pytest.raises(ValueError, match="sizes must be positive"):
        caffe.interp_coefficients(0, 3)


def test_host_constants_under_fake_and_meta_tensors():
    """Nothing fake is cached nor a cached real tensor traced: Interp and AVE pooling under FakeTensorMode
    (tracing, opcheck) work whether the real call came first or not; the tables are built on the CPU even
    under a meta default device."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    x = torch.randn(1, 2, 7, 7)
    want = caffe.interp_gather(x, (13, 13)), caffe.pool2d(x, 3, 1, 1, "ave")
    for _ in range(2):  # real first, then fake, then real again
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            got = caffe.interp_gather(fx, (13, 13)), caffe.pool2d(fx, 3, 1, 1, "ave")
        assert all(isinstance(t, FakeTensor) and t.shape == w.shape for t, w in zip(got, want))
        caffe._host_constants_cached.cache_clear()
    assert not any(isinstance(t, FakeTensor) for t in caffe.interp_coefficients(7, 13))
    torch.testing.assert_close(caffe.interp_gather(x, (13, 13)), want[0], rtol=0, atol=0)
    torch.testing.assert_close(caffe.pool2d(x, 3, 1, 1, "ave"), want[1], rtol=0, atol=0)
    with torch.device("meta"):
        i0, _, _, lam1 = caffe.interp_coefficients(7, 12, "cpu")
    assert i0.device.type == "cpu" and lam1.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_interp_coefficients_equal_the_cpu_ones():
    """On a GPU the ratio is still divided on the host (as Caffe's GPU Interp takes it): the CUDA
    coefficients are the CPU ones bit for bit (PyTorch's CUDA tensor / number multiplies by the reciprocal,
    which is 1 ulp off for some sizes), under the current device's index for "cuda"; and the CUDA Interp
    matches the CPU one."""
    for size_in in range(2, 70):
        for size_out in (size_in * 2 - 1, 41, 65, 97, 513):
            cpu = caffe.interp_coefficients(size_in, size_out)
            dev = caffe.interp_coefficients(size_in, size_out, "cuda")
            for a, b in zip(cpu, dev):
                assert b.device == torch.device("cuda", torch.cuda.current_device()), b.device
                assert torch.equal(b.cpu(), a), (size_in, size_out)
    x = torch.randn(2, 3, 31, 23)
    torch.testing.assert_close(caffe.interp_gather(x.cuda(), (41, 45)).cpu(), caffe.interp_gather(x, (41, 45)),
                               rtol=1e-6, atol=1e-6)


def test_interp_equals_caffe_loop_and_grad():
    rng = np.random.default_rng(0)
    for (ih, iw), (oh, ow) in [((5, 7), (13, 9)), ((31, 31), (41, 41)), ((8, 8), (4, 3)), ((7, 5), (7, 5)),
                               ((1, 4), (3, 4)), ((21, 17), (41, 33))]:
        x = rng.standard_normal((ih, iw)).astype(np.float32)
        got = caffe.interp(torch.from_numpy(x)[None, None], (oh, ow))[0, 0].numpy()
        np.testing.assert_allclose(got, caffe_interp_loop(x, oh, ow), rtol=0, atol=2e-6)
    # align-corners bilinear: agrees with torch's to rounding, and gradients match torch's
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: caffe.interp(t, (14, 4)), (x,))
    a = caffe.interp(x.float(), (14, 4))
    b = F.interpolate(x.float(), size=(14, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def caffe_interp_backward_loop(g: np.ndarray, ih: int, iw: int) -> np.ndarray:
    """caffe_cpu_interp2_backward (one channel, sizes differ): every tap of every output pixel adds
    ``lambda_h * lambda_w * diff`` to its source, zero weights included; float64 sums."""
    oh, ow = g.shape
    out = np.zeros((ih, iw), np.float64)
    for h2, (h0, h1, l1h) in enumerate(caffe_interp_taps(ih, oh)):
        for w2, (w0, w1, l1w) in enumerate(caffe_interp_taps(iw, ow)):
            l1h_, l1w_, d = float(l1h), float(l1w), float(g[h2, w2])
            out[h0, w0] += (1 - l1h_) * (1 - l1w_) * d
            out[h0, w1] += (1 - l1h_) * l1w_ * d
            out[h1, w0] += l1h_ * (1 - l1w_) * d
            out[h1, w1] += l1h_ * l1w_ * d
    return out


@pytest.mark.parametrize("sizes", [((31, 31), (41, 41)), ((21, 21), (41, 41)), ((41, 41), (41, 31)), ((2, 3), (42, 9)),
                                   ((7, 5), (13, 5)), ((9, 11), (4, 3))])
def test_interp_backward_is_caffes_scatter_as_a_gather(sizes):
    """interp_gather's backward (per axis, each source summing its outputs' contributions through index
    tables) gives Caffe's backward loop's values (float32 within rounding of the float64 loop), autograd's
    own backward of the gathers (torch_interp) likewise, and spreads a non-finite gradient to the
    same sources as Caffe's loop does (zero-weight taps included); bfloat16 sums in float32, so it lands
    closer to the exact values than the bfloat16 scatter."""
    (ih, iw), (oh, ow) = sizes
    gen = torch.Generator().manual_seed(ih * 100 + ow)
    x = torch.randn(2, 3, ih, iw, generator=gen)
    g = torch.randn(2, 3, oh, ow, generator=gen)
    want = np.stack([[caffe_interp_backward_loop(g[n, c].numpy(), ih, iw) for c in range(3)] for n in range(2)])

    def grad(dtype, scatter=False):
        xt = x.to(dtype, copy=True).requires_grad_(True)
        with caffe.torch_interp() if scatter else contextlib.nullcontext():
            caffe.interp_gather(xt, (oh, ow)).backward(g.to(dtype))
        return xt.grad

    got = grad(torch.float32)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))
    np.testing.assert_allclose(grad(torch.float32, scatter=True).numpy(), want, rtol=0,
                               atol=1e-5 * max(1.0, np.abs(want).max()))
    torch.testing.assert_close(grad(torch.float64), torch.from_numpy(want), rtol=1e-12, atol=1e-12)
    err_new = (grad(torch.bfloat16).double() - torch.from_numpy(want)).abs().max()
    err_old = (grad(torch.bfloat16, scatter=True).double() - torch.from_numpy(want)).abs().max()
    assert err_new <= err_old
    # a non-finite gradient: the same sources as Caffe's loop
    g[0, 1, oh // 2, ow // 3] = float("inf")
    g[1, 2, oh - 1, ow - 1] = float("nan")
    want = np.stack([[caffe_interp_backward_loop(g[n, c].numpy(), ih, iw) for c in range(3)] for n in range(2)])
    got = grad(torch.float32)
    assert np.array_equal(np.isnan(got.numpy()), np.isnan(want)) and np.array_equal(np.isinf(got.numpy()),
                                                                                   np.isinf(want))


def test_interp_backward_twice_differentiable():
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: caffe.interp_gather(t, (13, 4)), (x,))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_interp_backward_equals_cpu_and_is_deterministic(dtype):
    """The gather-form Interp backward on the GPU: the CPU's values (the same tables and order of sums;
    float32 within rounding of fused multiply-adds), the same bits on a rerun, channels_last too."""
    x = torch.randn(3, 64, 31, 21)
    g = torch.randn(3, 64, 41, 41)
    grads = []
    for dev, fmt in (("cpu", torch.contiguous_format), ("cuda", torch.contiguous_format), ("cuda", torch.contiguous_format),
                     ("cuda", torch.channels_last)):
        xt = x.to(dev, dtype, copy=True).contiguous(memory_format=fmt).requires_grad_(True)
        caffe.interp_gather(xt, (41, 41)).backward(g.to(dev, dtype).contiguous(memory_format=fmt))
        grads.append(xt.grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[1].cpu(), grads[0], rtol=tol, atol=tol)
    assert torch.equal(grads[1], grads[2])
    torch.testing.assert_close(grads[3], grads[1], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------- scales
def test_scale_params_and_sizes():
    assert caffe.scale_interp_params(1.0) is None
    assert caffe.scale_interp_params(0.75) == InterpParams(shrink_factor=4, zoom_factor=3)
    assert caffe.scale_interp_params(0.5) == InterpParams(shrink_factor=2)
    assert caffe.scaled_input_shape((321, 321), 0.75) == (241, 241)
    assert caffe.scaled_input_shape((321, 321), 0.5) == (161, 161)
    assert caffe.scaled_input_shape((513, 513), 0.75) == (385, 385)
    assert caffe.scaled_input_shape((513, 513), 0.5) == (257, 257)
    assert caffe.scaled_input_shape((321, 513), 0.6) == (193, 308)  # floor(320*.6)+1, floor(512*.6)+1
    with pytest.raises(ValueError):
        caffe.scale_interp_params(1.5)
    with pytest.raises(ValueError, match="hw"):
        caffe.scale_interp_params(0.6)


# ----------------------------------------------------------------------------------------- labels
def test_shrink_label_integral_ratios_pick_the_interp_pixels():
    g = torch.Generator().manual_seed(1)
    lab = torch.randint(0, 21, (2, 321, 321), generator=g)
    lab[:, 100:140] = 255
    assert torch.equal(caffe.shrink_label(lab, 41), lab[:, ::8, ::8])
    assert torch.equal(caffe.shrink_label(lab, 21), lab[:, ::16, ::16])
    big = torch.randint(0, 21, (1, 513, 513), generator=g)
    assert torch.equal(caffe.shrink_label(big, (65, 33)), big[:, ::8, ::16])
    # Caffe's bilinear Interp on the float label blob gives the same ids when the ratio is integral
    as_float = caffe.interp(lab[:, None].float(), InterpParams(shrink_factor=8))[:, 0]
    assert torch.equal(as_float.long(), caffe.shrink_label(lab, 41))


def test_shrink_label_nonintegral_is_nearest_on_interp_grid():
    # 321 -> 31: positions 320/30 * j = 0, 10.67, 21.33, 32, ... -> rows 0, 11, 21, 32, ...
    idx = caffe.label_sample_indices(321, 31)
    assert idx[:5].tolist() == [0, 11, 21, 32, 43]
    assert idx[-1].item() == 320
    lab = torch.arange(321)[None, :, None].expand(1, 321, 5).contiguous()
    lab4 = lab[:, None]
    out = caffe.shrink_label(lab4, (31, 5))
    assert out.shape == (1, 1, 31, 5) and out.dtype == torch.int64
    assert out[0, 0, :5, 0].tolist() == [0, 11, 21, 32, 43]
    assert set(caffe.shrink_label(torch.full((1, 9, 9), 255), 4).unique().tolist()) == {255}
    with pytest.raises(TypeError):
        caffe.shrink_label(lab.float(), 5)
    with pytest.raises(ValueError):
        caffe.shrink_label(torch.zeros(5, 5, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------------ image
def test_bgr_mean_preprocess():
    assert caffe.MEAN_BGR == (104.008, 116.669, 122.675)
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 104, 117, 200  # B, G, R
    x = caffe.preprocess_bgr(img)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    f = np.float32  # Caffe's DataTransformer subtracts in Dtype (float32)
    assert x[0, :, 0, 0].tolist() == [float(f(104) - f(104.008)), float(f(117) - f(116.669)), float(f(200) - f(122.675))]
    rgb = img[..., ::-1]
    assert np.array_equal(caffe.rgb_to_bgr(rgb), img)
    with pytest.raises(ValueError):
        caffe.preprocess_bgr(np.zeros((4, 4), np.uint8))


def test_all_exports_exist():
    for name in caffe.__all__:
        assert hasattr(caffe, name), name
    assert list(itertools.chain(caffe.__all__))
