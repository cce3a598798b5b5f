"""attnscale against numbers a real Caffe computed (tests/data/caffe_reference.h5).

The fixture holds a real Caffe's float64 forward and backward (PSPNet's build of DeepLab-v2's Caffe, CPU, through
``benchmarks/caffe_runner.cpp``; made by ``benchmarks/caffe_compare.py --write-fixture``) of four nets cut from
the reference prototxts: the E-Supv training net (attention, 3 scales, four losses) and the max / average / single
scale deploy nets with a loss on their merged scores, every channel count divided by 64 (the layer types, sizes
and wiring are the prototxts'), on two images with labels that ignore a corner: 65x65 (a DeepLab size, 8k+1),
DeepLab-LargeFOV 66x66 (where Caffe's pooling rounds its output size up).  For each: the prototxt,
the weights, and from Caffe the losses and, for every blob, blob diff and parameter diff, its shape, its largest
magnitude and 32 of its elements; for the training net also the change of every weight by four iterations of
Caffe's ``SGDSolver`` (``SOLVER`` in the script) on that batch.

Here the prototxt and weights go through the importer (``to_attnscale``), the model runs in float64 with its
compiled ops, and every loss, every blob Caffe keeps, every diff and every parameter gradient must equal
Caffe's to 1e-10 of the blob's largest magnitude (they agree to ~1e-14: the rounding of float64 sums).  So
pooling rounding, Interp sizes and corners, the softmax over scales, the Eltwise MAX and SUM (its float
coefficient), the loss normalisation and every backward are Caffe's own, not a re-reading of its source; and the
training loop's updates (rates, lr_mult / decay_mult, momentum, iter_size) are its solver's.  (The label maps
Caffe was given are ours, shrunk by ``caffe.shrink_label``: the training prototxt takes them as inputs, so the
fixture pins that rule rather than Caffe checking it.)
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

import prototxt_import as pi  # noqa: E402
from attnscale.model import caffe_diff  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "caffe_reference.h5")
TOL = 1e-10


def _compare_module():
    spec = importlib.util.spec_from_file_location("caffe_compare", os.path.join(ROOT, "benchmarks", "caffe_compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nets():
    with h5py.File(FIXTURE, "r") as f:
        return [k for k in f if k not in ("pixels", "labels")]


def _unpack(g, kind):
    names = json.loads(g.attrs[kind + "_names"])
    shapes = [tuple(int(d) for d in s if d >= 0) for s in g[kind + "_shape"][()]]
    return {n: (sh, float(m), v) for n, sh, m, v in zip(names, shapes, g[kind + "_max"][()], g[kind][()])}


def _check(kind, name, ours: torch.Tensor, want, sample_index) -> None:
    shape, max_abs, samples = want
    assert tuple(ours.shape) == shape, f"{kind} {name}: shape {tuple(ours.shape)}, Caffe's {shape}"
    flat = ours.detach().reshape(-1).numpy()
    idx = sample_index(flat.size)
    got = flat[idx]
    err = np.abs(got - samples[: idx.size]).max() / max(max_abs, 1e-300)
    assert err <= TOL, f"{kind} {name}: off by {err:.2e} of its largest magnitude ({got[:4]} vs {samples[:4]})"
    ours_max = float(np.abs(flat).max())
    assert abs(ours_max - max_abs) <= TOL * max_abs, f"{kind} {name}: largest magnitude {ours_max} vs {max_abs}"


def test_fixture_says_where_it_came_from():
    with h5py.File(FIXTURE, "r") as f:
        assert "Caffe" in f.attrs["made_by"] and f.attrs["date"]
        assert set(_nets()) == {"attention3_train_esupv", "max3", "avg3", "largefov"}


def _load(net, tmp_path):
    """The fixture's net through the importer, in float64 (weights written as Caffe's Net::ToHDF5 writes them),
    its input and labels, and Caffe's results (``fixture``)."""
    with h5py.File(FIXTURE, "r") as f:
        g = f[net]
        size = int(g.attrs["size"])
        x = torch.from_numpy(f[f"pixels/{size}"][()]).double() - float(f.attrs["pixel_offset"])
        labels = torch.from_numpy(f[f"labels/{size}"][()].astype(np.int64))
        names = json.loads(g.attrs["weight_names"])
        flat = g["weights"][()]
        fixture = {"prototxt": g.attrs["prototxt"], "weight_names": names,
                   "losses": dict(zip(json.loads(g.attrs["loss_names"]), g["losses"][()]))}
        for kind in ("blobs", "diffs", "params") + (("updates",) if "updates" in g else ()):
            fixture[kind] = _unpack(g, kind)
        if "solver" in g.attrs:
            fixture["solver"], fixture["solver_iters"] = g.attrs["solver"], int(g.attrs["solver_iters"])
    proto = tmp_path / "net.prototxt"
    proto.write_text(fixture["prototxt"])
    with h5py.File(tmp_path / "w.caffemodel.h5", "w") as w:
        at = 0
        for key, shape in names.items():
            n = int(np.prod(shape))
            w.create_dataset(f"data/{key}", data=flat[at:at + n].reshape(shape))
            at += n
    assert at == flat.size
    model, report = pi.to_attnscale(str(proto), str(tmp_path / "w.caffemodel.h5"), use_reference_ops=False,
                                    phase="TRAIN")
    assert not report.fresh and not report.unmapped, str(report)
    return model.double().train(), x, labels, fixture, proto


@pytest.mark.parametrize("net", ["attention3_train_esupv", "max3", "avg3", "largefov"])
def test_matches_real_caffe(tmp_path, net):
    cc = _compare_module()
    model, x, labels, fx, _ = _load(net, tmp_path)
    losses, blobs, diffs, params, names = fx["losses"], fx["blobs"], fx["diffs"], fx["params"], fx["weight_names"]
    with model.caffe_blobs() as rec:
        out = model(x)
        for v in rec.values():
            if v.requires_grad:
                v.retain_grad()
        total, parts = model.loss(out, labels)
        total.backward()
    assert set(parts) == set(losses)
    for k, v in losses.items():
        assert abs(float(parts[k]) - v) <= TOL * abs(v), f"{k}: {float(parts[k])!r}, Caffe {v!r}"
    # every blob the model records is one Caffe keeps, and the other way round but for the ones it does not
    # record (the input, the labels, Slice's views, SpatialProduct's products, the losses)
    assert set(rec) == set(blobs)
    assert set(diffs) <= set(blobs)
    for b in blobs:
        _check("blob", b, rec[b], blobs[b], cc.sample_index)
    checked = 0
    for b in diffs:
        if rec[b].grad is None:
            # no gradient reaches the scaled inputs and, in max / avg nets, fc7's Interp (a dead end there): Caffe's
            # diff is zero.  Otherwise only the merge's inputs and weights as Caffe holds them, which the fused
            # merge op never makes in the graph (recorded for the comparison only): their gradients reach the
            # scores and att_conv2, checked here
            assert diffs[b][1] == 0.0 or b == "attention" or (
                b.startswith(model.classifier_name) and b.endswith("_interp")), f"diff {b}: ours is not computed"
            continue
        _check("diff", b, caffe_diff(b, rec[b]), diffs[b], cc.sample_index)
        checked += 1
    assert checked >= len(blobs) - 6   # at most: two scaled inputs, two fc7 and two score Interps
    assert len(params) == len(names)
    for key in params:
        layer, i = key.split("/")
        conv = getattr(model, layer)
        _check("parameter diff", key, (conv.weight, conv.bias)[int(i)].grad, params[key], cc.sample_index)


def test_solver_matches_real_caffe(tmp_path):
    """Caffe's ``SGDSolver`` (the fixture's ``SOLVER``: step policy stepping within the run, momentum 0.9, weight
    decay, ``iter_size`` 2, the training prototxt's lr_mult / decay_mult) against the training loop's updates
    (``attnscale.train``: ``caffe_rate``, ``set_rate``, ``apply_update``), from the same weights on the same
    batch: every weight's change by the updates equals Caffe's to 1e-10 of its largest magnitude.  (Found
    this way: Caffe's momentum is a float field, float32(0.9) in a ``Net<double>`` too.)"""
    cc = _compare_module()
    model, x, labels, fx, proto = _load("attention3_train_esupv", tmp_path)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{proto}"\n' + fx["solver"])
    cfg, _ = pi.train_config(str(solver))
    assert (cfg.lr_policy, cfg.iter_size, cfg.stepsize) == ("step", 2, 2) and fx["solver_iters"] > cfg.stepsize
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cc.sgd_updates(model, cfg, x, labels, fx["solver_iters"])
    updates = fx["updates"]
    assert len(updates) == len(before)
    for key, want in updates.items():
        layer, i = key.split("/")
        p = (getattr(model, layer).weight, getattr(model, layer).bias)[int(i)]
        _check("update", key, p.detach() - before[f"{layer}.{('weight', 'bias')[int(i)]}"], want, cc.sample_index)
