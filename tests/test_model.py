"""attnscale.model.AttentionToScale: shapes (Caffe formulas), weight sharing, merges, losses, param groups,
predict, ops == references, training step, torch.compile."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnscale
from attnscale import caffe
from attnscale.caffe import InterpParams
from attnscale.model import AttentionToScale, ModelOutput, scale_suffix, softmax_loss

TINY = 1 / 16


def tiny(**kw):
    kw.setdefault("width", TINY)
    kw.setdefault("use_reference_ops", True)
    kw.setdefault("num_classes", 5)
    return AttentionToScale(**kw)


def trunk_size(n: int) -> int:
    """Caffe pooling formula, written out: pool1-3 (3, 2, 1), pool4/pool5/pool5a (3, 1, 1)."""
    for _ in range(3):
        out = -(-(n + 2 - 3) // 2) + 1
        if (out - 1) * 2 >= n + 1:
            out -= 1
        n = out
    return n  # stride-1 pools with pad 1 keep the size


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("hw,expected", [((321, 321), (41, 41)), ((513, 513), (65, 65)),
                                         ((353, 500), (45, 64)), ((241, 241), (31, 31)),
                                         ((161, 161), (21, 21)), ((385, 385), (49, 49)), ((257, 257), (33, 33)),
                                         ((100, 77), (14, 11)), ((8, 9), (2, 2)), ((66, 97), (10, 13))])
def test_output_size_formula(hw, expected):
    m = tiny(scales=(1.0,), merge=None)
    assert m.output_size(hw) == expected == (trunk_size(hw[0]), trunk_size(hw[1]))


def test_full_width_shapes_on_meta_513():
    """The real net (width 1) on the meta device: Caffe blob shapes of attention3_deploy at 513."""
    with torch.device("meta"):
        m = AttentionToScale(21, use_reference_ops=True)
        out = m(torch.empty(1, 3, 513, 513))
    assert m.conv1_1.weight.shape == (64, 3, 3, 3) and m.conv5_3.dilation == (2, 2)
    assert m.fc6.weight.shape == (1024, 512, 3, 3) and m.fc7.weight.shape == (1024, 1024, 1, 1)
    assert m.fc8_voc12.weight.shape == (21, 1024, 1, 1) and m.classifier is m.fc8_voc12
    assert m.att_conv1.weight.shape == (512, 3072, 3, 3) and m.att_conv2.weight.shape == (3, 512, 1, 1)
    assert out.merged.shape == (1, 21, 65, 65) and out.attention.shape == (1, 3, 65, 65)
    assert [tuple(s.shape[-2:]) for s in out.scales] == [(65, 65), (49, 49), (33, 33)]


def test_odd_size_forward_matches_formula():
    m = tiny(scales=(1.0, 0.75, 0.5)).eval()
    x = torch.randn(1, 3, 97, 66)
    out = m(x)
    for s, f in zip(m.scales, out.scales):
        assert tuple(f.shape[-2:]) == m.output_size(caffe.scaled_input_shape((97, 66), s))
    assert out.merged.shape[-2:] == m.output_size((97, 66)) == (13, 10)


@pytest.mark.parametrize("n", [321, 513])
def test_caffe_zoom_back_equals_scale1_size(n):
    """Caffe's fc8_*_interp params (zoom 4 + shrink 3; zoom 2) reproduce the scale-1 size at 321 / 513, so
    resizing to the scale-1 size explicitly (what scale_merge does) is the same Interp."""
    m = tiny(scales=(1.0,), merge=None)
    s1 = m.output_size((n, n))
    s075 = m.output_size(caffe.scaled_input_shape((n, n), 0.75))
    s05 = m.output_size(caffe.scaled_input_shape((n, n), 0.5))
    assert caffe.interp_output_shape(s075, InterpParams(zoom_factor=4, shrink_factor=3)) == s1
    assert caffe.interp_output_shape(s05, InterpParams(zoom_factor=2)) == s1


def test_caffe_zoom_back_differs_at_353x500():
    """Documented limitation of the prototxt factors: at 353x500 zoom 4 + shrink 3 gives 45x61, not 45x64
    (Caffe's Concat/Eltwise would refuse); our model resizes to the scale-1 size explicitly."""
    m = tiny(scales=(1.0,), merge=None)
    s075 = m.output_size(caffe.scaled_input_shape((353, 500), 0.75))
    assert s075 == (34, 48)
    assert caffe.interp_output_shape(s075, InterpParams(zoom_factor=4, shrink_factor=3)) == (45, 61)


# ------------------------------------------------------------------------------------ sharing
def test_one_parameter_set_shared_across_scales():
    one = tiny(scales=(1.0,), merge=None)
    three = tiny(scales=(1.0, 0.75, 0.5), merge="max")
    assert [n for n, _ in one.named_parameters()] == [n for n, _ in three.named_parameters()]
    att = tiny()
    names = [n for n, _ in att.named_parameters()]
    assert len(names) == len(set(names))
    assert names[-4:] == ["att_conv1.weight", "att_conv1.bias", "att_conv2.weight", "att_conv2.bias"]
    assert "fc8_voc12.weight" in names
    # the 0.5 branch alone produces gradients on the one conv1_1 and equals the trunk on the Interp'ed image
    att.eval()
    x = torch.randn(1, 3, 49, 49)
    out = att(x)
    out.scales[2].sum().backward()
    assert att.conv1_1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        _, f8 = att.trunk(caffe.interp(x, InterpParams(shrink_factor=2)))
    torch.testing.assert_close(out.scales[2].detach(), f8)


# ------------------------------------------------------------------------------------ merges
def _manual(m, x):
    with torch.no_grad():
        fc7, f8 = [], []
        hw = tuple(x.shape[-2:])
        for s in m.scales:
            p = caffe.scale_interp_params(s, hw)
            a, b = m.trunk(x if p is None else caffe.interp(x, p))
            fc7.append(a)
            f8.append(b)
        size = tuple(f8[0].shape[-2:])
        up = [f8[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in f8[1:]]
        return fc7, f8, up, size


@pytest.mark.parametrize("merge", ["attention", "max", "avg"])
def test_merges_match_their_definitions(merge):
    m = tiny(merge=merge).eval()
    x = torch.randn(2, 3, 57, 49)
    out = m(x)
    fc7, f8, up, size = _manual(m, x)
    if merge == "avg":
        expect = (up[0] + up[1] + up[2]) / 3
    elif merge == "max":
        expect = torch.maximum(torch.maximum(up[0], up[1]), up[2])
    else:
        cat = torch.cat([fc7[0]] + [caffe.interp(f, size) for f in fc7[1:]], 1)
        logits = m.att_conv2(F.relu(m.att_conv1(cat)))
        w = torch.softmax(logits, 1)
        expect = sum(w[:, i:i + 1] * up[i] for i in range(3))
        torch.testing.assert_close(out.attention, w)
        torch.testing.assert_close(out.attention.sum(1), torch.ones(2, *size))
    torch.testing.assert_close(out.merged, expect, rtol=1e-5, atol=1e-6)
    assert isinstance(out, ModelOutput) and out.attention.shape == (2, 3, *size)


def test_single_scale_baseline():
    m = tiny(scales=(1.0,), merge=None).eval()
    out = m(torch.randn(1, 3, 41, 41))
    assert out.attention is None and out.merged is out.scales[0] and len(out.scales) == 1
    assert not hasattr(m, "att_conv1")


def test_bad_arguments():
    with pytest.raises(ValueError, match="merge"):
        tiny(scales=(1.0, 0.5), merge=None)
    with pytest.raises(ValueError, match="merge=None"):
        tiny(scales=(1.0,), merge="attention")
    with pytest.raises(ValueError, match="start with 1.0"):
        tiny(scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="merge"):
        tiny(merge="sum")
    for bad in ("fc7", "", "fc8.voc", "forward", "att_conv2", "dropout", "fc7_channels", "_blobs", "_modules"):
        with pytest.raises(ValueError, match="classifier_name"):
            tiny(classifier_name=bad)
    assert tiny(classifier_name="_fc8-voc 12/x").classifier_name == "_fc8-voc 12/x"   # any other Caffe name
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        tiny()(torch.randn(1, 4, 33, 33))


# -------------------------------------------------------------------------------------- losses
def _caffe_loss(scores, lab):
    """SoftmaxWithLoss VALID, written out with numpy (float64)."""
    s = scores.detach().double().numpy()
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lab = lab.numpy()
    tot, cnt = 0.0, 0
    for n, h, w in zip(*np.nonzero(lab != 255)):
        tot -= np.log(max(p[n, lab[n, h, w], h, w], float(np.finfo(np.float32).tiny)))  # Dtype(FLT_MIN)
        cnt += 1
    return tot / max(cnt, 1)


def test_softmax_loss_valid_normalisation_and_ignore():
    scores = torch.randn(2, 5, 6, 7)
    lab = torch.randint(0, 5, (2, 6, 7))
    lab[0, :3] = 255
    assert softmax_loss(scores, lab).item() == pytest.approx(_caffe_loss(scores, lab), rel=1e-5)
    assert softmax_loss(scores, torch.full((2, 6, 7), 255)).item() == 0.0  # all ignored: 0, not NaN
    bad = lab.clone()
    bad[1, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        softmax_loss(scores, bad)


def test_softmax_loss_clamps_the_value_like_caffe_not_the_gradient():
    """Caffe's forward: -log(max(prob, FLT_MIN)), at most 87.3365 per pixel; its backward: prob - 1."""
    scores = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    scores[0, 1, 0, 0] = 200.0       # pixel 0: label 0 has prob e^-200 < FLT_MIN
    scores[0, 2, 0, 1] = 3.0         # pixel 1: an ordinary pixel
    lab = torch.tensor([[[0, 0]]])
    x = scores.clone().requires_grad_(True)
    loss = softmax_loss(x, lab)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_caffe_loss(scores, lab), rel=1e-12)
    assert loss.item() == pytest.approx((-np.log(float(np.finfo(np.float32).tiny)) + np.log(2 + np.exp(3.0))) / 2,
                                        rel=1e-12)
    loss.backward()
    p = torch.softmax(scores, 1)
    onehot = torch.zeros_like(p)
    onehot[:, 0] = 1
    torch.testing.assert_close(x.grad, (p - onehot) / 2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("merge", ["attention", "max", "avg"])
def test_esupv_loss_is_sum_of_independent_losses(merge):
    x = torch.randn(2, 3, 65, 65)
    lab = torch.randint(0, 5, (2, 65, 65))
    lab[:, 20:30] = 255
    m = tiny(merge=merge, extra_supervision=True).eval()
    out = m(x)
    total, parts = m.loss(out, lab)
    assert list(parts) == ["loss", "loss_res1", "loss_res075", "loss_res05"]
    # 65 -> 9 (exact stride 8), 49 -> 7 (6*8 = 48 = 64*0.75), 33 -> 5 (stride 16)
    assert [tuple(f.shape[-2:]) for f in out.scales] == [(9, 9), (7, 7), (5, 5)]
    expect = {"loss": _caffe_loss(out.merged, lab[:, ::8, ::8]),
              "loss_res1": _caffe_loss(out.scales[0], lab[:, ::8, ::8]),
              "loss_res075": _caffe_loss(out.scales[1], caffe.shrink_label(lab, 7)),
              "loss_res05": _caffe_loss(out.scales[2], lab[:, ::16, ::16])}
    for k, v in expect.items():  # the parts: detached 0-dim tensors (no host sync until read)
        assert parts[k].dim() == 0 and not parts[k].requires_grad
        assert float(parts[k]) == pytest.approx(v, rel=1e-5), k
    assert total.item() == pytest.approx(sum(expect.values()), rel=1e-5)
    # without E-Supv: only the merged loss, and it is the same number
    m.extra_supervision = False
    total2, parts2 = m.loss(out, lab)
    assert list(parts2) == ["loss"] and total2.item() == pytest.approx(expect["loss"], rel=1e-5)
    assert total.item() > total2.item()


def test_merge_choice_changes_the_loss():
    x = torch.randn(1, 3, 49, 49)
    lab = torch.randint(0, 5, (1, 49, 49))
    torch.manual_seed(3)
    ref = tiny(merge="attention").eval()
    losses = {}
    for merge in ("attention", "max", "avg"):
        m = tiny(merge=merge).eval()
        m.load_state_dict(ref.state_dict(), strict=False)
        losses[merge] = m.loss(m(x), lab)[1]
    # per-scale losses are identical (same shared weights), the merged ones differ
    assert float(losses["max"]["loss_res05"]) == pytest.approx(float(losses["avg"]["loss_res05"]), rel=1e-6)
    assert len({round(float(v["loss"]), 7) for v in losses.values()}) == 3


def test_scale_suffix():
    assert [scale_suffix(s) for s in (1.0, 0.75, 0.5, 0.6)] == ["1", "075", "05", "06"]


# ------------------------------------------------------------------------------------ param groups
def test_param_groups_caffe_multipliers():
    m = tiny()
    groups = m.param_groups(base_lr=1e-3, weight_decay=5e-4)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"weights", "biases", "head_weights", "head_biases"}
    assert (by["weights"]["lr"], by["weights"]["weight_decay"]) == pytest.approx((1e-3, 5e-4))
    assert (by["biases"]["lr"], by["biases"]["weight_decay"]) == pytest.approx((2e-3, 0.0))
    assert (by["head_weights"]["lr"], by["head_weights"]["weight_decay"]) == pytest.approx((1e-2, 5e-4))
    assert (by["head_biases"]["lr"], by["head_biases"]["weight_decay"]) == pytest.approx((2e-2, 0.0))
    assert [by[k]["lr_mult"] for k in ("weights", "biases", "head_weights", "head_biases")] == [1, 2, 10, 20]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    head = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert head == {id(p) for n in ("fc8_voc12", "att_conv1", "att_conv2") for p in getattr(m, n).parameters()}
    torch.optim.SGD(groups, lr=1e-3, momentum=0.9)


def test_fresh_init():
    m = tiny()
    assert m.fc8_voc12.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert m.att_conv1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert all(getattr(m, n).bias.abs().sum() == 0 for n in ("conv1_1", "fc6", "fc8_voc12", "att_conv2"))



def test_all_zero_attention_head_learns_only_att_conv2_bias():
    """Caffe's default filler (constant 0) for the attention head, as the training prototxt gives it: only
    att_conv2's bias receives a gradient (the reason reset_parameters draws N(0, 0.01) instead)."""
    m = tiny(merge="attention", extra_supervision=True, dropout=0.0).train()
    for n in ("att_conv1", "att_conv2"):
        torch.nn.init.zeros_(getattr(m, n).weight)
        torch.nn.init.zeros_(getattr(m, n).bias)
    x = torch.randn(2, 3, 49, 49)
    lab = torch.randint(0, 5, (2, 49, 49))
    m.loss(m(x), lab)[0].backward()
    for p in (m.att_conv1.weight, m.att_conv1.bias, m.att_conv2.weight):
        assert p.grad is not None and p.grad.abs().max() == 0
    assert m.att_conv2.bias.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------- predict
def test_predict_protocol():
    m = tiny()
    m.train()
    img = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    label, att = m.predict(img, crop_size=49)
    assert m.training  # mode restored
    assert label.shape == (30, 41) and label.dtype == np.uint8 and att.shape == (3, 30, 41)
    # the same by hand: mean subtraction, zero pad to 49x49, eval, Interp zoom 8 (7 -> 49), crop, argmax
    x = F.pad(caffe.preprocess_bgr(img), (0, 49 - 41, 0, 49 - 30))
    m.eval()
    with torch.no_grad():
        out = m(x)
    scores = caffe.interp(out.merged, InterpParams(zoom_factor=8))
    assert scores.shape[-2:] == (49, 49)
    np.testing.assert_array_equal(label, scores[0, :, :30, :41].argmax(0).numpy())
    np.testing.assert_allclose(att, caffe.interp(out.attention, InterpParams(zoom_factor=8))[0, :, :30, :41],
                               rtol=1e-6, atol=1e-7)
    # tied classes: the first of them, everywhere (classes 1, 2 and 4 score 3 at every pixel)
    tied = tiny()
    with torch.no_grad():
        tied.classifier.weight.zero_()
        tied.classifier.bias.copy_(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]))
    assert (tied.predict(img, crop_size=49)[0] == 1).all()
    # a non-finite weight (a corrupt checkpoint) makes NaN scores: refused, not scored as class 0
    with torch.no_grad():
        tied.conv1_1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite values"):
        tied.predict(img, crop_size=49)
    # larger than the crop: padded to the next 8k+1 (50 -> 57), still the image size back
    big = np.zeros((50, 20, 3), np.uint8)
    label2, _ = m.predict(big, crop_size=33)
    assert label2.shape == (50, 20)
    single = tiny(scales=(1.0,), merge=None)
    lab3, att3 = single.predict(img, crop_size=33)
    assert att3 is None and lab3.shape == (30, 41)
    with pytest.raises(TypeError):
        m.predict(img.astype(np.float32))
    with pytest.raises(ValueError, match="8k\\+1"):
        m.predict(img, crop_size=48)
    with pytest.raises(ValueError, match="8k\\+1"):
        tiny(test_crop_size=500)


# ------------------------------------------------------------------------------------ ops vs refs
@pytest.mark.parametrize("merge", ["attention", "max", "avg"])
def test_model_with_ops_equals_references(merge):
    ref = tiny(merge=merge).eval()
    ops = tiny(merge=merge, use_reference_ops=False).eval()
    ops.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 65, 57)
    a, b = ref(x), ops(x)
    torch.testing.assert_close(b.merged, a.merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.attention, a.attention, rtol=1e-5, atol=1e-5)
    for u, v in zip(b.scales, a.scales):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["winograd", "winograd4"])
def test_winograd_convs_equal_torch_convs(impl):
    """conv_impl="winograd" / "winograd4" runs every 3x3 layer (conv1_1 .. conv5_3, conv5 dilated, and
    att_conv1) through winograd_conv2d and gives nn.Conv2d's values and gradients (float64).  Each weight's
    transform is reused across the scales and renewed when the weight changes."""
    torch.manual_seed(0)
    ref = tiny(merge="attention", dropout=0.0).double()
    win = tiny(merge="attention", dropout=0.0, conv_impl=impl).double()
    win.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 45, 41, dtype=torch.float64)
    lab = torch.randint(0, 5, (2, 45, 41))

    def run(m):
        out = m(x)
        loss, _ = m.loss(out, lab)
        grads = torch.autograd.grad(loss, [p for p in m.parameters()])
        return out, grads

    (a, ga), (b, gb) = run(ref), run(win)
    torch.testing.assert_close(b.merged, a.merged, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.attention, a.attention, rtol=1e-10, atol=1e-10)
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    wino_layers = {spec[1] for spec in win._layers if spec[0] == "conv"} | {"att_conv1"}
    assert set(win._winograd_cache) == wino_layers and "conv5_3" in wino_layers
    before = {n: e[2] for n, e in win._winograd_cache.items()}
    win(x)  # same weights: the transforms are reused
    assert all(win._winograd_cache[n][2] is before[n] for n in before)
    with torch.no_grad():
        for m in (ref, win):
            m.conv1_1.weight.mul_(-0.5)
    torch.testing.assert_close(win(x).merged, ref(x).merged, rtol=1e-10, atol=1e-10)
    assert win._winograd_cache["conv1_1"][2] is not before["conv1_1"]


def cpu_kind(monkeypatch, avx512: bool, gemm: str) -> None:
    """Make the model see a CPU with or without AVX-512 whose kernels' GEMMs run on ``gemm``."""
    import attnscale.model as model_mod
    monkeypatch.setattr(model_mod, "_AVX512", avx512)
    monkeypatch.setattr(model_mod, "cpu_gemm", lambda: gemm)


CPU_KINDS = [(False, "blas"), (True, "blas"), (True, "onednn")]


@pytest.mark.parametrize("impl,planes", [("auto", 16), ("auto4", 36)])
@pytest.mark.parametrize("avx512,gemm", CPU_KINDS)
def test_auto_conv_impl_uses_winograd_only_without_gradients(monkeypatch, avx512, gemm, impl, planes):
    """conv_impl="auto" (the default) runs the 3x3 layers whose channels pay (winograd_pays, stood in for
    here: the tiny net's layers are all too narrow) through Winograd F(2x2, 3x3) where no gradient is
    needed (inference on a CPU) and through nn.Conv2d when one is, or with use_reference_ops; on AVX-512
    CPUs whose GEMMs would run on the BLAS, where oneDNN is faster (cpu_prefers_onednn), always through
    nn.Conv2d.  "auto4" the same with F(4x4, 3x3)."""
    import attnscale.model as model_mod
    cpu_kind(monkeypatch, avx512, gemm)
    monkeypatch.setattr(model_mod, "winograd_pays", lambda c, k, hw: c > 3)  # all but conv1_1
    onednn_wins = avx512 and gemm == "blas"
    torch.manual_seed(0)
    auto = tiny(merge="attention", dropout=0.0, use_reference_ops=False, conv_impl=impl)
    assert tiny().conv_impl == "auto"
    ref = tiny(merge="attention", dropout=0.0, use_reference_ops=False, conv_impl="torch")
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(1, 3, 45, 41)
    out = auto(x)  # parameters require grad: the direct convolution
    assert auto._winograd_cache == {}
    with torch.no_grad():
        a, b = auto(x), ref(x)
    if onednn_wins:
        assert auto._winograd_cache == {}
        torch.testing.assert_close(a.merged, b.merged, rtol=0, atol=0)
    else:
        assert {e[2].shape[0] for e in auto._winograd_cache.values()} == {planes}  # F(2x2) / F(4x4) transforms
        assert "att_conv1" in auto._winograd_cache and ref._winograd_cache == {}
        assert "conv1_1" not in auto._winograd_cache and "conv1_2" in auto._winograd_cache
    torch.testing.assert_close(a.merged, b.merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.merged.detach(), b.merged, rtol=1e-5, atol=1e-5)
    refops = tiny(merge="attention", dropout=0.0, use_reference_ops=True)
    with torch.no_grad():
        refops(x)
    assert refops._winograd_cache == {}


@pytest.mark.parametrize("avx512", [False, True])
def test_winograd_pays_for_the_wide_layers_on_large_maps(monkeypatch, avx512):
    """winograd_pays on the real net's 3x3 layers (benchmarks/RESULTS.md, fourteenth session): with AVX-512
    oneDNN's convolution keeps conv1_1 and conv1_2 (at most 32 by in * out / (in + out)), Winograd takes
    conv2_1 and up and the attention head; on AVX2 only conv1_1 (3 input channels) stays with oneDNN.
    Small maps stay with oneDNN: outputs under 20 pixels a side.  The model asks it with each layer's
    channels and output size."""
    import attnscale.model as model_mod
    from attnscale.model import ATT1_OUT, FC7_OUT, TRUNK, winograd_pays
    monkeypatch.setattr(model_mod, "_AVX512", avx512)
    layers, c = [], 3
    for spec in TRUNK:
        if spec[0] == "conv":
            layers.append((spec[1], c, spec[2], spec[4]))
            c = spec[2]
    layers.append(("att_conv1", 3 * FC7_OUT, ATT1_OUT, 1))
    names = [name for name, _, _, _ in layers]
    picked = [name for name, cin, cout, _ in layers if winograd_pays(cin, cout, (65, 65))]
    assert picked == names[names.index("conv2_1" if avx512 else "conv1_2"):]
    assert winograd_pays(512, 512, (65, 20)) and not winograd_pays(512, 512, (19, 65))
    cpu_kind(monkeypatch, avx512, "onednn")
    asked = []
    monkeypatch.setattr(model_mod, "winograd_pays", lambda *a: asked.append(a) or False)
    m = AttentionToScale(21, (1.0, 0.75, 0.5), "attention")
    with torch.no_grad():
        m._conv(torch.randn(1, 3, 9, 7), "conv1_1")
        m._conv(torch.randn(1, 512, 11, 13), "conv5_1")
        m._conv(torch.randn(1, 3 * FC7_OUT, 3, 3), "att_conv1")
    assert asked == [(3, 64, (9, 7)), (512, 512, (11, 13)), (3 * FC7_OUT, ATT1_OUT, (3, 3))]
    assert m._winograd_cache == {}


@pytest.mark.parametrize("conv_impl", ["torch", "winograd"])
def test_channels_last_model_computes_what_nchw_does(conv_impl):
    """The model and its input in channels_last (NHWC) memory (config.channels_last): every op, ours
    included (Winograd, the fused merge, Caffe pooling and Interp), takes it; eval outputs equal NCHW's."""
    torch.manual_seed(0)
    a = tiny(merge="attention", extra_supervision=True, use_reference_ops=False, conv_impl=conv_impl).eval()
    b = tiny(merge="attention", extra_supervision=True, use_reference_ops=False, conv_impl=conv_impl)
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last).eval()
    assert b.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 57, 49)
    with torch.no_grad():
        oa, ob = a(x), b(x.contiguous(memory_format=torch.channels_last))
    for u, v in [(oa.merged, ob.merged), (oa.attention, ob.attention), *zip(oa.scales, ob.scales)]:
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_auto_leaves_cpu_autocast_to_onednn(monkeypatch):
    """Inside CPU autocast (precision "bf16") oneDNN computes in bfloat16 and our kernels in float32, so
    conv_impl="auto" and fc6_impl="auto" leave every layer to nn.Conv2d / F.conv2d there (cpu_autocast);
    outside it the same model runs them through Winograd and our fc6."""
    import attnscale.model as model_mod
    cpu_kind(monkeypatch, False, "blas")
    monkeypatch.setattr(model_mod, "winograd_pays", lambda c, k, hw: True)
    calls = []
    real_fc6 = model_mod.dilated_conv2d
    monkeypatch.setattr(model_mod, "dilated_conv2d", lambda *a, **k: calls.append("ops") or real_fc6(*a, **k))
    m = tiny(merge="attention", use_reference_ops=False).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_mod.cpu_autocast(x)
        m(x)
    assert m._winograd_cache == {} and calls == []
    with torch.no_grad():
        assert not model_mod.cpu_autocast(x)
        m(x)
    assert "conv2_2" in m._winograd_cache and calls == ["ops"] * 3


def test_conv_impl_is_checked():
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        tiny(conv_impl="fft")


@pytest.mark.parametrize("impl,device,avx512,gemm,grad,ours,size", [
    ("auto", "cpu", False, "blas", True, True, 33), ("auto", "cpu", True, "blas", False, False, 33),
    ("auto", "cpu", True, "onednn", False, True, 33), ("auto", "cpu", True, "onednn", True, False, 33),
    ("auto", "cpu", True, "onednn", False, False, 32), ("auto", "cpu", False, "blas", False, True, 9),
    ("ops", "cpu", True, "blas", True, True, 9), ("torch", "cpu", False, "blas", False, False, 33),
    ("auto", "cuda", False, "blas", False, False, 33), ("ops", "cuda", False, "blas", False, True, 33)])
def test_fc6_impl_picks_the_kernel(monkeypatch, impl, device, avx512, gemm, grad, ours, size):
    """fc6_impl: "auto" is our dilated_conv2d on a CPU except where oneDNN ran fc6 faster
    (cpu_prefers_onednn: on an AVX-512 CPU with a gradient to compute or with BLAS GEMMs; dilated_pays: on
    an AVX-512 CPU, maps under 33x33), cuDNN on a GPU; "ops" / "torch" force one.  The choice follows the
    input's device and size and whether a gradient is needed."""
    import types
    import attnscale.model as model_mod
    cpu_kind(monkeypatch, avx512, gemm)
    calls = []
    monkeypatch.setattr(model_mod, "dilated_conv2d", lambda *a, **k: calls.append("ops"))
    monkeypatch.setattr(model_mod, "dilated_conv2d_reference", lambda *a, **k: calls.append("torch"))
    m = tiny(merge=None, scales=(1.0,), extra_supervision=False, use_reference_ops=False, fc6_impl=impl)
    # only the input's device matters to the choice: a stand-in for a CUDA tensor here
    x = (types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), shape=(1, 1, size, size)) if device == "cuda"
         else torch.randn(1, m.fc6.in_channels, size, size + 4))
    with torch.set_grad_enabled(grad):
        m._dilated(x)
    assert calls == (["ops"] if ours else ["torch"])


def test_fc6_impl_is_checked():
    with pytest.raises(ValueError, match="fc6_impl must be one of"):
        tiny(fc6_impl="cudnn")


# ------------------------------------------------------------------------------------------ training
def test_training_steps_decrease_loss():
    """A learnable fixed batch (class = colour + noise), tiny net, Caffe param groups, SGD momentum 0.9."""
    torch.manual_seed(0)
    m = tiny(merge="attention", dropout=0.0)
    m.train()
    lab = torch.zeros(2, 49, 49, dtype=torch.long)
    lab[:, :, 25:] = 3
    lab[1, :20] = 1
    lab[:, :4] = 255
    colours = torch.tensor([[-1.0, 0, 1], [0, 1, -1], [0, 0, 0], [1, -1, 0], [0, 0, 0]])
    x = colours[lab.clamp(max=4)].permute(0, 3, 1, 2) + 0.2 * torch.randn(2, 3, 49, 49)
    opt = torch.optim.SGD(m.param_groups(base_lr=1e-3, weight_decay=5e-4), lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, _ = m.loss(m(x), lab)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses[2:], losses[3:])), losses


# ------------------------------------------------------------------------------------------ compile
def test_torch_compile_fullgraph_reference_ops():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable in this torch build")
    torch._dynamo.reset()
    m = tiny().eval()
    x = torch.randn(1, 3, 41, 41)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    out = compiled(x)
    ref = m(x)
    torch.testing.assert_close(out.merged, ref.merged)
    torch.testing.assert_close(out.attention, ref.attention)


def test_torch_compile_fullgraph_with_ops():
    torch._dynamo.reset()
    m = tiny(use_reference_ops=False).eval()
    x = torch.randn(1, 3, 41, 41)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out.merged, m(x).merged, rtol=1e-5, atol=1e-5)


def test_reexport():
    assert attnscale.AttentionToScale is AttentionToScale and attnscale.ModelOutput is ModelOutput


def test_autocast_bf16_training_step_with_ops():
    """bf16 autocast (CPU here; the same code path on CUDA): convolutions run in bf16, our ops get mixed
    dtypes and cast as documented; the loss stays close to the fp32 one and every parameter gets a grad."""
    m = tiny(use_reference_ops=False, dropout=0.0).train()
    x = torch.randn(2, 3, 41, 41)
    lab = torch.randint(0, 5, (2, 41, 41))
    ref, _ = m.loss(m(x), lab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    loss, _ = m.loss(out, lab)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_scale_streams_ignored_on_cpu():
    """``scale_streams`` is a GPU matter: on a CPU the scales run one after another either way, with the
    same result, and no CUDA stream is made."""
    from attnscale import model as model_mod
    x = torch.randn(1, 3, 49, 49)
    a, b = (tiny(use_reference_ops=False, scale_streams=flag).eval() for flag in (True, False))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya.merged, yb.merged) and not model_mod._SIDE_STREAMS


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cuda_scale_streams_equal_one_stream(bf16):
    """Inference with the coarser scales on side streams (``scale_streams``, the default) gives what one
    stream gives (the same kernels on the same data), uses the side streams only without gradients, and
    leaves the caller's stream ordered after them (the outputs are read right away, no sync)."""
    from attnscale import model as model_mod
    m = tiny(use_reference_ops=False, merge="attention").cuda().eval()
    x = torch.randn(2, 3, 97, 97, device="cuda")
    ac = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    model_mod._SIDE_STREAMS.clear()
    with torch.no_grad(), ac:
        m.scale_streams = False
        want = m(x)
        assert not model_mod._SIDE_STREAMS
        m.scale_streams = True
        got = m(x)
    assert len(model_mod._SIDE_STREAMS[torch.cuda.current_device()]) == 2
    for a, b in zip([want.merged, want.attention, *want.scales], [got.merged, got.attention, *got.scales]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    model_mod._SIDE_STREAMS.clear()
    m.train()
    with ac:
        m(x)   # a gradient is needed: one stream
    assert not model_mod._SIDE_STREAMS


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cuda_graph_capture_of_inference(bf16):
    """The 3-scale attention forward with our ops (merge, Interp, fc6 on its default path) can be captured
    as one CUDA graph (no host-device copy or sync inside: benchmarks/bench_e2e.py's "ops+graph" variant),
    and every replay on a new input equals the eager forward (with ``scale_streams`` the capture runs the
    scales serially: captured on side streams, the second and later replays went wrong on an H100)."""
    m = tiny(use_reference_ops=False, merge="attention").cuda().eval()
    x = torch.randn(1, 3, 97, 97, device="cuda")
    ac = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

    def fwd():
        with torch.no_grad(), ac:
            out = m(x)
        return out.merged, out.attention

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd()
    torch.cuda.current_stream().wait_stream(side)
    # after the first call nothing in the forward synchronises with the host (cached Interp coefficients
    # and AVE divisors, no host-device copies): a sync here would name the operator
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        merged, attention = fwd()
    # bf16: the capture read weight copies the eager calls made (18 layers; kept for the graph)
    assert not bf16 or sum(v[4][0] for v in m._cast_cache.values()) == len({n for n, _ in m._cast_cache})
    for _ in range(3):
        x.copy_(torch.randn(1, 3, 97, 97, device="cuda"))
        graph.replay()
        want_merged, want_attention = fwd()
        torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention, want_attention, rtol=1e-5, atol=1e-5)


def test_inference_keeps_autocast_weight_casts():
    """Under autocast without a gradient the model casts each layer's parameters once and keeps the copies
    (autocast casts them on every forward): the same outputs bit for bit as autocast's own casts, the copies
    reused while the parameters are unchanged, cast again after an in-place change or load_state_dict,
    never kept where a gradient is needed."""
    import attnscale.model as model_mod
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(1, 3, 41, 41)
    convs = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)}

    def run(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).merged

    def uncached(self, name, x):
        return getattr(self, name).weight, getattr(self, name).bias

    def fresh_like(model):
        other = tiny().eval()
        other.load_state_dict(model.state_dict())
        return other

    def copies():
        return {name: v[3][0] for (name, stream), v in m._cast_cache.items()}

    y = run(m)
    assert set(m._cast_cache) == {(n, None) for n in convs}  # on the CPU: no stream
    kept = copies()
    assert all(t.dtype == torch.bfloat16 for t in kept.values())
    assert torch.equal(run(m), y) and all(copies()[n] is kept[n] for n in convs)  # reused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_mod.AttentionToScale, "_params", uncached)
        assert torch.equal(run(m), y)  # autocast's own casts: the same values
    with torch.no_grad():
        m.conv1_1.weight.mul_(0.5)
    y2 = run(m)
    assert copies()["conv1_1"] is not kept["conv1_1"] and not torch.equal(y2, y)
    fresh = tiny().eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(run(fresh), y2)
    m.load_state_dict(tiny().state_dict())
    run(m)
    assert all(copies()[n] is not kept[n] for n in convs)  # load_state_dict bumped every version
    # a move to another dtype and back (the same parameters, the same versions, new storage), pickling,
    # training mode: nothing stale is kept or carried
    m.double().float()
    assert m._cast_cache == {}
    assert torch.equal(run(m), run(fresh_like(m)))
    assert copy.deepcopy(m)._cast_cache == {} and m._cast_cache
    m.train()
    assert m._cast_cache == {}
    t = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t(x)
    assert t._cast_cache == {}
    # a forward hook sees the layer's own call (the module's weights, not the copies)
    seen = []
    m.eval().classifier.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    run(m)
    assert seen == [torch.bfloat16] * 3


@pytest.mark.cuda
def test_cuda_inference_weight_casts_equal_autocast(monkeypatch):
    """On a GPU (bf16 autocast, channels_last, the coarser scales on side streams) the kept weight copies give
    autocast's outputs bit for bit, on the first call (copies made on the caller's stream before the fork:
    the side streams wait for them) and after a weight change (copies made again)."""
    import attnscale.model as model_mod
    torch.manual_seed(0)
    m = tiny(use_reference_ops=False).cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 97, 97, device="cuda").contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        return [out.merged, out.attention, *out.scales]

    w0 = m.fc7.weight.detach().clone()
    got = run()
    assert m._cast_cache and all(v[3][0].dtype == torch.bfloat16 for v in m._cast_cache.values())
    with torch.no_grad():
        m.fc7.weight.mul_(1.5)
    got2 = run()
    with monkeypatch.context() as mp:
        mp.setattr(model_mod.AttentionToScale, "_params",
                   lambda self, name, x: (getattr(self, name).weight, getattr(self, name).bias))
        want2 = run()
        with torch.no_grad():
            m.fc7.weight.copy_(w0)
        want = run()
    for a, b in zip(got + got2, want + want2):
        assert torch.equal(a, b)


def test_conv1_1_on_a_zero_padded_channel(monkeypatch):
    """pad_input_channels (a GPU matter, forced here on the CPU): conv1_1 on the image with a fourth, zero
    channel and a zero fourth input channel in its weight gives the 3-channel model's outputs (up to the order
    of float sums) and gradients, the weight's gradient in its own (64, 3, 3, 3) shape; only conv1_1 pads."""
    import attnscale.model as model_mod
    torch.manual_seed(0)
    ref = tiny(use_reference_ops=False, pad_input_channels=False).train()
    m = tiny(use_reference_ops=False).train()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 41, 41)
    labels = torch.randint(0, 5, (2, 41, 41))
    assert not m._pads_input(x, m.conv1_1)  # on the CPU: never
    padded = []
    real = model_mod.AttentionToScale._pads_input

    def forced(self, x, conv):
        on = self.pad_input_channels and conv.in_channels == 3 and x.shape[1] == 3
        padded.append(on)
        return on

    monkeypatch.setattr(model_mod.AttentionToScale, "_pads_input", forced)
    res = []
    for model in (ref, m):
        torch.manual_seed(1)
        out = model(x)
        loss, _ = model.loss(out, labels)
        res.append((out.merged, torch.autograd.grad(loss, list(model.parameters()))))
    assert sum(padded) == 3 and real is not forced  # conv1_1 of each scale
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res[0][1], res[1][1]):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_conv1_1_padded_equals_three_channels(monkeypatch):
    """On a GPU conv1_1 runs on 4 channels by default (channels_last): in float32 (TF32 off) the outputs and
    gradients agree with the 3-channel model's to float rounding; in bf16 autocast the outputs to bf16's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    ref = tiny(use_reference_ops=False, pad_input_channels=False, dropout=0.0)
    ref = ref.cuda().to(memory_format=torch.channels_last).train()
    m = tiny(use_reference_ops=False, dropout=0.0).cuda().to(memory_format=torch.channels_last).train()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 65, 65, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (2, 65, 65), device="cuda")
    assert m._pads_input(x, m.conv1_1) and not ref._pads_input(x, ref.conv1_1)
    res = []
    for model in (ref, m):
        out = model(x)
        loss, _ = model.loss(out, labels)
        res.append((out.merged, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(res[0][1], res[1][1]):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref.eval()(x).merged.float(), m.eval()(x).merged.float()
    torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3)
