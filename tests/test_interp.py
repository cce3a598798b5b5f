"""attnscale.ops.caffe_interp (DeepLab Interp forward, CPU and CUDA): bit-identical to the index_select path of
attnscale.caffe.interp (which it serves when no gradient is needed) over zooms, shrinks, equal sizes, size-1
axes and Caffe's cropping, the dispatch inside interp, and its input checks; on CUDA in every dtype and both
layouts, and as the forward of interp_gather's autograd Function."""
import pytest
import torch

from attnscale import caffe
from attnscale.ops import has_extension
from attnscale.ops.interp import caffe_interp, caffe_interp_applies
from tests.test_max_pool import cuda_kernel_names

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

SIZES = [1, 2, 3, 5, 8, 21, 31, 33, 41, 49, 65]


def grad_path(x, size):
    """caffe.interp through its differentiable index_select path (x requires grad)."""
    return caffe.interp(x.clone().requires_grad_(), size).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_index_select_path(dtype):
    """The CPU kernel == the differentiable index_select path bit for bit (half types: every product and sum
    rounded to the dtype, as the path's tensor ops round them)."""
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for hin in SIZES:
        for hout in SIZES:
            win, wout = SIZES[(SIZES.index(hin) + 3) % len(SIZES)], SIZES[(SIZES.index(hout) + 5) % len(SIZES)]
            x = torch.randn(2, 3, hin, win, generator=gen).to(dtype)
            assert caffe_interp_applies(x)
            got = caffe.interp(x, (hout, wout))
            assert got.shape == (2, 3, hout, wout)
            assert torch.equal(got, grad_path(x, (hout, wout))), (hin, win, hout, wout)
            checked += 1
    assert checked == len(SIZES) ** 2


def test_deeplab_resizes():
    """predict's zoom 8 (65 -> 513), the input scales (513 -> 385 by shrink 4 + zoom 3, 513 -> 257) and the
    attention head's fc7 resize (49 -> 65), plus a cropping Interp (pad_end -2)."""
    gen = torch.Generator().manual_seed(1)
    cases = [((1, 21, 65, 65), caffe.InterpParams(zoom_factor=8)),
             ((1, 3, 513, 513), caffe.scale_interp_params(0.75, (513, 513))),
             ((1, 3, 513, 513), caffe.scale_interp_params(0.5, (513, 513))),
             ((1, 16, 49, 49), (65, 65)),
             ((2, 4, 30, 27), caffe.InterpParams(zoom_factor=2, pad_end=-2))]
    for shape, spec in cases:
        x = torch.randn(*shape, generator=gen)
        got = caffe.interp(x, spec)
        assert torch.equal(got, grad_path(x, spec)), (shape, spec)
    # the corners are copied exactly (aligned corners) and a constant map stays constant
    x = torch.full((1, 1, 9, 7), 0.3)
    y = caffe_interp(x, (17, 25))
    torch.testing.assert_close(y, torch.full_like(y, 0.3), rtol=0, atol=1e-7)
    z = torch.randn(1, 2, 9, 7, generator=gen)
    w = caffe_interp(z, (17, 25))
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert torch.equal(w[..., i, j], z[..., i, j])


def test_dispatch():
    """With a gradient interp stays differentiable (the index_select path); without, the kernel runs."""
    x = torch.randn(1, 2, 5, 6, requires_grad=True)
    assert not caffe_interp_applies(x)
    y = caffe.interp(x, (9, 11))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert caffe_interp_applies(x)
    assert caffe_interp_applies(torch.zeros(1, 2, 5, 6, dtype=torch.float16))
    assert not caffe_interp_applies(torch.zeros(1, 2, 5, 6, dtype=torch.int32))
    assert not caffe_interp_applies(torch.zeros(2, 5, 6))


def test_same_size_is_a_copy():
    x = torch.randn(1, 2, 5, 6)
    y = torch.ops.attnscale.caffe_interp(x, 5, 6)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_one_axis_unchanged_still_blends():
    """Caffe copies only when both sizes are unchanged: an axis that keeps its size alone still blends, its
    second tap (the next pixel) at weight 0, so an infinite neighbour gives NaN (0 * inf) as in Caffe and the
    index_select path, where a per-axis copy would not."""
    x = torch.randn(1, 2, 5, 7)
    x[0, 0, 2, 3] = float("inf")
    for size in ((5, 13), (9, 7)):
        got, want = torch.ops.attnscale.caffe_interp(x, *size), caffe._interp_blend(x, size)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.ops.attnscale.caffe_interp(x, 9, 7)[0, 0, 3, 2].isnan()  # 0 * inf from the row below


def test_input_errors():
    op = torch.ops.attnscale.caffe_interp
    with pytest.raises(ValueError, match="4-D"):
        op(torch.zeros(2, 5, 6), 3, 3)
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(1, 1, 5, 6, dtype=torch.int32), 3, 3)
    with pytest.raises(ValueError, match="output size"):
        op(torch.zeros(1, 1, 5, 6), 0, 3)
    with pytest.raises(ValueError, match="empty spatial size"):
        op(torch.zeros(1, 1, 0, 6), 3, 3)


def test_opcheck():
    x = torch.randn(2, 3, 7, 5)
    torch.library.opcheck(torch.ops.attnscale.caffe_interp, (x, 13, 9), test_utils=("test_schema", "test_faketensor"))


def test_forward_only():
    """A backward through ``caffe_interp`` is an error, not a silently missing gradient."""
    y = caffe_interp(torch.randn(1, 2, 4, 4, requires_grad=True), (7, 7))
    with pytest.raises(RuntimeError, match="forward only"):
        y.sum().backward()


BACKWARD_CASES = [((31, 21), (41, 41)), ((5, 7), (13, 9)), ((8, 8), (4, 3)), ((13, 10), (7, 9)), ((1, 6), (4, 1))]


def _tables(ih, iw, oh, ow, dtype, device="cpu"):
    return (caffe.host_constants(caffe._interp_adjoint_tables, ih, oh, dtype, device=device)
            + caffe.host_constants(caffe._interp_adjoint_tables, iw, ow, dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_op_equals_adjoint_path(dtype):
    """caffe_interp_backward (the GPU backward's CPU twin) == interp_gather's index_select adjoint (the same
    tables, slots and order; fused multiply-adds), shrinks with unreferenced sources (gradient 0) included."""
    gen = torch.Generator().manual_seed(3)
    for (ih, iw), (oh, ow) in BACKWARD_CASES:
        g = torch.randn(2, 3, oh, ow, generator=gen, dtype=dtype)
        want = caffe._interp_adjoint(caffe._interp_adjoint(g, -1, iw, dtype), -2, ih, dtype)
        got = torch.ops.attnscale.caffe_interp_backward(g, *_tables(ih, iw, oh, ow, dtype))
        assert got.shape == (2, 3, ih, iw)
        torch.testing.assert_close(got, want)
        x = torch.randn(2, 3, ih, iw, dtype=dtype, requires_grad=True)
        y = caffe.interp_gather(x, (oh, ow))
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], got)


def test_backward_op_checks_and_opcheck():
    g = torch.randn(1, 2, 13, 9)
    t = _tables(5, 7, 13, 9, torch.float32)
    torch.library.opcheck(torch.ops.attnscale.caffe_interp_backward, (g, *t), test_utils=("test_schema", "test_faketensor"))
    op = torch.ops.attnscale.caffe_interp_backward
    with pytest.raises(ValueError, match="4-D floating-point"):
        op(g[0], *t)
    with pytest.raises(ValueError, match="idx_h must be an int64"):
        op(g, t[0].int(), *t[1:])
    with pytest.raises(ValueError, match="coef_w"):
        op(g, *t[:3], t[3].double())
    with pytest.raises(ValueError, match="contiguous"):
        op(g, t[0], t[1], t[2].t().contiguous().t(), t[3].t().contiguous().t())
    with pytest.raises(ValueError, match="float32 or float64"):
        op(g.half(), *t)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last,channels", [(False, 5), (True, 5), (True, 16)], ids=["nchw", "nhwc", "nhwc16"])
def test_cuda_equals_index_select_path(dtype, channels_last, channels):
    """The CUDA kernel == the index_select path run on the GPU (PyTorch's elementwise ops, each product and
    sum rounded to the dtype), bit for bit, every dtype and layout (the output in the input's; 16 channels in
    channels_last: the kernel that takes 16 bytes of channels per thread); float32 / float64 also == the CPU
    kernel."""
    gen = torch.Generator().manual_seed(2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    checked = 0
    for hin in SIZES:
        for hout in (1, 2, 31, 41, 65):
            win = SIZES[(SIZES.index(hin) + 3) % len(SIZES)]
            wout = (hout * 3) % 67 + 1
            if (hin, win) == (hout, wout):
                continue
            x = torch.randn(2, channels, hin, win, generator=gen).to(dtype)
            xd = x.cuda().contiguous(memory_format=fmt)
            with torch.no_grad():
                assert caffe_interp_applies(xd)
                got = caffe.interp(xd, (hout, wout))
            assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
            want = caffe._interp_blend(xd, (hout, wout))
            assert torch.equal(got, want), (hin, win, hout, wout, dtype)
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(got.cpu(), caffe_interp(x, (hout, wout))), (hin, win, hout, wout)
            checked += 1
    assert checked > 40
    x16 = torch.randn(2, channels, 31, 21, device="cuda").to(dtype).contiguous(memory_format=fmt)
    names = [n for n in cuda_kernel_names(lambda: caffe_interp(x16, (41, 41))) if "interp" in n]
    assert len(names) == 1 and ("vec_kernel" in names[0]) == (channels_last and channels == 16), names


@pytest.mark.cuda
def test_cuda_training_forward_uses_the_kernel(monkeypatch):
    """With a gradient on a GPU interp_gather's autograd Function takes its forward from the kernel (the
    index_select path's values) and keeps its gather-form backward (== autograd's backward of the
    index_select path, up to summation order); opcheck on CUDA in channels_last."""
    x = torch.randn(3, 64, 31, 21, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    calls = []

    def counted(t, out_hw):
        calls.append(tuple(out_hw))
        return caffe_interp(t, out_hw)

    monkeypatch.setattr(caffe, "caffe_interp", counted)
    xg = x.clone().requires_grad_()
    y = caffe.interp(xg, (41, 41))
    assert calls == [(41, 41)]
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, xg, g)
    xr = x.clone().requires_grad_()
    with caffe.torch_interp():
        yr = caffe.interp(xr, (41, 41))
    (gr,) = torch.autograd.grad(yr, xr, g)
    assert torch.equal(y, yr)
    # bf16: autograd's path rounds every product and sum (and adds atomically, in any order), the kernel once
    torch.testing.assert_close(gx.float(), gr.float(), rtol=2e-2, atol=5e-2)
    monkeypatch.undo()
    torch.library.opcheck(torch.ops.attnscale.caffe_interp, (x.float(), 41, 45),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="not supported on CUDA"):
        torch.ops.attnscale.caffe_interp(torch.zeros(1, 1, 5, 6, device="cuda", dtype=torch.int32), 3, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_backward_equals_cpu_op(dtype, channels_last, monkeypatch):
    """The CUDA caffe_interp_backward == the CPU one bit for bit (fmaf / fma in the same order; half types
    summed in float32 from the same values and tables and rounded once), the gradient in grad's layout, also
    from a channel slice of a wider gradient (read through its strides); and interp_gather's backward on a
    GPU runs it."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(5)
    for (ih, iw), (oh, ow) in BACKWARD_CASES:
        g = torch.randn(2, 8, oh, ow, generator=gen).to(dtype)
        got = torch.ops.attnscale.caffe_interp_backward(g.cuda().contiguous(memory_format=fmt),
                                                        *_tables(ih, iw, oh, ow, dtype, "cuda"))
        assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
        want = torch.ops.attnscale.caffe_interp_backward(g.to(ref_dtype), *_tables(ih, iw, oh, ow, dtype)).to(dtype)
        assert torch.equal(got.cpu(), want), ((ih, iw), (oh, ow))
        # a channel slice of a wider gradient (the attention concatenation's) is read in place, same result; in
        # channels_last at channel 8 of 24 by the kernel that takes 16 bytes of channels, at 3 of 14 per element
        for start, wide_c in ((3, 14), (8, 24)):
            wide = torch.full((2, wide_c, oh, ow), float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=fmt)
            wide[:, start:start + 8] = g.cuda()
            got = torch.ops.attnscale.caffe_interp_backward(wide[:, start:start + 8],
                                                            *_tables(ih, iw, oh, ow, dtype, "cuda"))
            assert torch.equal(got.cpu(), want) and got.is_contiguous(memory_format=fmt), ((ih, iw), (oh, ow), start)
            names = [n for n in cuda_kernel_names(lambda: torch.ops.attnscale.caffe_interp_backward(
                wide[:, start:start + 8], *_tables(ih, iw, oh, ow, dtype, "cuda"))) if "interp" in n]
            # the vector kernel needs the slice's start 16-byte aligned and its pixel stride a multiple of 16 bytes
            assert len(names) == 1 and ("vec_kernel" in names[0]) == (channels_last and start == 8), (names, start)
    calls = []
    real = torch.ops.attnscale.caffe_interp_backward
    monkeypatch.setattr(torch.ops.attnscale, "caffe_interp_backward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 8, 31, 21, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    caffe.interp_gather(x, (41, 41)).sum().backward()
    assert calls == [1] and x.grad.shape == x.shape
