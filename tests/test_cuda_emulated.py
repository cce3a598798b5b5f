"""The CUDA kernels' own source (csrc/ops/cuda/*_kernel.cu) run on the CPU under tests/cuda_emu (host-compiled,
blocks in order, a block's threads as fibers: barriers, shared memory and warp shuffles as CUDA defines them),
against the CPU kernels (or float64 F.conv2d), with the same expectations as the CUDA tests that need a GPU
(test_max_pool, test_interp, test_bias_relu, test_scale_merge, test_dilated_conv).  So the index arithmetic, layouts, vector paths, launch
configurations and reductions of every kernel are checked on every machine; what emulation cannot show
(timing, the memory model, nvcc's code generation) stays with the GPU run (benchmarks/gpu_proof.sh).  Every
buffer sits between sentinel margins: a write outside it fails, a read outside it brings NaNs in."""
import ctypes

import pytest
import torch

from attnscale import caffe
from attnscale.ops import bias_relu_reference, has_extension
from tests.cuda_emu import build
from tests.test_max_pool import _train_cases

pytestmark = [pytest.mark.skipif(not has_extension(), reason="attnscale._C not built"),
              pytest.mark.skipif(build.unavailable() is not None,
                                 reason=f"CUDA emulator unavailable: {build.unavailable()}")]

if build.unavailable() is None:
    from tests.cuda_emu import ops as emu

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = [False, True]


def _ref_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _same(a, b):
    """Equal bit for bit up to NaN payloads: NaN in the same places, every other value equal."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _in_layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


# ------------------------------------------------------------------------------------- the emulator itself
def test_emulator_shuffles_barriers_and_its_checks_fail_when_they_should():
    """Warp shuffles (down and xor) and a block barrier over shared memory give the exact sums; a kernel that
    writes one element past its tensor is caught by the margins; lanes of one warp split between a barrier and
    a shuffle are reported as a deadlock; a block of 2048 threads is refused as a launch would be."""
    lib = emu.lib()
    n, threads = 1000, 128
    x = torch.arange(n, dtype=torch.float32) % 7
    blocks, lanes = torch.zeros((n + threads - 1) // threads), torch.zeros(n)
    assert lib.emu_selftest_block_sum(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(blocks.data_ptr()),
                                      ctypes.c_void_p(lanes.data_ptr()), n, threads) == 0
    padded = torch.cat([x, torch.zeros(len(blocks) * threads - n)])
    assert torch.equal(blocks, padded.view(-1, threads).sum(1))
    assert torch.equal(lanes, padded.view(-1, 32).sum(1).repeat_interleave(32)[:n])
    y = emu._Guarded((100,), torch.float32)
    assert lib.emu_selftest_one_past_the_end(y.ptr(), 100) == 0
    with pytest.raises(AssertionError, match="4 bytes after the tensor"):
        y.check("one_past_the_end")
    z = torch.zeros(64)
    assert lib.emu_selftest_split_warp(ctypes.c_void_p(z.data_ptr())) == -1
    assert lib.emu_selftest_bad_config(ctypes.c_void_p(z.data_ptr())) == 9  # cudaErrorInvalidConfiguration


# --------------------------------------------------------------------------------------------- max pool
MAX_POOL_CONFIGS = [(3, 2, 1), (3, 1, 1), (2, 2, 0), (5, 2, 2), (4, 3, 1)]


def _pool_cases(k, s, p, gen):
    """test_max_pool's cases (every size Caffe's rule accepts, integer values: ties), a NaN in each."""
    for x, out_hw in _train_cases(k, s, p, gen, sizes_h=(1, 2, 5, 13, 33), sizes_w=(1, 3, 8, 17)):
        x[0, 1, x.shape[2] // 2, x.shape[3] // 2] = float("nan")
        yield x, out_hw


@pytest.mark.parametrize("k,s,p", MAX_POOL_CONFIGS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["nchw", "nhwc"])
def test_max_pool_kernels(k, s, p, dtype, channels_last):
    """max_pool_kernel.cu: inference, training forward (output and mask) and backward == the CPU kernels bit
    for bit (half types against the CPU in float32: the maximum is a copy, the gradient the same float sum),
    ties and NaNs among the values."""
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    ref = _ref_dtype(dtype)
    checked = 0
    for x, (oh, ow) in _pool_cases(k, s, p, gen):
        x = x.to(dtype)
        xl = _in_layout(x, channels_last)
        want = torch.ops.attnscale.caffe_max_pool2d(x.to(ref), k, s, p, oh, ow)
        assert torch.equal(emu.caffe_max_pool2d(xl, k, s, p, oh, ow, channels_last).to(ref), want)
        k_eff = min(k, max(x.shape[2], x.shape[3]) + p)  # what the glue passes (max_pool.h check_mask_args)
        out, mask = emu.caffe_max_pool2d_with_mask(xl, k_eff, s, p, oh, ow, channels_last)
        want, want_mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x.to(ref), k, s, p, oh, ow)
        assert torch.equal(out.to(ref), want) and torch.equal(mask, want_mask), (x.shape, oh, ow)
        g = torch.randn(out.shape, generator=gen).to(dtype)
        gx = emu.caffe_max_pool2d_backward(_in_layout(g, channels_last), _in_layout(mask, channels_last), k_eff, s, p,
                                           x.shape[2], x.shape[3], channels_last)
        want_gx = torch.ops.attnscale.caffe_max_pool2d_backward(g.to(ref), want_mask, k, s, p, x.shape[2], x.shape[3])
        assert torch.equal(gx, want_gx.to(dtype)), (x.shape, oh, ow)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("C,misalign", [(16, 0), (24, 0), (12, 0), (16, 1)], ids=["c16", "c24", "c12", "c16-off"])
def test_max_pool_vector_kernels(dtype, C, misalign):
    """The channels_last vector kernels (a thread per 16 bytes of channels): taken exactly when C is a multiple of
    16 / element size and every pointer is aligned, else the per-element kernels; the same bits as the CPU kernels
    either way (ties and NaNs among the values), for every pooling configuration and border case."""
    width = 16 // torch.empty((), dtype=dtype).element_size()
    vec = C % width == 0 and misalign == 0
    gen = torch.Generator().manual_seed(C * 10 + misalign)
    ref = _ref_dtype(dtype)
    emu.launches()
    for k, s, p in MAX_POOL_CONFIGS:
        for x, (oh, ow) in _train_cases(k, s, p, gen, sizes_h=(1, 5, 13), sizes_w=(1, 8, 17), channels=C):
            h, w = x.shape[-2:]
            x = x.to(dtype)
            x[1, C // 2, h // 2, w // 2] = float("nan")
            xl = _in_layout(x, True)
            want = torch.ops.attnscale.caffe_max_pool2d(x.to(ref), k, s, p, oh, ow)
            assert torch.equal(emu.caffe_max_pool2d(xl, k, s, p, oh, ow, True, misalign).to(ref).nan_to_num(7),
                               want.nan_to_num(7))
            k_eff = min(k, max(h, w) + p)
            out, mask = emu.caffe_max_pool2d_with_mask(xl, k_eff, s, p, oh, ow, True, misalign)
            want, want_mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(x.to(ref), k, s, p, oh, ow)
            assert torch.equal(out.to(ref).nan_to_num(7), want.nan_to_num(7)) and torch.equal(mask, want_mask)
            g = torch.randn(out.shape, generator=gen).to(dtype)
            gx = emu.caffe_max_pool2d_backward(_in_layout(g, True), _in_layout(mask, True), k_eff, s, p, h, w, True,
                                               misalign)
            want_gx = torch.ops.attnscale.caffe_max_pool2d_backward(g.to(ref), want_mask, k, s, p, h, w)
            assert torch.equal(gx, want_gx.to(dtype)), (k, s, p, h, w)
            launched = emu.launches()
            assert len(launched) == 3 and all(("vec_kernel" in n) == vec for n in launched), launched
    if vec:  # aligned values with a mask off its alignment (one byte): the per-element kernels, the same bits
        out, mask = emu.caffe_max_pool2d_with_mask(xl, k_eff, s, p, oh, ow, True, mask_misalign=1)
        assert torch.equal(out.to(ref).nan_to_num(7), want.nan_to_num(7)) and torch.equal(mask, want_mask)
        gx = emu.caffe_max_pool2d_backward(_in_layout(g, True), _in_layout(mask, True), k_eff, s, p, h, w, True,
                                           mask_misalign=1)
        assert torch.equal(gx, want_gx.to(dtype))
        assert ["vec_kernel" in n for n in emu.launches()] == [False, False]


# ----------------------------------------------------------------------------------------------- Interp
INTERP_CASES = [((31, 21), (41, 41)), ((5, 7), (13, 9)), ((8, 8), (4, 3)), ((13, 10), (7, 9)), ((1, 6), (4, 1)),
                ((65, 65), (33, 49)), ((2, 3), (1, 1)), ((5, 7), (5, 13)), ((5, 7), (9, 7))]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["nchw", "nhwc"])
def test_interp_kernels(dtype, channels_last):
    """interp_kernel.cu: the forward == the index_select path (attnscale.caffe._interp_blend: each product and
    sum rounded to the dtype) bit for bit; the backward == the CPU caffe_interp_backward bit for bit (half
    types summed in float32 from the same values and tables, rounded once); an infinity among the values and
    the gradients (an axis that keeps its size still blends: 0 * inf from the next pixel, as in Caffe); the
    backward's gradient dense or a channel slice of a wider tensor (read through its strides)."""
    gen = torch.Generator().manual_seed(3)
    ref = torch.float64 if dtype == torch.float64 else torch.float32
    for (ih, iw), (oh, ow) in INTERP_CASES:
        x = torch.randn(2, 5, ih, iw, generator=gen).to(dtype)
        x[1, 2, ih // 2, iw // 2] = float("inf")
        got = emu.caffe_interp(_in_layout(x, channels_last), oh, ow, channels_last)
        assert _same(got, caffe._interp_blend(x, (oh, ow))), ((ih, iw), (oh, ow))
        g = torch.randn(2, 5, oh, ow, generator=gen).to(dtype)
        g[0, 3, oh // 2, ow // 2] = float("inf")
        tables = (caffe.host_constants(caffe._interp_adjoint_tables, ih, oh, dtype)
                  + caffe.host_constants(caffe._interp_adjoint_tables, iw, ow, dtype))
        want = torch.ops.attnscale.caffe_interp_backward(g.to(ref), *tables).to(dtype)
        for slice_of in (0, 3):  # a dense gradient, and a channel slice of a wider one read in place
            got = emu.caffe_interp_backward(g, *tables, channels_last=channels_last, slice_of=slice_of)
            assert _same(got, want), ((ih, iw), (oh, ow), slice_of)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("C,misalign", [(16, 0), (24, 0), (12, 0), (16, 1)], ids=["c16", "c24", "c12", "c16-off"])
def test_interp_vector_kernels(dtype, C, misalign):
    """The channels_last vector kernels (a thread per 16 bytes of channels), forward and backward: taken exactly
    when C is a multiple of 16 / element size and the data aligned (for the backward also the gradient's
    channels contiguous in aligned runs: a dense gradient or a channel slice starting at a multiple of the
    width), else the per-element kernels; the same bits either way, infinities included."""
    width = 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(C + misalign)
    ref = torch.float64 if dtype == torch.float64 else torch.float32
    emu.launches()
    for (ih, iw), (oh, ow) in INTERP_CASES[:6]:
        x = torch.randn(2, C, ih, iw, generator=gen).to(dtype)
        x[1, C - 1, ih // 2, iw // 2] = float("inf")
        got = emu.caffe_interp(_in_layout(x, True), oh, ow, True, misalign)
        assert _same(got, caffe._interp_blend(x, (oh, ow))), ((ih, iw), (oh, ow))
        assert [("vec_kernel" in n) for n in emu.launches()] == [C % width == 0 and misalign == 0]
        g = torch.randn(2, C, oh, ow, generator=gen).to(dtype)
        g[0, 1, oh // 2, ow // 2] = float("inf")
        tables = (caffe.host_constants(caffe._interp_adjoint_tables, ih, oh, dtype)
                  + caffe.host_constants(caffe._interp_adjoint_tables, iw, ow, dtype))
        want = torch.ops.attnscale.caffe_interp_backward(g.to(ref), *tables).to(dtype)
        # dense; a slice at an aligned channel; one off it; one at an aligned channel of a tensor whose pixel
        # stride is not a multiple of the width (4 channels more after it)
        for slice_of, tail in ((0, 0), (width, width), (3, 3), (width, width + 4)):
            got = emu.caffe_interp_backward(g, *tables, channels_last=True, slice_of=slice_of, tail=tail)
            assert _same(got, want), ((ih, iw), (oh, ow), slice_of)
            vec = C % width == 0 and slice_of % width == 0 and (slice_of + C + tail) % width == 0
            assert [("vec_kernel" in n) for n in emu.launches()] == [vec], (slice_of, tail)


# -------------------------------------------------------------------------------------------- bias_relu
BIAS_RELU_SHAPES = [((2, 64, 9, 8), 0), ((2, 64, 9, 8), 1), ((3, 21, 5, 7), 0), ((4, 64, 33, 33), 0),
                    ((1, 1024, 9, 9), 0), ((2, 48, 40, 40), 0)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,misalign", BIAS_RELU_SHAPES)
def test_bias_relu_kernels(dtype, channels_last, shape, misalign):
    """bias_relu_kernel.cu: forward == the CPU kernel bit for bit (half types: the float32 sum rounded once);
    backward: x's gradient bit for bit, the bias gradient (block partials, then the lane sum) against a float64
    sum, deterministic; the vector and scalar paths (21 channels, a misaligned pointer), one block and many
    (NHWC: several channel chunks with 1024 channels; NCHW: several blocks per plane at 33x33 and 40x40)."""
    gen = torch.Generator().manual_seed(sum(shape) + misalign)
    ref = _ref_dtype(dtype)
    x = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape[1], generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    y = emu.bias_relu(_in_layout(x, channels_last), b, channels_last, misalign)
    want = torch.ops.attnscale.bias_relu(x.to(ref), b.to(ref)).to(dtype)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())
    g = torch.randn(shape, generator=gen).to(dtype)
    gx, gb, plan = emu.bias_relu_backward(_in_layout(g, channels_last), _in_layout(y, channels_last), dtype,
                                          channels_last, misalign)
    want_gx = torch.where(want <= 0, torch.zeros((), dtype=dtype), g)
    assert torch.equal(gx, want_gx)
    exact = want_gx.double().sum((0, 2, 3))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gb.double(), exact, rtol=tol, atol=tol * max(1.0, exact.abs().max().item()))
    gx2, gb2, _ = emu.bias_relu_backward(_in_layout(g, channels_last), _in_layout(y, channels_last), dtype,
                                         channels_last, misalign)
    assert torch.equal(gb, gb2) and torch.equal(gx, gx2)
    vm = 16 // x.element_size()
    assert plan["vec"] == (vm if misalign == 0 and (shape[1] if channels_last else shape[2] * shape[3]) % vm == 0
                           else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["nchw", "nhwc"])
def test_bias_relu_float32_bias_of_a_half_map(dtype, channels_last):
    """Autocast's case: a float32 bias with a half-type map == the bias cast first, bit for bit; its gradient in
    float32 (the float sum unrounded), which rounded to the dtype is the half-type gradient."""
    gen = torch.Generator().manual_seed(1)
    x = _in_layout(torch.randn(4, 64, 9, 8, generator=gen).to(dtype), channels_last)
    b32 = torch.randn(64, generator=gen)
    y = emu.bias_relu(x, b32, channels_last)
    assert torch.equal(y, emu.bias_relu(x, b32.to(dtype), channels_last))
    g = _in_layout(torch.randn(y.shape, generator=gen).to(dtype), channels_last)
    yl = _in_layout(y, channels_last)
    gx, gb, _ = emu.bias_relu_backward(g, yl, torch.float32, channels_last)
    gx_h, gb_h, _ = emu.bias_relu_backward(g, yl, dtype, channels_last)
    assert gb.dtype == torch.float32 and torch.equal(gx, gx_h) and torch.equal(gb.to(dtype), gb_h)
    torch.testing.assert_close(gb.double(), gx.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,misalign", [((2, 64, 9, 8), 0), ((2, 64, 9, 8), 1), ((3, 21, 5, 7), 0),
                                            ((1, 1024, 9, 9), 0)])
@pytest.mark.parametrize("p", [0.3])
def test_bias_relu_dropout_kernels(dtype, channels_last, shape, misalign, p):
    """The fused dropout: the forward kernel == the pure-PyTorch reference (the Philox mask over memory order,
    F.relu then the scale in the dtype: bit for bit; float32 / float64 also == the CPU kernel with the same seed),
    through the vector paths (two Philox blocks per 8 half-type elements, half a block per 2 doubles) and the
    scalar one (21 channels, 35 pixels, a misaligned pointer: elements not starting a block); the backward with
    the scale: 0 where the output is 0, grad * scale elsewhere, the bias gradient its sum."""
    gen = torch.Generator().manual_seed(sum(shape) + misalign)
    x = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape[1], generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    xl = _in_layout(x, channels_last)
    seed = 0x5DEECE66D + shape[1]
    y = emu.bias_relu(xl, b, channels_last, misalign, p=p, seed=seed)
    assert _same(y, bias_relu_reference(xl, b, p, seed))
    if dtype in (torch.float32, torch.float64):
        assert _same(y, torch.ops.attnscale.bias_relu(xl, b, p, seed))
    scale = 1.0 / (1.0 - p)
    g = torch.randn(shape, generator=gen).to(dtype)
    gx, gb, _ = emu.bias_relu_backward(_in_layout(g, channels_last), _in_layout(y, channels_last), dtype,
                                       channels_last, misalign, scale=scale)
    want_gx = torch.where(y <= 0, torch.zeros((), dtype=dtype), g * scale)
    assert torch.equal(gx, want_gx)
    exact = want_gx.double().sum((0, 2, 3))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gb.double(), exact, rtol=tol, atol=tol * max(1.0, exact.abs().max().item()))


def test_bias_relu_dropout_ratio_under_one_in_2_to_32():
    """p = 1e-12 (floor(p 2^32) = 0): nothing dropped, every unit still scaled, as on the CPU."""
    test_bias_relu_dropout_kernels(torch.float64, False, (2, 64, 9, 8), 0, 1e-12)


# ------------------------------------------------------------------------------------------ scale merge
@pytest.mark.parametrize("mode", ["attention", "avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_merge_kernels(mode, dtype):
    """scale_merge_kernel.cu (already proven on an H100, so also a check of the emulator on shared memory and
    shuffles): forward and backward, both backward layouts, against the CPU op in float32."""
    gen = torch.Generator().manual_seed(4)
    sizes = [(41, 37), (31, 28), (21, 19)]
    scores = [torch.randn(2, 21, h, w, generator=gen).to(dtype) for h, w in sizes]
    logits = torch.randn(2, 3, *sizes[0], generator=gen).to(dtype) if mode == "attention" else None
    f32 = [s.float() for s in scores]
    l32 = logits.float() if logits is not None else None
    merged, weights = emu.scale_merge(scores, logits, mode)
    want, want_w = torch.ops.attnscale.scale_merge(f32, l32, mode)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(merged.float(), want, **tol)
    if mode == "attention":
        torch.testing.assert_close(weights.float(), want_w, **tol)
    gm = torch.randn(merged.shape, generator=gen).to(dtype)
    gw = torch.randn(weights.shape, generator=gen).to(dtype) if mode == "attention" else None
    want_gs, want_gl = torch.ops.attnscale.scale_merge_backward(gm.float(), gw.float() if gw is not None else None,
                                                                f32, l32, mode, None)
    for layout in ((0, 1) if mode != "max" else (0,)):
        gs, gl = emu.scale_merge_backward(gm, gw, scores, logits, mode, layout=layout)
        for a, b in zip(gs, want_gs):
            torch.testing.assert_close(a.float(), b, **tol)
        if mode == "attention":
            torch.testing.assert_close(gl.float(), want_gl, **tol)


@pytest.mark.parametrize("hw", [(6, 4), (4, 7)], ids=["rows-kept", "cols-kept"])
def test_scale_merge_kernel_blends_an_axis_that_keeps_its_size(hw):
    """A coarse scale that keeps one of the finest scale's sizes is blended along it as Caffe's Interp does
    (0 * inf from the next pixel): NaN and infinity where the CPU kernel has them."""
    gen = torch.Generator().manual_seed(6)
    f0 = torch.randn(1, 2, 6, 7, generator=gen)
    f1 = torch.randn(1, 2, *hw, generator=gen)
    f1[0, 1, 2, 1] = float("inf")
    got, _ = emu.scale_merge([f0, f1], None, "avg")
    want, _ = torch.ops.attnscale.scale_merge([f0, f1], None, "avg")
    assert want.isnan().any() and torch.equal(got.isinf(), want.isinf()) and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(posinf=0), want.nan_to_num(posinf=0))


# ------------------------------------------------------------------------------------ dilated convolution
CONV_CASES = [  # (dtype, forward rel tol, backward rel tol, tensor cores): test_dilated_conv's CUDA cases
    (torch.float64, 1e-10, 1e-10, False),
    (torch.float32, 1e-5, 1e-5, False),
    (torch.float32, 5e-3, 5e-3, True),
    (torch.bfloat16, 2e-2, 3e-2, True),
    (torch.float16, 5e-3, 5e-3, True),
]
CONV_SHAPES = [  # (N, C, O, H, W, k, dilation, padding)
    (2, 4, 6, 13, 13, 3, 5, 5), (2, 3, 4, 9, 9, 3, 1, 1), (1, 2, 3, 5, 5, 3, 12, 12), (2, 3, 2, 7, 11, 3, 4, 4),
    (1, 2, 3, 9, 6, 5, 2, 3), (1, 2, 3, 4, 4, 3, 1, 4), (2, 3, 2, 6, 5, 1, 1, 0), (2, 40, 70, 21, 19, 3, 12, 12),
]


def _rel_err(a, e):
    return ((a - e).norm() / e.norm()).item()


def _conv_inputs(shape, dtype):
    """(generator, x, weight, bias) of a CONV_SHAPES entry, random in float64 rounded to dtype; the generator
    goes on to draw the output gradient."""
    n, c, o, h, w, k, d, p = shape
    gen = torch.Generator().manual_seed(n + c + o + h + w + k + d + p)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    wt = (torch.randn(o, c, k, k, generator=gen, dtype=torch.float64) / (c * k * k) ** 0.5).to(dtype)
    b = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    return gen, x, wt, b


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-tc{c[3]}")
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dilated_conv_kernels(case, shape):
    """dilated_conv_kernel.cu's direct kernels (the tensor-core implicit GEMM through an emulation of
    nvcuda::wmma, the SIMT kernels, split-K weight gradient and its fixed-order reduction, the bias
    gradient's tree): forward, input, weight and bias gradients against F.conv2d in float64 from the same
    rounded values, to the CUDA tests' tolerances; partial tiles, dead taps, outputs with no live tap."""
    dtype, tol_f, tol_b, tc = case
    gen, x, wt, b = _conv_inputs(shape, dtype)
    _, _, _, _, _, k, d, p = shape
    ref = torch.nn.functional.conv2d(x.double(), wt.double(), b.double(), padding=p, dilation=d)
    y = emu.dilated_conv2d(x, wt, b, d, p, tc)
    assert y.shape == ref.shape and _rel_err(y.double(), ref) < tol_f
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    xr, wr, br = (t.double().requires_grad_() for t in (x, wt, b))
    want = torch.autograd.grad(torch.nn.functional.conv2d(xr, wr, br, padding=p, dilation=d), (xr, wr, br), g.double())
    gx = emu.dilated_conv2d_backward_input(g, wt, x.shape, d, p, tc)
    gw, gb = emu.dilated_conv2d_backward_weight(g, x, k, d, p, tc)
    for name, a, e in zip(("x", "weight", "bias"), (gx, gw, gb), want):
        assert _rel_err(a.double(), e) < tol_b, name


GEMM_CASES = [case for case in CONV_CASES if not (case[0] == torch.float32 and case[3])]  # no TF32: cuBLAS's own
GEMM_SHAPES = CONV_SHAPES + [(2, 16, 24, 41, 41, 3, 12, 12)]  # fc6's plane: a centre, 4 edges, 4 corners


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("O", [512, 1024, 1032])
def test_dilated_conv_gemm_bias_gradient_wide(dtype, O):
    """The gather's bias gradient at fc6's widths, where each lane sums 2, 4 or 8 vectors of channels (the
    fc6 plane at the 0.5 scale, 21x21: nine rectangles in one plan); past 1024 channels it is left to ATen."""
    gen = torch.Generator().manual_seed(O)
    x = torch.randn(2, 8, 21, 21, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(2, O, 21, 21, generator=gen, dtype=torch.float64).to(dtype)
    _, gb = emu.gemm_backward_weight(g, x, 3, 3, 12, 12)
    if O > 1024:
        assert gb is None
        return
    assert gb is not None and gb.dtype == dtype
    want = g.double().sum((0, 2, 3))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel_err(gb.double(), want) < tol


@pytest.mark.parametrize("misalign", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: str(c[0]))
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dilated_conv_gemm_path_kernels(case, shape, misalign):
    """dilated_conv_pack_kernel.cu, the GEMM path's copies (column blocks, weight blocks through a view of the
    kernel or of its flipped transpose, product blocks to and from the channels_last output, the weight
    gradient's sum over the rectangles, the bias gradient summed by the gather), around batched GEMMs in
    float32 as cuBLAS's: forward, input gradient (the adjoint convolution), weight and bias gradients against
    F.conv2d in float64, to the CUDA tests' tolerances; 16-byte copies and, misaligned by an element or with odd channel counts, the narrow ones;
    a channels_last kernel too (the weight copy then reads along the other axis)."""
    dtype, tol_f, tol_b, _ = case
    gen, x, wt, b = _conv_inputs(shape, dtype)
    _, _, _, _, _, k, d, p = shape
    xr, wr, br = (t.double().requires_grad_() for t in (x, wt, b))
    ref = torch.nn.functional.conv2d(xr, wr, br, padding=p, dilation=d)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    want = torch.autograd.grad(ref, (xr, wr, br), g.double())
    for kernel in (wt, wt.contiguous(memory_format=torch.channels_last)):
        y = emu.gemm_convolve(x, kernel, b, d, p, p, misalign=misalign)
        assert y.shape == ref.shape and _rel_err(y.double(), ref.detach()) < tol_f
        pad = d * (k - 1) - p
        gx = emu.gemm_convolve(g, kernel, None, d, pad, pad, adjoint=True, misalign=misalign)
        assert gx.shape == x.shape and _rel_err(gx.double(), want[0]) < tol_b, "x"
    gw, gb = emu.gemm_backward_weight(g, x, k, k, d, p, misalign=misalign)
    assert _rel_err(gw.permute(0, 3, 1, 2).double(), want[1]) < tol_b, "weight"
    # the gather sums the bias gradient where one plan covers every output and the vectors are whole and
    # aligned: fc6's plane (else gemm_backward_weight leaves it to ATen's sum)
    if shape == GEMM_SHAPES[-1] and dtype != torch.float64 and not misalign:
        assert gb is not None
    if gb is not None:
        assert _rel_err(gb.double(), want[2]) < tol_b, "bias"
