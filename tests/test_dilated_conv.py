"""Tests of attnscale.ops.dilated_conv2d (Caffe Convolution, stride 1, dilation d, pad p, zero padding).

CPU tests run everywhere the extension is built; @pytest.mark.cuda tests compare the CUDA kernels
with F.conv2d at TF32 / bf16 / fp16 / fp64 tolerances (skipped without a GPU).  Tests that take the
``algo`` fixture run once per implementation (ATTNSCALE_DILATED_CONV_ALGO): the hand-written kernels
("direct", the CPU default) and the GEMMs over rectangles of live taps ("gemm", the CUDA default,
written with ATen ops, so it runs on a CPU too).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnscale.ops import dilated_conv2d, dilated_conv2d_reference, has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

# (N, C, O, H, W, k, dilation, padding)
SMALL_SHAPES = [
    (2, 4, 6, 13, 13, 3, 5, 5),   # the example
    (2, 3, 4, 9, 9, 3, 1, 1),     # attention head: 3x3 d=1 p=1
    (1, 3, 5, 10, 10, 3, 2, 2),   # conv5: 3x3 d=2 p=2
    (1, 2, 3, 5, 5, 3, 12, 12),   # only the centre tap is ever live
    (2, 3, 2, 7, 11, 3, 4, 4),    # H != W
    (1, 2, 3, 9, 6, 5, 2, 3),     # 5x5 kernel, padding != dilation
    (1, 2, 3, 4, 4, 3, 1, 4),     # border outputs with no live tap at all (bias only)
    (2, 3, 2, 6, 5, 1, 1, 0),     # 1x1 kernel
    (1, 2, 3, 8, 9, (3, 5), 3, 4),  # kh != kw
]


@pytest.fixture(params=["direct", "gemm"])
def algo(request, monkeypatch):
    monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", request.param)
    return request.param


def _rand(shape, dtype=torch.float64, device="cpu", grad=False):
    return torch.randn(shape, dtype=dtype, device=device, requires_grad=grad)


def _inputs(shape, dtype=torch.float64, device="cpu", bias=True, grad=False):
    n, c, o, h, w, k, d, p = shape
    x = _rand((n, c, h, w), dtype, device, grad)
    kh, kw = k if isinstance(k, tuple) else (k, k)
    wt = _rand((o, c, kh, kw), dtype, device, grad)
    b = _rand((o,), dtype, device, grad) if bias else None
    return x, wt, b, d, p


@pytest.mark.usefixtures("algo")
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_gradcheck_float64(shape):
    x, w, b, d, p = _inputs(shape, grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dilated_conv2d(x, w, b, d, p), (x, w, b))


@pytest.mark.usefixtures("algo")
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_conv2d_float64(shape, bias):
    x, w, b, d, p = _inputs(shape, bias=bias, grad=True)
    y = dilated_conv2d(x, w, b, d, p)
    ref = F.conv2d(x, w, b, padding=p, dilation=d)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = (x, w) + ((b,) if bias else ())
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("algo")
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_match_conv2d_float64(data):
    """Random batch, channel counts (off the kernels' block sizes), map sizes, kernel sizes,
    dilations and paddings: output and all three gradients equal F.conv2d's in float64."""
    n = data.draw(st.integers(1, 3), label="N")
    c = data.draw(st.integers(1, 37), label="C")
    o = data.draw(st.integers(1, 37), label="O")
    h = data.draw(st.integers(1, 18), label="H")
    w = data.draw(st.integers(1, 18), label="W")
    kh = data.draw(st.sampled_from([1, 3, 5]), label="kh")  # odd sizes only (a documented limit)
    kw = data.draw(st.sampled_from([1, 3, 5]), label="kw")
    d = data.draw(st.integers(1, 7), label="dilation")
    p = data.draw(st.integers(0, 8), label="padding")
    assume(h + 2 * p - d * (kh - 1) >= 1 and w + 2 * p - d * (kw - 1) >= 1)
    bias = data.draw(st.booleans(), label="bias")
    x, wt, b, d, p = _inputs((n, c, o, h, w, (kh, kw), d, p), bias=bias, grad=True)
    y = dilated_conv2d(x, wt, b, d, p)
    ref = F.conv2d(x, wt, b, padding=p, dilation=d)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    params = (x, wt) + ((b,) if bias else ())
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("algo")
def test_opcheck():
    for shape in [SMALL_SHAPES[0], SMALL_SHAPES[6]]:
        x, w, b, d, p = _inputs(shape, dtype=torch.float32, grad=True)
        torch.library.opcheck(torch.ops.attnscale.dilated_conv2d.default, (x, w, b, d, p))
        torch.library.opcheck(torch.ops.attnscale.dilated_conv2d.default, (x, w, None, d, p))
        y = torch.ops.attnscale.dilated_conv2d(x, w, b, d, p).detach()
        go = torch.randn_like(y)
        torch.library.opcheck(torch.ops.attnscale.dilated_conv2d_backward_input.default,
                              (go, w.detach(), d, p))
        torch.library.opcheck(torch.ops.attnscale.dilated_conv2d_backward_weight.default,
                              (go, x.detach(), w.shape[2], w.shape[3], d, p))


def test_with_columns_opcheck_and_kept_columns(monkeypatch):
    """dilated_conv2d_with_columns (the GEMM path's forward that keeps x's column blocks): opcheck (schema,
    fake, autograd); the blocks it keeps are those the weight gradient packs itself, so the gradient taken
    with them equals the one without, bit for bit, on shapes with bias-only borders, a 1x1 kernel, kh != kw
    and an empty batch; their size is the fake's (from attnscale._C.dilated_conv_column_groups)."""
    ops = torch.ops.attnscale
    for shape in [SMALL_SHAPES[0], SMALL_SHAPES[6], SMALL_SHAPES[7], SMALL_SHAPES[8], (0, 2, 3, 9, 9, 3, 2, 2)]:
        x, w, b, d, p = _inputs(shape, dtype=torch.float32, grad=True)
        torch.library.opcheck(ops.dilated_conv2d_with_columns.default, (x, w, b, d, p))
        y, cols = ops.dilated_conv2d_with_columns(x.detach(), w.detach(), b.detach(), d, p)
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        fx, fw, fb = (mode.from_tensor(t.detach()) for t in (x, w, b))
        with mode:
            fy, fcols = ops.dilated_conv2d_with_columns(fx, fw, fb, d, p)
        assert fcols.shape == cols.shape and fy.shape == y.shape and fy.stride() == y.stride()
        torch.testing.assert_close(y, ops.dilated_conv2d(x.detach(), w.detach(), b.detach(), d, p), rtol=1e-6,
                                   atol=1e-6)
        go = torch.randn_like(y)
        kh, kw = w.shape[2:]
        args = (go, x.detach(), kh, kw, d, p)
        monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", "gemm")  # the path that takes them
        with_cols, packed = (ops.dilated_conv2d_backward_weight(*args, c) for c in (cols, None))
        monkeypatch.delenv("ATTNSCALE_DILATED_CONV_ALGO")
        for a, e in zip(with_cols, packed):
            assert torch.equal(a, e)
        torch.library.opcheck(ops.dilated_conv2d_backward_weight.default, args + (cols,))


@pytest.mark.usefixtures("algo")
def test_forward_keeps_columns_only_for_a_weight_gradient_on_the_gemm_path(algo):
    """dilated_conv2d calls dilated_conv2d_with_columns exactly when the weight needs a gradient and the
    GEMM path runs, and the backward hands those columns to the weight gradient; gradients agree with
    F.conv2d either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name.startswith("dilated_conv2d"):
                self.seen.append((name, len(args) > 6 and args[6] is not None))
            return func(*args, **(kwargs or {}))

    x, w, b, d, p = _inputs(SMALL_SHAPES[0], grad=True)
    for weight_grad in (True, False):
        w.requires_grad_(weight_grad)
        with Calls() as calls:
            y = dilated_conv2d(x, w, b, d, p)
            grads = torch.autograd.grad(y.pow(2).sum(), (x, w, b) if weight_grad else (x, b))
        keep = weight_grad and algo == "gemm"
        assert calls.seen[0][0] == ("dilated_conv2d_with_columns" if keep else "dilated_conv2d")
        assert ("dilated_conv2d_backward_weight", keep) in calls.seen
        xr, wr, br = (t.detach().requires_grad_(t.requires_grad) for t in (x, w, b))
        ref = torch.autograd.grad(F.conv2d(xr, wr, br, padding=p, dilation=d).pow(2).sum(),
                                  (xr, wr, br) if weight_grad else (xr, br))
        for a, e in zip(grads, ref):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    with torch.no_grad(), Calls() as calls:
        dilated_conv2d(x, w.requires_grad_(), b, d, p)
    assert calls.seen == [("dilated_conv2d", False)]


def test_column_groups_refuse_bad_geometry():
    """attnscale._C.dilated_conv_column_groups (the layout of the kept columns, for the fake) checks what it is
    given: a bad geometry raises instead of dividing by zero or overflowing."""
    from attnscale import _C

    assert sorted(_C.dilated_conv_column_groups(41, 41, 3, 3, 12, 12)) == [(1, 17 * 17, 9), (4, 12 * 12, 4), (4, 12 * 17, 6)]
    for args, words in (((13, 13, 3, 3, 2 ** 62, 5), "dilation must be in"),
                        ((13, 13, 2, 3, 5, 5), "odd kernel sizes"),
                        ((2 ** 40, 2 ** 40, 1, 1, 1, 0), "input size"),
                        ((0, 13, 3, 3, 1, 1), "input size"),
                        ((3, 3, 3, 3, 5, 0), "output size")):
        with pytest.raises(RuntimeError, match=words):
            _C.dilated_conv_column_groups(*args)


def test_with_columns_keeps_the_batch_dynamic_under_compile(monkeypatch):
    """The fakes count the kept columns in symbolic batch and channel sizes: a compiled training step on the
    GEMM path is traced once for batches of 2, 3 and 4, and its gradients are the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", "gemm")
    torch._dynamo.reset()
    x0, w, b, d, p = _inputs(SMALL_SHAPES[0], dtype=torch.float32, grad=True)
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x: dilated_conv2d(x, w, b, d, p).pow(2).sum(), backend=cnt, dynamic=True)
    for n in (2, 3, 4):
        x = torch.randn(n, *x0.shape[1:])
        got = torch.autograd.grad(f(x), (w, b))
        want = torch.autograd.grad(dilated_conv2d(x, w, b, d, p).pow(2).sum(), (w, b))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
    assert cnt.frame_count == 1
    torch._dynamo.reset()


def test_bad_columns_are_refused():
    """Columns that are not x's column blocks (size, rank, layout, dtype) are refused by the kernel and the fake,
    naming them, instead of being multiplied."""
    ops = torch.ops.attnscale
    x, w, b, d, p = _inputs(SMALL_SHAPES[0], dtype=torch.float32)
    y, cols = ops.dilated_conv2d_with_columns(x, w, b, d, p)
    go = torch.randn_like(y)
    strided = torch.empty(2 * cols.numel())[::2]
    for bad in (cols[:-1], cols.view(2, -1), cols.double(), strided):
        with pytest.raises(RuntimeError, match="columns"):
            ops.dilated_conv2d_backward_weight(go, x, 3, 3, d, p, bad)
        meta = bad.to("meta") if bad.is_contiguous() else torch.empty_strided(bad.shape, bad.stride(), device="meta")
        with pytest.raises(RuntimeError, match="columns"):
            ops.dilated_conv2d_backward_weight(go.to("meta"), x.to("meta"), 3, 3, d, p, meta)


def _rel_err(a, e):
    return ((a - e).norm() / e.norm()).item()


@pytest.mark.usefixtures("algo", "cpu_gemm_backend")
def test_fc6_shape_float32_forward_backward():
    """DeepLab-LargeFOV fc6 at the 0.5 scale of a 321 crop: (1,512,21,21) -> 1024, 3x3, d=12, p=12."""
    x = torch.randn(1, 512, 21, 21, requires_grad=True)
    w = (torch.randn(1024, 512, 3, 3) * 0.01).requires_grad_()
    b = torch.randn(1024, requires_grad=True)
    y = dilated_conv2d(x, w, b, 12, 12)
    ref = dilated_conv2d_reference(x, w, b, 12, 12)
    assert y.shape == (1, 1024, 21, 21)
    assert _rel_err(y, ref) < 1e-4
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        assert _rel_err(a, e) < 1e-4, name


@pytest.mark.usefixtures("algo")
@pytest.mark.parametrize("shape", [(3, 16, 24, 17, 15, 3, 6, 6), (2, 8, 8, 12, 12, 3, 12, 12)])
def test_matches_conv2d_float32_batched(shape):
    x, w, b, d, p = _inputs(shape, dtype=torch.float32, grad=True)
    y = dilated_conv2d(x, w, b, d, p)
    ref = F.conv2d(x, w, b, padding=p, dilation=d)
    assert _rel_err(y, ref) < 1e-5
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert _rel_err(a, e) < 1e-5


@pytest.mark.usefixtures("algo")
def test_dead_taps_are_skipped():
    """5x5 input, 3x3 d=12 p=12: only the centre tap ever reads the image.  NaN weights on the
    other taps would poison a dense convolution (NaN * 0 = NaN) but must not reach our output or
    grad_x; their grad_weight is exactly 0."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.full((4, 3, 3, 3), float("nan"), dtype=torch.float64)
    w[:, :, 1, 1] = torch.randn(4, 3, dtype=torch.float64)
    w.requires_grad_()
    b = torch.randn(4, dtype=torch.float64)
    y = dilated_conv2d(x, w, b, 12, 12)
    assert torch.isnan(F.conv2d(x, w, b, padding=12, dilation=12)).all()  # dense conv touches the NaNs
    want = F.conv2d(x, w[:, :, 1:2, 1:2].detach(), b)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx, w[:, :, 1, 1].detach().sum(0)[None, :, None, None].expand_as(x).contiguous())
    dead = torch.ones(3, 3, dtype=torch.bool)
    dead[1, 1] = False
    assert torch.equal(gw[:, :, dead], torch.zeros_like(gw[:, :, dead]))


@pytest.mark.usefixtures("algo")
def test_batch_split_into_chunks():
    """Large enough (64 channels x 358^2 live (tap, pixel) pairs = 8.2 Mi im2col elements per image,
    above the CPU kernel's 6 Mi-element buffer budget) that the forward and grad_weight loops run
    over several batch chunks and groups of rectangles."""
    x = torch.randn(3, 64, 120, 120, requires_grad=True)
    w = (torch.randn(16, 64, 3, 3) * 0.05).requires_grad_()
    b = torch.randn(16, requires_grad=True)
    y = dilated_conv2d(x, w, b, 1, 1)
    ref = F.conv2d(x, w, b, padding=1, dilation=1)
    assert _rel_err(y, ref) < 1e-5
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert _rel_err(a, e) < 1e-5


@pytest.mark.usefixtures("algo")
def test_non_contiguous_inputs():
    x = torch.randn(2, 9, 9, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last-like strides
    w = torch.randn(5, 3, 3, 4, dtype=torch.float64).permute(0, 3, 1, 2)
    y = dilated_conv2d(x, w, None, 2, 2)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=2, dilation=2))
    assert y.is_contiguous()  # a CPU result is NCHW whatever the input's layout (the fake's rule)


@pytest.mark.usefixtures("algo")
def test_backward_deterministic():
    x, w, b, d, p = _inputs((3, 8, 6, 11, 11, 3, 4, 4), dtype=torch.float32, grad=True)
    g = torch.randn(3, 6, 11, 11)
    first = torch.autograd.grad(dilated_conv2d(x, w, b, d, p), (x, w, b), g)
    second = torch.autograd.grad(dilated_conv2d(x, w, b, d, p), (x, w, b), g)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


@pytest.mark.usefixtures("algo")
def test_empty_batch():
    x = torch.randn(0, 3, 7, 7, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = dilated_conv2d(x, w, None, 2, 2)
    assert y.shape == (0, 4, 7, 7)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("args, exc, words", [
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3), None, 2, 2), ValueError, "input channels"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 2, 2), None, 2, 2), ValueError, "odd kernel"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 2, -1), ValueError, "padding"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 0, 1), ValueError, "dilation"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 12, 1), ValueError, "output size"),
    (lambda: (torch.randn(1, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half(), None, 2, 2), TypeError,
     "float32 or float64"),
    (lambda: (torch.randint(0, 5, (1, 3, 8, 8)), torch.randint(0, 5, (4, 3, 3, 3)), None, 2, 2), TypeError,
     "x must be floating point"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).double(), None, 2, 2), TypeError, "weight has dtype"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4).double(), 2, 2), TypeError,
     "bias has dtype"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta"), None, 2, 2), ValueError,
     "weight is on meta"),
    (lambda: (torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3), None, 2, 2), ValueError, "x must be 4-D"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3), None, 2, 2), ValueError, "weight must be 4-D"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5), 2, 2), ValueError, "bias must have"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 2.0, 2), TypeError, "dilation must be an int"),
])
def test_bad_inputs_python(args, exc, words):
    with pytest.raises(exc, match=words):
        dilated_conv2d(*args())


@pytest.mark.parametrize("args, words", [
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3), None, 2, 2), "input channels"),
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 3, 2, 3), None, 2, 2), "odd kernel"),
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 2, -1), "padding"),
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 12, 1), "output size"),
    ((torch.randn(1, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half(), None, 2, 2), "float32 or float64"),
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).double(), None, 2, 2), "weight has dtype"),
    ((torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5), 2, 2), "bias must have"),
    ((torch.randn(8, 8), torch.randn(4, 3, 3, 3), None, 2, 2), "x must be 4-D"),
])
def test_bad_inputs_cpp(args, words):
    """The C++ op checks on its own (direct torch.ops calls bypass the Python wrapper)."""
    with pytest.raises(RuntimeError, match=words):
        torch.ops.attnscale.dilated_conv2d(*args)


def test_bad_grad_output_cpp():
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.attnscale.dilated_conv2d_backward_weight(torch.randn(1, 4, 5, 5), torch.randn(1, 3, 8, 8),
                                                           3, 3, 2, 2)
    with pytest.raises(RuntimeError, match="grad_output has 5 channels"):
        torch.ops.attnscale.dilated_conv2d_backward_input(torch.randn(1, 5, 8, 8), torch.randn(4, 3, 3, 3), 2, 2)


# --------------------------------------------------------------------------------------------- CUDA
CUDA_CASES = [
    # (dtype, forward rel tol, backward rel tol, TF32 allowed)
    (torch.float64, 1e-10, 1e-10, False),
    (torch.float32, 1e-5, 1e-5, False),   # exact (direct: SIMT; gemm: cuBLAS fp32)
    (torch.float32, 5e-3, 5e-3, True),    # TF32 tensor cores
    (torch.bfloat16, 2e-2, 3e-2, True),
    (torch.float16, 5e-3, 5e-3, True),
]
CUDA_SHAPES = SMALL_SHAPES + [(2, 40, 70, 21, 19, 3, 12, 12), (1, 512, 1024, 21, 21, 3, 12, 12),
                              (2, 512, 1024, 41, 41, 3, 12, 12)]  # fc6: centre, 4 edges, 4 corners


@pytest.mark.usefixtures("algo")
@pytest.mark.cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0]}-tf32{c[3]}")
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_matches_conv2d(case, shape, layout):
    """Both implementations against float64 F.conv2d, NCHW and channels_last: the outputs and the input
    gradient keep the layout of x and grad_output (the fakes say so too: test_cuda_opcheck)."""
    dtype, tol_f, tol_b, tf32 = case
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # the direct kernels follow cuDNN's TF32 flag, the GEMM path cuBLAS's
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        x, w, b, d, p = _inputs(shape, dtype=torch.float64, device="cuda")
        w = w / (w.shape[1] * w.shape[2] * w.shape[3]) ** 0.5
        # reference in float64 from the same (rounded) inputs
        xl, wl, bl = (t.to(dtype).requires_grad_() for t in (x.contiguous(memory_format=layout), w, b))
        xr, wr, br = (t.detach().double().requires_grad_() for t in (xl, wl, bl))
        y = dilated_conv2d(xl, wl, bl, d, p)
        ref = F.conv2d(xr, wr, br, padding=p, dilation=d)
        assert y.dtype == dtype and y.shape == ref.shape
        assert y.is_contiguous(memory_format=layout)
        assert _rel_err(y.double(), ref) < tol_f
        g = torch.randn_like(ref).contiguous(memory_format=layout)
        got = torch.autograd.grad(y, (xl, wl, bl), g.to(dtype))
        assert got[0].is_contiguous(memory_format=layout)
        want = torch.autograd.grad(ref, (xr, wr, br), g)
        for name, a, e in zip(("x", "weight", "bias"), got, want):
            assert _rel_err(a.double(), e) < tol_b, name
        again = torch.autograd.grad(dilated_conv2d(xl, wl, bl, d, p), (xl, wl, bl), g.to(dtype))
        for a, e in zip(got, again):
            assert torch.equal(a, e)  # deterministic: no atomics
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.usefixtures("algo")
@pytest.mark.cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cuda_opcheck(layout):
    x, w, b, d, p = _inputs(SMALL_SHAPES[0], dtype=torch.float32, device="cuda")
    x = x.contiguous(memory_format=layout).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.dilated_conv2d.default, (x, w, b, d, p))
    torch.library.opcheck(torch.ops.attnscale.dilated_conv2d_with_columns.default, (x, w, b, d, p))
    g = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], device="cuda").contiguous(memory_format=layout)
    torch.library.opcheck(torch.ops.attnscale.dilated_conv2d_backward_input.default, (g, w.detach(), d, p))
    cols = torch.ops.attnscale.dilated_conv2d_with_columns(x.detach(), w.detach(), b.detach(), d, p)[1]
    args = (g, x.detach(), w.shape[2], w.shape[3], d, p)
    torch.library.opcheck(torch.ops.attnscale.dilated_conv2d_backward_weight.default, args + (cols,))
    for a, e in zip(torch.ops.attnscale.dilated_conv2d_backward_weight(*args, cols),
                    torch.ops.attnscale.dilated_conv2d_backward_weight(*args)):
        assert torch.equal(a, e)  # the kept columns are the ones the weight gradient packs


@pytest.mark.cuda
def test_cuda_graph_capture_of_the_gemm_path(monkeypatch):
    """Captured into a CUDA graph, the GEMM path's replays give the eager forward's values on new inputs (its
    plan, copies and batched GEMMs hold no host state between calls)."""
    monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", "gemm")
    x, w, b, d, p = _inputs((2, 64, 96, 41, 41, 3, 12, 12), dtype=torch.bfloat16, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    static_x = x.clone()
    dilated_conv2d(static_x, w, b, d, p)  # warm-up: cuBLAS handles and workspaces outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dilated_conv2d(static_x, w, b, d, p)
    for _ in range(3):
        new = torch.randn_like(x)
        static_x.copy_(new)
        graph.replay()
        torch.testing.assert_close(static_y, dilated_conv2d(new, w, b, d, p))  # (cuBLAS may pick other kernels
        # while capturing: equal up to rounding; a stale replay would be off by the inputs' whole size)


@pytest.mark.cuda
def test_cuda_mixed_device_error():
    with pytest.raises(ValueError, match="weight is on"):
        dilated_conv2d(torch.randn(1, 3, 8, 8, device="cuda"), torch.randn(4, 3, 3, 3), None, 2, 2)


@pytest.mark.usefixtures("algo")
def test_autocast_cpu_runs_in_float32():
    """Under CPU autocast (bfloat16) a conv before fc6 hands it bf16 activations with fp32 weights;
    the op runs in float32 (its CPU kernels' dtype) and matches F.conv2d in float32."""
    x = torch.randn(1, 4, 9, 9)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dilated_conv2d(x.to(torch.bfloat16), w, b, dilation=2, padding=2)
    assert y.dtype == torch.float32
    ref = F.conv2d(x.to(torch.bfloat16).float(), w, b, padding=2, dilation=2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and b.grad is not None


@pytest.mark.usefixtures("algo")
def test_double_backward_matches_conv2d():
    """Both backward ops have their own derivatives (they are bilinear: the three ops again), so
    second-order gradients are right, not silently zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: dilated_conv2d(x, w, b, 2, 2), (x, w, b))
    gx, = torch.autograd.grad((dilated_conv2d(x, w, None, 2, 2) ** 2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    xr, wr = x.detach().requires_grad_(), w.detach().clone().requires_grad_()
    gr, = torch.autograd.grad((F.conv2d(xr, wr, None, padding=2, dilation=2) ** 2).sum(), xr, create_graph=True)
    gr.pow(2).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)


def test_direct_op_calls_refuse_mixed_devices_and_huge_geometry():
    """A meta tensor among CPU ones must not reach the fake kernel (which would return uninitialised
    CPU memory); a dilation or padding whose products overflow is an error naming it."""
    ops = torch.ops.attnscale
    x, w, gy = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="one dtype and device"):
        ops.dilated_conv2d_backward_input(gy, w.to("meta"), 2, 2)
    with pytest.raises(RuntimeError, match="one dtype and device"):
        ops.dilated_conv2d_backward_weight(gy, x.to("meta"), 3, 3, 2, 2)
    for dilation, padding in ((2 ** 63 - 1, 0), (2 ** 62 + 1, 0), (2, 2 ** 61)):
        with pytest.raises(RuntimeError, match="dilation must be in|padding must be in"):
            ops.dilated_conv2d(x, w, None, dilation, padding)
        with pytest.raises(ValueError, match="dilation must be in|padding must be in"):
            dilated_conv2d(x, w, None, dilation, padding)


def test_backward_fakes_refuse_what_the_kernels_refuse():
    """Tracing the backward ops (meta tensors run the fake kernels) must refuse an even kernel, a
    grad_output that implies an empty input, and a grad_output whose shape x does not produce, as
    the C++ kernels do, instead of returning a tensor of a wrong or negative shape."""
    ops = torch.ops.attnscale
    meta = dict(device="meta")
    cases = [
        (lambda: ops.dilated_conv2d_backward_input(torch.empty(1, 3, 8, 8, **meta), torch.empty(3, 2, 2, 3, **meta),
                                                   2, 2), "odd kernel sizes"),
        (lambda: ops.dilated_conv2d_backward_weight(torch.empty(1, 3, 8, 8, **meta), torch.empty(1, 2, 8, 8, **meta),
                                                    3, 4, 2, 2), "odd kernel sizes"),
        (lambda: ops.dilated_conv2d_backward_input(torch.empty(1, 3, 1, 1, **meta), torch.empty(3, 2, 3, 3, **meta),
                                                   1, 5), "implies an input size"),
        (lambda: ops.dilated_conv2d_backward_weight(torch.empty(1, 3, 7, 8, **meta), torch.empty(1, 2, 8, 8, **meta),
                                                    3, 3, 2, 2), "grad_output has shape"),
        (lambda: ops.dilated_conv2d_backward_weight(torch.empty(1, 3, 8, 8, **meta), torch.empty(1, 2, 2, 2, **meta),
                                                    3, 3, 4, 0), "output size"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()
    # and the CPU kernels say the same
    with pytest.raises(RuntimeError, match="odd kernel sizes"):
        ops.dilated_conv2d_backward_input(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 2, 3), 2, 2)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        ops.dilated_conv2d_backward_weight(torch.randn(1, 3, 7, 8), torch.randn(1, 2, 8, 8), 3, 3, 2, 2)


def test_algo_variable_is_checked(monkeypatch):
    x, w = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3)
    monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", "fast")
    with pytest.raises(RuntimeError, match="ATTNSCALE_DILATED_CONV_ALGO must be 'gemm' or 'direct'.*'fast'"):
        dilated_conv2d(x, w, None, 2, 2)


def test_gemm_and_direct_agree_on_fc6_float32(monkeypatch):
    """The two implementations on fc6's geometry at the 0.5 scale of a 321 crop, batch 2 (nine
    rectangles of live taps, three of them with all nine taps live only in the middle): each output and
    gradient within float32 rounding of the other."""
    x = torch.randn(2, 64, 21, 21, requires_grad=True)
    w = (torch.randn(96, 64, 3, 3) * 0.05).requires_grad_()
    b = torch.randn(96, requires_grad=True)
    g = torch.randn(2, 96, 21, 21)
    res = {}
    for algo in ("direct", "gemm"):
        monkeypatch.setenv("ATTNSCALE_DILATED_CONV_ALGO", algo)
        y = dilated_conv2d(x, w, b, 12, 12)
        res[algo] = (y,) + torch.autograd.grad(y, (x, w, b), g)
    for name, a, e in zip(("out", "x", "weight", "bias"), res["gemm"], res["direct"]):
        assert _rel_err(a, e) < 1e-6, name
