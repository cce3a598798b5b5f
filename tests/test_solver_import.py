"""A Caffe solver + training net as a TrainConfig (prototxt_import.train_config) and every layer's
lr_mult / decay_mult (prototxt_import.param_mults, Net::AppendParam's sharing rules) in training."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

import prototxt_import as pi
from attnscale.config import TrainConfig
from attnscale.config import resume_free_fields
from attnscale.train import build_model, freeze_zero_rate, load_checkpoint, make_optimizer, train
from prototxt_import import CaffeImportError
from prototxt_import.__main__ import main as cli
from tests.caffe_files import (SUFFIX, blob_bytes, caffemodel_bytes, deeplab_prototxt, net_weights, randomize,
                               to_v1_text)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "prototxt")
TRAIN_NET = os.path.join(SHARED, "attention3_train_esupv.prototxt")
MERGED = {"attention": "fc8_attention", "max": "fc8_max", "avg": "fc8_avg", None: "fc8_voc12"}
SOLVER = """base_lr: 0.01
lr_policy: "fixed"
max_iter: 2
momentum: 0.9
weight_decay: 0.0005
random_seed: 3
"""


def train_net(scales=(1.0, 0.5), merge="attention", esupv=True, width=1 / 32, classes=21, size=33,
              data_layer=False) -> str:
    """``deeplab_prototxt`` in training form: label inputs (or an ImageSegData layer) and the losses."""
    from attnscale.caffe import scaled_input_shape
    from attnscale.model import AttentionToScale
    text = deeplab_prototxt(scales, merge, width=width, classes=classes, size=size)
    sfx = [SUFFIX.get(s, "") for s in scales]
    out = {x: AttentionToScale.output_size(scaled_input_shape((size, size), s))[0] for s, x in zip(scales, sfx)}
    if data_layer:   # the labels shrunk by Interp to each score map's size
        text = text.replace(f'input: "data"\ninput_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}\n',
                            'layer { name: "data" type: "ImageSegData" top: "data" top: "label" '
                            'include { phase: TRAIN } image_data_param { source: "list/train_aug.txt" '
                            'root_folder: "/data/VOC2012" batch_size: 7 shuffle: true } transform_param { '
                            f'mirror: true crop_size: {size} mean_value: 104.008 mean_value: 116.669 '
                            'mean_value: 122.675 } }\n' + "".join(
                                f'layer {{ name: "label_shrink{x}" type: "Interp" bottom: "label" top: "label{x}_s" '
                                f'interp_param {{ height: {out[x]} width: {out[x]} }} }}\n' for x in sfx))
    else:
        text = text.replace(f"dim: {size} }}\n", f"dim: {size} }}\n" + "".join(
            f'input: "label{x}"\ninput_shape {{ dim: 1 dim: 1 dim: {out[x]} dim: {out[x]} }}\n' for x in sfx), 1)
    label = (lambda x: f"label{x}_s") if data_layer else (lambda x: f"label{x}")
    losses = [("loss", MERGED[merge if len(scales) > 1 else None], label(""))]
    if esupv and len(scales) > 1:
        losses += [(f"loss{x or '_res1'}", f"fc8_voc12{x}", label(x)) for x in sfx]
    return text + "".join(f'layer {{ name: "{n}" type: "SoftmaxWithLoss" bottom: "{b}" bottom: "{lab}" '
                          f'top: "{n}" loss_param {{ ignore_label: 255 }} }}\n' for n, b, lab in losses)


def _write(tmp_path, name, text) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------ param_mults
@pytest.mark.skipif(not os.path.exists(TRAIN_NET), reason="the shared reference prototxts are not beside the checkout")
def test_param_mults_of_the_training_prototxt_are_the_prototxt_scheme():
    """Read from attention3_train_esupv.prototxt, the multipliers give every parameter the (lr_mult,
    decay_mult) of the fixed ``lr_mults="prototxt"`` scheme (written from that file by hand)."""
    mults = pi.param_mults(TRAIN_NET)
    assert mults["fc6"] == [[1.0, 1.0], [2.0, 0.0]] and mults["att_conv1"] == [[1.0, 1.0], [1.0, 1.0]]
    kw = dict(num_classes=21, scales=[1.0, 0.75, 0.5], merge="attention", extra_supervision=True, width=1 / 32,
              classifier_name="fc8_voc12", dataset="synthetic")
    groups = {}
    for scheme in ("prototxt", mults):
        cfg = TrainConfig(lr_mults=scheme, **kw).validate()
        model = build_model(cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        groups[str(scheme)[:8]] = {names[id(p)]: (g["lr_mult"], g["decay_mult"], g["lr"], g["weight_decay"])
                                   for g in make_optimizer(model, cfg).param_groups for p in g["params"]}
    a, b = groups.values()
    assert a == b and len(a) == 36


def _shared(text, layer, blob, spec):
    """Replace the ``param`` spec of blob ``blob`` ("w"/"b") of one layer copy with ``spec``."""
    pat = re.compile(r'(layer \{ name: "' + layer + r'" [^\n]*?)param \{ name: "(\w+)_' + blob + r'"[^}]*\}')
    new, n = pat.subn(lambda m: m.group(1) + f'param {{ name: "{m.group(2)}_{blob}" {spec} }}', text)
    assert n == 1, layer
    return new


def test_param_mults_follow_caffe_sharing_rules():
    net = train_net()
    assert pi.param_mults(net)["conv1_1"] == [[1.0, 1.0], [2.0, 0.0]]
    # the first copy leaves lr_mult unset: a later sharing copy's value holds (Net::AppendParam)
    text = _shared(_shared(net, "conv1_1", "w", "decay_mult: 1"), "conv1_1_res05", "w", "lr_mult: 3 decay_mult: 1")
    assert pi.param_mults(text)["conv1_1"] == [[3.0, 1.0], [2.0, 0.0]]
    # both unset: ParamSpec's default 1; a proto float reads as its shortest decimal
    text = _shared(_shared(net, "conv2_1", "b", ""), "conv2_1_res05", "b", "decay_mult: 0.1")
    assert pi.param_mults(text)["conv2_1"] == [[1.0, 1.0], [1.0, 0.1]]
    # two settings that differ stop Caffe
    text = _shared(net, "fc7_res05", "w", "lr_mult: 5 decay_mult: 1")
    with pytest.raises(CaffeImportError, match=r"'fc7_res05'.*shared param 'fc7_w' has mismatched lr_mult: 5 here, 1"):
        pi.param_mults(text)
    text = _shared(net, "fc7_res05", "b", "lr_mult: 2 decay_mult: 1")
    with pytest.raises(CaffeImportError, match="mismatched decay_mult"):
        pi.param_mults(text)
    # scale copies that do not share a blob would train apart
    text = net.replace('layer { name: "fc6_res05" type: "Convolution" bottom: "pool5a_res05" top: "fc6_res05" '
                       'param { name: "fc6_w"', 'layer { name: "fc6_res05" type: "Convolution" bottom: '
                       '"pool5a_res05" top: "fc6_res05" param { name: "fc6_w2"')
    assert text != net
    with pytest.raises(CaffeImportError, match=r"'fc6' and 'fc6_res05' do not share their weight"):
        pi.param_mults(text)
    text = _shared(net, "fc8_voc12", "b", 'lr_mult: 2 decay_mult: 0 } param { lr_mult: 1')
    with pytest.raises(CaffeImportError, match="3 param specs"):
        pi.param_mults(text)
    # one blob for two model parameters: Caffe ties them (Net::ShareWeights), attnscale's model cannot
    for a, b in (("conv5_2", "conv5_3"), ("conv1_1", "conv1_2")):
        text = re.sub(r'(layer \{ name: "' + b + r'(_res05)?" [^\n]*?param \{ name: ")' + b + r'_w', r"\g<1>" + a + "_w", net)
        with pytest.raises(CaffeImportError, match=rf"{a}.weight and {b}.weight share one blob"):
            pi.param_mults(text)
    text = net.replace('name: "fc7_b" lr_mult: 2 decay_mult: 0', 'name: "fc7_w" lr_mult: 1 decay_mult: 1')
    with pytest.raises(CaffeImportError, match=r"fc7.weight and fc7.bias share one blob"):
        pi.param_mults(text)


def test_param_mults_of_a_v1_net_read_blobs_lr_and_weight_decay():
    text = to_v1_text(deeplab_prototxt(width=1 / 32))
    text = text.replace('name: "fc6" type: CONVOLUTION', 'name: "fc6" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2 '
                        'weight_decay: 1 weight_decay: 0')
    mults = pi.param_mults(text)
    assert mults["fc6"] == [[1.0, 1.0], [2.0, 0.0]] and mults["conv1_1"] == [[1.0, 1.0], [1.0, 1.0]]
    assert len(mults) == 16


def test_explicit_lr_mults_are_checked(tmp_path):
    kw = dict(dataset="synthetic", width=1 / 32, classifier_name="fc8_voc12")
    good = pi.param_mults(deeplab_prototxt(width=1 / 32, classes=5))
    for bad, why in (({"conv1_1": [[1, 1]]}, "lr_mults must be"), ({"conv1_1": [[1, float("nan")], [1, 1]]}, "finite"),
                     ({"conv1_1": [[1, 1], [1, True]]}, "lr_mults must be"), ([1, 2], "lr_mults must be")):
        with pytest.raises(ValueError, match=why):
            TrainConfig(lr_mults=bad, **kw).validate()
    cfg = TrainConfig(lr_mults={k: v for k, v in good.items() if k != "fc7"}, **kw).validate()
    with pytest.raises(ValueError, match=r"no entry for the model's layer\(s\) \['fc7'\]"):
        make_optimizer(build_model(cfg), cfg)
    cfg = TrainConfig(lr_mults={**good, "att_conv1": [[1, 1], [1, 1]]}, **kw).validate()
    with pytest.raises(ValueError, match=r"\['att_conv1'\] are not layers of this model"):
        make_optimizer(build_model(cfg), cfg)
    # a JSON round trip keeps them
    cfg = TrainConfig(lr_mults=good, **kw).validate()
    cfg.save(str(tmp_path / "c.json"))
    assert TrainConfig.load(str(tmp_path / "c.json")).lr_mults == good


# ------------------------------------------------------------------------------ train_config
@pytest.mark.skipif(not os.path.exists(TRAIN_NET), reason="the shared reference prototxts are not beside the checkout")
def test_train_config_from_a_solver_and_the_training_prototxt(tmp_path):
    solver = _write(tmp_path, "solver.prototxt", f'net: "{TRAIN_NET}"\nbase_lr: 0.001\nlr_policy: "step"\n'
                    'gamma: 0.1\nstepsize: 2000\nmax_iter: 6000\nmomentum: 0.9\nweight_decay: 0.0005\n'
                    'iter_size: 3\nsnapshot: 2000\ndisplay: 10\nsnapshot_prefix: "x"\nsolver_mode: GPU\n'
                    'weights: "init.caffemodel"\n')
    cfg, notes = pi.train_config(solver)
    want = dict(base_lr=0.001, lr_policy="step", gamma=0.1, stepsize=2000, max_iter=6000, momentum=0.9,
                weight_decay=0.0005, iter_size=3, snapshot=2000, display=10, init="init.caffemodel",
                scales=[1.0, 0.75, 0.5], merge="attention", extra_supervision=True, num_classes=21, width=1.0,
                classifier_name="fc8_voc12", dropout=0.0, batch_size=10, crop_size=321,
                lr_mults=pi.param_mults(TRAIN_NET))
    assert {k: getattr(cfg, k) for k in want} == want
    assert any("snapshot_prefix, solver_mode" in n for n in notes) and any("random_seed" in n for n in notes)


def test_train_config_reads_the_data_layer_and_the_losses(tmp_path):
    net = train_net(scales=(1.0, 0.75, 0.5), merge="max", esupv=False, data_layer=True, size=33)
    cfg, notes = pi.train_config(SOLVER + 'iter_size: 2\ntype: "SGD"\n', net=net)
    assert (cfg.batch_size, cfg.crop_size, cfg.mirror, cfg.train_list, cfg.data_root) == (
        7, 33, True, "list/train_aug.txt", "/data/VOC2012", )
    assert (cfg.merge, cfg.extra_supervision, cfg.scales, cfg.iter_size, cfg.seed, cfg.lr_policy) == (
        "max", False, [1.0, 0.75, 0.5], 2, 3, "fixed")
    assert cfg.dropout == 0.5 and cfg.num_classes == 21
    # no crop (whole images, one per batch): the label sizes vary per image, nothing to check up front
    cfg, _ = pi.train_config(SOLVER, net=train_net(data_layer=True).replace("crop_size: 33", "crop_size: 0")
                             .replace("batch_size: 7", "batch_size: 1"))
    assert (cfg.crop_size, cfg.batch_size, cfg.extra_supervision) == (0, 1, True)
    # with a base: the fields Caffe's files do not set come from it
    base = TrainConfig(dataset="synthetic", out_dir="runs/x", device="cpu", random_scale=(0.5, 1.5))
    cfg, notes = pi.train_config(SOLVER, net=train_net(classes=5), base=base)
    assert (cfg.dataset, cfg.out_dir, cfg.extra_supervision, cfg.batch_size) == ("synthetic", "runs/x", True, 1)
    # ... but not a random scaling the net's data layer does not do, nor another class count
    assert cfg.random_scale is None and any("random_scale [0.5, 1.5] of the base dropped" in n for n in notes)
    with pytest.raises(CaffeImportError, match="the net scores 21 classes, the data set 'synthetic' has 5"):
        pi.train_config(SOLVER, net=train_net(), base=base)


@pytest.mark.parametrize("solver,net,why", [
    ('lr_policy: "cosine"\n', None, "lr_policy 'cosine': Caffe stops on an unknown learning rate policy"),
    ('lr_policy: "sigmoid"\ngamma: 0.1\n', None, "'sigmoid' needs stepsize > 0"),
    ('lr_policy: "step"\nstepsize: 3\ngamma: -0.1\n', None, r"gamma -0.1 < 0 \(Caffe: CHECK_GE"),
    ('type: "SGD"\nsolver_type: SGD\n', None, "both solver_type and type"),
    ("average_loss: 0\n", None, "average_loss 0 < 1"),
    ('weights: "a.caffemodel, b.caffemodel"\n', None, r"2 weights files \['a.caffemodel', 'b.caffemodel'\]"),
    ('weights: "a.caffemodel,"\n', None, "names an empty file"),
    ('type: "Adam"\n', None, "solver type 'Adam'"),
    ("solver_type: NESTEROV\n", None, "solver type 'NESTEROV'"),
    ('regularization_type: "L1"\n', None, "regularization_type 'L1'"),
    ('lr_policy: "step"\n', None, "stepsize > 0"),
    ('weights: "a" weights: "b"\n', None, "2 weights files"),
    ("", "no-net", "no training net"),
    ('net: "does/not/exist.prototxt"\n', "no-net", "'does/not/exist.prototxt' is not a file"),
    ("", ("ignore_label: 255", ""), "ignore_label must be 255"),
    ("", ('top: "loss_res05"', 'top: "loss_res05" loss_weight: 2'), r"loss_weight \[2.0\]"),
    ("", ('ignore_label: 255 }', 'ignore_label: 255 normalization: BATCH_SIZE }'), "VALID"),
    ("", ('ignore_label: 255 }', 'ignore_label: 255 normalize: false }'), "VALID"),
    ("", ("mean_value: 104.008", "mean_value: 104"), "mean_value"),
    ("", ("crop_size: 33", "crop_height: 33 crop_width: 65"), "crop 33x65"),
    ("", ("mirror: true", "mirror: true scale: 0.00390625"), "scale 0.0039"),
])
def test_train_config_refuses_what_attnscale_would_train_otherwise(solver, net, why):
    text = train_net(data_layer=True)
    if isinstance(net, tuple):
        assert net[0] in text
        text = text.replace(net[0], net[1], 1)
    solver = (SOLVER.replace('lr_policy: "fixed"\n', "") if "lr_policy" in solver else SOLVER) + solver
    with pytest.raises(CaffeImportError, match=why):
        pi.train_config(solver, net=None if net == "no-net" else text)


def test_train_config_takes_each_policys_fields():
    """A DeepLab-v2 solver (poly, power 0.9) and the others: each policy's own fields, none it ignores."""
    base = TrainConfig()
    for policy, extra, want in (
            ("poly", "power: 0.9\n", dict(power=0.9, gamma=base.gamma, stepsize=base.stepsize)),
            ("multistep", "gamma: 0.5\nstepvalue: 10\nstepvalue: 30\n", dict(gamma=0.5, stepvalue=[10, 30])),
            ("inv", "gamma: 0.0001\npower: 0.75\n", dict(gamma=0.0001, power=0.75)),
            ("sigmoid", "gamma: 0.5\nstepsize: 7\n", dict(gamma=0.5, stepsize=7)),
            ("exp", "gamma: 0.99\n", dict(gamma=0.99, power=0.0))):
        cfg, _ = pi.train_config(SOLVER.replace('"fixed"', f'"{policy}"') + extra, net=train_net())
        assert cfg.lr_policy == policy and {k: getattr(cfg, k) for k in want} == want, policy


def test_train_config_follows_each_loss_to_its_scores_and_label():
    """Each loss must read the merged scores or one scale's classifier output, once, against the label at
    that size: anything else trains another objective than attnscale's."""
    net = train_net(data_layer=True)
    for edit, why in (
            (('bottom: "fc8_voc12_res05" bottom: "label_res05_s"', 'bottom: "fc8_attention" bottom: "label_s"'),
             "layers 'loss' and 'loss_res05' both put a loss on the merged scores"),
            (('bottom: "fc8_attention" bottom: "label_s"', 'bottom: "fc8_voc12_res05_interp" bottom: "label_s"'),
             "its scores 'fc8_voc12_res05_interp' are neither the merged scores nor a scale's classifier output"),
            (('bottom: "fc8_attention" bottom: "label_s"', 'bottom: "fc8_attention" bottom: "label"'),
             r"layer 'loss': its label 'label' is \(33, 33\) at crop 33, its scores \(5, 5\)"),
            (('interp_param { height: 5 width: 5 }', 'interp_param { shrink_factor: 4 }'),
             r"its label 'label_s' is \(9, 9\) at crop 33"),
            (('bottom: "fc8_attention" bottom: "label_s"', 'bottom: "fc8_attention" bottom: "fc7"'),
             "its label comes from layer 'drop7' .Dropout.")):
        assert edit[0] in net, edit
        with pytest.raises(CaffeImportError, match=why):
            pi.train_config(SOLVER, net=net.replace(edit[0], edit[1], 1))
    cfg, _ = pi.train_config(SOLVER, net=net)
    assert cfg.extra_supervision


def test_train_config_reads_seed_weights_and_display_as_caffe():
    cfg, notes = pi.train_config(SOLVER.replace("random_seed: 3", "random_seed: 4294967301")
                                 + 'weights: " a.caffemodel "\ndisplay: -20\n', net=train_net())
    assert (cfg.seed, cfg.init, cfg.display) == (5, "a.caffemodel", 20)
    assert any("random_seed 4294967301 is 5" in n for n in notes)
    with pytest.raises(ValueError, match=r"config.seed must be in \[0, 2\^32\)"):
        TrainConfig(seed=2 ** 32).validate()


def test_zero_rate_parameters_get_no_gradient_and_poly_keeps_max_iter():
    """lr_mult 0: Caffe computes no diff (so ClipGradients' norm leaves it out); poly's rates depend on
    max_iter, so a resume may not change it."""
    mults = pi.param_mults(train_net())
    mults["conv1_1"] = [[0.0, 1.0], [0.0, 0.0]]
    cfg = TrainConfig(dataset="synthetic", width=1 / 32, scales=[1.0, 0.5], merge="attention",
                      classifier_name="fc8_voc12", lr_mults=mults, crop_size=33, batch_size=1).validate()
    model = build_model(cfg)
    freeze_zero_rate(make_optimizer(model, cfg))
    assert not model.conv1_1.weight.requires_grad and model.conv1_2.weight.requires_grad
    model.train()
    model.loss(model(torch.randn(1, 3, 33, 33)), torch.zeros(1, 33, 33, dtype=torch.long))[0].backward()
    assert model.conv1_1.weight.grad is None and model.conv1_2.weight.grad is not None
    frozen = TrainConfig(**{**cfg.to_dict(), "lr_mults": {k: [[0, 1], [0, 0]] for k in mults}}).validate()
    with pytest.raises(ValueError, match="every lr_mult is 0"):
        freeze_zero_rate(make_optimizer(build_model(frozen), frozen))
    assert "max_iter" in resume_free_fields(cfg)
    assert "max_iter" not in resume_free_fields(TrainConfig(lr_policy="poly", power=0.9))


def test_train_config_needs_the_papers_losses():
    net = train_net(scales=(1.0, 0.75, 0.5))
    one_less = net.replace('layer { name: "loss_res05"', 'layer { name: "x" type: "Silence" bottom: "label_res05" }\n'
                           '#', 1)
    with pytest.raises(CaffeImportError, match=r"losses on the scale\(s\) \[1.0, 0.75\] only"):
        pi.train_config(SOLVER, net=one_less)


def test_config_cli_writes_a_config_that_trains_as_the_prototxt_says(tmp_path, capsys):
    """End to end: solver + net with conv1_1 frozen (lr_mult 0), MSRA fillers -> ``python -m prototxt_import
    config`` -> ``attnscale.train``: conv1_1 keeps its (MSRA) start, conv1_2 moves."""
    net = train_net(classes=5).replace("convolution_param {", 'convolution_param { weight_filler { type: "msra" }')
    for blob in ("w", "b"):
        net = re.sub(r'param \{ name: "conv1_1_' + blob + r'" lr_mult: \d', f'param {{ name: "conv1_1_{blob}" lr_mult: 0',
                     net)
    net_path = _write(tmp_path, "train.prototxt", net)
    solver = _write(tmp_path, "solver.prototxt", SOLVER + f'net: "{net_path}"\n')
    base = TrainConfig(dataset="synthetic", synthetic_size=33, synthetic_train=4, synthetic_val=2, workers=0,
                       out_dir=str(tmp_path / "run"), torch_threads=1, snapshot=100)
    base.save(str(tmp_path / "base.json"))
    out = str(tmp_path / "cfg.json")
    assert cli(["config", solver, "--base", str(tmp_path / "base.json"), "-o", out]) == 0
    assert "train with: python -m attnscale.train" in capsys.readouterr().out
    cfg = TrainConfig.load(out)
    assert cfg.lr_mults["conv1_1"] == [[0.0, 1.0], [0.0, 0.0]] and cfg.crop_size == 33
    ck = load_checkpoint(train(cfg, progress=False).checkpoint)
    torch.manual_seed(cfg.seed)
    start = build_model(cfg).state_dict()
    assert torch.equal(ck["model"]["conv1_1.weight"], start["conv1_1.weight"])
    assert torch.equal(ck["model"]["conv1_1.bias"], start["conv1_1.bias"])
    assert abs(start["conv1_1.weight"].std().item() / (2 / 27) ** 0.5 - 1) < 0.3    # MSRA, fan_in 3 * 3 * 3
    assert not torch.equal(ck["model"]["conv1_2.weight"], start["conv1_2.weight"])
    assert json.load(open(out))["lr_mults"]["fc6"] == [[1.0, 1.0], [2.0, 0.0]]


def test_config_cli_names_what_is_wrong(tmp_path, capsys):
    solver = _write(tmp_path, "solver.prototxt", SOLVER.replace('"fixed"', '"cosine"'))
    assert cli(["config", solver, "--net", _write(tmp_path, "n.prototxt", train_net()), "-o",
                str(tmp_path / "c.json")]) == 2
    assert f"{solver}: lr_policy 'cosine'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c.json")
    assert cli(["config", solver, "--base", str(tmp_path / "none.json"), "-o", str(tmp_path / "c.json")]) == 2
    assert "--base: config file not found" in capsys.readouterr().err
    solver = _write(tmp_path, "solver2.prototxt", SOLVER)
    (tmp_path / "a_file").write_text("")
    assert cli(["config", solver, "--net", _write(tmp_path, "n.prototxt", train_net()), "-o",
                str(tmp_path / "a_file" / "c.json")]) == 2
    assert "cannot write the config" in capsys.readouterr().err


# ------------------------------------------------------------------------------ fillers
def _filled(spec, shape=(64, 32, 3, 3)):
    from attnscale.caffe import caffe_fill
    torch.manual_seed(0)
    return caffe_fill(torch.empty(shape), spec)


def test_caffe_fillers_draw_caffes_distributions():
    assert torch.equal(_filled({"type": "constant", "value": 0.5}), torch.full((64, 32, 3, 3), 0.5))
    assert torch.equal(_filled({}), torch.zeros(64, 32, 3, 3))      # FillerParameter's default: constant 0
    t = _filled({"type": "gaussian", "std": 0.01, "mean": 1.0})
    assert abs(t.std().item() - 0.01) < 5e-4 and abs(t.mean().item() - 1.0) < 5e-4
    t = _filled({"type": "uniform", "min": -2, "max": 3})
    assert t.min() >= -2 and t.max() <= 3 and t.min() < -1.99 and t.max() > 2.99
    # xavier: U(-sqrt(3 / n), sqrt(3 / n)); msra: N(0, sqrt(2 / n)); n = fan_in (32*9), fan_out (64*9) or their mean
    for norm, n in (("FAN_IN", 288), ("FAN_OUT", 576), ("AVERAGE", 432)):
        t = _filled({"type": "xavier", "variance_norm": norm})
        assert t.abs().max() <= (3 / n) ** 0.5 and t.abs().max() > 0.99 * (3 / n) ** 0.5, norm
        t = _filled({"type": "msra", "variance_norm": norm})
        assert abs(t.std().item() / (2 / n) ** 0.5 - 1) < 0.02, norm
    # a bias (O,): fan_in = 1, fan_out = O
    assert abs(_filled({"type": "msra", "variance_norm": "FAN_OUT"}, (20000,)).std().item() - (2 / 20000) ** 0.5) < 1e-4
    assert _filled({"type": "xavier"}, (20000,)).abs().max() > 1.7    # sqrt(3 / 1)
    t = _filled({"type": "positive_unitball"})
    assert (t > 0).all() and torch.allclose(t.view(64, -1).sum(1), torch.ones(64))
    t = _filled({"type": "gaussian", "sparse": 16})               # kept with probability 16 / 64 outputs
    assert abs((t != 0).float().mean().item() - 0.25) < 0.02
    k = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(_filled({"type": "bilinear"}, (2, 1, 4, 4))[1, 0], k[:, None] * k[None, :])
    for k in (5, 6, 9, 11):      # BilinearFiller's float arithmetic: c, x / f and the product in float
        f = -(-k // 2)
        c = np.float32((k - 1) / (2.0 * f))
        r = [np.float32(1) - abs(np.float32(x) / np.float32(f) - c) for x in range(k)]
        want = torch.tensor([[a * b for b in r] for a in r])
        assert torch.equal(_filled({"type": "bilinear"}, (1, 1, k, k))[0, 0], want), k
    for spec, why in (({"type": "gaussian", "sparse": 65}, "sparse 65 > the blob's 64 outputs"),
                      ({"type": "foo"}, "unknown filler type 'foo'"), ({"type": "constant", "std": 1}, "takes"),
                      ({"type": "gaussian", "std": float("inf")}, "finite"),
                      ({"type": "msra", "variance_norm": "FAN"}, "variance_norm"),
                      ({"type": "bilinear"}, "square kernel"), ({"type": "gaussian", "std": 0}, "std must be > 0"),
                      ({"type": "gaussian", "std": -0.01}, "std must be > 0"),
                      ({"type": "uniform", "min": 1, "max": 0}, "min <= max")):
        with pytest.raises(ValueError, match=why):
            _filled(spec, (64, 32, 3, 1) if spec == {"type": "bilinear"} else (64, 32, 3, 3))


def test_fillers_in_the_config_start_the_model_before_init(tmp_path):
    kw = dict(dataset="synthetic", width=1 / 32, scales=[1.0, 0.5], merge="attention")
    fill = {"fc8_synthetic": [{"type": "constant", "value": 0.25}, {"type": "constant", "value": -1}],
            "att_conv1": [{"type": "gaussian", "std": 0.01}, {"type": "constant"}]}
    cfg = TrainConfig(fillers=fill, **kw).validate()
    m = build_model(cfg)
    assert (m.fc8_synthetic.weight == 0.25).all() and (m.fc8_synthetic.bias == -1).all()
    assert abs(m.att_conv1.weight.std().item() - 0.01) < 1e-3 and (m.att_conv1.bias == 0).all()
    # the init weights are copied in afterwards (solver --weights after the net's set-up)
    init = tmp_path / "init.pt"
    state = {k: torch.full_like(v, 3.0) for k, v in m.state_dict().items() if k.startswith("fc8_synthetic")}
    torch.save({"model": state}, init)
    m = build_model(TrainConfig(fillers=fill, init=str(init), **kw).validate())
    assert (m.fc8_synthetic.weight == 3).all() and abs(m.att_conv1.weight.std().item() - 0.01) < 1e-3
    with pytest.raises(ValueError, match=r"config.fillers: \['fc9'\] are not layers"):
        build_model(TrainConfig(fillers={"fc9": [{}, {}]}, **kw).validate())
    with pytest.raises(ValueError, match=r"config.fillers\['fc6'\] \(bias\): unknown filler type 'gauss'"):
        TrainConfig(fillers={"fc6": [{}, {"type": "gauss"}]}, **kw).validate()
    with pytest.raises(ValueError, match=r"config.fillers must be"):
        TrainConfig(fillers={"fc6": [{}]}, **kw).validate()


def test_train_config_takes_the_blob_owners_fillers():
    net = train_net()
    for layer, filler in (("fc8_voc12", 'weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: '
                           '"constant" value: 0.5 }'), ("fc8_voc12_res05", 'weight_filler { type: "constant" value: 5 }'),
                          ("att_conv1", 'weight_filler { type: "xavier" variance_norm: AVERAGE }')):
        net, n = re.subn(r'(layer \{ name: "' + layer + r'" [^\n]*\n  convolution_param \{)', r"\1 " + filler, net)
        assert n == 1, layer
    cfg, notes = pi.train_config(SOLVER, net=net)
    assert cfg.fillers["fc8_voc12"] == [{"type": "gaussian", "mean": 0.0, "std": 0.01, "sparse": -1},
                                        {"type": "constant", "value": 0.5}]      # the owner's (scale 1, first)
    assert cfg.fillers["att_conv1"][0] == {"type": "xavier", "variance_norm": "AVERAGE"}
    assert cfg.fillers["conv1_1"] == [{"type": "constant", "value": 0.0}] * 2
    # a spec written without its defaults is the same config as the filled-in one
    assert TrainConfig(fillers={"fc6": [{"type": "gaussian", "std": 0.01}, {}]}).validate().fillers == {
        "fc6": [{"type": "gaussian", "mean": 0.0, "std": 0.01, "sparse": -1}, {"type": "constant", "value": 0.0}]}
    assert any("no weight_filler in conv1_1" in n and "att_conv2" in n and "learns only its last biases" in n
               for n in notes)
    for filler, why in (('weight_filler { type: "foo" }', "layer 'fc6': weight_filler: unknown filler type 'foo'"),
                        ('bias_filler { type: "constant" sparse: 3 }', "sparse 3 on a constant filler")):
        bad = re.sub(r'(layer \{ name: "fc6" [^\n]*\n  convolution_param \{)', r"\1 " + filler, train_net())
        with pytest.raises(CaffeImportError, match=why):
            pi.train_config(SOLVER, net=bad)


# ------------------------------------------------------------------------------ Caffe snapshots
def _snapshot(tmp_path, net_text, it=2, drop=0, current_step=0, h5=False):
    """A Caffe run's snapshot of ``net_text``: random weights (.caffemodel) and a solverstate whose history blob
    i is all i + 1, in Net::learnable_params order (owners in net order: the scale-1 trunk, then att_conv*)."""
    from prototxt_import.schema import message_class
    caffe_net = pi.load_net(net_text, phase="TRAIN")
    randomize(caffe_net, seed=11)
    weights = _write(tmp_path, "iter.caffemodel", "")
    (tmp_path / "iter.caffemodel").write_bytes(caffemodel_bytes(net_weights(caffe_net)))
    learnable = [(n, a.shape) for n, _, arrays in net_weights(caffe_net) if "_res0" not in n
                 for a, what in zip(arrays, ("weight", "bias"))]
    history = [np.full(shape, i + 1.0, np.float32) for i, (_, shape) in enumerate(learnable[:len(learnable) - drop])]
    if h5:   # Caffe's SnapshotSolverStateToHDF5
        import h5py
        path = tmp_path / "iter.solverstate.h5"
        with h5py.File(path, "w") as f:
            f["iter"], f["current_step"], f["learned_net"] = np.int32(it), np.int32(current_step), np.bytes_(weights)
            for i, h in enumerate(history):
                f.create_dataset(f"history/{i}", data=h)
        return str(path), weights, caffe_net, learnable
    State = message_class("SolverState")
    st = State(iter=it, learned_net=weights, current_step=current_step)
    for h in history:
        st.history.add().ParseFromString(blob_bytes(h))
    path = tmp_path / "iter.solverstate"
    path.write_bytes(st.SerializeToString())
    return str(path), weights, caffe_net, learnable


@pytest.mark.parametrize("h5", [False, True], ids=["binaryproto", "hdf5"])
def test_a_caffe_snapshot_goes_on_in_attnscale(tmp_path, capsys, h5):
    """``config --snapshot``: Caffe's weights and momentum history at its iteration; with base_lr 0 the next
    update is the momentum alone, w - 0.9 h, which pins each history blob to its parameter."""
    net_text = train_net(classes=5).replace("convolution_param {", 'convolution_param { weight_filler { type: "msra" }')
    net_path = _write(tmp_path, "train.prototxt", net_text)
    state, weights, caffe_net, learnable = _snapshot(tmp_path, net_text, h5=h5)
    solver = _write(tmp_path, "solver.prototxt", SOLVER.replace("base_lr: 0.01", "base_lr: 0").replace(
        "max_iter: 2", "max_iter: 4") + f'net: "{net_path}"\nweights: "init.caffemodel"\n')
    base = TrainConfig(dataset="synthetic", synthetic_size=33, synthetic_train=4, synthetic_val=2, workers=0,
                       out_dir=str(tmp_path / "run"), torch_threads=1, snapshot=100)
    base.save(str(tmp_path / "base.json"))
    out = str(tmp_path / "cfg.json")
    args = ["config", solver, "--base", str(tmp_path / "base.json"), "-o", out, "--snapshot", state]
    assert cli(args) == 0
    assert "at iteration 2; go on with: python -m attnscale.train" in capsys.readouterr().out
    cfg = TrainConfig.load(out)
    assert cfg.init == ""
    ck = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), keys=("iter", "model", "optimizer"))
    assert ck["iter"] == 2
    caffe = {f"{layer}.{what}": a for layer, _, arrays in net_weights(caffe_net)
             for a, what in zip(arrays, ("weight", "bias"))}
    assert all(np.array_equal(ck["model"][k].numpy(), caffe[k]) for k in ("conv1_1.weight", "fc8_voc12.bias",
                                                                         "att_conv2.weight"))
    assert cli(args) == 2 and "checkpoint.pt exists" in capsys.readouterr().err
    res = train(cfg, resume=True, progress=False, stop_at=3)
    ck3 = load_checkpoint(res.checkpoint)
    assert ck3["iter"] == 3
    assert len(learnable) == 36     # 16 trunk and classifier layers, att_conv1, att_conv2
    for i, (layer, shape) in enumerate(learnable):     # weight, bias, weight, bias, ... in Caffe's order
        name = f"{layer}.{('weight', 'bias')[i % 2]}"
        assert torch.equal(ck3["model"][name], ck["model"][name] - torch.full(shape, i + 1.0) * 0.9), name


@pytest.mark.parametrize("case,why", [
    ("drop", "31 history blobs, but the net has 32 learnable blobs"),
    ("weights", "its weights 'nowhere.caffemodel' .learned_net. are not a file"),
    ("h5", "history datasets must be named 0 ... 1"),
    ("truncated", "not a valid binary SolverState"),
    ("step", r"current_step 1 at iteration 2, but the solver's stepvalue \[5\] gives 0"),
])
def test_a_caffe_snapshot_that_does_not_fit_is_refused(tmp_path, case, why):
    net_text = train_net(scales=(1.0,), merge=None)
    state, weights, _, _ = _snapshot(tmp_path, net_text, drop=case == "drop", current_step=int(case == "step"))
    solver = SOLVER + ('lr_policy: "multistep"\nstepvalue: 5\ngamma: 0.1\n' if case == "step" else "")
    if case == "step":
        solver = solver.replace('lr_policy: "fixed"\n', "")
    kw = dict(weights="nowhere.caffemodel") if case == "weights" else {}
    if case == "h5":      # an HDF5 solverstate whose history names skip one
        import h5py
        state = str(tmp_path / "bad.solverstate.h5")
        with h5py.File(state, "w") as f:
            f["iter"], f["learned_net"] = np.int32(2), np.bytes_(weights)
            f["history/0"], f["history/2"] = np.zeros(2, np.float32), np.zeros(2, np.float32)
    if case == "truncated":
        data = open(state, "rb").read()
        state = _write(tmp_path, "cut.solverstate", "")
        open(state, "wb").write(data[:len(data) // 2])
    with pytest.raises(CaffeImportError, match=why):
        pi.resume_caffe_snapshot(solver, state, net=net_text, **kw)


def test_snapshot_edge_cases_follow_caffe(tmp_path, capsys):
    """A multistep snapshot at a stepvalue holds the step of the update before (Caffe snapshots after ++iter_);
    a net naming its layers otherwise gets its weights by its own names; nothing is half-written."""
    solver = SOLVER.replace('lr_policy: "fixed"\n', 'lr_policy: "multistep"\nstepvalue: 2\ngamma: 0.1\n')
    net_text = train_net(scales=(1.0,), merge=None)
    state, _, _, _ = _snapshot(tmp_path, net_text, it=2, current_step=0)
    cfg, ck, _ = pi.resume_caffe_snapshot(solver, state, net=net_text)
    assert ck["iter"] == 2 and os.path.isabs(cfg.out_dir)
    state, _, _, _ = _snapshot(tmp_path, net_text, it=2, current_step=1)      # a state Caffe never writes
    with pytest.raises(CaffeImportError, match="current_step 1 at iteration 2, but the solver's stepvalue"):
        pi.resume_caffe_snapshot(solver, state, net=net_text)
    # conv1_1 named conv1_1_s1 in the net: Caffe's CopyTrainedLayersFrom goes by the net's names
    renamed = net_text.replace('"conv1_1"', '"conv1_1_s1"').replace('bottom: "conv1_1"', 'bottom: "conv1_1_s1"')
    state, weights, caffe_net, _ = _snapshot(tmp_path, renamed)
    cfg, ck, _ = pi.resume_caffe_snapshot(SOLVER, state, net=renamed)
    want = dict((n, a) for n, _, a in net_weights(caffe_net))["conv1_1_s1"][0]
    assert np.array_equal(ck["model"]["conv1_1.weight"].numpy(), want)
    with pytest.raises(CaffeImportError, match=r"names layers otherwise than attnscale's model \(conv1_1_s1 "
                       r"\(conv1_1\)\).*convert them first"):
        pi.train_config(SOLVER + f'weights: "{weights}"\n', net=renamed)
    # a checkpoint that cannot be written: nothing is, the config neither
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    base = TrainConfig(out_dir=str(blocked / "run"))
    base.save(str(tmp_path / "base.json"))
    solver_path = _write(tmp_path, "solver.prototxt", SOLVER + f'net: "{_write(tmp_path, "n.prototxt", net_text)}"\n')
    out = tmp_path / "c.json"
    (tmp_path / "s").mkdir()
    state, _, _, _ = _snapshot(tmp_path / "s", net_text)
    assert cli(["config", solver_path, "--base", str(tmp_path / "base.json"), "-o", str(out), "--snapshot", state]) == 2
    assert "cannot write the checkpoint" in capsys.readouterr().err and not out.exists()


def test_train_cli_names_errors_instead_of_tracing(tmp_path, capsys):
    from attnscale.train import main as train_main
    cfg = TrainConfig(dataset="synthetic", out_dir=str(tmp_path / "run"), max_iter=1, synthetic_train=2,
                      synthetic_val=1, workers=0, width=1 / 32, crop_size=25, synthetic_size=25)
    cfg.save(str(tmp_path / "c.json"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    assert train_main([str(tmp_path / "c.json"), "--no-progress"]) == 2
    assert "checkpoint.pt exists: continue that run with --resume" in capsys.readouterr().err
    assert train_main([str(tmp_path / "nothere.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_renamed_layers_take_a_converted_init_and_cli_outputs_make_their_folders(tmp_path, capsys):
    """The renamed-layer refusal points at a converted init.pt, which is then accepted; an unknown data set is
    an error, not a traceback; an output folder that does not exist yet is made; a link to nowhere is refused."""
    from prototxt_import.__main__ import main as cli
    renamed = train_net(scales=(1.0,), merge=None).replace('"conv1_1"', '"conv1_1_s1"').replace(
        'bottom: "conv1_1"', 'bottom: "conv1_1_s1"')
    cfg, _ = pi.train_config(SOLVER + 'weights: "init.pt"\n', net=renamed)
    assert cfg.init == "init.pt"
    bad = TrainConfig()
    bad.dataset = "voc2012"
    with pytest.raises(CaffeImportError, match="unknown data set 'voc2012'"):
        pi.train_config(SOLVER, net=renamed, base=bad)
    solver = _write(tmp_path, "s.prototxt", SOLVER + f'net: "{_write(tmp_path, "n.prototxt", renamed)}"\n')
    assert cli(["config", solver, "-o", str(tmp_path / "new" / "dir" / "c.json")]) == 0
    assert TrainConfig.load(str(tmp_path / "new" / "dir" / "c.json")).crop_size == 33
    os.symlink(tmp_path / "nowhere" / "run", tmp_path / "dangling")
    assert cli(["config", solver, "-o", str(tmp_path / "dangling" / "c.json")]) == 2
    assert "is a link to nothing" in capsys.readouterr().err
