"""attnscale.ops.dense_crf / attnscale.crf (DeepLab's DenseCRF layer): the C++ kernel equals the numpy twin bit
for bit (lattice, filters, mean field, fast_exp), the unary is the negated scores, the lattice filter is a unit
Gaussian, the inference does what
a CRF must (no pairwise term: the softmax; a noisy labelling of a two-colour image: cleaned), the layer's crop,
input checks, and its use by predict, evaluate and the Caffe importer."""
import json

import numpy as np
import pytest
import torch

from attnscale import caffe
from attnscale.crf import CRFParams, dense_crf
from attnscale.ops import has_extension
from attnscale.ops.reference import _fast_exp, _lattice, _lattice_filter, dense_crf_reference

needs_ext = pytest.mark.skipif(not has_extension(), reason="attnscale._C not built")

FEW = CRFParams(max_iter=3, pos_w=(3.0, 1.5), pos_xy_std=(3.0, 1.0), bi_w=(4.0,), bi_xy_std=(7.0,), bi_rgb_std=(5.0,))


def _op(unary, image, p):
    return torch.ops.attnscale.dense_crf(unary, image, p.max_iter, list(p.pos_w), list(p.pos_xy_std), list(p.bi_w),
                                         list(p.bi_xy_std), list(p.bi_rgb_std))


def _args(p):
    return (p.max_iter, p.pos_w, p.pos_xy_std, p.bi_w, p.bi_xy_std, p.bi_rgb_std)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 21, 9, 11), (2, 5, 13, 10), (1, 1, 4, 4), (1, 3, 1, 7), (1, 4, 16, 20)])
@pytest.mark.parametrize("params", [CRFParams(), FEW, CRFParams(bi_w=(), bi_xy_std=(), bi_rgb_std=())])
def test_kernel_equals_numpy_twin_bit_for_bit(shape, params):
    """Every float operation in the same order: a changed rounding, summation order, blur or fast_exp breaks this
    (pixel counts with and without a partial last block of four: the SSE code's zero points)."""
    g = torch.Generator().manual_seed(sum(shape))
    N, M, H, W = shape
    unary = -torch.randn(N, M, H, W, generator=g) * 4
    # colours near the mean put pixels near the zero feature, whose simplex the SSE code adds (N % 4 != 0)
    image = torch.randn(N, 3, H, W, generator=g) * 10 if params.bi_w else None
    ours = _op(unary, image, params)
    twin = dense_crf_reference(unary, image, *_args(params))
    assert torch.equal(ours, twin)
    assert torch.allclose(ours.sum(1), torch.ones(N, H, W), atol=2e-6)


@needs_ext
def test_threads_do_not_change_the_bits():
    g = torch.Generator().manual_seed(3)
    unary = -torch.randn(1, 21, 30, 41, generator=g) * 3
    image = torch.randn(1, 3, 30, 41, generator=g) * 50
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op(unary, image, CRFParams())
        torch.set_num_threads(max(2, threads))
        many = _op(unary, image, CRFParams())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_fast_exp_is_exp():
    """Krähenbühl's polynomial-and-squaring exp: within 1e-5 relative of exp on the layer's range (x <= 0,
    0 beyond -20)."""
    x = np.concatenate([-np.linspace(0, 20, 20001), [-1e-30, -0.69, -1.38, -2.76, -5.52, -19.99]]).astype(np.float32)
    got = _fast_exp(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 1e-5 * want)
    assert _fast_exp(np.float32([-20.5, -100, -np.inf])).tolist() == [0, 0, 0]
    assert _fast_exp(np.float32([0.0]))[0] == 1.0


def test_lattice_filter_is_a_unit_gaussian():
    """The normalised lattice filter approximates the Gaussian exp(-|fi - fj|^2 / 2) of the scaled features
    (Krähenbühl's kernel with std 1 in feature units), not a wider or narrower one, and keeps a constant."""
    rng = np.random.default_rng(0)
    for d, n, spread in ((2, 300, 3.0), (5, 400, 1.5)):
        f = (rng.standard_normal((n, d)) * spread).astype(np.float32)
        v = rng.standard_normal((n, 2)).astype(np.float32)
        lat = _lattice(f)
        ones = _lattice_filter(lat, np.ones((n, 1), np.float32))
        ours = _lattice_filter(lat, v) / ones
        dist = ((f[:, None] - f[None]) ** 2).sum(-1)

        def corr(sigma):
            k = np.exp(-dist / (2 * sigma ** 2))
            return np.corrcoef(ours.ravel(), (k @ v / k.sum(1, keepdims=True)).ravel())[0, 1]

        sigmas = (0.5, 0.7, 1.0, 1.4, 2.0)
        fits = [corr(s) for s in sigmas]
        assert sigmas[int(np.argmax(fits))] == 1.0 and max(fits) > 0.95, fits
        c = _lattice_filter(lat, np.full((n, 1), 2.5, np.float32)) / ones
        assert np.allclose(c, 2.5, rtol=1e-5)


@needs_ext
def test_without_pairwise_terms_it_is_the_softmax():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 6, 8, 9, generator=g) * 5
    want = torch.softmax(scores, 1)
    for p in (CRFParams(max_iter=0), CRFParams(pos_w=(0.0,), bi_w=(0.0,), max_iter=4)):
        got = dense_crf(scores, torch.zeros(2, 3, 8, 9), p)
        assert torch.allclose(got, want, rtol=2e-5, atol=1e-7)


def _two_regions(h=40, w=56, seed=0):
    """An image of two colours (a disc on a background), its labels, and scores that favour the right label
    only weakly under heavy per-pixel noise."""
    yy, xx = np.mgrid[:h, :w]
    lab = (((yy - h / 2) ** 2 + (xx - w / 2.5) ** 2) < (h / 3) ** 2).astype(np.int64)
    img = np.where(lab[..., None] == 1, [40, 160, 220], [200, 90, 30]).astype(np.uint8)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, 2, h, w, generator=g) * 1.5
    scores[0, 1] += torch.from_numpy(lab * 1.6 - 0.8).float()
    return img, lab, scores


@needs_ext
def test_cleans_a_noisy_labelling():
    img, lab, scores = _two_regions()
    x = caffe.preprocess_bgr(img)
    before = (scores.argmax(1)[0].numpy() == lab).mean()
    after = (dense_crf(scores, x, CRFParams()).argmax(1)[0].numpy() == lab).mean()
    assert before < 0.75 and after > 0.98
    # the colour edge matters: the same scores on a flat image get only the smoothing
    flat = (dense_crf(scores, torch.zeros_like(x), CRFParams()).argmax(1)[0].numpy() == lab).mean()
    assert after > flat + 0.02


@needs_ext
def test_size_crops_like_the_layers_data_dims():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1, 4, 12, 15, generator=g)
    image = torch.randn(1, 3, 12, 15, generator=g) * 30
    out = dense_crf(scores, image, FEW, size=(9, 11))
    assert torch.equal(out[:, :, :9, :11], dense_crf(scores[:, :, :9, :11].contiguous(),
                                                     image[:, :, :9, :11].contiguous(), FEW))
    assert not out[:, :, 9:].any() and not out[:, :, :, 11:].any()
    with pytest.raises(ValueError, match="within"):
        dense_crf(scores, image, FEW, size=(13, 4))


@needs_ext
def test_unary_is_the_negated_scores():
    """DeepLab's final layers take ``unary_ = -bottom_data``; deeplab-public's early-2015 layer took -log softmax,
    a per-pixel constant away: the same CRF up to rounding."""
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(1, 6, 10, 12, generator=g) * 4
    image = torch.randn(1, 3, 10, 12, generator=g) * 20
    q = dense_crf(scores, image, FEW)
    assert torch.equal(q, _op(-scores, image, FEW))
    early = _op(-torch.log_softmax(scores, 1), image, FEW)
    assert torch.allclose(q, early, atol=1e-5) and not torch.equal(q, early)


@needs_ext
def test_inf_unary_is_a_zero_probability():
    u = torch.zeros(1, 3, 5, 6)
    u[:, :2] = float("inf")     # scores of -inf: those labels cannot be
    q = _op(u, torch.zeros(1, 3, 5, 6), FEW)
    assert torch.isfinite(q).all() and torch.equal(q[:, 2], torch.ones(1, 5, 6))


@needs_ext
def test_input_errors():
    u = torch.randn(1, 3, 5, 6)
    im = torch.zeros(1, 3, 5, 6)
    p = CRFParams()
    with pytest.raises(ValueError, match="float32"):
        _op(u.double(), im, p)
    with pytest.raises(ValueError, match=r"\(N, M, H, W\)"):
        _op(u[0], im, p)
    with pytest.raises(ValueError, match="unary must be contiguous"):
        _op(u.transpose(2, 3), im.transpose(2, 3), p)
    with pytest.raises(ValueError, match="image must be a float32"):
        _op(u, im[:, :2], p)
    with pytest.raises(ValueError, match="image must be contiguous"):
        _op(u, torch.zeros(1, 3, 6, 5).transpose(2, 3), p)
    with pytest.raises(ValueError, match="NaN"):
        _op(torch.full_like(u, float("nan")), im, p)
    with pytest.raises(ValueError, match="non-finite"):
        _op(u, torch.full_like(im, float("inf")), p)
    with pytest.raises(ValueError, match="bilateral kernels .*need the image"):
        _op(u, None, p)
    with pytest.raises(ValueError, match="no bilateral kernel"):
        _op(u, im, CRFParams(bi_w=(), bi_xy_std=(), bi_rgb_std=()))
    op = torch.ops.attnscale.dense_crf
    with pytest.raises(ValueError, match="pos_xy_std has 1, pos_w 2|pos_w has 2, pos_xy_std 1"):
        op(u, im, 10, [1.0, 2.0], [3.0], [4.0], [5.0], [6.0])
    with pytest.raises(ValueError, match="positive finite standard deviations"):
        op(u, im, 10, [1.0], [0.0], [4.0], [5.0], [6.0])
    with pytest.raises(ValueError, match="finite weights"):
        op(u, im, 10, [float("inf")], [1.0], [4.0], [5.0], [6.0])
    with pytest.raises(ValueError, match="max_iter"):
        op(u, im, -1, [1.0], [1.0], [4.0], [5.0], [6.0])
    with pytest.raises(ValueError, match="16-bit lattice keys"):
        op(u, None, 1, [1.0], [1e-4], [], [], [])
    with pytest.raises(ValueError, match="16-bit lattice keys"):
        dense_crf_reference(u, None, 1, [1.0], [1e-4])
    for std in (1e-39, 1e-50):   # zero or subnormal as float32: refused, not infinite features
        with pytest.raises(ValueError, match="positive finite standard deviations"):
            op(u, im, 1, [1.0], [1.0], [4.0], [std], [6.0])
    with pytest.raises(ValueError, match="16-bit lattice keys"):   # features overflowing to inf
        op(u, torch.full_like(im, 3e38), 1, [1.0], [1.0], [4.0], [5.0], [0.5])
    dead = u.clone()
    dead[0, :, 2, 3] = float("inf")     # every label's score -inf at one pixel
    with pytest.raises(ValueError, match="no label is possible"):
        _op(dead, im, p)


def test_params_checks():
    with pytest.raises(ValueError, match="pos_w has 2 values, pos_xy_std 1"):
        CRFParams(pos_w=(1, 2))
    with pytest.raises(ValueError, match="a number or a list of numbers"):
        CRFParams(bi_w="35")
    with pytest.raises(ValueError, match="as a float32"):
        CRFParams(bi_w=1e39)
    with pytest.raises(ValueError, match=r"max_iter must be an int in \[0, 1048576\]"):
        CRFParams(max_iter=5_000_000)
    assert CRFParams(bi_w=np.float32(3), max_iter=np.int64(4)) == CRFParams(bi_w=(3.0,), max_iter=4)
    assert CRFParams(pos_w=(x for x in [2.0]), pos_xy_std=np.array([5.0])).pos_w == (2.0,)
    assert CRFParams(bi_w=torch.tensor(3.0)).bi_w == (3.0,) and CRFParams(bi_w=3.4028235e38).bi_w == (3.4028235e38,)
    for bad in ({"bi_xy_std": 1e-39}, {"pos_w": 10 ** 400}, {"bi_w": [True]}, {"bi_w": [[1.0]]}):
        with pytest.raises(ValueError, match="CRFParams"):
            CRFParams(**bad)
    with pytest.raises(ValueError, match="bi_rgb_std"):
        CRFParams(bi_rgb_std=(-1,))
    with pytest.raises(ValueError, match="max_iter"):
        CRFParams(max_iter=2.5)
    with pytest.raises(ValueError, match="unknown field"):
        CRFParams.from_dict({"iters": 3})
    p = CRFParams(pos_w=2, pos_xy_std=[1.5])
    assert p.pos_w == (2.0,) and CRFParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@needs_ext
def test_opcheck_and_forward_only():
    u = torch.randn(1, 3, 5, 6)
    args = (u, torch.zeros(1, 3, 5, 6), 2, [3.0], [3.0], [4.0], [7.0], [5.0])
    torch.library.opcheck(torch.ops.attnscale.dense_crf, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="forward only"):
        torch.ops.attnscale.dense_crf(u.clone().requires_grad_(), *args[1:]).sum().backward()


@needs_ext
def test_predict_runs_the_crf_on_the_image_and_zoomed_scores(monkeypatch):
    from attnscale import crf as crf_module
    from attnscale.model import AttentionToScale

    torch.manual_seed(0)
    model = AttentionToScale(num_classes=3, scales=(1.0, 0.5), width=1 / 16, test_crop_size=33)
    img = np.random.default_rng(0).integers(0, 255, (21, 27, 3), dtype=np.uint8)
    seen = {}
    real = crf_module.dense_crf

    def spy(scores, image, params):
        seen.update(scores=scores.clone(), image=image.clone(), params=params)
        return real(scores, image, params)

    monkeypatch.setattr(crf_module, "dense_crf", spy)
    lab, _ = model.predict(img, crf=FEW)
    plain, _ = model.predict(img)
    assert seen["scores"].shape == (1, 3, 21, 27) and seen["params"] == FEW
    assert torch.equal(seen["image"], caffe.preprocess_bgr(img))
    assert np.array_equal(lab, real(seen["scores"], seen["image"], FEW)[0].argmax(0).numpy())
    assert np.array_equal(plain, seen["scores"][0].argmax(0).numpy())


def test_evaluate_crf_params_flag(tmp_path):
    from attnscale.evaluate import _crf_params

    assert _crf_params(None, None) is None and _crf_params("largefov", None) == CRFParams()
    assert _crf_params("msc-coco-largefov", None) == CRFParams(bi_w=(4,), bi_xy_std=(59,), bi_rgb_std=(5,))
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        _crf_params("vgg", None)
    f = tmp_path / "crf.json"
    f.write_text(json.dumps({"bi_w": [5], "bi_xy_std": [50], "bi_rgb_std": [3], "max_iter": 5}))
    assert _crf_params(None, str(f)) == CRFParams(bi_w=(5,), bi_xy_std=(50,), bi_rgb_std=(3,), max_iter=5)
    assert _crf_params(None, '{"pos_w": 2}') == CRFParams(pos_w=(2,))
    # the JSON's fields over the named model's
    assert _crf_params("coco-largefov", '{"bi_xy_std": [67]}') == CRFParams(bi_w=(5,), bi_xy_std=(67,), bi_rgb_std=(5,))
    for text, msg in (("{", "not JSON"), ('{"x": 1}', "unknown field"), (str(tmp_path / "none.json"), "readable"),
                      ("", "readable"), (str(tmp_path), "readable")):
        with pytest.raises(ValueError, match=msg):
            _crf_params(None, text)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object"):
        _crf_params(None, str(tmp_path / "list.json"))
    (tmp_path / "{x}.json").write_text('\ufeff{"max_iter": 3}')        # a file whose name looks like JSON, a BOM
    assert _crf_params(None, str(tmp_path / "{x}.json")).max_iter == 3
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="bin.json: neither"):
        _crf_params(None, str(tmp_path / "bin.json"))


PROTO = """
name: "crf"
input: "data"  input_shape { dim: 1 dim: 3 dim: 14 dim: 17 }
input: "data_dim"  input_shape { dim: 1 dim: 1 dim: 1 dim: 2 }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "crf" type: "DenseCRF" bottom: "score" bottom: "data_dim" bottom: "data" top: "crf_inf"
  dense_crf_param { max_iter: 3 pos_w: 3 pos_xy_std: 3 bi_w: 4 bi_xy_std: 7 bi_rgb_std: 5 } }
"""


@needs_ext
def test_caffe_net_dense_crf_layer():
    """load_net runs a DenseCRF layer on the image's data_dim corner (the padded map where the image is larger),
    and refuses what DeepLab's layer does not do right: no image bottom, a batch of several images."""
    import prototxt_import as pi

    net = pi.load_net(PROTO)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 14, 17, generator=g) * 40
    p = CRFParams(max_iter=3, pos_w=(3,), pos_xy_std=(3,), bi_w=(4,), bi_xy_std=(7,), bi_rgb_std=(5,))
    blobs = net(x, torch.tensor([[[[11.0, 13.0]]]]), return_blobs=True)
    assert torch.equal(blobs["crf_inf"], dense_crf(blobs["score"], x, p, size=(11, 13)))
    blobs = net(x, torch.tensor([[[[20.0, 30.0]]]]), return_blobs=True)   # cropped image: the whole map
    assert torch.equal(blobs["crf_inf"], dense_crf(blobs["score"], x, p))
    for dims, msg in (([[[[11.0, 30.0]]]], "along one axis only"), ([[[[0.0, 5.0]]]], "not a positive size"),
                      ([[[[float("nan"), 5.0]]]], "is not a size")):
        with pytest.raises(ValueError, match=msg):
            net(x, torch.tensor(dims))
    params = "pos_w: 3 pos_xy_std: 3 bi_w: 4 bi_xy_std: 7 bi_rgb_std: 5"
    batch2 = PROTO.replace("dim: 1 dim: 3", "dim: 2 dim: 3").replace("dim: 1 dim: 1 dim: 1", "dim: 2 dim: 1 dim: 1")
    for text, msg in ((PROTO.replace(params, "pos_w: 3 pos_xy_std: 3"), "no bilateral parameters"),
                      (PROTO.replace(params, params + " output_probability: false"), "output_probability"),
                      (PROTO.replace(params, "pos_w: 3 bi_w: 4 bi_xy_std: 7 bi_rgb_std: 5"),
                       "pos_w has 1 values, pos_xy_std 0"),
                      (PROTO.replace(' bottom: "data" top: "crf_inf"', ' top: "crf_inf"'), "needs 3 bottoms"),
                      (batch2, "a batch of 2 images")):
        with pytest.raises(pi.CaffeImportError, match=msg):
            pi.load_net(text)


@needs_ext
def test_to_attnscale_reads_the_nets_crf():
    """DeepLab-CRF's test net (the deploy net + Interp zoom 8 + DenseCRF, V1 form too) converts, and the report
    carries the CRF's parameters for predict / evaluate."""
    import prototxt_import as pi
    from tests.test_prototxt_import import SHARED

    path = SHARED / "deeplab_largefov_deploy.prototxt"
    if not path.exists():
        pytest.skip(f"shared prototxts not found at {SHARED}")
    text = path.read_text()
    text += """
layer { name: "fc8_interp" type: "Interp" bottom: "fc8_voc12" top: "fc8_interp" interp_param { zoom_factor: 8 } }
layer { name: "crf" type: "DenseCRF" bottom: "fc8_interp" bottom: "data_dim" bottom: "data" top: "crf_inf"
  dense_crf_param { max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 4 bi_xy_std: 121 bi_rgb_std: 5 } }
"""
    text = text.replace('input_shape { dim: 1 dim: 3 dim: 513 dim: 513 }',
                        'input_shape { dim: 1 dim: 3 dim: 513 dim: 513 }\ninput: "data_dim"\n'
                        'input_shape { dim: 1 dim: 1 dim: 1 dim: 2 }', 1)
    _, report = pi.to_attnscale(text)
    assert report.crf == CRFParams()
    assert any("DenseCRF 'crf'" in n and "--crf-params" in n for n in report.notes)
    no_image = text.replace('bottom: "data_dim" bottom: "data" top: "crf_inf"', 'bottom: "data_dim" top: "crf_inf"')
    with pytest.raises(pi.CaffeImportError, match="needs 3 bottoms"):
        pi.to_attnscale(no_image)
    # a CRF fed something else than the scores (here their softmax) is another CRF than predict's: not taken
    soft = text.replace('bottom: "fc8_interp" bottom: "data_dim"', 'bottom: "prob" bottom: "data_dim"').replace(
        'layer { name: "crf"', 'layer { name: "prob" type: "Softmax" bottom: "fc8_interp" top: "prob" }\nlayer { name: "crf"')
    _, report = pi.to_attnscale(soft)
    assert report.crf is None and any("reads 'prob'" in n and "not taken" in n for n in report.notes)
    # nor one on another image than the net's (here a pooled one, with the scores zoomed less)
    pooled = text.replace("zoom_factor: 8", "zoom_factor: 4").replace(
        'bottom: "data_dim" bottom: "data" top: "crf_inf"', 'bottom: "data_dim" bottom: "half" top: "crf_inf"').replace(
        'layer { name: "crf"', 'layer { name: "half" type: "Pooling" bottom: "data" top: "half" '
        'pooling_param { pool: AVE kernel_size: 2 stride: 2 } }\nlayer { name: "crf"')
    _, report = pi.to_attnscale(pooled)
    assert report.crf is None and any("'half'" in n and "not taken" in n for n in report.notes)


@needs_ext
def test_legacy_v1_dense_crf_layer():
    """DeepLab-v1's own form (``layers { type: DENSE_CRF }``, V1 field numbers) builds the same layer."""
    import prototxt_import as pi

    v1 = """
name: "crf"
input: "data"  input_dim: 1 input_dim: 3 input_dim: 14 input_dim: 17
input: "data_dim"  input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 2
layers { name: "score" type: CONVOLUTION bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layers { name: "crf" type: DENSE_CRF bottom: "score" bottom: "data_dim" bottom: "data" top: "crf_inf"
  dense_crf_param { max_iter: 3 pos_w: 3 pos_xy_std: 3 bi_w: 4 bi_xy_std: 7 bi_rgb_std: 5 } }
"""
    old, new = pi.load_net(v1), pi.load_net(PROTO)
    with torch.no_grad():
        for a, b in zip(old.layer_blobs("score"), new.layer_blobs("score")):
            a.copy_(b)
    x = torch.randn(1, 3, 14, 17, generator=torch.Generator().manual_seed(4)) * 30
    dims = torch.tensor([[[[9.0, 12.0]]]])
    assert torch.equal(old(x, dims), new(x, dims))
