"""attnscale.ops.caffe_max_pool2d (Caffe MAX Pooling forward, CPU and CUDA): bit-identical to the F.max_pool2d
path of attnscale.caffe.pool2d over kernels, strides, pads and sizes (every border case of Caffe's
size rule), Caffe's NaN rule, the dispatch inside pool2d, and its input checks; the CUDA kernel against the
CPU one.  The training pair (caffe_max_pool2d_with_mask / caffe_max_pool2d_backward, through
caffe_max_pool2d_train): values and gradients against F.max_pool2d's, the mask, opcheck, gradcheck, checks;
its CUDA kernels against the CPU ones."""
import pytest
import torch

from attnscale import caffe
from attnscale.ops import has_extension
from attnscale.ops.pooling import (caffe_ave_pool2d, caffe_max_pool2d, caffe_max_pool2d_applies, caffe_max_pool2d_train,
                                   caffe_max_pool2d_train_applies)

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

CONFIGS = [(3, 2, 1), (3, 1, 1), (2, 2, 0), (3, 3, 0), (5, 2, 2), (3, 2, 0), (2, 1, 0), (4, 3, 1)]


@pytest.mark.parametrize("k,s,p", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_torch_path(k, s, p, dtype):
    """pool2d without a gradient (the C++ kernel; half types compared in float32) == pool2d with one
    (F.max_pool2d), bit for bit."""
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    checked = 0
    for h in range(1, 14):
        for w in (1, 2, 3, 5, 8, 17, 33, 40):
            x = torch.randn(2, 3, h, w, generator=gen).to(dtype)
            try:
                ref = caffe.pool2d(x.clone().requires_grad_(), k, s, p, "max").detach()
            except ValueError:  # Caffe's size rule refuses this one
                continue
            assert caffe_max_pool2d_applies(x)
            got = caffe.pool2d(x, k, s, p, "max")
            assert torch.equal(got, ref), (k, s, p, h, w)
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deeplab_sizes_and_ties(dtype):
    """pool1 at 513 (stride 2) and pool4 at 65 (stride 1), on data with many ties (few distinct values)."""
    for c, hw, s in ((4, 513, 2), (8, 65, 1)):
        x = torch.randint(0, 4, (1, c, hw, hw)).to(dtype)
        oh, ow = caffe.pool_output_shape((hw, hw), 3, s, 1)
        ref = caffe.pool2d(x.clone().requires_grad_(), 3, s, 1, "max").detach()
        assert torch.equal(caffe_max_pool2d(x, 3, s, 1, (oh, ow)), ref)


def test_nan_never_wins():
    """Caffe's `if (bottom > top)`: a NaN never replaces the running maximum."""
    x = torch.tensor([[[[1.0, float("nan"), 3.0], [0.0, 2.0, float("nan")], [5.0, 0.0, 1.0]]]])
    out = caffe_max_pool2d(x, 3, 1, 1, (3, 3))
    assert not torch.isnan(out).any()
    assert out[0, 0, 1, 1].item() == 5.0


def test_dispatch_keeps_gradients():
    x = torch.randn(1, 2, 9, 9, requires_grad=True)
    assert not caffe_max_pool2d_applies(x)
    y = caffe.pool2d(x, 3, 2, 1, "max")
    y.sum().backward()
    assert x.grad is not None and x.grad.sum().item() == y.numel()  # one winner per window
    with torch.no_grad():
        assert caffe_max_pool2d_applies(x)


@pytest.mark.parametrize("call,match", [
    (lambda: caffe_max_pool2d(torch.randn(3, 8, 8), 3, 2, 1, (4, 4)), "4-D"),
    (lambda: caffe_max_pool2d(torch.randn(1, 1, 8, 8).to(torch.float8_e4m3fn), 3, 2, 1, (4, 4)),
     "float32, float64, bfloat16 or float16"),
    (lambda: caffe_max_pool2d(torch.randn(1, 1, 8, 8), 3, 2, 3, (4, 4)), "pad < kernel"),
    (lambda: caffe_max_pool2d(torch.randn(1, 1, 8, 8), 3, 2, 1, (9, 4)), "outside the input"),
    (lambda: caffe_max_pool2d(torch.randn(1, 1, 8, 8), 3, 2, 1, (0, 4)), "empty"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_forward_only_and_argument_bounds():
    """No silent gradient loss: a backward through the op is an error.  Arguments are bounded before any
    int arithmetic (kernel 2^32 + 3 was truncated to 3; stride 2^62 + 1 wrapped the window check), and a
    kernel reaching past the image pools the clipped window, as Caffe does."""
    x = torch.randn(1, 1, 5, 5)
    y = caffe_max_pool2d(x.clone().requires_grad_(), 3, 1, 1, (5, 5))
    with pytest.raises(RuntimeError, match="forward only"):
        y.sum().backward()
    for args in ((2 ** 32 + 3, 1, 0, (1, 1)), (2, 2 ** 62 + 1, 0, (3, 3)), (2 ** 31 + 1, 1, 0, (1, 1))):
        with pytest.raises(ValueError, match="more than 16777216"):
            caffe_max_pool2d(x, *args)
    assert caffe_max_pool2d(x, 1000, 1, 0, (1, 1)).item() == x.max().item()


def test_ave_op_checks_dispatch_and_switch(monkeypatch):
    """caffe_ave_pool2d: opcheck; bad inputs raise naming the op; forward only; a kernel reaching past the image
    keeps Caffe's divisor (the padding the whole window reaches counts: not clipped like MAX's kernel);
    pool2d takes it only without a gradient on the CPU, never within caffe.torch_max_pool()."""
    x = torch.randn(2, 3, 9, 11)
    torch.library.opcheck(torch.ops.attnscale.caffe_ave_pool2d.default, (x, 3, 2, 1, 5, 6))
    for args, match in (((torch.randn(3, 8, 8), 3, 2, 1, (4, 4)), "caffe_ave_pool2d: x must be 4-D"),
                        ((torch.ones(1, 1, 8, 8, dtype=torch.int32), 3, 2, 1, (4, 4)), "caffe_ave_pool2d: x dtype"),
                        ((x, 3, 2, 3, (4, 4)), "pad < kernel"), ((x, 2 ** 32 + 3, 1, 0, (1, 1)), "more than")):
        with pytest.raises(ValueError, match=match):
            caffe_ave_pool2d(*args)
    with pytest.raises(RuntimeError, match="forward only"):
        caffe_ave_pool2d(x.clone().requires_grad_(), 3, 1, 1, (9, 11)).sum().backward()
    big = torch.ones(1, 1, 3, 3)  # kernel 7, pad 2 on 3x3: one window of 7x7 clipped to [-2, 5): 49 / 49
    assert caffe_ave_pool2d(big, 7, 1, 2, (1, 1)).item() == pytest.approx(9 / 49)
    assert caffe.ave_pool_divisor(3, 7, 1, 2) == [7]
    # the largest geometry the checks admit: a divisor of 2^48 without int overflow (Caffe's int would wrap)
    assert caffe_ave_pool2d(torch.ones(1, 1, 1, 1), 2 ** 24, 2 ** 24, 2 ** 24 - 1, (1, 1)).item() == 2.0 ** -48
    calls = []
    real = caffe.caffe_ave_pool2d
    monkeypatch.setattr(caffe, "caffe_ave_pool2d", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        caffe.pool2d(x, 3, 1, 1, "ave")
        with caffe.torch_max_pool():
            caffe.pool2d(x, 3, 1, 1, "ave")
        y = caffe.pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1, "ave")  # F.avg_pool2d keeps it
        assert y.is_contiguous(memory_format=torch.channels_last)
    caffe.pool2d(x.requires_grad_(), 3, 1, 1, "ave").sum().backward()
    assert calls == [1] and x.grad is not None


# ------------------------------------------------------------------------------------------- training
def _train_cases(k, s, p, gen, sizes_h=range(1, 12), sizes_w=(1, 2, 5, 8, 17), channels=3):
    """(x, out_hw) over sizes Caffe's rule accepts, integer values (many ties), x (2, channels, h, w) float64."""
    for h in sizes_h:
        for w in sizes_w:
            try:
                oh, ow = caffe.pool_output_shape((h, w), k, s, p)
            except ValueError:
                continue
            if (oh - 1) * s - p >= h or (ow - 1) * s - p >= w:
                continue
            yield torch.randint(-3, 4, (2, channels, h, w), generator=gen).double(), (oh, ow)


@pytest.mark.parametrize("k,s,p", CONFIGS)
def test_train_op_equals_torch_values_and_gradients(k, s, p):
    """caffe_max_pool2d_train's output and gradient == pool2d's F.max_pool2d path, bit for bit, on data full of
    ties (the gradient goes to the first maximum in row-major order in both), every border case; float32 and
    float64; the mask names the winner's offset in its window (the kernel clipped to max(H, W) + pad)."""
    gen = torch.Generator().manual_seed(7 + k * 100 + s * 10 + p)
    checked = 0
    for x, (oh, ow) in _train_cases(k, s, p, gen):
        for dtype in (torch.float64, torch.float32):
            xr = x.to(dtype).requires_grad_()
            ref = caffe.pool2d(xr, k, s, p, "max")  # F.max_pool2d on the CPU
            g = torch.randn(ref.shape, generator=gen, dtype=dtype)
            want, = torch.autograd.grad(ref, xr, g)
            y = caffe_max_pool2d_train(xr, k, s, p, (oh, ow))
            got, = torch.autograd.grad(y, xr, g)
            assert torch.equal(y.detach(), ref.detach()) and torch.equal(got, want), (k, s, p, tuple(x.shape), dtype)
        out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x, k, s, p, oh, ow)
        assert mask.dtype == torch.uint8 and mask.shape == out.shape
        i = torch.arange(oh).view(-1, 1)
        j = torch.arange(ow).view(1, -1)
        ke = min(k, max(x.shape[2:]) + p)  # the kernel as the op clips it (the same windows)
        h = i * s - p + mask.long() // ke
        w = j * s - p + mask.long() % ke
        assert torch.equal(x[torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), h, w], out)
        checked += 1
    assert checked > 10


def test_train_op_nan_rule_and_gradcheck():
    """Caffe's rule: a NaN never wins; a window of NaNs gives -inf and mask 255 (Caffe's maxidx -1), and its
    gradient goes nowhere.  gradcheck on distinct values."""
    x = torch.tensor([[[[1.0, float("nan"), 3.0], [0.0, 2.0, float("nan")], [5.0, 0.0, 1.0]]]], dtype=torch.float64)
    out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x, 3, 1, 1, 3, 3)
    assert not torch.isnan(out).any() and out[0, 0, 1, 1].item() == 5.0 and mask[0, 0, 1, 1].item() == 6
    xn = torch.full((1, 1, 4, 4), float("nan"), dtype=torch.float64)
    xn[0, 0, 3, 3] = 1.0
    xn.requires_grad_()
    y = caffe_max_pool2d_train(xn, 2, 2, 0, (2, 2))
    assert y[0, 0, 0, 0].item() == float("-inf") and y[0, 0, 1, 1].item() == 1.0
    assert torch.ops.attnscale.caffe_max_pool2d_with_mask(xn.detach(), 2, 2, 0, 2, 2)[1][0, 0, 0, 0].item() == 255
    g, = torch.autograd.grad(y, xn, torch.ones_like(y))
    assert g.sum().item() == 1.0 and g[0, 0, 3, 3].item() == 1.0
    xd = torch.randperm(2 * 3 * 9 * 11).reshape(2, 3, 9, 11).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: caffe_max_pool2d_train(t, 3, 2, 1, (5, 6)), (xd,))


def test_train_opcheck():
    x = torch.randperm(2 * 3 * 9 * 11).reshape(2, 3, 9, 11).float().requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.caffe_max_pool2d_with_mask.default, (x, 3, 2, 1, 5, 6))
    out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x.detach(), 3, 2, 1, 5, 6)
    torch.library.opcheck(torch.ops.attnscale.caffe_max_pool2d_backward.default,
                          (torch.randn(2, 3, 5, 6), mask, 3, 2, 1, 9, 11))


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.attnscale.caffe_max_pool2d_with_mask(torch.randn(1, 1, 40, 40), 16, 1, 0, 25, 25),
     "uint8 mask holds"),
    (lambda: torch.ops.attnscale.caffe_max_pool2d_with_mask(torch.randn(1, 1, 8, 8).half(), 3, 2, 1, 4, 4),
     "float32 or float64"),
    (lambda: torch.ops.attnscale.caffe_max_pool2d_with_mask(torch.randn(8, 8), 3, 2, 1, 4, 4), "4-D"),
    (lambda: torch.ops.attnscale.caffe_max_pool2d_backward(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4),
                                                           3, 2, 1, 8, 8), "mask must be uint8"),
    (lambda: torch.ops.attnscale.caffe_max_pool2d_backward(torch.randn(1, 1, 4, 4),
                                                           torch.zeros(1, 1, 4, 3, dtype=torch.uint8),
                                                           3, 2, 1, 8, 8), "of one shape"),
    (lambda: torch.ops.attnscale.caffe_max_pool2d_backward(torch.randn(1, 1, 4, 4),
                                                           torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
                                                           3, 2, 1, 2, 8), "outside the input"),
])
def test_train_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_train_dispatch_on_cpu():
    """On the CPU training keeps F.max_pool2d (the op's CPU kernels are its CUDA kernels' twin): NaN propagates
    as torch does."""
    x = torch.randn(1, 2, 9, 9)
    x[0, 0, 4, 4] = float("nan")
    assert not caffe_max_pool2d_train_applies(x, 3)
    assert torch.isnan(caffe.pool2d(x.requires_grad_(), 3, 2, 1, "max")).any()


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("k,s,p", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_equals_cpu(k, s, p, dtype, channels_last):
    """The CUDA kernel (a thread per output, NCHW or channels_last) gives the CPU kernel's values bit for bit
    (a maximum is one of the inputs; half / bfloat16 compared on the CPU in float32, which keeps their order),
    with many ties and NaNs among the values, the output in the input's layout."""
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    checked = 0
    for h in (1, 2, 5, 8, 13, 33):
        for w in (1, 3, 8, 17, 40):
            try:
                oh, ow = caffe.pool_output_shape((h, w), k, s, p)
                if (oh - 1) * s - p >= h or (ow - 1) * s - p >= w:
                    continue
            except ValueError:
                continue
            x = torch.randint(-3, 4, (2, 5, h, w), generator=gen).to(dtype)
            x[0, 1, h // 2, w // 2] = float("nan")
            xd = x.cuda()
            if channels_last:
                xd = xd.contiguous(memory_format=torch.channels_last)
            got = caffe_max_pool2d(xd, k, s, p, (oh, ow))
            assert got.dtype == dtype and got.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            want = caffe_max_pool2d(x.to(ref_dtype), k, s, p, (oh, ow))
            assert torch.equal(got.cpu().to(ref_dtype), want), (k, s, p, h, w)
            checked += 1
    assert checked > 10


@pytest.mark.cuda
def test_cuda_pool2d_dispatch_and_checks():
    """pool2d on a GPU without a gradient takes the CUDA kernel (Caffe's NaN rule: a NaN never wins, where
    F.max_pool2d would propagate it); with a gradient the training pair, the same rule (F.max_pool2d only
    under caffe.torch_max_pool()).  Bad dtypes are refused by name."""
    x = torch.randn(1, 2, 9, 9, device="cuda")
    x[0, 0, 4, 4] = float("nan")
    with torch.no_grad():
        assert caffe_max_pool2d_applies(x)
        y = caffe.pool2d(x, 3, 2, 1, "max")
    assert not torch.isnan(y).any()
    xg = x.clone().requires_grad_()
    assert not caffe_max_pool2d_applies(xg) and caffe_max_pool2d_train_applies(xg, 3)
    yg = caffe.pool2d(xg, 3, 2, 1, "max")
    assert torch.equal(yg, y) and yg.requires_grad
    with caffe.torch_max_pool():
        assert torch.isnan(caffe.pool2d(xg, 3, 2, 1, "max")).any()
    with pytest.raises(ValueError, match="not supported on CUDA"):
        caffe_max_pool2d(torch.ones(1, 1, 8, 8, device="cuda", dtype=torch.int32), 3, 2, 1, (4, 4))
    with pytest.raises(ValueError, match="outside the input"):
        caffe_max_pool2d(x, 3, 2, 1, (9, 4))


def test_torch_max_pool_switch(monkeypatch):
    """caffe.torch_max_pool() (bench_e2e's comparison) sends MAX pooling to F.max_pool2d inside the block only."""
    x = torch.randn(1, 2, 9, 9)
    want = caffe.pool2d(x, 3, 2, 1, "max")
    monkeypatch.setattr(caffe, "caffe_max_pool2d", lambda *a: pytest.fail("the inference kernel was called"))
    with torch.no_grad(), caffe.torch_max_pool():
        assert torch.equal(caffe.pool2d(x, 3, 2, 1, "max"), want)
    with pytest.raises(pytest.fail.Exception):
        caffe.pool2d(x, 3, 2, 1, "max")


@pytest.mark.cuda
@pytest.mark.parametrize("k,s,p", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_train_equals_cpu(k, s, p, dtype, channels_last):
    """The CUDA training kernels (forward with mask: a thread per output; backward: a gather per input) give the
    CPU kernels' output, mask and gradient bit for bit (half types computed on the CPU in float32 from the same
    values: the maximum is a copy, the gradient a float sum of the same terms in the same order, rounded
    once), NaNs among the inputs, outputs and gradients in the input's layout."""
    gen = torch.Generator().manual_seed(11 + k * 100 + s * 10 + p)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    checked = 0
    for x, (oh, ow) in _train_cases(k, s, p, gen, sizes_h=(1, 2, 5, 8, 13, 33), sizes_w=(1, 3, 8, 17, 40)):
        x = x.to(dtype)
        x[0, 1, x.shape[2] // 2, x.shape[3] // 2] = float("nan")
        xd = x.cuda().contiguous(memory_format=fmt)
        out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(xd, k, s, p, oh, ow)
        assert out.is_contiguous(memory_format=fmt) and mask.is_contiguous(memory_format=fmt)
        want, want_mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x.to(ref_dtype), k, s, p, oh, ow)
        assert torch.equal(out.cpu().to(ref_dtype), want) and torch.equal(mask.cpu(), want_mask), (k, s, p, x.shape)
        g = torch.randn(out.shape, generator=gen).to(dtype)
        gx = torch.ops.attnscale.caffe_max_pool2d_backward(g.cuda().contiguous(memory_format=fmt), mask, k, s, p,
                                                           x.shape[2], x.shape[3])
        assert gx.dtype == dtype and gx.is_contiguous(memory_format=fmt)
        want_gx = torch.ops.attnscale.caffe_max_pool2d_backward(g.to(ref_dtype), want_mask, k, s, p, x.shape[2],
                                                                x.shape[3]).to(dtype)
        assert torch.equal(gx.cpu(), want_gx), (k, s, p, x.shape)
        checked += 1
    assert checked > 10


def _nhwc_at(x: torch.Tensor, offset: int, device) -> torch.Tensor:
    """x in channels_last on device, its data starting `offset` elements into a fresh buffer (0: aligned)."""
    N, C, H, W = x.shape
    buf = torch.empty(offset + x.numel(), dtype=x.dtype, device=device)
    t = buf[offset:].view(N, H, W, C).permute(0, 3, 1, 2)
    t.copy_(x)
    return t


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "off"])
def test_cuda_nhwc_vector_kernels_equal_cpu(dtype, offset):
    """channels_last with C = 64 (the model's case): the kernels that take 16 bytes of channels per thread
    (aligned) and the per-element ones (pointers off a 16-byte boundary) give the CPU kernels' output, mask and
    gradient bit for bit, ties and NaNs among the values; inference too."""
    gen = torch.Generator().manual_seed(5 + offset)
    ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    for k, s, p in ((3, 2, 1), (3, 1, 1), (2, 2, 0)):
        for h, w in ((33, 40), (8, 17), (2, 3)):
            oh, ow = caffe.pool_output_shape((h, w), k, s, p)
            if (oh - 1) * s - p >= h or (ow - 1) * s - p >= w:
                continue
            x = torch.randint(-3, 4, (2, 64, h, w), generator=gen).to(dtype)
            x[1, 9, h // 2, w // 2] = float("nan")
            xd = _nhwc_at(x, offset, "cuda")
            got = caffe_max_pool2d(xd, k, s, p, (oh, ow))
            want = caffe_max_pool2d(x.to(ref_dtype), k, s, p, (oh, ow))
            assert torch.equal(got.cpu().to(ref_dtype).nan_to_num(7), want.nan_to_num(7)), (k, s, p, h, w)
            out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(xd, k, s, p, oh, ow)
            want, want_mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x.to(ref_dtype), k, s, p, oh, ow)
            assert torch.equal(out.cpu().to(ref_dtype).nan_to_num(7), want.nan_to_num(7))
            assert torch.equal(mask.cpu(), want_mask), (k, s, p, h, w)
            g = torch.randn(out.shape, generator=gen).to(dtype)
            gx = torch.ops.attnscale.caffe_max_pool2d_backward(_nhwc_at(g, offset, "cuda"), mask, k, s, p, h, w)
            want_gx = torch.ops.attnscale.caffe_max_pool2d_backward(g.to(ref_dtype), want_mask, k, s, p, h, w)
            assert torch.equal(gx.cpu(), want_gx.to(dtype)), (k, s, p, h, w)
    # which kernels ran: the vector ones exactly when aligned
    xd = _nhwc_at(torch.randn(2, 64, 9, 9).to(dtype), offset, "cuda")

    def three():
        caffe_max_pool2d(xd, 3, 2, 1, (5, 5))
        out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(xd, 3, 2, 1, 5, 5)
        torch.ops.attnscale.caffe_max_pool2d_backward(_nhwc_at(torch.ones(2, 64, 5, 5).to(dtype), offset, "cuda"),
                                                      mask, 3, 2, 1, 9, 9)
    names = [n for n in cuda_kernel_names(three) if "max_pool" in n]
    assert len(names) == 3 and all(("vec_kernel" in n) == (offset == 0) for n in names), names


def cuda_kernel_names(fn) -> list:
    """The CUDA kernels fn launches, by the profiler (names as the driver reports them)."""
    from torch.autograd import DeviceType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


@pytest.mark.cuda
def test_cuda_train_dispatch_opcheck_and_checks():
    """pool2d on a GPU with a gradient takes caffe_max_pool2d_train: values equal F.max_pool2d's
    (caffe.torch_max_pool()) on finite bf16 channels_last data at pool1's geometry, gradients in the same
    places (ties included) and equal up to bf16 rounding (PyTorch's sum order is its own); opcheck on CUDA; bad
    dtypes refused by name."""
    x = torch.randint(-3, 4, (2, 16, 41, 41), device="cuda").to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert caffe_max_pool2d_train_applies(x, 3)
    y = caffe.pool2d(x, 3, 2, 1, "max")
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    with caffe.torch_max_pool():
        yr = caffe.pool2d(x, 3, 2, 1, "max")
    gr, = torch.autograd.grad(yr, x, g)
    assert torch.equal(y, yr) and torch.equal(gx != 0, gr != 0)
    torch.testing.assert_close(gx.float(), gr.float(), rtol=1e-2, atol=1e-2)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    xf = torch.randperm(2 * 3 * 9 * 11, device="cuda").reshape(2, 3, 9, 11).float().requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.caffe_max_pool2d_with_mask.default, (xf, 3, 2, 1, 5, 6))
    with pytest.raises(ValueError, match="not supported on CUDA"):
        torch.ops.attnscale.caffe_max_pool2d_with_mask(torch.ones(1, 1, 8, 8, device="cuda", dtype=torch.int32),
                                                       3, 2, 1, 4, 4)
