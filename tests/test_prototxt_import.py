"""prototxt_import: readers (text/binary/V1/HDF5), net builder, converter, CLI, bad input, fuzz."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prototxt_import as pi
from prototxt_import import CaffeImportError, readers
from tests.caffe_files import (SUFFIX, caffemodel_bytes, deeplab_prototxt, net_weights,
                                            randomize, write_h5)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "prototxt"
SHARED_FILES = sorted(SHARED.glob("*.prototxt")) if SHARED.is_dir() else []
W = 1 / 16  # width of the small test nets: 64 -> 4 channels, 1024 -> 64
SIZE = 65   # input size of the small test nets (9x9 output, 7x7 at 0.75, 5x5 at 0.5)


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A width-1/16 3-scale attention net, its prototxt path and random weights."""
    d = tmp_path_factory.mktemp("att3")
    p = d / "att3.prototxt"
    p.write_text(deeplab_prototxt((1.0, 0.75, 0.5), "attention", width=W, size=SIZE))
    net = pi.load_net(p)
    randomize(net, seed=1)
    return p, net, net_weights(net)


# ------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("v1", [False, True], ids=["layer", "V1"])
@pytest.mark.parametrize("packed,double", [(True, False), (False, False), (True, True)],
                         ids=["packed", "unpacked", "double_data"])
@pytest.mark.parametrize("legacy", [False, True], ids=["shape", "nchw"])
def test_caffemodel_round_trip(tmp_path, small_net, v1, packed, double, legacy):
    proto, net, layers = small_net
    raw = caffemodel_bytes(layers, v1=v1, packed=packed, double=double, legacy=legacy)
    wpath = _write(tmp_path, "w.caffemodel", raw)
    wf = pi.read_weights(wpath)
    got = wf.by_name()
    assert [n for n, _, _ in wf.layers] == [n for n, _, _ in layers]
    for name, type_, arrays in layers:
        assert wf.types()[name] == type_
        assert len(got[name]) == len(arrays)
        for blob, a in zip(got[name], arrays):
            assert blob.legacy == legacy
            np.testing.assert_array_equal(blob.data.reshape(a.shape), a)
    fresh = pi.load_net(proto, weights=wpath)
    assert not fresh.load_report.ignored and len(fresh.load_report.loaded) == len(layers)
    for (name, _, arrays) in layers:
        for p, a in zip(fresh.layer_blobs(name), arrays):
            np.testing.assert_array_equal(p.detach().numpy(), a)


def test_hdf5_round_trip(tmp_path, small_net):
    proto, net, layers = small_net
    h5 = tmp_path / "w.caffemodel.h5"
    write_h5(h5, layers)
    fresh = pi.load_net(proto, weights=h5)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_text_round_trip_and_v1_upgrade(tmp_path):
    from google.protobuf import text_format
    text = deeplab_prototxt(width=W, size=SIZE)
    net = pi.read_net(text)
    again = pi.parse_text(text_format.MessageToString(net))
    assert again == net
    v1 = pi.read_net(deeplab_prototxt(width=W, size=SIZE, v1=True))
    assert len(v1.layers) == len(net.layer) and not len(v1.layer)
    up = readers.upgraded_layers(v1)
    for a, b in zip(up, net.layer):
        assert (a.name, a.type, list(a.bottom), list(a.top)) == (b.name, b.type, list(b.bottom), list(b.top))
        assert a.convolution_param == b.convolution_param and a.pooling_param == b.pooling_param
    # binary NetParameter (a prototxt serialized) reads back equal
    p = _write(tmp_path, "net.binaryproto", net.SerializeToString())
    assert pi.read_net(p) == net


def test_v1_param_upgrade():
    text = ('layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" param: "cw" param: "cb" '
            'blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 '
            'convolution_param { num_output: 2 kernel_size: 1 } include { phase: TEST } }')
    (lp,) = readers.upgraded_layers(pi.read_net(text))
    assert lp.type == "Convolution" and [p.name for p in lp.param] == ["cw", "cb"]
    assert [p.lr_mult for p in lp.param] == [1, 2] and [p.decay_mult for p in lp.param] == [1, 0]
    assert lp.include[0].phase == 1


def test_solver(tmp_path):
    text = ('net: "train.prototxt"\ntest_iter: 10\ntest_interval: 100\nbase_lr: 0.001\n'
            'lr_policy: "step"\ngamma: 0.1\nstepsize: 2000\nmomentum: 0.9\nweight_decay: 0.0005\n'
            'max_iter: 6000\nsnapshot_prefix: "snap/att"\nsolver_mode: GPU\niter_size: 2\n')
    s = pi.read_solver(_write(tmp_path, "solver.prototxt", text))
    assert (s.net, s.base_lr, s.lr_policy, s.stepsize, s.max_iter, s.iter_size) == \
        ("train.prototxt", pytest.approx(0.001), "step", 2000, 6000, 2)
    assert s.momentum == pytest.approx(0.9) and s.weight_decay == pytest.approx(0.0005)
    with pytest.raises(CaffeImportError, match=r"solver.prototxt:4:\d+: .*no field named \"base_lrate\""):
        pi.read_solver(_write(tmp_path, "solver.prototxt", text.replace("base_lr", "base_lrate")))


def test_unknown_binary_fields_are_skipped(tmp_path, small_net):
    _, _, layers = small_net
    raw = caffemodel_bytes(layers[:1])
    # append an unknown field (number 999, varint) at the NetParameter level
    wf = pi.read_weights(_write(tmp_path, "w.caffemodel", raw + bytes([0xB8, 0x3E, 0x05])))
    assert [n for n, _, _ in wf.layers] == [layers[0][0]]


# ------------------------------------------------------------------------------- shared nets
@pytest.mark.skipif(not SHARED_FILES, reason=f"shared prototxts not found at {SHARED}")
@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.name)
def test_shared_prototxt_parses_and_builds(path):
    """Every shared prototxt parses and runs at 65x65 (not 513) with zero-cost default weights."""
    net = pi.load_net(path, input_shapes={"data": (1, 3, SIZE, SIZE)}, use_ops=False)
    assert net.input_names == ["data"]
    with torch.no_grad():
        blobs = net(torch.randn(1, 3, SIZE, SIZE), return_blobs=True)
    merged = [n for n in ("fc8_attention", "fc8_max", "fc8_avg", "fc8_voc12") if n in blobs][0]
    assert merged in net.output_names
    assert tuple(blobs[merged].shape) == (1, 21, 9, 9) == net.blob_shapes[merged]
    for name, t in blobs.items():  # the statically inferred shapes are the computed ones
        assert tuple(t.shape) == net.blob_shapes[name], name
    if "attention" in blobs:
        torch.testing.assert_close(blobs["attention"].sum(1), torch.ones(1, 9, 9))
    if "train" in path.name:
        assert net.unused_inputs == ["label", "label_res075", "label_res05"]


@pytest.mark.skipif(not SHARED_FILES, reason=f"shared prototxts not found at {SHARED}")
@pytest.mark.parametrize("merge,scales,fname", [
    (None, (1.0,), "deeplab_largefov_deploy.prototxt"),
    ("attention", (1.0, 0.75, 0.5), "attention3_deploy.prototxt"),
    ("attention", (1.0, 0.5), "attention2_deploy.prototxt"),
    ("max", (1.0, 0.75, 0.5), "max3_deploy.prototxt"),
    ("avg", (1.0, 0.75, 0.5), "avg3_deploy.prototxt")])
def test_generator_matches_shared_structure(merge, scales, fname):
    """The small test nets have exactly the shared nets' layers (names, types, blobs, params)."""
    ours = readers.upgraded_layers(pi.read_net(deeplab_prototxt(scales, merge, width=1.0)))
    theirs = readers.upgraded_layers(pi.read_net(SHARED / fname))

    def key(lp):
        return (lp.name, lp.type, list(lp.bottom), list(lp.top), [p.SerializeToString() for p in lp.param],
                lp.convolution_param, lp.pooling_param, lp.interp_param, lp.eltwise_param, lp.slice_param,
                lp.dropout_param)
    assert [key(a) for a in ours] == [key(b) for b in theirs]


@pytest.mark.skipif(not SHARED_FILES, reason=f"shared prototxts not found at {SHARED}")
def test_shared_v1_equals_current():
    net = pi.load_net(SHARED / "deeplab_largefov_deploy.prototxt", input_shapes=(1, 3, 33, 33))
    old = pi.load_net(SHARED / "deeplab_largefov_deploy_v1.prototxt", input_shapes=(1, 3, 33, 33))
    randomize(net)
    for (name, _, arrays) in net_weights(net):
        with torch.no_grad():
            for p, a in zip(old.layer_blobs(name), arrays):
                p.copy_(torch.from_numpy(a))
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(old(x), net(x), rtol=0, atol=0)


@pytest.mark.skipif(not SHARED_FILES, reason=f"shared prototxts not found at {SHARED}")
@pytest.mark.parametrize("fname,scales,merge,dropout,esupv", [
    ("deeplab_largefov_deploy.prototxt", (1.0,), None, 0.5, None),
    ("deeplab_largefov_deploy_v1.prototxt", (1.0,), None, 0.5, None),
    ("attention3_deploy.prototxt", (1.0, 0.75, 0.5), "attention", 0.5, None),
    ("attention2_deploy.prototxt", (1.0, 0.5), "attention", 0.5, None),
    ("max3_deploy.prototxt", (1.0, 0.75, 0.5), "max", 0.5, None),
    ("avg3_deploy.prototxt", (1.0, 0.75, 0.5), "avg", 0.5, None),
    ("attention3_train_esupv.prototxt", (1.0, 0.75, 0.5), "attention", 0.0, True)])
def test_shared_prototxt_analysis(fname, scales, merge, dropout, esupv):
    from prototxt_import.convert import analyse
    cfg = analyse(pi.read_net(SHARED / fname))
    assert (cfg["scales"], cfg["merge"], cfg["dropout"], cfg["extra_supervision"]) == (scales, merge, dropout, esupv)
    assert (cfg["num_classes"], cfg["width"], cfg["classifier_name"]) == (21, 1.0, "fc8_voc12")


def test_deeplab_train_layers():
    """DeepLab training-net layers: ImageSegData (tops are inputs, shapes from batch/crop), params
    of SegAccuracy / image_data / memory_data parse, TRAIN-only layers are dropped at TEST."""
    text = '''
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim"
  image_data_param { root_folder: "/voc" source: "list.txt" batch_size: 2 shuffle: true label_type: PIXEL }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: 17 mirror: true }
  include { phase: TRAIN } }
layer { name: "mem" type: "MemoryData" top: "mdata" top: "mlabel" memory_data_param { batch_size: 1 channels: 3 height: 9 width: 9 }
  include { phase: TEST } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 1 } include { phase: TRAIN } }
layer { name: "cm" type: "Convolution" bottom: "mdata" top: "cm" convolution_param { num_output: 2 kernel_size: 3 } include { phase: TEST } }
layer { name: "acc" type: "SegAccuracy" bottom: "c" bottom: "label" top: "acc" seg_accuracy_param { ignore_label: 255 } include { phase: TRAIN } }
'''
    train = pi.load_net(text, phase="TRAIN")
    assert train.blob_shapes["data"] == (2, 3, 17, 17) and train.blob_shapes["label"] == (2, 1, 17, 17)
    assert train.input_names == ["data"] and set(train.unused_inputs) == {"label", "data_dim"}
    assert train.output_names == ["c"]
    inp = pi.load_net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }\n'
                      'layer { name: "r" type: "ReLU" bottom: "x" top: "r" }')
    assert inp.input_names == ["x"] and inp.blob_shapes["r"] == (1, 2, 5, 5)
    with pytest.raises(CaffeImportError, match="layer 'in' \\(Input\\): top 'x' has a negative dimension"):
        pi.load_net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: -2 } } }')
    test = pi.load_net(text)
    assert test.input_names == ["mdata"] and test.blob_shapes["cm"] == (1, 2, 7, 7)
    assert tuple(test(torch.randn(1, 3, 9, 9)).shape) == (1, 2, 7, 7)
    with pytest.raises(CaffeImportError, match="MemoryData has 3 tops: Caffe's layer produces exactly 2"):
        pi.load_net(text.replace('top: "mlabel"', 'top: "mlabel" top: "data_dim"'))


# ------------------------------------------------------------------------ builder semantics
def test_blobs_inplace_and_sharing(small_net):
    _, net, _ = small_net
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        blobs = net(x, return_blobs=True)
    assert blobs["conv1_1"].min() >= 0  # relu1_1 ran in place: the blob holds the ReLU output
    assert net.layer_blobs("conv1_1")[0] is net.layer_blobs("conv1_1_res075")[0]  # param { name }
    assert net.layer_blobs("att_conv1")[0] is not net.layer_blobs("conv1_1")[0]
    assert net.output_names == ["fc8_attention"]


def test_layer_semantics(tmp_path):
    """Eltwise coeff/PROD/MAX, Concat, Slice points, Split, Silence, Crop, SpatialProduct, Softmax
    axis, InnerProduct, ReLU slope and include/exclude phase rules, checked against torch."""
    text = '''
input: "a" input_shape { dim: 2 dim: 4 dim: 5 dim: 6 }
input: "b" input_shape { dim: 2 dim: 4 dim: 5 dim: 6 }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 2 coeff: -1 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" concat_param { axis: 2 } }
layer { name: "sl" type: "Slice" bottom: "cat" top: "s1" top: "s2" top: "s3" slice_param { axis: 2 slice_point: 3 slice_point: 7 } }
layer { name: "sp" type: "Split" bottom: "s1" top: "s1a" top: "s1b" }
layer { name: "sil" type: "Silence" bottom: "s1b" }
layer { name: "crop" type: "Crop" bottom: "a" bottom: "s1a" top: "crop" crop_param { axis: 2 offset: 1 offset: 0 } }
layer { name: "one" type: "Convolution" bottom: "b" top: "one" convolution_param { num_output: 1 kernel_size: 1 bias_term: false } }
layer { name: "spp" type: "SpatialProduct" bottom: "a" bottom: "one" top: "spp" }
layer { name: "sm" type: "Softmax" bottom: "a" top: "sm" softmax_param { axis: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "ip" inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.5 } } }
layer { name: "lrelu" type: "ReLU" bottom: "b" top: "lrelu" relu_param { negative_slope: 0.1 } }
layer { name: "train_only" type: "ReLU" bottom: "a" top: "tr" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" bottom: "a" top: "nt" exclude { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "b" top: "loss" }
'''
    net = pi.load_net(text)
    a, b = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        r = net(a, b, return_blobs=True)
    eq = torch.testing.assert_close
    eq(r["sum"], 2 * a - b)
    eq(r["prod"], a * b)
    eq(r["max"], torch.maximum(a, b))
    cat = torch.cat([a, b], 2)
    eq(r["cat"], cat)
    eq(r["s1"], cat[:, :, :3]), eq(r["s2"], cat[:, :, 3:7]), eq(r["s3"], cat[:, :, 7:])
    eq(r["crop"], a[:, :, 1:4, 0:6])
    w = net.layer_blobs("one")[0]
    eq(r["spp"], a * torch.nn.functional.conv2d(b, w))
    eq(r["sm"], torch.softmax(a, 3))
    wi, bi = net.layer_blobs("ip")
    eq(r["ip"], a.flatten(1) @ wi.t() + bi)
    assert torch.all(bi == 0.5) and 0.05 < float(wi.detach().std()) < 0.2
    eq(r["lrelu"], torch.where(b > 0, b, 0.1 * b))
    assert "tr" not in r and "nt" not in r and "loss" not in r
    assert net.blob_shapes["s2"] == (2, 4, 4, 6)
    assert set(net.output_names) == {"sum", "prod", "max", "s2", "s3", "crop", "spp", "sm", "ip", "lrelu"}
    train = pi.load_net(text, phase="TRAIN")
    assert {"tr", "nt"} <= set(train.blob_shapes)


def test_pool_interp_conv_forms():
    """Caffe rounding (ceil) in Pooling, Interp sizes, _h/_w conv forms and dilation/groups."""
    text = '''
input: "x" input_shape { dim: 1 dim: 4 dim: 10 dim: 9 }
layer { name: "p" type: "Pooling" bottom: "x" top: "p" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "q" type: "Pooling" bottom: "x" top: "q" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "g" type: "Pooling" bottom: "x" top: "g" pooling_param { pool: AVE global_pooling: true } }
layer { name: "i" type: "Interp" bottom: "x" top: "i" interp_param { zoom_factor: 3 } }
layer { name: "j" type: "Interp" bottom: "x" top: "j" interp_param { height: 4 width: 7 } }
layer { name: "k" type: "Interp" bottom: "x" top: "k" interp_param { shrink_factor: 2 pad_beg: -1 pad_end: -1 } }
layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 6 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 group: 2 } }
layer { name: "d" type: "Convolution" bottom: "x" top: "d" convolution_param { num_output: 2 kernel_size: 3 kernel_size: 1 pad: 2 pad: 0 dilation: 2 } }
'''
    net = pi.load_net(text)
    s = net.blob_shapes
    # Caffe: ceil((10 - 3) / 2) + 1 = 5 (floor would give 4), ceil((9-3)/2)+1 = 4
    assert s["p"] == (1, 4, 5, 4) and s["q"] == (1, 4, 6, 5) and s["g"] == (1, 4, 1, 1)
    assert s["i"] == (1, 4, 28, 25) and s["j"] == (1, 4, 4, 7) and s["k"] == (1, 4, 4, 4)
    assert s["c"] == (1, 6, 5, 9) and s["d"] == (1, 2, 10, 9)
    assert tuple(net.layer_blobs("c")[0].shape) == (6, 2, 3, 1)
    x = torch.randn(1, 4, 10, 9)
    with torch.no_grad():
        r = net(x, return_blobs=True)
    for k, v in r.items():
        assert tuple(v.shape) == s[k]
    from attnscale import caffe
    torch.testing.assert_close(r["p"], caffe.pool2d(x, 3, 2, 0, "max"))
    torch.testing.assert_close(r["g"], x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(r["j"], caffe.interp(x, (4, 7)))
    wc, bc = net.layer_blobs("c")
    torch.testing.assert_close(r["c"], torch.nn.functional.conv2d(x, wc, bc, (2, 1), (1, 0), 1, 2))
    wd, bd = net.layer_blobs("d")
    torch.testing.assert_close(r["d"], torch.nn.functional.conv2d(x, wd, bd, 1, (2, 0), 2))


def test_our_ops_path_matches_reference(small_net):
    proto, net, layers = small_net
    ours = pi.load_net(proto, use_ops=True)
    ours.load_caffe_weights(readers.WeightFile("mem", [(n, t, [readers.CaffeBlob(a) for a in arrs])
                                                      for n, t, arrs in layers]))
    assert any(m.use_ops for m in ours.layers.values() if hasattr(m, "use_ops"))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- converter
def test_classifier_named_as_deeplabs_scripts_name_it(tmp_path):
    """DeepLab's scripts name the classifier fc8_${EXP} ("fc8_exper/voc12" in a released ResNet net): any name
    Caffe takes converts, its weights load by it, and its blobs keep it."""
    text = deeplab_prototxt((1.0, 0.5), "attention", width=W, size=SIZE).replace("fc8_voc12", "fc8_exper/voc12")
    proto = _write(tmp_path, "net.prototxt", text)
    net = pi.load_net(proto, use_ops=False)
    randomize(net, seed=5)
    wpath = _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(net)))
    model, report = pi.to_attnscale(proto, wpath, use_reference_ops=True)
    assert model.classifier_name == "fc8_exper/voc12" and not report.unmapped and not report.fresh
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), model.caffe_blobs() as blobs:
        out = model(x)
        want = net(x, return_blobs=True)
    torch.testing.assert_close(out.merged, want["fc8_attention"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blobs["fc8_exper/voc12_res05"], want["fc8_exper/voc12_res05"], rtol=1e-5, atol=1e-5)
    again = type(model)(num_classes=21, scales=(1.0, 0.5), width=W, classifier_name="fc8_exper/voc12")
    again.load_state_dict(model.state_dict())


@pytest.mark.parametrize("scales,merge", [((1.0,), None), ((1.0, 0.75, 0.5), "attention"),
                                          ((1.0, 0.75, 0.5), "max"), ((1.0, 0.75, 0.5), "avg")],
                         ids=["largefov", "attention3", "max3", "avg3"])
def test_to_attnscale_agrees_with_caffe_net(tmp_path, scales, merge):
    proto = _write(tmp_path, "net.prototxt", deeplab_prototxt(scales, merge, width=W, size=SIZE))
    net = pi.load_net(proto, use_ops=False)
    randomize(net, seed=3)
    wpath = _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(net)))
    model, report = pi.to_attnscale(proto, wpath, use_reference_ops=True)
    assert model.scales == scales and model.merge == merge and model.width == W
    assert model.num_classes == 21 and model.classifier_name == "fc8_voc12"
    assert not report.unmapped and not report.fresh
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        blobs = net(x, return_blobs=True)
        out = model(x)
    merged = {"attention": "fc8_attention", "max": "fc8_max", "avg": "fc8_avg", None: "fc8_voc12"}[merge]
    torch.testing.assert_close(out.merged, blobs[merged], rtol=1e-5, atol=1e-5)
    for s, scores in zip(scales, out.scales):
        torch.testing.assert_close(scores, blobs["fc8_voc12" + SUFFIX.get(s, "")], rtol=1e-5, atol=1e-5)
    if merge == "attention":
        torch.testing.assert_close(out.attention, blobs["attention"], rtol=1e-5, atol=1e-5)
        assert "conv1_1_res075[0]" in str(report) and "shared copy" in str(report)
    # blob by blob: the model's record of a forward (caffe_blobs) under the Caffe net's names; every blob of
    # the net the model holds is there (not Slice's views, SpatialProduct's products, nor the input)
    with torch.no_grad(), model.caffe_blobs() as rec:
        model(x)
    assert set(rec) == {b for b in blobs if b != "data" and not b.startswith("attention") or b == "attention"
                        if not b.endswith("_weighted")}, sorted(set(blobs) ^ set(rec))
    for name, value in rec.items():
        torch.testing.assert_close(value, blobs[name], rtol=1e-5, atol=1e-5, msg=name)
    assert model._blobs is None  # the record closes with the block
    # ... and gradient by gradient: the recorded blobs' gradients (of the values after their in-place
    # ReLU) are the Caffe net's for the same loss
    g = torch.randn_like(out.merged)
    with model.caffe_blobs() as rec:
        (model(x).merged * g).sum().backward(inputs=[v for v in rec.values() if v.requires_grad]
                                             + list(model.parameters()))
    ref = net(x, return_blobs=True)
    (ref[merged] * g).sum().backward(inputs=[ref[k] for k, v in rec.items() if v.requires_grad]
                                     + list(net.parameters()))
    assert sum(v.grad is not None for v in rec.values()) >= 20
    for name, value in rec.items():
        if value.grad is not None:
            torch.testing.assert_close(value.grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(model.conv1_1.weight.grad, net.layer_blobs("conv1_1")[0].grad, rtol=1e-4, atol=1e-5)


def test_to_attnscale_v1_and_h5(tmp_path):
    proto = _write(tmp_path, "v1.prototxt", deeplab_prototxt(width=W, size=SIZE, v1=True))
    net = pi.load_net(proto)
    randomize(net, seed=4)
    h5 = tmp_path / "w.caffemodel.h5"
    write_h5(h5, net_weights(net))
    model, report = pi.to_attnscale(proto, h5, use_reference_ops=True)
    assert model.scales == (1.0,) and model.merge is None and model.dropout == 0.5
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x).merged, net(x), rtol=1e-5, atol=1e-5)


def test_imagenet_init(tmp_path):
    """vgg16_20M-style init: conv1_1 ... fc7, an ImageNet fc8 (1000 classes) -> trunk loaded,
    classifier and attention head fresh, everything listed in the report."""
    proto = _write(tmp_path, "att.prototxt", deeplab_prototxt((1.0, 0.5), "attention", width=W, size=SIZE))
    ref = pi.load_net(deeplab_prototxt(width=W, size=SIZE, classes=1000).replace('"fc8_voc12"', '"fc8"'))
    randomize(ref, seed=5)
    layers = net_weights(ref)
    assert layers[-1][0] == "fc8"
    model, report = pi.to_attnscale(proto, _write(tmp_path, "init.caffemodel", caffemodel_bytes(layers)))
    for name, _, arrays in layers[:-1]:
        np.testing.assert_array_equal(getattr(model, name).weight.detach().numpy(), arrays[0])
    assert ("fc8", "no such layer in the prototxt") in report.unmapped
    fresh = dict(report.fresh)
    assert set(fresh) == {f"{n}.{p}" for n in ("fc8_voc12", "att_conv1", "att_conv2") for p in ("weight", "bias")}
    assert float(model.att_conv1.weight.detach().abs().sum()) > 0  # fresh gaussian, not zeros
    # ... and the report says how each starts, beside Caffe's fill from the prototxt (none declared here)
    assert fresh["att_conv1.weight"] == ("new head layer, not in the weights; attnscale starts it at gaussian "
                                         "std 0.01, Caffe at constant 0, no filler given")
    assert fresh["att_conv2.bias"].endswith("attnscale starts it at 0, Caffe at constant 0, no filler given")
    text = proto.read_text()
    at = text.index("convolution_param {", text.index('name: "att_conv1"')) + len("convolution_param {")
    proto2 = _write(tmp_path, "att2.prototxt", text[:at] + ' weight_filler { type: "gaussian" std: 0.02 }' + text[at:])
    assert proto2.read_text() != proto.read_text()
    fresh2 = dict(pi.to_attnscale(proto2, tmp_path / "init.caffemodel")[1].fresh)
    assert fresh2["att_conv1.weight"].endswith('Caffe at type: "gaussian" std: 0.02')
    # the same ImageNet classifier under the classifier's own name: shapes do not fit -> fresh
    layers[-1] = ("fc8_voc12",) + layers[-1][1:]
    model, report = pi.to_attnscale(proto, _write(tmp_path, "init2.caffemodel", caffemodel_bytes(layers)))
    assert "fc8_voc12.weight" in dict(report.fresh) and report.unmapped[0][0] == "fc8_voc12"
    text = str(report)
    assert "mapped (" in text and "freshly initialised" in text and "1000" in text


def test_to_attnscale_rejects_non_deeplab(tmp_path):
    with pytest.raises(CaffeImportError, match=r"conv1_1 \(the first layer on the image\): expected one Convolution layer reading blob 'data'"):
        pi.to_attnscale('input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
                        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    text = deeplab_prototxt(width=W, size=SIZE).replace("num_output: 8 kernel_size: 3 pad: 1 } }\n"
                                                        'layer { name: "relu2_2"', "num_output: 9 kernel_size: 3 pad: 1 } }\n"
                                                        'layer { name: "relu2_2"')
    with pytest.raises(CaffeImportError, match="conv2_2"):
        pi.to_attnscale(text)


# ------------------------------------------------------------------------------------- CLI
def test_cli_inspect_and_convert(tmp_path, small_net, capsys):
    from prototxt_import.__main__ import main
    proto, net, layers = small_net
    wpath = _write(tmp_path, "w.caffemodel", caffemodel_bytes(layers))
    assert main(["inspect", str(proto), str(wpath)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"conv1_1 +Convolution +data -> conv1_1 \(1, 4, 65, 65\) +params 112", out)
    assert re.search(r"conv1_1_res075 .*\(1, 4, 49, 49\) +params 0 \(shared\)", out)
    assert f"parameters: {net.parameter_count()} (unique)" in out
    assert f"copied {len(layers)} layer(s)" in out
    target = tmp_path / "model.pt"
    assert main(["convert", str(proto), str(wpath), "-o", str(target), "-q"]) == 0
    sd = torch.load(target, weights_only=True)
    model, _ = pi.to_attnscale(proto, None)
    model.load_state_dict(sd, strict=True)
    np.testing.assert_array_equal(sd["att_conv2.weight"].numpy(), layers[[n for n, _, _ in layers].index("att_conv2")][2][0])
    assert main(["inspect", str(tmp_path / "missing.prototxt")]) == 2
    assert "missing.prototxt" in capsys.readouterr().err
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert main(["convert", str(proto), str(wpath), "-o", str(blocked / "model.pt"), "-q"]) == 2
    assert f"{blocked / 'model.pt'}: cannot write the converted model" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bad input
def test_syntax_error_names_file_line_column(tmp_path):
    p = _write(tmp_path, "bad.prototxt", 'name: "x"\nlayer {\n  name: "c1" type: "ReLU"\n  bottom "a"\n}\n')
    with pytest.raises(CaffeImportError, match=r"bad\.prototxt:4:\d+: .*\(in layer 'c1'\)"):
        pi.read_net(p)


def test_unknown_field_names_field_line_and_layer(tmp_path):
    text = deeplab_prototxt(width=W, size=SIZE).replace("kernel_size: 3 pad: 2 dilation: 2", "kernel_size: 3 padd: 2 dilation: 2", 1)
    line = next(i + 1 for i, ln in enumerate(text.splitlines()) if "padd" in ln)
    p = _write(tmp_path, "u.prototxt", text)
    with pytest.raises(CaffeImportError, match=rf'u\.prototxt:{line}:\d+: .*"padd".*\(in layer \'conv5_1\'\)'):
        pi.read_net(p)


def test_unknown_layer_type_and_missing_bottom(tmp_path):
    with pytest.raises(CaffeImportError, match="layer 'w': unsupported layer type 'Warp'"):
        pi.load_net('input: "x" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }\n'
                    'layer { name: "w" type: "Warp" bottom: "x" top: "y" }')
    with pytest.raises(CaffeImportError, match="layer 'r' \\(ReLU\\): bottom blob 'nope'"):
        pi.load_net('input: "x" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }\n'
                    'layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }')
    with pytest.raises(CaffeImportError, match="layer 'p' \\(Pooling\\): .*STOCHASTIC"):
        pi.load_net('input: "x" input_shape { dim: 1 dim: 1 dim: 4 dim: 4 }\n'
                    'layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 } }')
    with pytest.raises(CaffeImportError, match="input_shapes"):
        pi.load_net('layer { name: "d" type: "Data" top: "data" }\n'
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 1 kernel_size: 1 } }')
    net = pi.load_net('layer { name: "d" type: "Data" top: "data" top: "label" }\n'
                      'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 1 kernel_size: 1 } }\n'
                      'layer { name: "l" type: "SoftmaxWithLoss" bottom: "c" bottom: "label" }', input_shapes={"data": (1, 2, 3, 3)})
    assert net.input_names == ["data"] and net.unused_inputs == ["label"] and net.output_names == ["c"]


def test_bad_weight_files(tmp_path, small_net):
    proto, _, layers = small_net
    good = caffemodel_bytes(layers)
    for cut in (len(good) // 3, len(good) - 1):
        p = _write(tmp_path, "t.caffemodel", good[:cut])
        with pytest.raises(CaffeImportError, match=r"t\.caffemodel"):
            pi.load_net(proto, weights=p)
    # data size that does not match the shape
    lie = [(layers[0][0], layers[0][1], [layers[0][2][0].reshape(-1)[:-1], layers[0][2][1]])]
    from prototxt_import.schema import message_class
    net = message_class("NetParameter")()
    net.ParseFromString(caffemodel_bytes(lie))
    net.layer[0].blobs[0].shape.dim[:] = [4, 3, 3, 3]  # 108 values claimed, 107 stored
    p = _write(tmp_path, "lie.caffemodel", net.SerializeToString())
    with pytest.raises(CaffeImportError, match=r"lie\.caffemodel: layer 'conv1_1' blob 0: blob shape \(4, 3, 3, 3\) holds 108 values but its data has 107"):
        pi.read_weights(p)
    # a weight that does not fit the prototxt layer
    wrong = [(layers[1][0], layers[1][1], [np.zeros((4, 4, 1, 3), np.float32), layers[1][2][1]])]
    p = _write(tmp_path, "wrong.caffemodel", caffemodel_bytes(wrong))
    with pytest.raises(CaffeImportError, match=r"wrong\.caffemodel: layer 'conv1_2': cannot copy blob 0: shape mismatch"):
        pi.load_net(proto, weights=p)
    p = _write(tmp_path, "count.caffemodel", caffemodel_bytes([(layers[1][0], "Convolution", layers[1][2][:1])]))
    with pytest.raises(CaffeImportError, match="incompatible number of blobs"):
        pi.load_net(proto, weights=p)
    # a lying length field: a huge declared length inside a small file
    p = _write(tmp_path, "len.caffemodel", bytes([0xA2, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x07]) + b"\x00" * 16)
    with pytest.raises(CaffeImportError, match="truncated or corrupt"):
        pi.read_weights(p)
    # corrupt / non-HDF5 .h5
    p = _write(tmp_path, "bad.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(CaffeImportError, match=r"bad\.h5"):
        pi.read_weights(p)
    with pytest.raises(CaffeImportError, match="cannot read"):
        pi.read_weights(tmp_path / "absent.caffemodel")


def test_size_limits(tmp_path, monkeypatch):
    p = _write(tmp_path, "big.caffemodel", b"\x00" * 4096)
    monkeypatch.setattr(readers, "MAX_BINARY_BYTES", 1024)
    with pytest.raises(CaffeImportError, match="more than the 1024 bytes allowed"):
        pi.read_weights(p)
    with pytest.raises(CaffeImportError, match="parameter budget"):
        pi.load_net('input: "x" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
                    'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 4000000000 kernel_size: 1 } }')
    p = _write(tmp_path, "latin.prototxt", 'name: "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(CaffeImportError, match=r"latin\.prototxt:1: not UTF-8"):
        pi.read_net(p)


# ------------------------------------------------------------------------------------ fuzz
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_SMALL_TEXT = deeplab_prototxt((1.0, 0.5), "attention", width=1 / 64, size=17)


@pytest.fixture(scope="module")
def fuzz_base():
    net = pi.load_net(_SMALL_TEXT)
    randomize(net)
    return net_weights(net)


@FUZZ
@given(data=st.data())
def test_fuzz_binary_reader(tmp_path_factory, fuzz_base, data):
    good = caffemodel_bytes(fuzz_base, v1=data.draw(st.booleans()), packed=data.draw(st.booleans()))
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=512))
    elif kind == "flip":
        raw = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    elif kind == "truncate":
        raw = good[:data.draw(st.integers(0, len(good)))]
    else:
        i = data.draw(st.integers(0, len(good)))
        raw = good[:i] + data.draw(st.binary(max_size=32)) + good[i:]
    p = tmp_path_factory.mktemp("fz") / "f.caffemodel"
    p.write_bytes(raw)
    try:
        wf = pi.read_weights(p)
    except CaffeImportError:
        return
    net = pi.load_net(_SMALL_TEXT, use_ops=False)
    try:
        net.load_caffe_weights(wf)
    except CaffeImportError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_text_reader(data):
    text = _SMALL_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = min(len(text), i + data.draw(st.integers(0, 12)))
        ins = data.draw(st.sampled_from(["", "{", "}", '"', ":", " 7", " -1", " 99999", "layer", "x", "\n",
                                         "bottom: \"q\"", "\xff", "0.5", "MAX"]))
        text = text[:i] + ins + text[j:]
    try:
        net = pi.read_net(text)
        pi.CaffeNet(net, "<fuzz>", use_ops=False, max_param_count=2_000_000, max_blob_count=50_000_000)
    except CaffeImportError:
        pass


def test_weights_files_that_map_nothing_are_refused(tmp_path):
    """A V0 caffemodel (``layers { layer { ... } }``, which Caffe upgrades first) and a file with no
    weights at all (a mean .binaryproto, a deploy net) raise instead of leaving every layer fresh."""
    from tests.caffe_files import _varint, blob_bytes

    def ld(field, payload):
        return _varint(field << 3 | 2) + _varint(len(payload)) + payload

    v0 = ld(1, b"conv1_1") + ld(2, b"conv") + ld(50, blob_bytes(np.zeros((2, 3, 3, 3), np.float32)))
    path = _write(tmp_path, "v0.caffemodel", ld(2, ld(1, v0)))      # NetParameter.layers -> .layer (V0)
    with pytest.raises(CaffeImportError, match="V0"):
        pi.read_weights(path)
    mean = _write(tmp_path, "mean.caffemodel", blob_bytes(np.zeros((1, 3, 4, 4), np.float32)))
    with pytest.raises(CaffeImportError, match="no layer holds any weights"):
        pi.read_weights(mean)


def test_extra_supervision_needs_a_loss_on_a_scale_not_on_the_merge():
    """A single loss on the merged ``fc8_max`` (an Eltwise) is no extra supervision, even when the
    classifier is named ``fc8`` and the merge's name starts with it."""
    from prototxt_import.convert import analyse
    text = Path(SHARED / "max3_deploy.prototxt").read_text() if (SHARED / "max3_deploy.prototxt").exists() else None
    if text is None:
        pytest.skip("the shared reference prototxts are not beside the checkout")
    text = text.replace("fc8_voc12", "fc8")
    merged = re.findall(r'top: "(fc8_\w*max\w*)"', text)
    assert merged, "max3_deploy has no fc8_*max* blob"
    text += ('\nlayer { name: "label" type: "Input" top: "label" input_param { shape { dim: 1 dim: 1 dim: 65 dim: 65 } } }'
             f'\nlayer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{merged[-1]}" bottom: "label" top: "loss" }}\n')
    info = analyse(pi.readers.parse_text(text, source="max3+loss"), "max3+loss")
    assert info["merge"] == "max" and info["extra_supervision"] is False
    # one scale: the loss on its scores is the main loss, not an extra one
    single = deeplab_prototxt(width=W, size=SIZE) + (
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 1 dim: 1 dim: 9 dim: 9 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8_voc12" bottom: "label" top: "loss" }\n')
    assert analyse(pi.readers.parse_text(single, source="single+loss"))["extra_supervision"] is False


# ------------------------------------------------- converter: structure, scale order, Caffe's copy rules
def _sub(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) >= count, f"{old!r} not in the generated prototxt"
    return text.replace(old, new, count)


def _pool(name, stride):
    return f'top: "{name}"\n  pooling_param {{ pool: MAX kernel_size: 3 stride: {stride} pad: 1 }}'


# each edit makes a net attnscale's model would compute differently; each converted silently before
STRUCTURE_EDITS = {
    "strided conv1_1": (lambda t: _sub(t, "num_output: 4 kernel_size: 3 pad: 1 }", "num_output: 4 kernel_size: 3 pad: 1 stride: 2 }"),
                        r"'conv1_1' \(taken as conv1_1, scale 1\): stride \(2, 2\) where attnscale's model has \(1, 1\)"),
    "DeepLab-v1 pool4 stride 2": (lambda t: _sub(t, _pool("pool4", 1), _pool("pool4", 2)),
                                  r"'pool4' .*stride 2 where attnscale's model has 1"),
    "pool5a MAX": (lambda t: _sub(t, "pool: AVE", "pool: MAX"), r"'pool5a' .*method max where attnscale's model has ave"),
    "grouped conv1_2": (lambda t: _sub(t, "num_output: 4 kernel_size: 3 pad: 1 } }\nlayer { name: \"relu1_2\"",
                                       "num_output: 4 kernel_size: 3 pad: 1 group: 2 } }\nlayer { name: \"relu1_2\""),
                        r"'conv1_2' .*group 2 where attnscale's model has 1"),
    "no bias on fc7": (lambda t: _sub(t, "num_output: 64 kernel_size: 1 }", "num_output: 64 kernel_size: 1 bias_term: false }"),
                       r"'fc7' .*bias_term False where attnscale's model has True"),
    "fc6 skipped": (lambda t: _sub(t, 'name: "fc7" type: "Convolution" bottom: "fc6"', 'name: "fc7" type: "Convolution" bottom: "pool5a"'),
                    r"fc6, scale 1: expected one Convolution layer reading blob 'pool5a', found 2"),
    "leaky relu6": (lambda t: _sub(t, 'name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6"',
                                   'name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" relu_param { negative_slope: 0.1 }'),
                    r"'relu6': negative_slope 0.1"),
    "0.75 branch made by shrink 5 zoom 3": (
        lambda t: _sub(_sub(t, "interp_param { shrink_factor: 4 zoom_factor: 3 }", "interp_param { shrink_factor: 5 zoom_factor: 3 }"),
                       "interp_param { zoom_factor: 4 shrink_factor: 3 }", "interp_param { height: 9 width: 9 }", count=2),
        r"'shrink_res075': gives a \(37, 37\) image from a \(65, 65\) input, attnscale's scale 0.6 gives \(39, 39\)"),
    "attention Slice pairs scales wrongly": (
        lambda t: _sub(_sub(t, 'bottom: "fc8_voc12_res075_interp" bottom: "attention2"', 'bottom: "fc8_voc12_res075_interp" bottom: "attention3"'),
                       'bottom: "fc8_voc12_res05_interp" bottom: "attention3"', 'bottom: "fc8_voc12_res05_interp" bottom: "attention2"'),
        r"weights the scale-0.75 scores with attention channel 2, but 'fc7_concat' puts scale 0.5 in block 2"),
    "softmax over the wrong axis": (lambda t: _sub(t, 'type: "Softmax" bottom: "att_conv2" top: "attention"',
                                                   'type: "Softmax" bottom: "att_conv2" top: "attention" softmax_param { axis: 2 }'),
                                    r"'attention' \(the attention Softmax\): axis 2"),
}


@pytest.mark.parametrize("edit", list(STRUCTURE_EDITS))
def test_to_attnscale_checks_every_layer_on_the_way(edit):
    """Strides, groups, pooling, wiring, Interp sizes and the attention pattern are checked, each error
    naming the layer and field (the edited nets still run in Caffe, computing something else)."""
    change, message = STRUCTURE_EDITS[edit]
    trunk_edit = list(STRUCTURE_EDITS).index(edit) < 7  # one scale: the edit leaves no unedited copy
    text = change(deeplab_prototxt(*(((1.0,), None) if trunk_edit else ((1.0, 0.75, 0.5), "attention")),
                                   width=W, size=SIZE))
    pi.load_net(text, use_ops=False)  # a valid Caffe net ...
    with pytest.raises(CaffeImportError, match=message):  # ... but not attnscale's model
        pi.to_attnscale(text, use_reference_ops=True)


def _compare(net, model, x, merged_blob):
    with torch.no_grad():
        blobs = net(x, return_blobs=True)
        out = model(x)
    torch.testing.assert_close(out.merged, blobs[merged_blob], rtol=1e-5, atol=1e-5)
    return blobs, out


@pytest.mark.parametrize("merge", ["attention", "max"])
def test_scale_order_is_the_merge_order_not_the_file_order(tmp_path, merge):
    """Branches written 0.5 first, and a merge listing the scales as (1, 0.5, 0.75): the model's scales
    follow the merge (att_conv1's input blocks, att_conv2's outputs, Caffe's max tie order), not the file."""
    merged = {"attention": "fc8_attention", "max": "fc8_max"}[merge]
    for order, listing in (((1.0, 0.75, 0.5), (0.5, 0.75)), ((1.0, 0.5, 0.75), (0.75, 0.5))):
        text = deeplab_prototxt((1.0, 0.75, 0.5), merge, width=W, size=SIZE, order=order, listing=listing)
        net = pi.load_net(text, use_ops=False)
        randomize(net, seed=7)
        wpath = _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(net)))
        model, report = pi.to_attnscale(text, wpath, use_reference_ops=True)
        assert model.scales == order and not report.fresh
        blobs, out = _compare(net, model, torch.randn(1, 3, SIZE, SIZE), merged)
        if merge == "attention":
            torch.testing.assert_close(out.attention, blobs["attention"], rtol=1e-5, atol=1e-5)
    text = deeplab_prototxt((1.0, 0.75, 0.5), merge, width=W, size=SIZE, order=(0.75, 1.0, 0.5))
    with pytest.raises(CaffeImportError, match=r"lists the scales as \[0.75, 1.0, 0.5\].*scale-1 branch first"):
        pi.to_attnscale(text, use_reference_ops=True)


def test_caffe_written_hdf5_of_a_share_net(tmp_path):
    """``Net::ToHDF5`` writes a dataset only for the owner of a shared parameter: the scale copies'
    groups are empty.  Caffe loads such a file, and so do load_net and to_attnscale; a missing blob
    that is not shared is still an error."""
    text = deeplab_prototxt((1.0, 0.5), "max", width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    randomize(net, seed=8)
    h5 = tmp_path / "shared.caffemodel.h5"
    write_h5(h5, net_weights(net), owned_only=net)
    with readers_h5(h5) as f:
        assert len(f["data/conv1_1_res05"]) == 0 and len(f["data/conv1_1"]) == 2
    fresh = pi.load_net(text, weights=h5, use_ops=False)
    model, report = pi.to_attnscale(text, h5, use_reference_ops=True)
    assert not report.fresh and not report.unmapped
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    _compare(net, model, x, "fc8_max")
    # the unshared single-scale net: an empty group is an incompatible blob count, as in Caffe
    single = deeplab_prototxt(width=W, size=SIZE)
    layers = net_weights(pi.load_net(single, use_ops=False))
    layers = [(n, t, [] if n == "conv2_1" else a) for n, t, a in layers]
    write_h5(tmp_path / "gap.h5", layers)
    for load in (lambda: pi.load_net(single, weights=tmp_path / "gap.h5"),
                 lambda: pi.to_attnscale(single, tmp_path / "gap.h5")):
        with pytest.raises(CaffeImportError, match=r"'conv2_1': incompatible number of blobs.*only the blobs shared"):
            load()


def test_hdf5_blob_count_counts_links(tmp_path):
    """``CopyTrainedLayersFromHDF5`` checks a group's link count (any names) against the layer's blob
    count, then opens only datasets "0" .. "n-1": a shared copy's group may hold other links (even an
    index far beyond any layer's blobs, never allocated for), an owner's group may not exceed its count."""
    import h5py
    text = deeplab_prototxt((1.0, 0.5), "max", width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    randomize(net, seed=12)
    h5 = tmp_path / "links.h5"
    write_h5(h5, net_weights(net), owned_only=net)
    with h5py.File(h5, "a") as f:
        f["data/conv1_1_res05"].create_dataset("4000000000", data=np.zeros(3, np.float32))
        f["data/conv1_2_res05"].create_dataset("note", data=np.zeros(1, np.float32))
    model, report = pi.to_attnscale(text, h5, use_reference_ops=True)
    fresh = pi.load_net(text, weights=h5, use_ops=False)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    _compare(net, model, x, "fc8_max")
    with h5py.File(h5, "a") as f:
        f["data/conv2_1"].create_dataset("01", data=np.zeros(1, np.float32))
    for load in (lambda: pi.load_net(text, weights=h5), lambda: pi.to_attnscale(text, h5)):
        with pytest.raises(CaffeImportError, match=r"'conv2_1': incompatible number of blobs: the file has 3, "):
            load()


def readers_h5(path):
    import h5py
    return h5py.File(path, "r")


def test_scale_copies_follow_caffe_copy_order(tmp_path):
    """Shared copies: Caffe writes each source layer into the one shared blob, the last wins (as
    load_net).  Unshared copies (no ``param { name }``): equal values are fine, different ones are an
    error, since Caffe would then run different weights per scale."""
    text = deeplab_prototxt((1.0, 0.5), "avg", width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    randomize(net, seed=9)
    layers = net_weights(net)
    layers = [(n, t, [a[0] + 1.0, a[1]] if n == "conv1_1_res05" else a) for n, t, a in layers]
    wpath = _write(tmp_path, "w.caffemodel", caffemodel_bytes(layers))
    net.load_caffe_weights(wpath)
    model, report = pi.to_attnscale(text, wpath, use_reference_ops=True)
    assert ("conv1_1[0]", "overwritten by conv1_1_res05[0] (Caffe copies layers in file order: the last "
            "write to a shared blob wins)") in report.unmapped
    np.testing.assert_array_equal(model.conv1_1.weight.detach().numpy(), net.layer_blobs("conv1_1")[0].detach().numpy())
    _compare(net, model, torch.randn(1, 3, SIZE, SIZE), "fc8_avg")
    unshared = re.sub(r' param \{[^}]*\}', "", text)
    with pytest.raises(CaffeImportError, match=r"'conv1_1' and 'conv1_1_res05' do not share blob 0 .*different values"):
        pi.to_attnscale(unshared, wpath)
    equal = _write(tmp_path, "eq.caffemodel", caffemodel_bytes(net_weights(net)))
    model, report = pi.to_attnscale(unshared, equal, use_reference_ops=True)
    assert ("conv1_1_res05[0]", "conv1_1.weight (equal copy)", tuple(model.conv1_1.weight.shape)) in report.mapped


def test_weights_that_caffe_refuses(tmp_path):
    """A classifier with one blob (Caffe: "Incompatible number of blobs"), and a file none of whose
    layers is in the net, are errors, not fresh layers."""
    text = deeplab_prototxt(width=W, size=SIZE)
    layers = net_weights(pi.load_net(text, use_ops=False))
    one = [(n, t, a[:1] if n == "fc8_voc12" else a) for n, t, a in layers]
    with pytest.raises(CaffeImportError, match=r"'fc8_voc12': incompatible number of blobs: the file has 1"):
        pi.to_attnscale(text, _write(tmp_path, "one.caffemodel", caffemodel_bytes(one)))
    other = [("x" + n, t, a) for n, t, a in layers]
    with pytest.raises(CaffeImportError, match="no layer of the weights file is a layer of the net"):
        pi.to_attnscale(text, _write(tmp_path, "other.caffemodel", caffemodel_bytes(other)))


def test_blob_shape_follows_blob_from_proto():
    """Caffe's ``Blob::FromProto``: any legacy num/channels/height/width wins over ``shape``; a blob
    with neither is a scalar (0 axes, one value)."""
    blob = message_class_blob()
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 1, 4
    blob.shape.dim.extend([2, 2])
    blob.data.extend([1, 2, 3, 4])
    b = readers.blob_to_array(blob, "b")
    assert b.data.shape == (1, 1, 1, 4) and b.legacy and b.fits((4,)) and not b.fits((2, 2))
    scalar = message_class_blob()
    scalar.data.append(5.0)
    b = readers.blob_to_array(scalar, "s")
    assert b.data.shape == () and float(b.data) == 5.0


def message_class_blob():
    from prototxt_import.schema import message_class
    return message_class("BlobProto")()


def test_compressed_hdf5_weights(tmp_path):
    """A gzip-compressed HDF5 file (h5py can write one) holds more values than bytes: accepted."""
    text = deeplab_prototxt(width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    layers = [(n, t, [np.zeros_like(x) for x in a]) for n, t, a in net_weights(net)]
    layers[0] = (layers[0][0], layers[0][1], [np.zeros((4096, 64), np.float32)])
    h5 = tmp_path / "gz.h5"
    write_h5(h5, layers, compression="gzip")
    wf = pi.read_weights(h5)
    assert wf.hdf5 and wf.layers[0][2][0].data.nbytes > h5.stat().st_size


@pytest.mark.parametrize("how", ["chunks never written", "contiguous never written", "external file"])
def test_hdf5_dataset_without_stored_values_is_refused(tmp_path, how):
    """A dataset's claimed size must be stored in the file: a chunked or contiguous dataset never written
    reads as fill values (a 3 KB file claimed 14 GiB and was read), and an external one reads other files."""
    import h5py
    text = deeplab_prototxt(width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    h5 = tmp_path / "w.h5"
    write_h5(h5, net_weights(net))
    with h5py.File(h5, "a") as f:
        g = f["data/conv1_1"]
        shape = g["0"].shape
        del g["0"]
        if how == "chunks never written":
            g.create_dataset("0", shape=(1 << 28,), dtype=np.float32, chunks=(1 << 16,))
        elif how == "contiguous never written":
            g.create_dataset("0", shape=shape, dtype=np.float32)
        else:
            raw = tmp_path / "values.bin"
            raw.write_bytes(np.zeros(shape, np.float32).tobytes())
            g.create_dataset("0", shape=shape, dtype=np.float32, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    assert h5.stat().st_size < 1 << 20
    match = "external file" if how == "external file" else r"'conv1_1' blob 0: dataset claims \d+ bytes but the file stores 0"
    with pytest.raises(CaffeImportError, match=match):
        pi.read_weights(h5)


EQUIVALENT_EDITS = {
    "0.75 image by explicit height/width": lambda t: _sub(t, "interp_param { shrink_factor: 4 zoom_factor: 3 }",
                                                          "interp_param { height: 49 width: 49 }"),
    "explicit Split of fc7": lambda t: _sub(
        _sub(_sub(t, 'name: "fc8_voc12" type: "Convolution" bottom: "fc7"', 'name: "fc8_voc12" type: "Convolution" bottom: "fc7_a"'),
             'type: "Concat" bottom: "fc7"', 'type: "Concat" bottom: "fc7_b"'),
        'layer { name: "fc8_voc12" ', 'layer { name: "fc7_split" type: "Split" bottom: "fc7" top: "fc7_a" top: "fc7_b" }\n'
                                      'layer { name: "fc8_voc12" '),
    "ReLU not in place": lambda t: _sub(_sub(t, 'name: "relu1_1" type: "ReLU" bottom: "conv1_1" top: "conv1_1"',
                                             'name: "relu1_1" type: "ReLU" bottom: "conv1_1" top: "relu1_1"'),
                                        'type: "Convolution" bottom: "conv1_1" top: "conv1_2"', 'type: "Convolution" bottom: "relu1_1" top: "conv1_2"'),
    "unused drop7 at 0.75": lambda t: _sub(t, 'name: "drop7_res075" type: "Dropout" bottom: "fc7_res075" top: "fc7_res075"',
                                           'name: "drop7_res075" type: "Dropout" bottom: "fc7_res075" top: "unused"'),
    "no att_drop1": lambda t: _sub(t, 'layer { name: "att_drop1" type: "Dropout" bottom: "att_conv1" top: "att_conv1" '
                                      'dropout_param { dropout_ratio: 0.5 } }\n', ""),
    "Dropout before ReLU": lambda t: _swap(_swap(t, "relu6_res05", "drop6_res05"), "att_relu1", "att_drop1"),
}


def _swap(text: str, first: str, second: str) -> str:
    """Exchange the lines of two (in-place) layers, so that ``second`` runs before ``first``."""
    lines = text.splitlines(keepends=True)
    i = next(k for k, ln in enumerate(lines) if f'name: "{first}"' in ln)
    j = next(k for k, ln in enumerate(lines) if f'name: "{second}"' in ln)
    lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


@pytest.mark.parametrize("edit", list(EQUIVALENT_EDITS))
def test_to_attnscale_follows_the_data_not_the_names(tmp_path, edit):
    """Spellings Caffe runs the same way (explicit Interp size, a Split, a ReLU out of place, a Dropout
    whose output nothing reads, a Dropout before its ReLU) convert to the same model; a Dropout missing at one site is noted (it
    only matters in training)."""
    text = EQUIVALENT_EDITS[edit](deeplab_prototxt((1.0, 0.75, 0.5), "attention", width=W, size=SIZE))
    net = pi.load_net(text, use_ops=False)
    randomize(net, seed=10)
    model, report = pi.to_attnscale(text, _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(net))),
                                    use_reference_ops=True)
    assert model.scales == (1.0, 0.75, 0.5) and not report.fresh and not report.unmapped
    _compare(net, model, torch.randn(1, 3, SIZE, SIZE), "fc8_attention")
    differ = [n for n in report.notes if n.startswith("dropout ratios differ")]
    assert bool(differ) == (edit in ("no att_drop1", "unused drop7 at 0.75")) and model.dropout == 0.5
    if differ:
        assert ("att_conv1 0" if edit == "no att_drop1" else "fc7, scale 0.75 0") in differ[0]


def test_a_layer_outside_the_model_sharing_its_blobs_is_refused():
    """Caffe copies weights into a shared blob through every layer that names it, on the model's path
    or not (and ``Net::ToHDF5`` stores it under the first): such a net is refused, not half loaded."""
    text = _sub(deeplab_prototxt((1.0, 0.5), "max", width=W, size=SIZE), 'layer { name: "drop7" ',
                'layer { name: "extra" type: "Convolution" bottom: "fc7" top: "extra" param { name: "fc8_voc12_w" } '
                'param { name: "fc8_voc12_b" } convolution_param { num_output: 21 kernel_size: 1 } }\n'
                'layer { name: "drop7" ')
    pi.load_net(text, use_ops=False)
    with pytest.raises(CaffeImportError, match=r"'extra' lies outside attnscale's model but shares .*fc8_voc12_w"):
        pi.to_attnscale(text)


def test_the_nets_own_state_selects_its_layers():
    """``Net(file, TEST)`` filters with the file's ``state { stage level }``: the deploy-stage classifier
    is the one converted, as load_net runs it."""
    text = deeplab_prototxt(width=W, size=SIZE)
    text = _sub(text, 'layer { name: "fc8_voc12" type: "Convolution" bottom: "fc7" top: "fc8_voc12"',
                'layer { name: "fc8_other" type: "Convolution" bottom: "fc7" top: "fc8_other" '
                'exclude { stage: "deploy" } convolution_param { num_output: 5 kernel_size: 1 } }\n'
                'layer { name: "fc8_voc12" type: "Convolution" bottom: "fc7" top: "fc8_voc12" include { stage: "deploy" }')
    text = 'state { stage: "deploy" }\n' + text
    assert pi.load_net(text, use_ops=False).output_names == ["fc8_voc12"]
    model, _ = pi.to_attnscale(text, use_reference_ops=True)
    assert model.classifier_name == "fc8_voc12" and model.num_classes == 21


def test_hdf5_read_as_caffe_reads_it(tmp_path):
    """Caffe (DeepLab-v2) visits /data in name order whatever the creation order, takes integer as well as
    float datasets, and reshapes each blob to its dataset, so a bias stored (1,1,1,C) loads."""
    import h5py
    text = deeplab_prototxt((1.0, 0.5), "max", width=W, size=SIZE)
    net = pi.load_net(text, use_ops=False)
    randomize(net, seed=11)
    layers = net_weights(net)
    h5 = tmp_path / "w.h5"
    with h5py.File(h5, "w", track_order=True) as f:
        g = f.create_group("data", track_order=True)
        for name, _t, arrays in sorted(layers, key=lambda l: l[0], reverse=True):  # conv1_1_res05 before conv1_1
            lg = g.create_group(name)
            for i, a in enumerate(arrays):
                if name == "conv1_1_res05" and i == 0:
                    a = np.round(a * 100).astype(np.int32)  # an integer dataset, and the last writer by name
                lg.create_dataset(str(i), data=a.reshape(1, 1, 1, -1) if (name == "fc7" and i == 1) else a)
    wf = pi.read_weights(h5)
    names = [n for n, _, _ in wf.layers]
    assert names == sorted(names) and names.index("conv1_1_res05") > names.index("conv1_1")
    ref = pi.load_net(text, weights=h5, use_ops=False)
    model, report = pi.to_attnscale(text, h5, use_reference_ops=True)
    want = np.round(net.layer_blobs("conv1_1")[0].detach().numpy() * 100)
    np.testing.assert_array_equal(ref.layer_blobs("conv1_1")[0].detach().numpy(), want)
    np.testing.assert_array_equal(model.conv1_1.weight.detach().numpy(), want)
    _compare(ref, model, torch.randn(1, 3, SIZE, SIZE), "fc8_max")
    assert any(n.startswith("fc7[1]: HDF5 shape (1, 1, 1, 64) read as (64,)") for n in report.notes)


@pytest.mark.parametrize("edit,message", [
    (lambda t: _sub(t, "dim: 1 dim: 3 dim: 65 dim: 65", "dim: 65"), r"image input 'data' has shape \(65,\)"),
    (lambda t: _sub(t, "dim: 1 dim: 3 dim: 65 dim: 65", "dim: 1 dim: 3 dim: 0 dim: 0"), r"has shape \(1, 3, 0, 0\)"),
    (lambda t: _sub(t, "dim: 1 dim: 3 dim: 65 dim: 65", "dim: 1 dim: 1 dim: 65 dim: 65"), r"has shape \(1, 1, 65, 65\)"),
    (lambda t: _sub(t, "interp_param { shrink_factor: 2 }", "interp_param { zoom_factor: 0 }"), "must be >= 1"),
    (lambda t: _sub(t, 'bottom: "fc8_voc12" bottom: "attention1"', 'bottom: "fc8_voc12"'),
     r"expected one SpatialProduct weighting the scale-1 scores"),
], ids=["1-D input", "0x0 input", "1 channel", "zoom 0", "1-bottom SpatialProduct"])
def test_malformed_nets_raise_caffe_import_error(edit, message):
    with pytest.raises(CaffeImportError, match=message):
        pi.to_attnscale(edit(deeplab_prototxt((1.0, 0.5), "attention", width=W, size=SIZE)))


# ------------------------------------------------------------------------------ DeepLab-v1 (deeplab-public)
def deeplab_v1_prototxt(phase="TEST", width=W, size=SIZE) -> str:
    """DeepLab-LargeFOV as DeepLab-v1 released it (deeplab-public's legacy form): an IMAGE_SEG_DATA data
    layer, atrous ``hole``, ``strict_dim``, INTERP / SEG_ACCURACY / MAT_WRITE and, to train, ``blobs_lr`` and
    a SOFTMAX_LOSS with ``softmaxloss_param``."""
    text = deeplab_prototxt(width=width, size=size, v1=True).replace("dilation: ", "hole: ")
    head = text[:text.index("layers {")]
    data = ('layers { name: "data" type: IMAGE_SEG_DATA top: "data" top: "label" image_data_param { '
            f'root_folder: "/voc" source: "list/{phase.lower()}.txt" batch_size: 1 has_label: {"true" if phase == "TRAIN" else "false"} '
            + ("shuffle: true " if phase == "TRAIN" else "")
            + '} transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 '
            f'crop_size: {size} mirror: {"true" if phase == "TRAIN" else "false"} }} include: {{ phase: {phase} }} }}\n')
    text = 'name: "DeepLab-LargeFOV"\n' + data + text[len(head):]
    text = text.replace('name: "fc6" type: CONVOLUTION', 'name: "fc6" type: CONVOLUTION strict_dim: false')
    if phase == "TRAIN":
        text = re.sub(r'(name: "(conv\d_\d|fc\d\w*)" type: CONVOLUTION)', r"\1 blobs_lr: 1 blobs_lr: 2 "
                      r"weight_decay: 1 weight_decay: 0", text)
        text = text.replace('convolution_param { num_output: 21 kernel_size: 1',
                            'convolution_param { num_output: 21 kernel_size: 1 weight_filler { type: "gaussian" '
                            'std: 0.01 } bias_filler { type: "constant" value: 0 }')
        return text + ('layers { name: "label_shrink" type: INTERP bottom: "label" top: "label_shrink" interp_param { '
                       'shrink_factor: 8 pad_beg: 0 pad_end: 0 } }\n'
                       'layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc8_voc12" bottom: "label_shrink" '
                       'softmaxloss_param { ignore_label: 255 } include: { phase: TRAIN } }\n'
                       'layers { name: "accuracy" type: SEG_ACCURACY bottom: "fc8_voc12" bottom: "label_shrink" '
                       'top: "accuracy" seg_accuracy_param { ignore_label: 255 } }\n')
    return text + ('layers { bottom: "fc8_voc12" top: "fc8_interp" name: "fc8_interp" type: INTERP '
                   'interp_param { zoom_factor: 8 } }\n'
                   'layers { name: "fc8_mat" type: MAT_WRITE bottom: "fc8_interp" mat_write_param { prefix: "out/" '
                   'source: "list/test_id.txt" strip: 0 period: 1 } include: { phase: TEST } }\n'
                   'layers { name: "accuracy" type: SEG_ACCURACY bottom: "fc8_interp" bottom: "label" '
                   'top: "accuracy" seg_accuracy_param { ignore_label: 255 } }\n')


def test_deeplab_v1_prototxts_run_as_the_current_form(tmp_path):
    """DeepLab-v1's own test prototxt (hole, IMAGE_SEG_DATA, INTERP, MAT_WRITE, SEG_ACCURACY) builds the net the
    current form describes: the same layers, the same scores from the same weights, the same attnscale model."""
    ref = pi.load_net(deeplab_prototxt(width=W, size=SIZE))
    randomize(ref, seed=7)
    weights = _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(ref)))
    v1 = _write(tmp_path, "test.prototxt", deeplab_v1_prototxt())
    net = pi.load_net(v1, weights)
    fc6 = [lp for lp in readers.upgraded_layers(pi.read_net(v1)) if lp.name == "fc6"][0]
    assert list(fc6.convolution_param.dilation) == [12] and not fc6.convolution_param.HasField("hole")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        blobs = net(x, return_blobs=True)
        torch.testing.assert_close(blobs["fc8_voc12"], ref(x), rtol=0, atol=0)
    assert blobs["fc8_interp"].shape[-1] == (SIZE // 8) * 8 + 1
    model, report = pi.to_attnscale(v1, weights, use_reference_ops=True)
    assert report.config["num_classes"] == 21 and model.merge is None and not report.fresh
    with torch.no_grad():
        torch.testing.assert_close(model(x).merged, ref(x), rtol=1e-5, atol=1e-5)


def test_deeplab_v1_training_prototxt_gives_a_train_config():
    cfg, notes = pi.train_config('base_lr: 0.001 lr_policy: "step" gamma: 0.1 stepsize: 2000 max_iter: 6000 '
                                 'momentum: 0.9 weight_decay: 0.0005 random_seed: 1',
                                 net=deeplab_v1_prototxt("TRAIN", size=33))
    assert any(n.startswith("strict_dim: false in fc6:") for n in notes)
    assert cfg.lr_mults["fc6"] == [[1.0, 1.0], [2.0, 0.0]] and cfg.lr_mults["fc8_voc12"] == [[1.0, 1.0], [2.0, 0.0]]
    assert cfg.fillers["fc8_voc12"][0] == {"type": "gaussian", "mean": 0.0, "std": 0.01, "sparse": -1}
    assert (cfg.train_list, cfg.data_root, cfg.crop_size, cfg.batch_size, cfg.mirror) == (
        "list/train.txt", "/voc", 33, 1, True)


@pytest.mark.parametrize("edit,why", [
    (("hole: 12", "hole: 12 dilation: 12"), "both hole .DeepLab-v1. and dilation"),
    (("hole: 12", "hole_h: 12"), r"give hole, or hole_h and hole_w together \(got hole_h\)"),
    (("hole: 12", "hole: 12 hole_h: 12 hole_w: 6"), r"give hole, or hole_h and hole_w together \(got hole, "),
    (("hole: 12", "hole: 0"), "hole must be >= 1"),
    (("softmaxloss_param { ignore_label: 255 }", 'softmaxloss_param { weight_source: "w.txt" }'), "weight_source"),
    (("softmaxloss_param { ignore_label: 255 }", "softmaxloss_param { ignore_label: 255 ignore_label: 0 }"),
     "2 ignore labels"),
])
def test_deeplab_v1_fields_that_cannot_be_followed_are_named(edit, why):
    text = deeplab_v1_prototxt("TRAIN", size=33)
    assert edit[0] in text
    with pytest.raises(CaffeImportError, match=rf"layer '(fc6|loss)'.*{why}"):
        readers.upgraded_layers(pi.read_net(text.replace(edit[0], edit[1], 1)))


def test_hole_in_the_current_form_is_read_without_changing_the_callers_net():
    net = pi.read_net(deeplab_prototxt(width=W, size=SIZE).replace("dilation: 12", "hole_h: 12 hole_w: 6"))
    fc6 = [lp for lp in readers.upgraded_layers(net) if lp.name == "fc6"][0]
    assert list(fc6.convolution_param.dilation) == [12, 6]
    assert [lp for lp in net.layer if lp.name == "fc6"][0].convolution_param.hole_h == 12


def test_a_top_named_like_an_existing_blob_is_refused_unless_in_place():
    """Caffe's Net::AppendTop: in place only under the name of the bottom at the same index."""
    text = deeplab_prototxt(width=W, size=SIZE)
    bad = text + 'layer { name: "dup" type: "ReLU" bottom: "fc6" top: "fc7" }\n'
    for build in (pi.load_net, pi.to_attnscale):
        with pytest.raises(CaffeImportError, match="layer 'dup' .ReLU.: top blob 'fc7' is produced by multiple sources"):
            build(bad)
    with pytest.raises(CaffeImportError, match="top blob 'data' is produced by multiple sources"):
        pi.load_net(text + 'layer { name: "d" type: "ReLU" bottom: "fc7" top: "data" }\n')
    pi.load_net(text + 'layer { name: "ok" type: "ReLU" bottom: "fc7" top: "fc7" }\n')   # in place


def test_deeplab_v1_strict_dim_false_copies_the_same_count_in_another_shape(tmp_path):
    """deeplab-public's CopyTrainedLayersFrom: a ``strict_dim: false`` layer takes a blob of the same element
    count in the layer's shape (fc6 stored flat, as an InnerProduct's); other layers keep the shape check."""
    ref = pi.load_net(deeplab_prototxt(width=W, size=SIZE))
    randomize(ref, seed=8)
    layers = [(n, t, [a.reshape(1, 1, a.shape[0], -1) if n == "fc6" and a.ndim == 4 else a for a in arrays])
              for n, t, arrays in net_weights(ref)]
    weights = _write(tmp_path, "flat.caffemodel", caffemodel_bytes(layers, v1=True))
    v1 = _write(tmp_path, "test.prototxt", deeplab_v1_prototxt())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pi.load_net(v1, weights)(x, return_blobs=True)["fc8_voc12"], ref(x), rtol=0, atol=0)
    model, report = pi.to_attnscale(v1, weights, use_reference_ops=True)
    assert any("fc6[0]: file shape" in n and "strict_dim: false" in n for n in report.notes)
    with torch.no_grad():
        torch.testing.assert_close(model(x).merged, ref(x), rtol=1e-5, atol=1e-5)
    for strict in (deeplab_prototxt(width=W, size=SIZE), deeplab_v1_prototxt().replace("strict_dim: false", "")):
        with pytest.raises(CaffeImportError, match="layer 'fc6': cannot copy blob 0: shape mismatch"):
            pi.load_net(strict, weights)


def test_deeplab_v1_real_file_features():
    """What real DeepLab-v1 files hold beyond LargeFOV: DeepLab's 4x4 ``hole: 4`` fc6 (an even kernel: F.conv2d,
    not the op), the fork's other layer types and params; a TRAIN-only data layer names the phase to read."""
    text = ('name: "n"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 17\ninput_dim: 17\n'
            'layers { name: "fc6" type: CONVOLUTION bottom: "data" top: "fc6" convolution_param { num_output: 4 '
            'kernel_size: 4 pad: 6 hole: 4 } }\n'
            'layers { name: "pad" type: PADDING bottom: "fc6" top: "fc6p" padding_param { pad_beg: 1 pad_end: 1 } }\n'
            'layers { name: "u" type: UNIQUE_LABEL bottom: "fc6" top: "u" unique_label_param { max_labels: 3 } }\n')
    net = pi.read_net(text)
    assert [readers.v1_type_name(v1) for v1 in net.layers] == ["Convolution", "Padding", "UniqueLabel"]
    runnable = text[:text.index('layers { name: "pad"')]
    x = torch.randn(1, 3, 17, 17)
    a, b = pi.load_net(runnable, use_ops=True), pi.load_net(runnable, use_ops=False)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert a(x).shape == (1, 4, 17, 17)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(CaffeImportError, match="unsupported layer type 'Padding'"):
        pi.load_net(text)
    train = deeplab_v1_prototxt("TRAIN", size=33)
    with pytest.raises(CaffeImportError, match=r"no input in the TEST phase: the data layer\(s\) \['data'\] are in the "
                       r"TRAIN phase only \(to_attnscale\(..., phase='TRAIN'\)"):
        pi.to_attnscale(train)
    model, report = pi.to_attnscale(train, phase="TRAIN")
    assert model.classifier_name == "fc8_voc12"
    _, report = pi.to_attnscale(deeplab_v1_prototxt())
    assert any("'fc8_interp' (Interp) are not part of attnscale's model" in n for n in report.notes)


def test_v1_binary_nets_and_weights_name_their_types_or_refuse_ambiguity(tmp_path):
    """A binary legacy net: convolution fields 17-19 are deeplab-public's hole or BVLC's force_nd_im2col /
    dilation, so such a net is refused; weights name deeplab-public's data layer (39 with image_data_param) and
    leave a type no Caffe we read defines unnamed."""
    V1, Net = readers.message_class("V1LayerParameter"), readers.message_class("NetParameter")
    net = Net(name="n")
    net.input.append("data")
    net.input_dim.extend([1, 3, 9, 9])
    conv = V1(name="fc6", type=4, bottom=["data"], top=["fc6"])
    conv.convolution_param.num_output, conv.convolution_param.force_nd_im2col = 2, True   # hole: 2 read as bool
    conv.convolution_param.kernel_size.append(3)
    net.layers.append(conv)
    path = _write(tmp_path, "net.caffemodel", net.SerializeToString())
    with pytest.raises(CaffeImportError, match="legacy layer 'fc6': convolution fields 17-19 .* cannot tell"):
        pi.read_net(path)
    data = V1(name="data", type=39, top=["data", "label"])
    data.image_data_param.source = "list.txt"
    raw = caffemodel_bytes([("fc6", "Convolution", [np.ones((2, 3, 3, 3))])], v1=True)
    raw = Net(layers=[data]).SerializeToString() + raw
    raw += bytes([2 << 3 | 2, 4, 5 << 3, 77, 4 << 3 | 2, 0])   # a layer of type 77 with an empty name
    wf = pi.read_weights(_write(tmp_path, "w.caffemodel", raw))
    assert [(n, t) for n, t, _ in wf.layers] == [("data", "ImageSegData"), ("fc6", "Convolution"), ("", "")]


def test_convert_writes_the_config_evaluate_loads_the_model_with(tmp_path, capsys):
    """``convert --config``: a released net + weights become a checkpoint and the TrainConfig that rebuilds its
    model (``evaluate``'s load), the same scores as ``to_attnscale``'s."""
    from attnscale.config import TrainConfig
    from attnscale.evaluate import load_model_from_checkpoint
    from prototxt_import.__main__ import main as cli
    proto = _write(tmp_path, "att.prototxt", deeplab_prototxt((1.0, 0.5), "attention", width=W, size=SIZE, classes=5))
    net = pi.load_net(proto)
    randomize(net, seed=9)
    weights = _write(tmp_path, "w.caffemodel", caffemodel_bytes(net_weights(net)))
    TrainConfig(dataset="synthetic", out_dir=str(tmp_path / "run")).save(str(tmp_path / "base.json"))
    args = ["convert", str(proto), str(weights), "-o", str(tmp_path / "model.pt"), "-q", "--config",
            str(tmp_path / "eval.json")]
    assert cli(args + ["--base", str(tmp_path / "nope.json")]) == 2
    assert "--base: config file not found" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()
    (tmp_path / "model.pt").write_bytes(b"old")        # a config that cannot be written: the model stays as it was
    assert cli(args[:-1] + [str(tmp_path / "model.pt" / "eval.json")]) == 2
    assert "cannot write the config" in capsys.readouterr().err and (tmp_path / "model.pt").read_bytes() == b"old"
    (tmp_path / "model.pt").unlink()
    TrainConfig().save(str(tmp_path / "voc.json"))       # VOC's 21 classes for a 5-class net: refused, nothing written
    assert cli(args + ["--base", str(tmp_path / "voc.json")]) == 2
    assert "the net scores 5 classes, the data set 'voc12' has 21" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()
    assert cli(args + ["--base", str(tmp_path / "base.json")]) == 0
    assert "python -m attnscale.evaluate" in capsys.readouterr().out
    cfg = TrainConfig.load(str(tmp_path / "eval.json"))
    assert (cfg.dataset, cfg.scales, cfg.merge, cfg.num_classes, cfg.classifier_name) == (
        "synthetic", [1.0, 0.5], "attention", 5, "fc8_voc12")
    model, _ = load_model_from_checkpoint(cfg, str(tmp_path / "model.pt"))
    ref, _ = pi.to_attnscale(proto, weights)
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x).merged, ref(x).merged, rtol=0, atol=0)
    # a one-scale deploy net (no losses): no extra supervision in its config
    one = _write(tmp_path, "one.prototxt", deeplab_prototxt(width=W, size=SIZE, classes=5))
    assert cli(["convert", str(one), str(weights), "-q", "-o", str(tmp_path / "one.pt"), "--config",
                str(tmp_path / "one.json"), "--base", str(tmp_path / "base.json")]) == 0
    cfg = TrainConfig.load(str(tmp_path / "one.json"))
    assert (cfg.scales, cfg.merge, cfg.extra_supervision) == ([1.0], None, False)
