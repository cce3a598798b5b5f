"""Tests of the fused scale merge op (attnscale.ops.scale_merge) against its pure-PyTorch spec
(attnscale.ops.reference.scale_merge_reference): values, gradients, Caffe Eltwise MAX tie rule,
determinism, schema/fake/autograd registration (opcheck) and input checks.  CUDA tests compare the
CUDA kernels with the CPU kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnscale.ops import has_extension, scale_merge, scale_merge_reference

pytestmark = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

MODES = ("attention", "avg", "max")
# (H, W) per scale: exact Interp ratios (9->7->5: (7-1)/(9-1) = 3/4, (5-1)/(9-1) = 1/2), inexact
# ones (8/6/5: 5/7, 4/7), non-square, and the DeepLab training sizes (321 crop -> 41/31/21).
EXACT = ((9, 9), (7, 7), (5, 5))
INEXACT = ((8, 8), (6, 6), (5, 5))
NONSQUARE = ((9, 11), (7, 6), (5, 4))
TRAIN = ((41, 41), (31, 31), (21, 21))
S8 = ((11, 11), (10, 10), (9, 9), (8, 8), (7, 7), (6, 6), (5, 5), (4, 4))  # the most scales on CUDA


def _ups(scores):
    h0, w0 = scores[0].shape[-2:]
    return [scores[0]] + [F.interpolate(s, size=(h0, w0), mode="bilinear", align_corners=True)
                          for s in scores[1:]]


def _min_gap(scores):
    """Smallest gap between the best and second-best resized scale over all outputs."""
    if len(scores) == 1:
        return float("inf")
    top2 = torch.stack(_ups(scores), 0).double().topk(2, dim=0).values
    return (top2[0] - top2[1]).min().item()


def make_inputs(sizes, n=2, c=3, dtype=torch.float32, mode="attention", gap=None, seed=0, quantize=None):
    """Random scores/logits; for max, retry seeds until the argmax has a margin >= gap.
    ``quantize``: round the values to that dtype first (so CUDA half/bfloat16 inputs are exact)."""
    gen = torch.Generator().manual_seed(seed)
    q = (lambda t: t.to(quantize).to(dtype)) if quantize is not None else (lambda t: t)
    for _ in range(500):
        scores = [q(torch.randn(n, c, h, w, generator=gen, dtype=dtype)) for h, w in sizes]
        if mode != "max" or gap is None or _min_gap(scores) >= gap:
            break
    else:  # pragma: no cover
        raise AssertionError("could not draw inputs without near-ties")
    logits = torch.randn(n, len(sizes), *sizes[0], generator=gen, dtype=dtype) * 2
    return scores, logits


def run(fn, scores, logits, mode, gout=None, gw=None):
    """Forward + backward of fn; returns (merged, weights, score grads, logit grad)."""
    sc = [s.detach().clone().requires_grad_(True) for s in scores]
    lg = logits.detach().clone().requires_grad_(True)
    out, w = fn(sc, lg, mode)
    g = torch.randn_like(out) if gout is None else gout
    loss = (out * g).sum()
    if gw is not None and mode == "attention":
        loss = loss + (w * gw).sum()
    loss.backward()
    return out.detach(), w.detach(), [s.grad for s in sc], lg.grad


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def check_matches_reference(sizes, mode, n=2, c=3, tol=1e-6, grad_weights=True, dtype=torch.float32,
                            ref_dtype=None):
    """Values, weights and every gradient of the op against the reference (with a gradient
    reaching the weights output too unless grad_weights=False); returns the op's weights.
    ``ref_dtype``: run the reference on the same inputs cast to that dtype (float64: the exact
    answer to compare a float32 op with)."""
    scores, logits = make_inputs(sizes, n=n, c=c, mode=mode, gap=1e-4, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(n, c, *sizes[0], dtype=dtype, generator=gen)
    gw = torch.randn(n, len(sizes), *sizes[0], dtype=dtype, generator=gen) if grad_weights else None
    o1, w1, g1, l1 = run(scale_merge, scores, logits, mode, gout, gw)
    rd = ref_dtype or dtype
    cast = lambda t: None if t is None else t.to(rd)  # noqa: E731
    o2, w2, g2, l2 = run(scale_merge_reference, [cast(s) for s in scores], cast(logits), mode, cast(gout), cast(gw))
    o2, w2, g2, l2 = (o2.to(dtype), w2.to(dtype), [g.to(dtype) for g in g2],
                                  None if l2 is None else l2.to(dtype))
    close(o1, o2, tol)
    close(w1, w2, tol)
    for a, b in zip(g1, g2):
        close(a, b, tol)
    if mode == "attention":
        close(l1, l2, tol)
    else:
        assert l1 is None
    return w1


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [EXACT, INEXACT, NONSQUARE, TRAIN], ids=["exact", "inexact", "nonsquare", "train"])
def test_matches_reference_fp32(mode, sizes):
    check_matches_reference(sizes, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_scales", [3, 4, 5])
@pytest.mark.parametrize("w0", [12, 16, 33, 65, 70, 97])
def test_matches_reference_every_row_width_path(mode, num_scales, w0):
    """The CPU kernels pick their inner loops by row width and scale count: 8-wide vectors below 16
    pixels, else (AVX-512 builds) 16-wide ones; groups of as many blocks as the registers hold (the whole
    row at 16, 33, 65 and 70; several groups at 97, in the sweep at 70 with 4 scales, or with AVX2's 16
    registers) or block by block (5 scales: run-time scale loops).  Each path against the reference, with batch items whose chunks hold every
    class (n = 8) and not (n = 2)."""
    sizes = [(5, w0), (4, w0 * 3 // 4), (3, w0 // 2), (2, w0 // 3), (2, w0 // 4)][:num_scales]
    for n in (2, 8):
        check_matches_reference(sizes, mode, n=n, c=5, tol=2e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,c", [(1, 21), (1, 5), (3, 10), (8, 21), (1, 1)])
def test_batch_and_class_counts(mode, n, c):
    """The forward and the backward split each batch item's classes into chunks (more chunks for
    small N; the backward reduces its partial sums in a fixed order); every split must give the
    reference's values and gradients, uneven ones included: backward N=1, C=21: 7 chunks of 3 for
    attention, ten of 2 and one of 1 otherwise; forward N=8, C=21: 6, 6, 6 and 3."""
    sizes = INEXACT if mode == "max" else TRAIN  # max: few outputs, so that no near-tie is drawn
    check_matches_reference(sizes, mode, n=n, c=c, tol=2e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_scales", [1, 2])
def test_few_scales(mode, num_scales):
    w = check_matches_reference(INEXACT[:num_scales], mode, grad_weights=False)
    if num_scales == 1:
        assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,c", [(2, 3), (8, 21)])
def test_many_scales(mode, n, c):
    """Five scales: the CPU kernels' runtime loop over scales (S - 1 > 3 coarse maps), one class per
    forward task (N=2) and chunks of 6, 6, 6 and 3 classes (N=8, C=21)."""
    check_matches_reference(((12, 11), (10, 9), (8, 8), (6, 7), (4, 5)), mode, n=n, c=c, tol=2e-6)


def draw_case(data, max_n, max_c, max_hw, max_s):
    """A random (mode, N, C, sizes): scale 0 up to max_hw square-or-not, each coarser scale no larger."""
    mode = data.draw(st.sampled_from(MODES), label="mode")
    n = data.draw(st.integers(1, max_n), label="n")
    c = data.draw(st.integers(1, max_c), label="c")
    h0 = data.draw(st.integers(1, max_hw), label="h0")
    w0 = data.draw(st.integers(1, max_hw), label="w0")
    num = data.draw(st.integers(1, max_s), label="S")
    sizes = [(h0, w0)] + [(data.draw(st.integers(1, h0)), data.draw(st.integers(1, w0))) for _ in range(num - 1)]
    if mode == "max":  # few outputs, so that a draw without near-ties is found quickly
        n, c = min(n, 2), min(c, 3)
    return mode, n, c, tuple(sizes)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_shapes_match_reference(data):
    """Random batch sizes, class counts (so every class-chunk split), scale counts, map sizes
    (including 1-pixel rows/columns, equal sizes and widths that 8 does or does not divide) and modes:
    the op equals the reference in values, weights and all gradients.  In float64, so that a
    1-pixel map's gradient (a sum over every output pixel) is compared free of float32 summation-order
    noise.  What remains is the Interp source coordinate, which the op computes in float as Caffe does
    (an absolute error of ~6e-8 times the coordinate in each lambda, so ~1e-6 on these values), far
    below what any indexing slip would give."""
    mode, n, c, sizes = draw_case(data, max_n=9, max_c=25, max_hw=20, max_s=5)
    check_matches_reference(sizes, mode, n=n, c=c, tol=2e-5, dtype=torch.float64)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_shapes_float32_kernels(data):
    """The float32 kernels (AVX2 8-wide blocks where the machine has them: overlapping last blocks,
    in-register transposes, rows narrower than a block) over random sizes up to 48, against the
    float64 reference of the same inputs.  A float32 tolerance: an indexing slip is off by O(1)."""
    mode, n, c, sizes = draw_case(data, max_n=4, max_c=12, max_hw=48, max_s=4)
    check_matches_reference(sizes, mode, n=n, c=c, tol=1e-4, ref_dtype=torch.float64)


def test_too_many_scales_for_cpu_kernel():
    scores = [torch.randn(1, 2, 4, 4) for _ in range(17)]
    with pytest.raises(ValueError, match="at most 16 scales"):
        scale_merge(scores, torch.randn(1, 17, 4, 4), "attention")


def test_same_size_scale_is_a_copy():
    """Caffe Interp copies when input and output sizes are equal."""
    f0 = torch.randn(1, 2, 6, 7)
    f1 = torch.randn(1, 2, 6, 7)
    out, _ = scale_merge([f0, f1], None, "max")
    assert torch.equal(out, torch.maximum(f0, f1))


@pytest.mark.parametrize("S", [2, 3])
def test_avg_multiplies_by_caffes_float_coefficient(S):
    """Caffe's Eltwise SUM takes ``coeff`` from a float field of the prototxt (``0.3333333333333333``), so even a
    ``Net<double>`` multiplies by float32(1/S) (found against a real Caffe: tests/test_caffe_reference.py): in
    float64 the merge, its gradients, the returned weights and the reference all use that coefficient, not 1/S."""
    coeff = float(np.float32(1.0 / S))
    scores = [torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(S)]
    out, w = scale_merge(scores, None, "avg")
    want = sum(scores).detach() * coeff
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)
    if S == 3:   # float32(1/2) is 1/2; float32(1/3) is not 1/3, and the float64 1/3 would give other values
        assert (out - sum(scores).detach() / S).abs().max() > 1e-12
    assert torch.all(w == coeff)
    out.sum().backward()
    assert all(torch.all(s.grad == coeff) for s in scores)
    ref, wr = scale_merge_reference([s.detach() for s in scores], None, "avg")
    torch.testing.assert_close(ref, want, rtol=1e-15, atol=0)
    assert torch.all(wr == coeff)


def test_one_axis_unchanged_scale_still_blends():
    """Caffe's Interp copies only when both sizes match: a coarse scale that keeps one size is still blended
    along it (weight 0 on the next pixel), so an infinite score spreads NaN there as caffe.interp's does."""
    from attnscale import caffe

    f0 = torch.randn(1, 2, 6, 7)
    for f1 in (torch.randn(1, 2, 6, 4), torch.randn(1, 2, 4, 7)):
        f1[0, 1, 2, 1] = float("inf")
        out, _ = scale_merge([f0, f1], None, "avg")
        want = (f0 + caffe.interp(f1, (6, 7))) / 2
        assert want.isnan().any()
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
        close(out.nan_to_num(posinf=0), want.nan_to_num(posinf=0))


def test_noncontiguous_inputs():
    scores, logits = make_inputs(EXACT)
    nc = [s.transpose(2, 3).contiguous().transpose(2, 3) for s in scores]
    assert not nc[1].is_contiguous()
    lnc = logits.transpose(0, 1).contiguous().transpose(0, 1)
    o1, w1 = scale_merge(nc, lnc, "attention")
    o2, w2 = scale_merge_reference(scores, logits, "attention")
    close(o1, o2)
    close(w1, w2)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [EXACT, INEXACT, NONSQUARE], ids=["exact", "inexact", "nonsquare"])
def test_gradcheck_fp64(mode, sizes):
    scores, logits = make_inputs(sizes, n=1, c=2, dtype=torch.float64, mode=mode, gap=1e-3)
    sc = [s.requires_grad_(True) for s in scores]
    inputs = (*sc, logits.requires_grad_(mode == "attention"))
    S = len(sc)

    def fn(*args):
        return scale_merge(list(args[:S]), args[S], mode)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=False)


def test_fp64_matches_reference():
    # the reference computes the softmax in fp32; compare at fp32 precision
    scores, logits = make_inputs(INEXACT, dtype=torch.float64)
    o1, w1, g1, l1 = run(scale_merge, scores, logits, "attention")
    torch.manual_seed(0)
    o2, w2, g2, l2 = run(scale_merge_reference, scores, logits, "attention")
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    scores, logits = make_inputs(INEXACT, mode=mode, gap=1e-4)
    sc = [s.detach().requires_grad_(True) for s in scores]
    lg = logits.detach().requires_grad_(mode == "attention")
    torch.library.opcheck(torch.ops.attnscale.scale_merge.default, (sc, lg if mode == "attention" else None, mode))
    gout = torch.randn(2, 3, *INEXACT[0][:2])
    gw = torch.randn(2, 3, *INEXACT[0][:2]) if mode == "attention" else None
    torch.library.opcheck(torch.ops.attnscale.scale_merge_backward.default,
                          (gout, gw, scores, logits if mode == "attention" else None, mode))
    weights = torch.ops.attnscale.scale_merge(scores, logits if mode == "attention" else None, mode)[1]
    torch.library.opcheck(torch.ops.attnscale.scale_merge_backward.default,
                          (gout, gw, scores, logits if mode == "attention" else None, mode, weights))


@pytest.mark.parametrize("mode", MODES)
def test_backward_deterministic(mode):
    scores, logits = make_inputs(TRAIN, mode=mode)
    gout = torch.randn(2, 3, 41, 41)
    a = run(scale_merge, scores, logits, mode, gout)
    b = run(scale_merge, scores, logits, mode, gout)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = run(scale_merge, scores, logits, mode, gout)
    finally:
        torch.set_num_threads(prev)
    for other in (b, c):  # bit-identical, also across thread counts
        for x, y in zip(a[2], other[2]):
            assert torch.equal(x, y)
        if mode == "attention":
            assert torch.equal(a[3], other[3])
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


# ----------------------------------------------------------------------------------------------
def test_max_tie_rule_is_caffe_cpu_eltwise():
    """Caffe's CPU EltwiseLayer MAX: ``a > b ? 0 : 1`` for bottoms 0 and 1, then a later bottom wins only
    if strictly greater; the gradient reaches exactly one scale (the mask's)."""
    n, c = 2, 3
    ones = torch.ones(n, 9, 9)

    def check(scores, winner):
        out, w, grads, _ = run(scale_merge, scores, torch.zeros(n, 3, 9, 9), "max", torch.ones(n, c, 9, 9))
        ref = run(scale_merge_reference, scores, torch.zeros(n, 3, 9, 9), "max", torch.ones(n, c, 9, 9))
        assert torch.equal(out, torch.zeros_like(out))
        for s in range(3):
            assert torch.equal(w[:, s], ones if s == winner else 0 * ones), (winner, s)
            total = grads[s].sum((2, 3))   # each destination pixel's Interp weights sum to 1
            torch.testing.assert_close(total, torch.full((n, c), 81.0 if s == winner else 0.0))
            if s != winner:
                assert torch.equal(grads[s], torch.zeros_like(grads[s]))
            close(grads[s], ref[2][s])
            assert torch.equal(w, ref[1])

    z = [torch.zeros(n, c, h, w) for h, w in EXACT]   # zeros resize to exact zeros
    check(z, 1)                                                        # all tied: bottom 1 (a > b ? 0 : 1)
    check([z[0] - 1, z[1], z[2]], 1)                                   # 1 and 2 tied above 0: the earlier, 1
    check([z[0], z[1] - 1, z[2]], 0)                                   # 0 above 1, tied with 2: 0 keeps it
    check([z[0] - 1, z[1] - 1, z[2]], 2)                               # 2 strictly greatest


def test_max_tie_rule_of_the_importer_eltwise():
    """prototxt_import's Eltwise MAX follows the same rule, gradient included."""
    from types import SimpleNamespace
    from prototxt_import.layers import Eltwise
    lp = SimpleNamespace(eltwise_param=SimpleNamespace(operation=2, coeff=[]))
    layer = Eltwise(lp, [(1, 4)] * 3, None)
    xs = [torch.tensor([[0.0, 0.0, 1.0, -1.0]]), torch.tensor([[0.0, -1.0, 1.0, -1.0]]),
          torch.tensor([[0.0, 0.0, 0.0, 0.0]])]
    xs = [x.requires_grad_(True) for x in xs]
    out = layer(*xs)[0]
    out.sum().backward()
    assert out.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    # column 0: all tied -> bottom 1; column 1: 0 > 1, tie with 2 -> 0; column 2: 0, 1 tied above 2 -> 1;
    # column 3: 2 greatest
    assert [x.grad.tolist()[0] for x in xs] == [[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]


def test_max_weights_are_class_fractions():
    scores, logits = make_inputs(TRAIN, c=5, mode="max", gap=1e-4)
    _, w = scale_merge(scores, None, "max")
    torch.testing.assert_close(w.sum(1), torch.ones(2, 41, 41))
    assert torch.equal(torch.round(w * 5), w * 5) or torch.allclose(torch.round(w * 5), w * 5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
def _good():
    scores = [torch.randn(2, 3, 9, 9), torch.randn(2, 3, 7, 7), torch.randn(2, 3, 5, 5)]
    return scores, torch.randn(2, 3, 9, 9)


BAD = {
    "logits_S_mismatch": (lambda s, l: (s, l[:, :2], "attention"), r"logits has shape"),
    "N_mismatch": (lambda s, l: ([s[0], s[1], s[2][:1]], l, "attention"), r"scores\[2\].*N=1"),
    "C_mismatch": (lambda s, l: ([s[0], s[1][:, :2], s[2]], l, "avg"), r"scores\[1\].*C=2"),
    "coarse_larger": (lambda s, l: ([s[0], torch.randn(2, 3, 10, 7), s[2]], l, "max"), r"scores\[1\].*larger"),
    "coarse_wider": (lambda s, l: ([s[0], s[1], torch.randn(2, 3, 5, 12)], l, "max"), r"scores\[2\].*larger"),
    "empty_list": (lambda s, l: ([], l, "avg"), r"empty"),
    "int_dtype": (lambda s, l: ([s[0], s[1].long(), s[2]], l, "avg"), r"scores\[1\].*floating"),
    "int_dtype_all": (lambda s, l: ([x.int() for x in s], l.int(), "avg"), r"scores\[0\].*floating"),
    "mixed_dtype": (lambda s, l: ([s[0], s[1], s[2].double()], l, "avg"), r"scores\[2\].*dtype"),
    "logits_dtype": (lambda s, l: (s, l.double(), "attention"), r"logits.*dtype"),
    "non_4d": (lambda s, l: ([s[0], s[1][0], s[2]], l, "avg"), r"scores\[1\].*4-D"),
    "logits_non_4d": (lambda s, l: (s, l[0], "attention"), r"logits.*4-D"),
    "bad_mode": (lambda s, l: (s, l, "mean"), r"mode"),
    "logits_missing": (lambda s, l: (s, None, "attention"), r"logits"),
    "half_on_cpu": (lambda s, l: ([x.half() for x in s], l.half(), "attention"), r"not supported on CPU"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("entry", ["python", "op"])
def test_bad_input_raises(case, entry):
    make, pattern = BAD[case]
    scores, logits, mode = make(*_good())
    fn = scale_merge if entry == "python" else torch.ops.attnscale.scale_merge
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        fn(scores, logits, mode)


def test_mixed_devices_raise():
    scores, logits = _good()
    with pytest.raises(ValueError, match=r"scores\[1\].*mixed devices"):
        scale_merge([scores[0], scores[1].to("meta"), scores[2]], logits, "attention")
    with pytest.raises(ValueError, match=r"logits.*mixed devices"):
        scale_merge(scores, logits.to("meta"), "attention")


def test_backward_op_checks_grad_shape():
    scores, logits = _good()
    with pytest.raises(ValueError, match=r"grad_merged"):
        torch.ops.attnscale.scale_merge_backward(torch.randn(2, 3, 8, 9), None, scores, logits, "attention")
    with pytest.raises(ValueError, match=r"grad_weights"):
        torch.ops.attnscale.scale_merge_backward(torch.randn(2, 3, 9, 9), torch.randn(2, 2, 9, 9), scores,
                                                 logits, "attention")
    with pytest.raises(ValueError, match=r"weights \(the forward's weights output\) has shape"):
        torch.ops.attnscale.scale_merge_backward(torch.randn(2, 3, 9, 9), None, scores, logits, "attention",
                                                 torch.randn(2, 2, 9, 9))
    with pytest.raises(ValueError, match=r"weights must have the dtype/device"):
        torch.ops.attnscale.scale_merge_backward(torch.randn(2, 3, 9, 9), None, scores, logits, "attention",
                                                 torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_weights_output_is_saved_for_the_backward():
    """For attention the autograd kernel keeps the forward's weights output for the backward (the CUDA kernels
    read the float32 softmax from it), so changing it in place before backward is PyTorch's usual error
    instead of a silently wrong gradient; the other modes save no output."""
    scores, logits = make_inputs(EXACT)
    sc = [s.clone().requires_grad_(True) for s in scores]
    merged, weights = scale_merge(sc, logits.clone().requires_grad_(True), "attention")
    weights.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        merged.sum().backward()
    merged, weights = scale_merge(sc, None, "avg")
    weights.mul_(2)
    merged.sum().backward()
    assert all(s.grad is not None for s in sc)


def test_scores_not_a_list():
    scores, logits = _good()
    with pytest.raises(TypeError, match="scores must be a list"):
        scale_merge(scores[0], logits, "attention")


# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["element", "pixel"])
def cuda_backward_layout(request, monkeypatch):
    """Both layouts of the CUDA backward (ATTNSCALE_MERGE_BACKWARD): a thread per gradient element (the
    default for avg) or a thread per pixel and class chunk (the default for attention; max keeps the
    element layout)."""
    monkeypatch.setenv("ATTNSCALE_MERGE_BACKWARD", request.param)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_cuda_matches_cpu(mode, dtype, tol, cuda_backward_layout):
    # max: small maps so that inputs whose argmax has a clear margin can be drawn
    sizes, n, c = (EXACT, 2, 3) if mode == "max" else (TRAIN, 3, 5)
    scores, logits = make_inputs(sizes, n=n, c=c, mode=mode, gap=1e-2, quantize=dtype)
    logits = logits.to(dtype).float()
    gout = torch.randn(n, c, *sizes[0]).to(dtype).float()
    gw = torch.randn(n, len(sizes), *sizes[0]).to(dtype).float()
    cpu = run(scale_merge, scores, logits, mode, gout, gw)
    dev = run(scale_merge, [s.cuda().to(dtype) for s in scores], logits.cuda().to(dtype), mode,
              gout.cuda().to(dtype), gw.cuda().to(dtype))
    for a, b in zip((cpu[0], cpu[1], *cpu[2]), (dev[0], dev[1], *dev[2])):
        assert b.dtype == dtype and b.is_cuda
        torch.testing.assert_close(b.float().cpu(), a, rtol=tol, atol=tol)
    if mode == "attention":
        torch.testing.assert_close(dev[3].float().cpu(), cpu[3], rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [((9, 11), (7, 6)), ((9, 11), (8, 9), (7, 6), (5, 4)),
                                   ((13, 13), (10, 10), (7, 7), (5, 5), (4, 4)),
                                   S8],
                         ids=["S2", "S4", "S5", "S8"])
def test_cuda_matches_cpu_other_scale_counts(mode, sizes, cuda_backward_layout):
    """The CUDA kernels have an instance for up to 3 scales (fewer registers) and one for up to 8
    (kMaxScales): both against the CPU kernel, float32, on either side of the switch and at the most."""
    n, c = 2, 3
    scores, logits = make_inputs(sizes, n=n, c=c, mode=mode, gap=1e-3)
    gout = torch.randn(n, c, *sizes[0])
    gw = torch.randn(n, len(sizes), *sizes[0])
    cpu = run(scale_merge, scores, logits, mode, gout, gw)
    dev = run(scale_merge, [s.cuda() for s in scores], logits.cuda(), mode, gout.cuda(), gw.cuda())
    for a, b in zip((cpu[0], cpu[1], *cpu[2]), (dev[0], dev[1], *dev[2])):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    if mode == "attention":
        torch.testing.assert_close(dev[3].cpu(), cpu[3], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_backward_deterministic(mode, cuda_backward_layout):
    scores, logits = make_inputs(TRAIN, n=3, c=5, mode=mode)
    scores = [s.cuda() for s in scores]
    gout = torch.randn(3, 5, 41, 41, device="cuda")
    a = run(scale_merge, scores, logits.cuda(), mode, gout)
    b = run(scale_merge, scores, logits.cuda(), mode, gout)
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)
    if mode == "attention":
        assert torch.equal(a[3], b[3])


@pytest.mark.cuda
@pytest.mark.parametrize("groups", ["", "1", "2", "4", "8", "16", "32"])
@pytest.mark.parametrize("sizes,n", [(TRAIN, 8), (NONSQUARE, 1), (NONSQUARE[:2], 2), (S8, 2)],
                         ids=["train", "odd", "S2", "S8"])
def test_cuda_logit_gradient_lane_groups(monkeypatch, groups, sizes, n, cuda_backward_layout):
    """The attention backward splits each pixel's sum over classes between G lanes of a warp (a
    shuffle butterfly; the segment padded to whole warps): every G, the kernel's own rule ("") included,
    matches the CPU kernel with 21 classes (uneven classes per lane; 9x11 = 99 pixels, so the padding
    lanes are exercised; 2 and 8 scales, both kernel instances) and is deterministic.  In the pixel layout
    the train shape gets chunks of 4 classes and a last one of 1, and S8's coarse maps (ratios below 1/2)
    take the wide-footprint path."""
    monkeypatch.setenv("ATTNSCALE_MERGE_LOGIT_GROUPS", groups)
    c = 21
    scores, logits = make_inputs(sizes, n=n, c=c)
    gout = torch.randn(n, c, *sizes[0])
    gw = torch.randn(n, len(sizes), *sizes[0])
    cpu = run(scale_merge, scores, logits, "attention", gout, gw)
    dev = [run(scale_merge, [s.cuda() for s in scores], logits.cuda(), "attention", gout.cuda(), gw.cuda())
           for _ in range(2)]
    for a, b in zip(cpu[2] + [cpu[3]], dev[0][2] + [dev[0][3]]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    assert torch.equal(dev[0][3], dev[1][3])


@pytest.mark.cuda
def test_cuda_backward_layouts_spread_non_finite_gradients_alike(monkeypatch):
    """Where a coarse scale's softmax weight underflows to exactly 0 (expf on the GPU; the CPU's exp is
    clamped at e^-87, so the CPU is no judge here) a non-finite incoming gradient still reaches that
    scale's gradient (0 * inf = NaN) in both CUDA layouts: the pixel layout skips a tap by its Interp
    weight, as the element layout does, never by a zero softmax weight."""
    scores, logits = make_inputs(TRAIN, n=2, c=3)
    logits[:, 0] += 200.0  # w_1 = w_2 = 0 at every pixel
    gout = torch.randn(2, 3, 41, 41)
    gout[0, 1, 10, 11] = float("inf")
    gout[1, 2, 25, 3] = float("nan")
    got = {}
    for layout in ("element", "pixel"):
        monkeypatch.setenv("ATTNSCALE_MERGE_BACKWARD", layout)
        got[layout] = run(scale_merge, [s.cuda() for s in scores], logits.cuda(), "attention", gout.cuda())[2]
    assert got["element"][1].isnan().any() and got["element"][2].isnan().any()
    for a, b in zip(got["element"], got["pixel"]):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(b.nan_to_num(0, 0, 0), a.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes,n", [(TRAIN, 3), (S8, 2)], ids=["train", "S8"])
def test_cuda_backward_reads_the_saved_weights(dtype, sizes, n, cuda_backward_layout):
    """Given the forward's weights output (what the autograd kernel passes), the float32 CUDA backward reads
    the softmax from it instead of recomputing it: the same values, so every gradient is bit-identical to the
    recomputing backward (weights=None), through the op and through autograd; bfloat16 recomputes (its
    weights output is rounded), so it is bit-identical too."""
    c = 21
    scores, logits = make_inputs(sizes, n=n, c=c)
    sc = [s.cuda().to(dtype) for s in scores]
    lg = logits.cuda().to(dtype)
    gout = torch.randn(n, c, *sizes[0], device="cuda").to(dtype)
    gw = torch.randn(n, len(sizes), *sizes[0], device="cuda").to(dtype)
    weights = torch.ops.attnscale.scale_merge(sc, lg, "attention")[1]
    bwd = torch.ops.attnscale.scale_merge_backward
    want = bwd(gout, gw, sc, lg, "attention")
    got = bwd(gout, gw, sc, lg, "attention", weights)
    auto = run(scale_merge, sc, lg, "attention", gout, gw)
    for a, b, d in zip(want[0] + [want[1]], got[0] + [got[1]], auto[2] + [auto[3]]):
        assert torch.equal(a, b) and torch.equal(a, d)


@pytest.mark.cuda
@pytest.mark.parametrize("threads", ["1", "10000", "1073741824"], ids=["one-chunk", "some", "a-chunk-per-class"])
@pytest.mark.parametrize("mode", ["attention", "avg"])
def test_cuda_pixel_backward_chunk_threads(monkeypatch, threads, mode):
    """The pixel layout's class chunks (ATTNSCALE_MERGE_BACKWARD_THREADS: sized for about that many threads
    in all): one chunk of all 21 classes, two uneven chunks (10000 threads over 41^2 + 31^2 + 21^2 pixels
    x 2 items: 2 chunks of 11 and 10 classes) and one class per chunk all match the CPU kernel."""
    monkeypatch.setenv("ATTNSCALE_MERGE_BACKWARD", "pixel")
    monkeypatch.setenv("ATTNSCALE_MERGE_BACKWARD_THREADS", threads)
    c, n = 21, 2
    scores, logits = make_inputs(TRAIN, n=n, c=c)
    gout = torch.randn(n, c, *TRAIN[0])
    gw = torch.randn(n, len(TRAIN), *TRAIN[0])
    cpu = run(scale_merge, scores, logits, mode, gout, gw)
    dev = run(scale_merge, [s.cuda() for s in scores], logits.cuda(), mode, gout.cuda(), gw.cuda())
    for a, b in zip(cpu[2] + ([cpu[3]] if mode == "attention" else []),
                    dev[2] + ([dev[3]] if mode == "attention" else [])):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("var,value", [("ATTNSCALE_MERGE_LOGIT_GROUPS", v) for v in ("3", "64", "0", "x")]
                         + [("ATTNSCALE_MERGE_BACKWARD", "pixels")]
                         + [("ATTNSCALE_MERGE_BACKWARD_THREADS", v) for v in ("0", "-3", "x", "2000000000")])
def test_cuda_backward_env_checked(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    scores, logits = make_inputs(EXACT)
    with pytest.raises(ValueError, match=f"{var}={value}"):
        run(scale_merge, [s.cuda() for s in scores], logits.cuda(), "attention")


@pytest.mark.cuda
def test_cuda_max_tie_rule_and_opcheck():
    """The CUDA kernel's ties as the CPU kernel's (Caffe's CPU EltwiseLayer rule), all four cases."""
    z = [torch.zeros(2, 3, h, w) for h, w in EXACT]
    for scores, winner in (([z[0], z[1], z[2]], 1), ([z[0] - 1, z[1], z[2]], 1), ([z[0], z[1] - 1, z[2]], 0),
                           ([z[0] - 1, z[1] - 1, z[2]], 2)):
        cpu = run(scale_merge, scores, torch.zeros(2, 3, 9, 9), "max", torch.ones(2, 3, 9, 9))
        out, w, grads, _ = run(scale_merge, [s.cuda() for s in scores], torch.zeros(2, 3, 9, 9, device="cuda"),
                               "max", torch.ones(2, 3, 9, 9, device="cuda"))
        assert torch.equal(w[:, winner], torch.ones(2, 9, 9, device="cuda"))
        assert torch.equal(w.cpu(), cpu[1])
        for g, gc in zip(grads, cpu[2]):
            torch.testing.assert_close(g.cpu(), gc)
    sc, lg = make_inputs(INEXACT)
    torch.library.opcheck(torch.ops.attnscale.scale_merge.default, ([s.cuda() for s in sc], lg.cuda(), "attention"))


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_batch_parallel_matches_reference_and_is_deterministic(mode):
    """N >= 8: the attention logit gradient is finished per batch item inside the parallel task
    (one class chunk); the work is large enough to be split over threads.  Values match the
    reference and are bit-identical at 1 and 2 threads."""
    scores, logits = make_inputs(TRAIN, n=8, c=5)  # (max: near-ties possible, values only)
    gout = torch.randn(8, 5, 41, 41)
    gw = torch.randn(8, 3, 41, 41)
    ref = run(scale_merge_reference, scores, logits, mode, gout, gw)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run(scale_merge, scores, logits, mode, gout, gw))
    finally:
        torch.set_num_threads(prev)
    close(outs[0][0], ref[0])
    if mode != "max":  # max weights/gradients vs the reference: test_matches_reference_fp32
        close(outs[0][1], ref[1])
        for a, b in zip(outs[0][2], ref[2]):
            close(a, b, tol=1e-5)
    if mode == "attention":
        close(outs[0][3], ref[3], tol=1e-5)
    for x, y in zip(outs[0][2], outs[1][2]):
        assert torch.equal(x, y)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    if mode == "attention":
        assert torch.equal(outs[0][3], outs[1][3])


def test_only_weights_used():
    """Backward when only the weights output feeds the loss (merged gets no gradient)."""
    scores, logits = make_inputs(EXACT)
    gw = torch.randn(2, 3, 9, 9)
    grads = []
    for fn in (scale_merge, scale_merge_reference):
        sc = [s.detach().clone().requires_grad_(True) for s in scores]
        lg = logits.detach().clone().requires_grad_(True)
        _, w = fn(sc, lg, "attention")
        (w * gw).sum().backward()
        grads.append((lg.grad, [s.grad for s in sc]))
    close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):  # the reference may give zeros where we give None
        assert a is None or torch.count_nonzero(a) == 0
        assert b is None or torch.count_nonzero(b) == 0


def test_double_backward_raises():
    scores, logits = make_inputs(EXACT)
    sc = [s.detach().clone().requires_grad_(True) for s in scores]
    lg = logits.detach().clone().requires_grad_(True)
    out, _ = scale_merge(sc, lg, "attention")
    (g0,) = torch.autograd.grad(out.square().sum(), [sc[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g0.sum().backward()


def test_autocast_cpu_merges_in_float32():
    """Under CPU autocast (bfloat16) the score maps arrive in bf16; the op merges in float32 and
    matches the reference on the same (bf16-rounded) values, with gradients in the inputs' dtype."""
    sc = [torch.randn(1, 3, h, h).to(torch.bfloat16).requires_grad_() for h in (9, 7, 5)]
    lg = torch.randn(1, 3, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged, w = scale_merge(sc, lg, "attention")
    assert merged.dtype == torch.float32 and w.dtype == torch.float32
    ref, rw = scale_merge_reference([s.detach().float() for s in sc], lg.detach(), "attention")
    torch.testing.assert_close(merged, ref, rtol=1e-6, atol=1e-6)
    merged.sum().backward()
    assert all(s.grad is not None and s.grad.dtype == torch.bfloat16 for s in sc) and lg.grad is not None


def test_direct_calls_refuse_meta_tensors_among_cpu_ones_and_fakes_check_shapes():
    """The dispatcher sends a call with any meta tensor to the fake kernel: it must check devices (it
    returned uninitialised CPU memory), and it checks shapes as the C++ kernel does, so tracing refuses
    what running refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.attnscale
    a, b = torch.ones(1, 1, 3, 3), torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="mixed devices"):
        ops.scale_merge([a, b.to("meta")], None, "avg")
    with pytest.raises(ValueError, match="mixed devices"):
        ops.scale_merge([a, b], torch.zeros(1, 2, 3, 3, device="meta"), "attention")
    with pytest.raises(RuntimeError, match="grad_merged must be"):
        ops.scale_merge_backward(torch.ones(1, 1, 3, 3, device="meta"), None, [a, b], None, "avg")
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=r"scores\[1\] must be \(1, 1, <= 3, <= 3\)"):
            ops.scale_merge([torch.ones(1, 1, 3, 3), torch.ones(2, 1, 2, 2)], None, "avg")
        with pytest.raises(RuntimeError, match="logits must be"):
            ops.scale_merge([torch.ones(1, 1, 3, 3), torch.ones(1, 1, 2, 2)], torch.ones(1, 3, 3, 3), "attention")
