"""attnscale.ops.bias_relu (a convolution's bias + ReLU in one pass, CPU and CUDA): values bit for bit those of
F.relu(x + bias), its gradient F.relu's, the bias gradient the sum; NaN rule, layouts, opcheck, gradcheck,
checks; the fused dropout (Philox mask: the reference against Random123's known answers, the kernels against
the reference, the backward without a stored mask); the model's use of it (fuse_bias_relu, fuse_dropout)
against the unfused model; the CUDA kernels against the CPU ones (vectorised and scalar paths, both layouts,
multi-block sums, determinism)."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnscale.ops import bias_relu, bias_relu_reference, has_extension
from attnscale.ops.bias_relu import dropout_seed
from attnscale.ops.reference import dropout_keep, philox4x32_10

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _reference(x, b):
    return F.relu(x + b.view(1, -1, 1, 1))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_conv_bias_then_relu(fmt, dtype):
    """Values == F.relu(x + b) bit for bit (NaN stays NaN, as torch.relu), x's gradient == F.relu's (where
    the output is NaN the gradient passes, as threshold_backward does), the bias gradient the sum of it; the
    outputs in x's layout."""
    x = torch.randn(3, 16, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
    x[1, 2, 3, 4] = float("nan")
    x[0, 5, 0, 0] = float("-inf")
    x = x.requires_grad_()
    b = torch.randn(16, dtype=dtype, requires_grad=True)
    y, yr = bias_relu(x, b), _reference(x, b)
    assert torch.equal(y.isnan(), yr.isnan()) and torch.equal(y.nan_to_num(), yr.nan_to_num())
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn(y.shape, dtype=dtype)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    gxr, gbr = torch.autograd.grad(yr, (x, b), g)
    assert torch.equal(gx, gxr) and gx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gb, gbr)


# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key -> output words
PHILOX_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_reference_known_answers():
    for counter, key, want in PHILOX_KATS:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == want


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
@pytest.mark.parametrize("shape", [(3, 16, 7, 9), (2, 5, 3, 3)])
def test_dropout_is_the_philox_mask(fmt, dtype, p, shape):
    """With p > 0 the kernel keeps exactly the elements (memory order) the Philox reference keeps, at
    relu(x + b) * (1 / (1 - p)) bit for bit, the others 0 (a dropped NaN too); the keep rate is 1 - p within
    5 sigma; the same seed gives the same mask, another seed another (90 elements: not whole Philox blocks)."""
    gen = torch.Generator().manual_seed(int(p * 10) + shape[1])
    x = torch.randn(shape, generator=gen, dtype=dtype)
    x.view(-1)[::7] = float("nan")
    x = x.contiguous(memory_format=fmt)
    b = torch.randn(shape[1], generator=gen, dtype=dtype)
    seed = -0x123456789ABCDEF  # a negative int64: its two's-complement 64 bits are the key
    y = bias_relu(x, b, p, seed)
    want = bias_relu_reference(x, b, p, seed)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())
    assert y.is_contiguous(memory_format=fmt)
    keep = dropout_keep(seed, x.numel(), p)
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    mem = y.permute(0, 2, 3, 1).reshape(-1) if fmt == torch.channels_last else y.reshape(-1)
    assert torch.all(mem[~keep] == 0)
    assert torch.equal(bias_relu(x, b, p, seed).nan_to_num(), y.nan_to_num())
    assert not torch.equal(bias_relu(x, b, p, seed + 1).nan_to_num(), y.nan_to_num())


def test_dropout_ratio_under_one_in_2_to_32():
    """A ratio too small to drop anything (floor(p 2^32) = 0) still scales every unit by 1 / (1 - p), in the
    kernel, the reference and the backward alike."""
    p = 1e-12
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    y = bias_relu(x, b, p, 3)
    assert torch.equal(y, bias_relu_reference(x, b, p, 3))
    assert torch.equal(y, F.relu(x + b.view(1, -1, 1, 1)) * (1 / (1 - p)))
    assert torch.autograd.gradcheck(lambda a: bias_relu(a, b, p, 3), (x,))


def test_dropout_keep_rate_of_a_large_map():
    """Over a 1024x41x41 map (fc7's) the kept fraction is 1 - p within 5 sigma for several ratios, and every
    kept unit has the ReLU's value times 1 / (1 - p)."""
    x = torch.rand(1, 1024, 41, 41) + 0.5  # all positive: kept units are non-zero
    b = torch.zeros(1024)
    for p in (0.1, 0.5, 0.75):
        y = bias_relu(x, b, p, seed=11)
        kept = y != 0
        n = y.numel()
        assert abs(kept.double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
        assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - p)))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_dropout_backward_from_the_output(fmt):
    """The backward without a stored mask (0 where the output is 0, grad / (1 - p) elsewhere) == autograd
    through the reference (F.relu, the mask, the scale) bit for bit in x, the bias gradient its sum;
    gradcheck (the mask fixed by the seed) and opcheck with dropout."""
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    y, yr = bias_relu(x, b, 0.3, 99), bias_relu_reference(x, b, 0.3, 99)
    g = torch.randn(y.shape)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    gxr, gbr = torch.autograd.grad(yr, (x, b), g)
    assert torch.equal(gx, gxr)
    torch.testing.assert_close(gb, gbr)
    xd = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: bias_relu(a, c, 0.5, 5), (xd, bd))
    torch.library.opcheck(torch.ops.attnscale.bias_relu.default, (x.detach().requires_grad_(), b, 0.5, 1234))
    out = bias_relu(x.detach(), b.detach(), 0.5, 1234)
    torch.library.opcheck(torch.ops.attnscale.bias_relu_backward.default, (torch.randn_like(out), out, out.dtype, 2.0))


def test_dropout_seed_follows_torch_manual_seed():
    """Without a seed each call draws one from torch's CPU generator: reproducible under torch.manual_seed,
    a new mask on every call."""
    x, b = torch.rand(1, 4, 8, 8) + 0.5, torch.zeros(4)
    torch.manual_seed(3)
    s1, y1, y2 = dropout_seed(), bias_relu(x, b, 0.5), bias_relu(x, b, 0.5)
    torch.manual_seed(3)
    assert dropout_seed() == s1 and torch.equal(bias_relu(x, b, 0.5), y1)
    assert not torch.equal(y1, y2)


def test_gradcheck_and_opcheck():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bias_relu, (x, b))
    for fmt in LAYOUTS:
        xf = torch.randn(2, 8, 5, 6).contiguous(memory_format=fmt).requires_grad_()
        torch.library.opcheck(torch.ops.attnscale.bias_relu.default, (xf, torch.randn(8, requires_grad=True)))
        out = torch.relu(torch.randn(2, 8, 5, 6)).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.attnscale.bias_relu_backward.default, (torch.randn_like(out), out, out.dtype))


def test_fake_layout_follows_the_kernels_rule():
    """The fake result's strides == the real kernel's for the layouts only suggest_memory_format() calls
    channels_last: a sliced channels_last map (not dense) and an (N, C, 1, 1) map with channels_last strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cl = torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    for x in (cl[..., :5], torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last), cl,
              torch.randn(2, 3, 5, 6)):
        b = torch.randn(3)
        real = torch.ops.attnscale.bias_relu(x, b)
        with FakeTensorMode() as mode:
            fake = torch.ops.attnscale.bias_relu(mode.from_tensor(x), mode.from_tensor(b))
        assert fake.stride() == real.stride(), (x.stride(), real.stride(), fake.stride())


def test_bias_cast_to_x_dtype():
    """bias_relu casts the bias to x's dtype (autocast's cast of a convolution's bias); the gradient comes back
    in the bias's own dtype."""
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = bias_relu(x, b)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert b.grad.dtype == torch.float32


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(2, 3, 4), torch.randn(2)), "4-D"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4), torch.randn(4)), "shape \\(3,\\)"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4), torch.randn(3).double()), "dtype"),
    (lambda: torch.ops.attnscale.bias_relu(torch.ones(1, 3, 4, 4, dtype=torch.int32),
                                           torch.ones(3, dtype=torch.int32)), "floating point"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4).half(), torch.randn(3).half()),
     "float32 or float64"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4).double(), torch.randn(3)), "dtype"),
    (lambda: torch.ops.attnscale.bias_relu_backward(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 5), torch.float32),
     "one shape"),
    (lambda: torch.ops.attnscale.bias_relu_backward(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4).double(),
                                                    torch.float64), "one floating-point dtype"),
    (lambda: torch.ops.attnscale.bias_relu_backward(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.float64),
     "does not go with"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4), torch.randn(3), 1.0, 0), "dropout ratio"),
    (lambda: torch.ops.attnscale.bias_relu(torch.randn(1, 3, 4, 4), torch.randn(3), -0.1, 0), "dropout ratio"),
    (lambda: bias_relu(torch.randn(1, 3, 4, 4), torch.randn(3), float("nan")), "dropout ratio"),
    (lambda: torch.ops.attnscale.bias_relu_backward(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.float32,
                                                    0.5), "scale must be"),
    (lambda: torch.ops.attnscale.bias_relu_backward(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.float32,
                                                    float("inf")), "scale must be"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _tiny(**kw):
    from attnscale.model import AttentionToScale
    kw.setdefault("dropout", 0.0)
    return AttentionToScale(num_classes=5, width=1 / 16, use_reference_ops=False, **kw)


def test_model_fused_equals_unfused(monkeypatch):
    """The model with bias_relu at every convolution + ReLU (forced on the CPU here through the CPU kernels)
    gives the unfused model's outputs bit for bit and its gradients up to summation order; bias_relu is
    really called (13 trunk convolutions, fc6 and fc7 per scale; att_conv1)."""
    import attnscale.model as model_mod
    torch.manual_seed(0)
    ref = _tiny(fuse_bias_relu=False).train()
    fused = _tiny().train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 41, 41)
    labels = torch.randint(0, 5, (2, 41, 41))
    assert not fused._fuses(x)  # on the CPU the model keeps oneDNN's bias
    calls = []

    def counted(x, b, p=0.0):
        calls.append(tuple(x.shape))
        return bias_relu(x, b, p)

    monkeypatch.setattr(model_mod, "bias_relu_applies", lambda x: True)
    monkeypatch.setattr(model_mod, "bias_relu", counted)
    results = []
    for m in (ref, fused):
        out = m(x)
        loss, _ = m.loss(out, labels)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        results.append((out.merged, grads))
    assert len(calls) == 3 * 15 + 1
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fuse_dropout", [True, False])
def test_model_fuses_dropout_in_training(monkeypatch, fuse_dropout):
    """In training with fuse_dropout the Dropout after fc6, fc7 (every scale) and att_conv1 runs inside
    bias_relu (p = the model's ratio) and F.dropout is not called; without it, or in eval mode, bias_relu
    gets p = 0 and F.dropout runs (a no-op in eval).  Two training passes under one torch.manual_seed agree."""
    import attnscale.model as model_mod
    torch.manual_seed(0)
    m = _tiny(fuse_dropout=fuse_dropout, dropout=0.5)
    x = torch.randn(2, 3, 41, 41)
    ps, drops = [], []
    real_dropout = F.dropout

    def counted(x, b, p=0.0):
        ps.append(p)
        return bias_relu(x, b, p)

    def counted_dropout(x, p, training):
        drops.append(training)
        return real_dropout(x, p, training)

    monkeypatch.setattr(model_mod, "bias_relu_applies", lambda x: True)
    monkeypatch.setattr(model_mod, "bias_relu", counted)
    monkeypatch.setattr(model_mod.F, "dropout", counted_dropout)
    runs = []
    for _ in range(2):
        ps.clear(), drops.clear()
        torch.manual_seed(5)
        runs.append(m.train()(x).merged)
        n_drop = 3 * 2 + 1  # fc6, fc7 per scale; att_conv1
        assert len(ps) == 3 * 15 + 1
        assert ps.count(0.5) == (n_drop if fuse_dropout else 0) and ps.count(0.0) == len(ps) - ps.count(0.5)
        assert drops == ([] if fuse_dropout else [True] * n_drop)
    assert torch.equal(runs[0], runs[1])
    ps.clear(), drops.clear()
    m.eval()(x)
    assert set(ps) == {0.0} and drops == [False] * 7


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_pair(shape, dtype, fmt, misalign=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape[1], generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    xd = x.cuda().contiguous(memory_format=fmt)
    if misalign:  # the same values one element past a 16-byte boundary: the scalar path
        buf = torch.empty(xd.numel() + 1, dtype=dtype, device="cuda")
        strides = xd.stride()
        xd = buf[1:].as_strided(xd.shape, strides).copy_(xd)
        assert xd.data_ptr() % 16 != 0 and xd.is_contiguous(memory_format=fmt)
    return x, b, xd, b.cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,misalign", [((2, 64, 9, 8), False), ((2, 64, 9, 8), True), ((3, 21, 5, 7), False),
                                            ((30, 64, 41, 41), False), ((1, 1024, 41, 41), False),
                                            ((2, 24, 1, 1), False)])
def test_cuda_equals_cpu(dtype, fmt, shape, misalign):
    """CUDA forward == the CPU kernel on the same values (half types: the CPU's float32 sum rounded once, as
    the GPU rounds it), bit for bit; backward: x's gradient bit for bit, the bias gradient against a float64
    sum of it (block partial sums in float, then in order); vectorised (C or H*W a multiple of the vector)
    and scalar paths (21 channels, a misaligned pointer); one block and many."""
    ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x, b, xd, bd = _cuda_pair(shape, dtype, fmt, misalign)
    y = torch.ops.attnscale.bias_relu(xd, bd)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    want = torch.ops.attnscale.bias_relu(x.to(ref_dtype), b.to(ref_dtype)).to(dtype)
    assert torch.equal(y.cpu().isnan(), want.isnan()) and torch.equal(y.cpu().nan_to_num(), want.nan_to_num())
    g = torch.randn(shape).to(dtype)
    gd = g.cuda().contiguous(memory_format=fmt)
    gx, gb = torch.ops.attnscale.bias_relu_backward(gd, y, dtype)
    want_gx = torch.where(want <= 0, torch.zeros((), dtype=dtype), g)
    assert torch.equal(gx.cpu(), want_gx) and gx.is_contiguous(memory_format=fmt)
    exact = want_gx.double().sum((0, 2, 3))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gb.cpu().double(), exact, rtol=tol, atol=tol * max(1.0, exact.abs().max().item()))
    gx2, gb2 = torch.ops.attnscale.bias_relu_backward(gd, y, dtype)
    assert torch.equal(gb, gb2) and torch.equal(gx, gx2)  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_cuda_float32_bias_of_a_half_map(dtype, fmt):
    """Autocast's case without a cast kernel: a float32 bias with a float16 / bfloat16 map gives the values of
    the bias cast to the map's dtype first (bit for bit), and its gradient comes back in float32, the float sum
    unrounded (closer to the exact sum than the half-type gradient)."""
    x, b, xd, _ = _cuda_pair((4, 64, 9, 8), dtype, fmt)
    b32 = torch.randn(64, device="cuda")
    y = torch.ops.attnscale.bias_relu(xd, b32)
    assert torch.equal(y.isnan(), torch.ops.attnscale.bias_relu(xd, b32.to(dtype)).isnan())
    assert torch.equal(y.nan_to_num(), torch.ops.attnscale.bias_relu(xd, b32.to(dtype)).nan_to_num())
    g = torch.randn(y.shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
    gx, gb = torch.ops.attnscale.bias_relu_backward(g, y, torch.float32)
    gx_h, gb_h = torch.ops.attnscale.bias_relu_backward(g, y, dtype)
    assert gb.dtype == torch.float32 and torch.equal(gx, gx_h)
    exact = gx.double().sum((0, 2, 3))
    torch.testing.assert_close(gb.double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(gb.to(dtype), gb_h)  # the half-type gradient is the same sum, rounded once
    xg = xd.clone().requires_grad_()
    bg = b32.clone().requires_grad_()
    bias_relu(xg, bg).backward(g)
    assert bg.grad.dtype == torch.float32 and torch.equal(bg.grad, gb)


@pytest.mark.cuda
def test_cuda_model_fused_equals_unfused_and_opcheck():
    """On a GPU the model fuses by default: bf16 autocast, channels_last, a training step's outputs equal the
    unfused model's and its gradients agree to bf16 rounding; opcheck on CUDA."""
    torch.manual_seed(0)
    ref = _tiny(fuse_bias_relu=False).cuda().to(memory_format=torch.channels_last).train()
    fused = _tiny().cuda().to(memory_format=torch.channels_last).train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 65, 65, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (2, 65, 65), device="cuda")
    assert fused._fuses(x) and not ref._fuses(x)
    res = []
    for m in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        loss, _ = m.loss(out, labels)
        res.append((out.merged.float(), torch.autograd.grad(loss, list(m.parameters()))))
    assert torch.equal(res[0][0], res[1][0])
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-3)
    xf = torch.randn(2, 16, 5, 6, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.bias_relu.default, (xf, torch.randn(16, device="cuda", requires_grad=True)))
    with pytest.raises(ValueError, match="floating point"):  # the shared check comes before the CUDA dtype's
        torch.ops.attnscale.bias_relu(torch.ones(1, 2, 3, 3, device="cuda", dtype=torch.int32),
                                      torch.ones(2, device="cuda", dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,fmt,shape,misalign", [
    *[(dt, fmt, shape, mis) for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
      for fmt in LAYOUTS for shape, mis in (((2, 64, 9, 8), False), ((2, 64, 9, 8), True), ((3, 21, 5, 7), False))],
    (torch.bfloat16, torch.channels_last, (30, 1024, 41, 41), False)])  # fc7 at batch 30, as the model runs it
def test_cuda_dropout_equals_the_reference(dtype, fmt, shape, misalign):
    """The fused dropout on a GPU: the forward == the pure-PyTorch reference with the same seed bit for bit (the
    Philox mask over memory order; F.relu, then the scale in the dtype), so the CPU kernel's mask too; the
    backward reads the mask off the output (0 where it is 0, grad * scale elsewhere), the bias gradient its sum;
    the keep rate 1 - p within 5 sigma on fc7's batch-30 shape."""
    p, seed = 0.3, 2 ** 40 + 17
    x, b, xd, bd = _cuda_pair(shape, dtype, fmt, misalign)
    y = torch.ops.attnscale.bias_relu(xd, bd, p, seed)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    want = bias_relu_reference(x.contiguous(memory_format=fmt), b, p, seed)
    assert torch.equal(y.cpu().isnan(), want.isnan()) and torch.equal(y.cpu().nan_to_num(), want.nan_to_num())
    if dtype in (torch.float32, torch.float64):
        cpu = torch.ops.attnscale.bias_relu(x.contiguous(memory_format=fmt), b, p, seed)
        assert torch.equal(y.cpu().nan_to_num(), cpu.nan_to_num())
    if y.numel() > 10 ** 6:  # among the units the ReLU passes, the kept fraction is 1 - p
        passed = _reference(x.float(), b.float()).contiguous(memory_format=fmt) > 0
        n = passed.sum().item()
        assert abs((want != 0)[passed].double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    scale = 1.0 / (1.0 - p)
    g = torch.randn(shape).to(dtype)
    gx, gb = torch.ops.attnscale.bias_relu_backward(g.cuda().contiguous(memory_format=fmt), y, dtype, scale)
    want_gx = torch.where(want <= 0, torch.zeros((), dtype=dtype), g * scale)
    assert torch.equal(gx.cpu(), want_gx)
    exact = want_gx.double().sum((0, 2, 3))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gb.cpu().double(), exact, rtol=tol, atol=tol * max(1.0, exact.abs().max().item()))


@pytest.mark.cuda
def test_cuda_model_fused_dropout_trains():
    """The model on a GPU in training (bf16 autocast, channels_last, dropout 0.5): with fuse_dropout bias_relu
    draws the mask, the step is reproducible under torch.manual_seed, about half of fc7's units are zero
    (drop7 on top of relu7), and the gradients are finite; opcheck of the op with dropout on CUDA."""
    m = _tiny(dropout=0.5).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 65, 65, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (2, 65, 65), device="cuda")
    assert m._fuses(x)
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
            fc7, _ = m.trunk(x)
        loss, _ = m.loss(out, labels)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        runs.append((out.merged.float(), fc7.float()))
        assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(runs[0][0], runs[1][0])
    zero = (runs[0][1] == 0).double().mean().item()
    assert 0.5 < zero < 0.95, zero  # dropped (half) plus relu7's own zeros among the kept
    xf = torch.randn(2, 16, 5, 6, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.attnscale.bias_relu.default,
                          (xf, torch.randn(16, device="cuda", requires_grad=True), 0.5, 77))
