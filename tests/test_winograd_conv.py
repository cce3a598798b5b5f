"""Tests of attnscale.ops.winograd_conv2d (3x3, stride 1, zero padding, by Winograd F(2x2, 3x3) and
F(4x4, 3x3)) and
winograd_weight: values and gradients against F.conv2d, float32 rounding against float64, the band
structure of the kernel, registration (opcheck) and input checks.  CPU only: the op has no CUDA kernel."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnscale.ops import has_extension, winograd_applies, winograd_conv2d, winograd_weight

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)


G4 = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
TILE_PARAMS = pytest.mark.parametrize("tile", [2, 4])


@pytest.mark.parametrize("tile,g", [(2, G), (4, G4)])
def test_weight_transform_is_g_w_gt(tile, g):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    n = tile + 2
    want = torch.einsum("ai,kcij,bj->abkc", g, w, g).reshape(n * n, 5, 3)
    torch.testing.assert_close(winograd_weight(w, tile), want, rtol=0, atol=1e-14)
    torch.testing.assert_close(winograd_weight(w.float(), tile), want.float(), rtol=1e-6, atol=1e-7)


# (N, C, O, H, W, padding)
SHAPES = [
    (2, 3, 5, 9, 8, 1),    # even and odd output sizes
    (1, 4, 2, 1, 1, 1),    # one pixel: every tap but the centre reads padding
    (1, 2, 3, 5, 4, 0),    # no padding
    (3, 6, 7, 8, 8, 2),    # DeepLab conv5's padding (with dilation 1 here)
    (1, 2, 2, 3, 7, 4),    # padding wider than the kernel: border outputs are bias only
    (1, 1, 1, 3, 3, 0),    # one output
]


@TILE_PARAMS
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_conv2d_float64(shape, bias, tile):
    n, c, o, h, w, p = shape
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, requires_grad=True) if bias else None
    y = winograd_conv2d(x, wt, b, p, tile=tile)
    ref = F.conv2d(x, wt, b, padding=p)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = (x, wt) + ((b,) if bias else ())
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,d,p", [((2, 3, 4, 13, 12), 2, 2), ((1, 2, 3, 11, 14), 3, 3),
                                       ((1, 2, 2, 9, 10), 2, 4), ((1, 3, 2, 7, 8), 2, 0)])
@TILE_PARAMS
def test_dilated_by_polyphase_matches_conv2d(shape, d, p, tile):
    """Dilation d with padding p = d q (DeepLab conv5: d = 2, p = 2) through the d^2 polyphase components:
    values, and gradients of x, weight and bias, equal F.conv2d's."""
    n, c, o, h, w = shape
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, wt, b, padding=p, dilation=d)
    with torch.no_grad():  # the in-place assembly
        torch.testing.assert_close(winograd_conv2d(x, wt, b, p, dilation=d, tile=tile), ref, rtol=1e-12, atol=1e-12)
    y = winograd_conv2d(x, wt, b, p, dilation=d, tile=tile)  # the differentiable assembly
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, wt, b), g), torch.autograd.grad(ref, (x, wt, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_dilation_errors():
    x, w = torch.randn(1, 2, 9, 9), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="multiple of the dilation"):
        winograd_conv2d(x, w, None, 3, dilation=2)
    with pytest.raises(ValueError, match="polyphase component without output"):
        winograd_conv2d(torch.randn(1, 2, 3, 3), w, None, 0, dilation=2)
    assert not winograd_applies(torch.randn(1, 2, 3, 3), torch.nn.Conv2d(2, 3, 3, dilation=2))


@TILE_PARAMS
@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_gradcheck(p, tile):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: winograd_conv2d(x, w, b, p, tile=tile), (x, w, b))


@TILE_PARAMS
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
def test_no_input_channel_gives_the_bias(d, relu, tile):
    """No input channel: every output is the (ReLU of the) bias and only the bias has a gradient (an empty
    product once divided by K x C = 0 and killed the process; F.conv2d returns an empty tensor here).  No
    output channel is refused, as F.conv2d refuses it."""
    x = torch.randn(2, 0, 9, 8, requires_grad=True)
    w = torch.randn(4, 0, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    want = b.detach().view(1, 4, 1, 1).expand(2, 4, 9, 8)
    want = F.relu(want) if relu else want
    got = winograd_conv2d(x, w, b, d, dilation=d, tile=tile, relu=relu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    gx, gw, gb = torch.autograd.grad(got, (x, w, b), g)
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gb, (g * (want > 0) if relu else g).sum((0, 2, 3)))
    torch.testing.assert_close(winograd_conv2d(x, w, None, d, dilation=d, tile=tile), torch.zeros_like(want))
    u = torch.zeros(16 if tile == 2 else 36, 0, 3)
    for call in (lambda: winograd_conv2d(torch.randn(1, 3, 9, 8), torch.randn(0, 3, 3, 3), None, 1, tile=tile),
                 lambda: torch.ops.attnscale.winograd_conv2d(torch.randn(1, 3, 9, 8), torch.randn(0, 3, 3, 3), u,
                                                             None, 1, False, 1)):
        with pytest.raises(ValueError, match="no output channel"):
            call()


def test_backward_follows_in_place_weight_updates():
    """d/dx keeps the flipped weight's transform per weight version: after an in-place update (an
    optimizer step) the next backward uses the new weight."""
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    for _ in range(2):
        for _ in range(2):  # twice per version: the second backward reuses the transform
            got, = torch.autograd.grad(winograd_conv2d(x, w, None, 1), x, g)
            want, = torch.autograd.grad(F.conv2d(x, w, None, padding=1), x, g)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            w.mul_(-2.0)


def test_double_backward():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: winograd_conv2d(x, w, None, 1), (x, w))
    x2 = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)  # dilation 2: d/dx by the op, dilated
    assert torch.autograd.gradcheck(lambda x, w: winograd_conv2d(x, w, None, 2, dilation=2), (x2, w))
    assert torch.autograd.gradgradcheck(lambda x, w: winograd_conv2d(x, w, None, 2, dilation=2), (x2, w))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_shapes_match_conv2d_float64(data):
    n = data.draw(st.integers(1, 3), label="N")
    c = data.draw(st.integers(1, 20), label="C")
    o = data.draw(st.integers(1, 20), label="O")
    h = data.draw(st.integers(1, 30), label="H")
    w = data.draw(st.integers(1, 30), label="W")
    p = data.draw(st.integers(0, 3), label="padding")
    tile = data.draw(st.sampled_from([2, 4]), label="tile")
    if h + 2 * p - 2 < 1 or w + 2 * p - 2 < 1:
        p = 1
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt = torch.randn(o, c, 3, 3, dtype=torch.float64)
    b = torch.randn(o, dtype=torch.float64)
    torch.testing.assert_close(winograd_conv2d(x, wt, b, p, tile=tile), F.conv2d(x, wt, b, padding=p),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.usefixtures("cpu_gemm_backend")
@pytest.mark.parametrize("c,o,hw", [(64, 64, 97), (256, 96, 33), (3, 16, 60)])
@pytest.mark.parametrize("tile,factor", [(2, 2), (4, 12)])
def test_float32_rounding_against_direct(c, o, hw, tile, factor):
    """Against the float64 convolution, the float32 Winograd result errs no more than `factor` times the
    float32 direct convolution (oneDNN), plus a small slack: F(2x2, 3x3)'s transforms only add and halve
    (measured: about 5x *smaller* than direct); F(4x4, 3x3)'s have entries up to 8 and 1/24 (measured:
    2-7x larger, about 1e-5 of the output's range)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, hw, hw, generator=gen)
    w = torch.randn(o, c, 3, 3, generator=gen) * (2.0 / (9 * c)) ** 0.5
    b = torch.randn(o, generator=gen)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    err_wino = (winograd_conv2d(x, w, b, 1, tile=tile).double() - exact).abs().max().item()
    err_direct = (F.conv2d(x, w, b, padding=1).double() - exact).abs().max().item()
    # F(4x4, 3x3)'s own rounding does not shrink with the channel count: with C = 3 the direct sum is
    # nearly exact, so its bound also admits 2e-5 of the output's range
    slack = 1e-6 if tile == 2 else 2e-5 * exact.abs().max().item()
    assert err_wino <= factor * err_direct + slack, (err_wino, err_direct, slack)


@TILE_PARAMS
def test_bands_and_batch_float64(tile):
    """Batch 2 with 64 -> 64 channels on 97x97: the kernel splits each image into bands of tile rows
    (about 8 MiB of transformed tiles each: in float64 four bands of 10 of the 49 tile rows and a
    shorter last one), so band edges are crossed in both images."""
    x = torch.randn(2, 64, 97, 97, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64) / 24
    torch.testing.assert_close(winograd_conv2d(x, w, None, 1, tile=tile), F.conv2d(x, w, padding=1),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("d,hw", [(2, (97, 94)), (3, (50, 61))])
@TILE_PARAMS
def test_dilated_bands_cross_components_float64(d, hw, tile):
    """Dilation by polyphase components, in place: the d x d components' tile rows follow one another and
    the bands run over all of them, so a band holds the end of one component and the start of the next
    (64 -> 64 channels, batch 2, float64: bands of 18 to 46 tile rows over components of 8 to 25 tile rows,
    uneven components on both axes); with the fused ReLU too."""
    x = torch.randn(2, 64, *hw, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64) / 24
    b = torch.randn(64, dtype=torch.float64)
    ref = F.conv2d(x, w, b, padding=d, dilation=d)
    torch.testing.assert_close(winograd_conv2d(x, w, b, d, dilation=d, tile=tile), ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(winograd_conv2d(x, w, b, d, dilation=d, tile=tile, relu=True), F.relu(ref),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.usefixtures("cpu_gemm_backend")
def test_dilated_float32_on_both_gemm_backends():
    """conv5's shape at the 513x513 image's scale 1 (512 -> 512 at 65x65, dilation 2), float32: its products
    go to oneDNN or the BLAS; against the float64 convolution within the undilated layer's bound."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 512, 65, 65, generator=gen)
    w = torch.randn(512, 512, 3, 3, generator=gen) * (2.0 / (9 * 512)) ** 0.5
    exact = F.conv2d(x.double(), w.double(), padding=2, dilation=2)
    err = (winograd_conv2d(x, w, None, 2, dilation=2).double() - exact).abs().max().item()
    assert err <= 2e-6 * exact.abs().max().item(), err


def test_precomputed_weight_is_used():
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    u = winograd_weight(w)
    torch.testing.assert_close(winograd_conv2d(x, w, None, 1, weight_winograd=u), F.conv2d(x, w, padding=1))
    # a different transform gives a different result: the kernel reads weight_winograd, not weight
    assert not torch.allclose(winograd_conv2d(x, w, None, 1, weight_winograd=2 * u), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("d,p", [(1, 1), (1, 0), (2, 2)])
@TILE_PARAMS
def test_fused_relu(d, p, tile):
    """relu=True gives F.relu(F.conv2d(...)): values with and without autograd (the in-place and the
    differentiable polyphase assembly), and the gradients of x, weight and bias, also through the op
    itself (its autograd formula masks the gradient where the output is zero)."""
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ref = F.relu(F.conv2d(x, wt, b, padding=p, dilation=d))
    assert (ref == 0).float().mean() > 0.2  # the ReLU cuts a good part
    with torch.no_grad():
        torch.testing.assert_close(winograd_conv2d(x, wt, b, p, dilation=d, tile=tile, relu=True), ref,
                                   rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    expect = torch.autograd.grad(ref, (x, wt, b), g)
    ys = [winograd_conv2d(x, wt, b, p, dilation=d, tile=tile, relu=True)]
    if d == 1:
        ys.append(torch.ops.attnscale.winograd_conv2d(x, wt, winograd_weight(wt, tile), b, p, True))
    for y in ys:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, e in zip(torch.autograd.grad(y, (x, wt, b), g), expect):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="relu must be a bool"):
        winograd_conv2d(x, wt, b, p, dilation=d, relu=1)


@TILE_PARAMS
def test_opcheck(tile):
    x = torch.randn(2, 3, 7, 6)
    w = torch.randn(4, 3, 3, 3)
    u = winograd_weight(w, tile)
    b = torch.randn(4)
    torch.library.opcheck(torch.ops.attnscale.winograd_weight.default, (w, tile))
    torch.library.opcheck(torch.ops.attnscale.winograd_conv2d.default, (x, w, u, b, 1))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.attnscale.winograd_conv2d.default, (xg, wg, u, bg, 1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.attnscale.winograd_conv2d.default, (xg, wg, u, bg, 1, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    x2 = torch.randn(2, 3, 9, 8)  # dilation 2, padding 2: four components
    torch.library.opcheck(torch.ops.attnscale.winograd_conv2d.default, (x2, w, u, b, 2, False, 2))
    xg2 = x2.clone().requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.winograd_conv2d.default, (xg2, wg, u, bg, 2, True, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_applies():
    x = torch.randn(1, 3, 8, 8)
    assert winograd_applies(x, torch.nn.Conv2d(3, 4, 3, padding=1))
    assert winograd_applies(x, torch.nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    assert not winograd_applies(x, torch.nn.Conv2d(3, 4, 3, padding=1, dilation=2))
    assert not winograd_applies(x, torch.nn.Conv2d(3, 4, 3, stride=2))
    assert not winograd_applies(x, torch.nn.Conv2d(3, 4, 1))
    assert not winograd_applies(x.double(), torch.nn.Conv2d(3, 4, 3, padding=1))  # dtype mismatch


@pytest.mark.parametrize("args,exc,match", [
    (lambda: (torch.randn(3, 8, 8), torch.randn(2, 3, 3, 3)), ValueError, "x must be 4-D"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(2, 3, 5, 5)), ValueError, r"weight must be \(out, in, 3, 3\)"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(2, 3, 3, 3)), ValueError, "input channels"),
    (lambda: (torch.randn(1, 3, 8, 8).half(), torch.randn(2, 3, 3, 3).half()), TypeError, "float32 or float64"),
    (lambda: (torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3).double()), TypeError, "weight has dtype"),
    (lambda: (torch.randint(0, 3, (1, 3, 8, 8)), torch.randn(2, 3, 3, 3)), TypeError, "float32 or float64"),
])
def test_bad_inputs(args, exc, match):
    x, w = args()
    with pytest.raises(exc, match=match):
        winograd_conv2d(x, w)


def test_bad_padding_size_and_transform():
    x, w = torch.randn(1, 3, 1, 1), torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="output size"):
        winograd_conv2d(x, w, None, 0)
    with pytest.raises(ValueError, match=r"padding must be in \[0, 16777216\]"):
        winograd_conv2d(torch.randn(1, 3, 8, 8), w, None, -1)
    with pytest.raises(ValueError, match="weight_winograd must be"):
        winograd_conv2d(torch.randn(1, 3, 8, 8), w, None, 1, weight_winograd=torch.randn(16, 3, 2))
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_conv2d(torch.randn(1, 3, 8, 8), w, None, 1, tile=3)
    with pytest.raises(ValueError, match="weight_winograd must be"):  # a tile-4 transform with tile=2
        winograd_conv2d(torch.randn(1, 3, 8, 8), w, None, 1, weight_winograd=winograd_weight(w, 4), tile=2)
    with pytest.raises(ValueError, match="bias must have shape"):
        winograd_conv2d(torch.randn(1, 3, 8, 8), w, torch.randn(3), 1)
    # the C++ op checks too (a direct call past the Python wrapper)
    with pytest.raises(ValueError, match="weight_winograd must be"):
        torch.ops.attnscale.winograd_conv2d(torch.randn(1, 3, 8, 8), w, torch.randn(16, 3, 2), None, 1)


def test_weight_transform_fake_checks_as_the_kernel():
    """Tracing refuses what running refuses: a tile other than 2 or 4, a kernel other than 3x3."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="tile must be 2"):
            torch.ops.attnscale.winograd_weight(torch.ones(2, 2, 3, 3), 3)
        with pytest.raises(RuntimeError, match=r"weight must be a floating-point \(out, in, 3, 3\)"):
            torch.ops.attnscale.winograd_weight(torch.ones(2, 2, 5, 5), 2)


@pytest.mark.parametrize("tile", [2, 4])
def test_gemm_backends_on_bands(tile):
    """256 -> 256 channels on 66x66 in float32: several bands of tile rows and a shorter last one, each
    product over 2^22 multiply-adds (so the oneDNN backend takes it); both GEMM backends agree with the
    float64 convolution within a few times the float32 direct convolution's error, and with each other."""
    from attnscale.ops import set_cpu_gemm
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, 66, 66, generator=gen)
    w = torch.randn(256, 256, 3, 3, generator=gen) / 48
    exact = F.conv2d(x.double(), w.double(), padding=1)
    rel = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    bound = (4 if tile == 2 else 20) * rel(F.conv2d(x, w, padding=1))  # measured: 2.2x and 14x direct's
    outs = {}
    for backend in ("blas", "onednn"):
        prev = set_cpu_gemm(backend)
        try:
            outs[backend] = winograd_conv2d(x, w, None, 1, tile=tile)
        finally:
            set_cpu_gemm(prev)
        assert rel(outs[backend]) < bound, (backend, rel(outs[backend]), bound)
    assert ((outs["onednn"] - outs["blas"]).norm() / exact.norm()).item() < 2 * bound


def test_set_cpu_gemm():
    """The backend switch names its choices, refuses others (also from ATTNSCALE_CPU_GEMM, at import) and
    returns the previous backend."""
    import subprocess
    import sys
    from attnscale.ops import cpu_gemm, set_cpu_gemm
    first = cpu_gemm()
    assert first in ("blas", "onednn")
    assert set_cpu_gemm("blas") == first and cpu_gemm() == "blas"
    assert set_cpu_gemm(first) == "blas" and cpu_gemm() == first
    with pytest.raises(ValueError, match="backend must be 'blas' or 'onednn'"):
        set_cpu_gemm("mkl")
    assert cpu_gemm() == first
    run = subprocess.run([sys.executable, "-c", "import attnscale.ops"], capture_output=True, text=True,
                         env={**__import__("os").environ, "ATTNSCALE_CPU_GEMM": "mkl"})
    assert run.returncode != 0 and "ATTNSCALE_CPU_GEMM must be 'blas' or 'onednn', got 'mkl'" in run.stderr
