"""attnscale against a real Caffe, blob by blob and gradient by gradient, on the reference prototxts.

    python benchmarks/caffe_compare.py --runner CAFFE_RUNNER [--nets attention3 ...] [--size 513] [--json F]

``CAFFE_RUNNER`` is ``benchmarks/caffe_runner.cpp`` compiled against a Caffe build that has DeepLab-v2's
``Interp`` and ``SpatialProduct`` layers (the one line that compiles it is in that file).  For each net this
script builds attnscale's model from the prototxt (``prototxt_import.to_attnscale``, our compiled ops), gives it
random weights, writes them as a ``.caffemodel.h5`` (``Net::ToHDF5``'s layout: the layers that own their
parameters), writes the input (and for the training net the three label maps, shrunk by
``attnscale.caffe.shrink_label``), and lets Caffe run the same net on them.  Then it compares every blob our
model records (``AttentionToScale.caffe_blobs``) with Caffe's blob of that name; for the training net also the
four losses, every blob's diff (for a blob a ReLU rewrote in place, Caffe's diff is the gradient of the value
before the ReLU: ours times ``blob > 0``) and every parameter's diff (a shared parameter's owner holds the sum
over the scales).  Per blob it reports ``max |ours - caffe| / max |caffe|``, the relative L2 error and the share
of elements off by more than 1e-3 of the blob's largest magnitude (:func:`rel_err`); a blob shape that differs is
an error of its own (pooling rounding, Interp sizes).  ``--double`` runs both in float64 (Caffe's
``Net<double>``), where no ReLU mask or MAX pooling choice flips on rounding.  ``--time N`` also times N forwards
of each deploy net in Caffe and in attnscale on the same input (``torch.set_num_threads(--threads)``; Caffe's
BLAS threads come from its environment, e.g. ``OPENBLAS_NUM_THREADS``).  ``--write-fixture`` writes the CI's
record of Caffe's results instead (:func:`write_fixture`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prototxt_import as pi  # noqa: E402
from attnscale import caffe  # noqa: E402
from attnscale.model import blob_suffix, caffe_diff  # noqa: E402

NETS = {  # name: (file, phase)
    "largefov": ("deeplab_largefov_deploy.prototxt", "TEST"),
    "largefov_v1": ("deeplab_largefov_deploy_v1.prototxt", "TEST"),
    "attention2": ("attention2_deploy.prototxt", "TEST"),
    "attention3": ("attention3_deploy.prototxt", "TEST"),
    "max3": ("max3_deploy.prototxt", "TEST"),
    "avg3": ("avg3_deploy.prototxt", "TEST"),
    "attention3_train_esupv": ("attention3_train_esupv.prototxt", "TRAIN"),
}
MERGED = {"largefov": "fc8_voc12", "largefov_v1": "fc8_voc12", "attention2": "fc8_attention",
          "attention3": "fc8_attention", "max3": "fc8_max", "avg3": "fc8_avg"}


def conv_layers(model):
    return [(n, m) for n, m in model.named_children() if isinstance(m, torch.nn.Conv2d)]


def randomize(model, seed: int) -> None:
    """He-scaled normal weights and small biases, so that activations keep their size through 16 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, conv in conv_layers(model):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)


def moderate_scores(model, x: torch.Tensor, target: float = 4.0) -> None:
    """Scale the classifier (and the attention logits' layer) so that their outputs on x have a standard
    deviation of ``target`` (1 for the attention logits), as a trained net's do: He-scaled random weights
    through 16 layers give scores in the hundreds, a saturated softmax whose gradient hangs on near-ties."""
    was = model.training
    model.eval()
    with torch.no_grad(), model.caffe_blobs() as rec:
        model(x)
    model.train(was)
    for name, want in ((model.classifier_name, target), ("att_conv2", 1.0)):
        if name in rec:
            std = float(rec[name].std())
            conv = getattr(model, name)
            with torch.no_grad():
                conv.weight.mul_(want / std)
                conv.bias.mul_(want / std)


def write_weights(model, path: str) -> None:
    """``data/<layer>/<i>`` as ``Net::ToHDF5`` writes them, for the layers that own their parameters (the scale
    copies ``conv1_1_res075`` share them by name)."""
    with h5py.File(path, "w") as f:
        for name, conv in conv_layers(model):
            g = f.require_group("data").create_group(name)
            g.create_dataset("0", data=conv.weight.detach().numpy())
            if conv.bias is not None:
                g.create_dataset("1", data=conv.bias.detach().numpy())


def declared_inputs(text: str, inputs: dict) -> str:
    """The prototxt with every ``input_shape`` set to the shape of its input: Caffe's ``SpatialProduct`` (like
    other DeepLab layers) takes its sizes once, at set-up, from the declared shapes, so a net must declare the
    shapes it runs on (as a Caffe user would edit them)."""
    names = re.findall(r'^input:\s*"([^"]+)"', text, flags=re.M)
    shapes = iter(re.finditer(r"input_shape\s*\{[^}]*\}", text))
    out, last = [], 0
    for name, m in zip(names, shapes):
        dims = " ".join(f"dim: {d}" for d in inputs[name].shape)
        out += [text[last:m.start()], "input_shape { " + dims + " }"]
        last = m.end()
    return "".join(out) + text[last:]


def run_caffe(runner: str, proto: str, weights: str, inputs: dict, prefix: str, phase: str,
              reps: int = 0, double: bool = False) -> str:
    with h5py.File(prefix + "_in.h5", "w") as f:
        for k, v in inputs.items():
            f.create_dataset(k, data=np.ascontiguousarray(v))
    with open(proto) as f:
        text = declared_inputs(f.read(), inputs)
    proto = prefix + ".prototxt"
    with open(proto, "w") as f:
        f.write(text)
    return _run([runner, proto, weights, prefix + "_in.h5", prefix, phase, str(reps), "double" if double else "float"])


def _run(cmd: list) -> str:
    """The runner's output; its failure (Caffe's CHECK message) raised."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def caffe_params(model, path: str, group: str) -> dict:
    """``(layer, i)``: (our parameter, Caffe's array) for every parameter in ``group`` (``data`` or ``diff``) of a
    ``Net::ToHDF5`` file: the layers that own their parameters, ``i`` 0 the weight, 1 the bias."""
    out = {}
    with h5py.File(path, "r") as f:
        for lname, conv in conv_layers(model):
            for i, p in enumerate([conv.weight, conv.bias]):
                key = f"{group}/{lname}/{i}"
                if p is not None and key in f:
                    out[(lname, i)] = (p, f[key][()])
    return out


def rel_err(ours: np.ndarray, ref: np.ndarray) -> dict:
    """``max``: max |ours - caffe| / max |caffe|; ``l2``: ||ours - caffe|| / ||caffe||; ``far``: the share of
    elements off by more than 1e-3 of max |caffe| (a ReLU mask or a MAX pooling choice decided the other way
    where two float32 sums differ in their last bits moves a whole gradient element)."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    d = np.abs(a - b)
    scale, norm = (float(np.abs(b).max()), float(np.linalg.norm(b))) if b.size else (0.0, 0.0)
    return {"max": float(d.max()) / scale if scale > 0 else float(d.max(initial=0.0)),
            "l2": float(np.linalg.norm(d)) / norm if norm > 0 else float(np.linalg.norm(d)),
            "far": float((d > 1e-3 * scale).mean()) if b.size else 0.0}


def label_inputs(model, text: str, labels: torch.Tensor, dtype) -> dict:
    """The label blobs the prototxt declares (``label``, ``label_res075``, ``label_res05``), each ``labels``
    shrunk to the size of the scores it supervises (:func:`attnscale.caffe.shrink_label`)."""
    hw = tuple(labels.shape[-2:])
    sizes = {"label": model.output_size(hw)}
    for s in model.scales[1:]:
        sizes["label" + blob_suffix(s)] = model.output_size(caffe.interp_output_shape(hw, caffe.scale_interp_params(s, hw)))
    declared = re.findall(r'^input:\s*"([^"]+)"', text, flags=re.M)
    return {k: caffe.shrink_label(labels, v)[:, None].to(dtype).numpy() for k, v in sizes.items() if k in declared}


def compare(name: str, runner: str, proto: str, phase: str, size: int, batch: int, seed: int, work: str,
            reference_ops: bool = False, double: bool = False) -> dict:
    """Our model and Caffe on one prototxt (see the module's docstring); with ``double`` both in float64.  The
    result holds, besides the errors, what :func:`write_fixture` keeps (``_internal``)."""
    model, _ = pi.to_attnscale(proto, None, use_reference_ops=reference_ops, phase=phase)
    randomize(model, seed)
    train = phase == "TRAIN"
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    x = pixels.float() - PIXEL_OFFSET   # a mean-subtracted image's range, in values every float type holds
    if double:
        model, x = model.double(), x.double()
    moderate_scores(model, x)
    with torch.no_grad():   # values a float32 holds exactly, so that a float32 copy of them is the same weights
        for _, conv in conv_layers(model):
            for t in (conv.weight, conv.bias):
                t.copy_(t.float())
    weights = os.path.join(work, name + ".caffemodel.h5")
    write_weights(model, weights)
    inputs = {"data": x.numpy()}
    labels = None
    if train:
        model.train()
        labels = torch.randint(0, model.num_classes, (batch, size, size), generator=g)
        labels[:, : size // 5, : size // 3] = caffe.IGNORE_LABEL
        with open(proto) as f:
            inputs.update(label_inputs(model, f.read(), labels, x.dtype))
    prefix = os.path.join(work, name)
    stdout = run_caffe(runner, proto, weights, inputs, prefix, phase, double=double)
    res = {"net": name, "phase": phase, "input": [batch, 3, size, size], "blobs": {}, "shape_mismatch": []}
    with torch.set_grad_enabled(train), model.caffe_blobs() as rec:
        out = model(x)
        if train:
            for v in rec.values():
                if v.requires_grad:
                    v.retain_grad()
            total, parts = model.loss(out, labels)
            total.backward()
    caffe_out = {}
    with h5py.File(prefix + "_blobs.h5", "r") as cb:
        for k in cb:
            caffe_out[k] = cb[k][()]
    for b, v in rec.items():
        if b not in caffe_out:
            res["blobs"][b] = {"missing_in_caffe": True}
            continue
        ref = caffe_out[b]
        ours = v.detach().numpy()
        if ours.shape != ref.shape:
            res["shape_mismatch"].append([b, list(ours.shape), list(ref.shape)])
            continue
        row = {"data": rel_err(ours, ref)}
        if train and v.grad is not None and b + "@diff" in caffe_out:
            row["diff"] = rel_err(caffe_diff(b, v).numpy(), caffe_out[b + "@diff"])
        res["blobs"][b] = row
    res["not_recorded"] = sorted(k for k in caffe_out if "@" not in k and k not in rec)
    param_diffs = {}
    if train:
        res["loss"] = {k: [float(v), float(caffe_out[k].reshape(-1)[0])] for k, v in parts.items() if k in caffe_out}
        pairs = caffe_params(model, prefix + "_params.h5", "diff")
        param_diffs = {k: d for k, (_, d) in pairs.items()}
        res["params"] = {f"{ln}[{i}]": rel_err(p.grad.numpy(), d) for (ln, i), (p, d) in pairs.items()}
    res["caffe_stdout"] = stdout.strip()
    res["_internal"] = dict(model=model, pixels=pixels, x=x, labels=labels, caffe=caffe_out, params=param_diffs)
    return res


# Caffe's SGD solver as the solver test runs it: a step policy that steps within the run, momentum, weight decay
# (decay_mult 0 on the biases) and two passes per update; the training prototxt's lr_mults (classifier 1/2 ...)
SOLVER = """base_lr: 0.001
lr_policy: "step"
gamma: 0.1
stepsize: 2
momentum: 0.9
weight_decay: 0.0005
iter_size: 2
max_iter: 1000
display: 0
snapshot: 0
solver_mode: CPU
"""
SOLVER_ITERS = 4


def sgd_updates(model, cfg, x: torch.Tensor, labels: torch.Tensor, iters: int) -> None:
    """``iters`` updates of the training loop (:mod:`attnscale.train`: the rate of the iteration,
    ``iter_size`` passes, :func:`attnscale.train.apply_update`) on one fixed batch, as ``caffe_runner --solve``
    runs Caffe's solver on fixed input blobs."""
    from attnscale.train import apply_update, caffe_rate, freeze_zero_rate, make_optimizer, set_rate
    opt = make_optimizer(model, cfg)
    freeze_zero_rate(opt)
    model.train()
    for it in range(iters):
        set_rate(opt, caffe_rate(cfg, it))
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.iter_size):
            loss, _ = model.loss(model(x), labels)
            loss.backward()
        apply_update(opt, cfg)


def compare_solver(runner: str, prefix: str, x: torch.Tensor, labels: torch.Tensor, reference_ops: bool = False,
                   double: bool = False) -> dict:
    """After :func:`compare` on a training net (its files under ``prefix``): ``SOLVER_ITERS`` updates of Caffe's
    solver (``SOLVER``) and of ours from the same weights on the same batch; the weights after them compared
    (:func:`rel_err`).  Returns the errors and Caffe's weights (``_caffe``)."""
    net = prefix + ".prototxt"   # the net as run_caffe wrote it, with its inputs' shapes
    solver = prefix + "_solver.prototxt"
    with open(solver, "w") as f:
        f.write(f'net: "{net}"\n' + SOLVER)
    weights = prefix + ".caffemodel.h5"
    _run([runner, "--solve", solver, weights, prefix + "_in.h5", prefix + "_solve", str(SOLVER_ITERS),
          "double" if double else "float"])
    model, _ = pi.to_attnscale(net, weights, use_reference_ops=reference_ops, phase="TRAIN")
    cfg, _ = pi.train_config(solver)
    sgd_updates(model.to(x.dtype), cfg, x, labels, SOLVER_ITERS)
    pairs = caffe_params(model, prefix + "_solve_params.h5", "data")
    return {"iters": SOLVER_ITERS,
            "weights": {f"{ln}[{i}]": rel_err(p.detach().numpy(), w) for (ln, i), (p, w) in pairs.items()},
            "_caffe": {f"{ln}/{i}": w for (ln, i), (_, w) in pairs.items()}}


def for_gradients(name: str, text: str, width: float) -> str:
    """A reference net as the CI fixture runs it: every trunk and attention channel count times ``width``
    (rounded as the model rounds it); a deploy net without its Dropout layers (random in TRAIN) and with a
    ``label`` input and a ``SoftmaxWithLoss`` on its merged scores, so that Caffe runs its backward."""
    def narrow(m):
        return f"num_output: {max(1, int(round(int(m.group(1)) * width)))}"
    text = re.sub(r"num_output:\s*(64|128|256|512|1024)\b", narrow, text)
    if NETS[name][1] == "TEST":
        text = re.sub(r'^layer \{ name: "[^"]*" type: "Dropout".*\n', "", text, flags=re.M)
        text = re.sub(r"(input_shape \{[^}]*\}\n)", r'\1input: "label"\ninput_shape { dim: 1 dim: 1 dim: 1 dim: 1 }\n',
                      text, count=1)
        merged = MERGED[name]
        text += (f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{merged}" bottom: "label" top: "loss" '
                 "loss_param { ignore_label: 255 } }\n")
    return text


# the fixture's nets and input sizes: the multi-scale nets at a DeepLab size (8k+1: every pooling and Interp size
# divides evenly; at other sizes the prototxts' zoom / shrink factors bring the coarser scales back a row short,
# and Caffe's Eltwise refuses them), DeepLab-LargeFOV at an even size, where Caffe's pooling rounds its output
# size up (a floor would lose a row)
FIXTURE_NETS = {"attention3_train_esupv": 65, "max3": 65, "avg3": 65, "largefov": 66}
FIXTURE_SAMPLES = 32
PIXEL_OFFSET = 120.0   # the input: random 8-bit pixels minus this   # elements kept of each blob, blob diff and parameter diff (np.linspace over the flat array)


def sample_index(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, FIXTURE_SAMPLES).round().astype(np.int64))


def _samples(group, kind: str, arrays: dict) -> None:
    """``arrays`` (name: array) as three datasets: ``<kind>`` (names x FIXTURE_SAMPLES samples, NaN-padded),
    ``<kind>_max`` (each largest magnitude) and ``<kind>_shape`` (each shape, padded with -1); names in an
    attribute."""
    names = list(arrays)
    vals = np.full((len(names), FIXTURE_SAMPLES), np.nan)
    shapes = np.full((len(names), 4), -1, np.int64)
    for i, a in enumerate(arrays.values()):
        idx = sample_index(a.size)
        vals[i, : idx.size] = a.reshape(-1)[idx]
        shapes[i, : a.ndim] = a.shape
    group.create_dataset(kind, data=vals)
    group.create_dataset(kind + "_max", data=np.array([np.abs(a).max() for a in arrays.values()]))
    group.create_dataset(kind + "_shape", data=shapes)
    group.attrs[kind + "_names"] = json.dumps(names)


def write_fixture(path: str, runner: str, proto_dir: str, width: float, batch: int, seed: int, work: str) -> None:
    """Caffe's float64 results for small-width versions of the reference nets (:func:`for_gradients`), for
    ``tests/test_caffe_reference.py``: the prototxt, the weights (float32 values, one flat array), the input and
    labels (``pixels/<size>``, the input plus ``PIXEL_OFFSET``, and ``labels/<size>``: the same for every net of
    a size), the losses, and of every blob, blob diff and parameter diff its shape,
    largest magnitude and the ``sample_index`` elements; for the training net also ``SOLVER`` and the change
    of every weight by ``SOLVER_ITERS`` updates of Caffe's solver (``updates``)."""
    with h5py.File(path, "w") as f:
        f.attrs["made_by"] = ("benchmarks/caffe_compare.py --write-fixture, with benchmarks/caffe_runner.cpp built "
                              "against a CPU-only build of PSPNet's Caffe (github.com/hszhao/PSPNet at 798bdc9: "
                              "DeepLab-v2's Caffe with its Interp and SpatialProduct layers), Net<double>")
        f.attrs["date"] = time.strftime("%Y-%m-%d")
        f.attrs["pixel_offset"] = PIXEL_OFFSET
        for name, size in FIXTURE_NETS.items():
            with open(os.path.join(proto_dir, NETS[name][0])) as fh:
                text = for_gradients(name, fh.read(), width)
            proto = os.path.join(work, name + "_fixture.prototxt")
            with open(proto, "w") as fh:
                fh.write(text)
            r = compare(name + "_fixture", runner, proto, "TRAIN", size, batch, seed, work, double=True)
            it = r.pop("_internal")
            bad = [k for k, v in r["blobs"].items() if v.get("missing_in_caffe")] + r["shape_mismatch"]
            if bad:
                raise RuntimeError(f"{name}: our blobs and Caffe's differ in name or shape: {bad}")
            if f"pixels/{size}" not in f:
                f.create_dataset(f"pixels/{size}", data=it["pixels"].numpy())
                f.create_dataset(f"labels/{size}", data=it["labels"].numpy().astype(np.uint8))
            elif not (np.array_equal(f[f"pixels/{size}"][()], it["pixels"].numpy())
                      and np.array_equal(f[f"labels/{size}"][()], it["labels"].numpy())):
                raise RuntimeError("every net of the fixture takes the same input of its size")
            g = f.create_group(name)
            g.attrs["prototxt"] = text
            g.attrs["source"] = NETS[name][0]
            g.attrs["size"] = size
            weights = {f"{ln}/{i}": [getattr(it["model"], ln).weight, getattr(it["model"], ln).bias][i]
                       for (ln, i) in it["params"]}
            g.attrs["weight_names"] = json.dumps({k: list(v.shape) for k, v in weights.items()})
            g.create_dataset("weights", data=np.concatenate([v.detach().float().numpy().reshape(-1)
                                                             for v in weights.values()]))
            g.create_dataset("losses", data=np.array([v for _, v in r["loss"].values()]))
            g.attrs["loss_names"] = json.dumps(list(r["loss"]))
            _samples(g, "blobs", {b: it["caffe"][b] for b in r["blobs"]})
            _samples(g, "diffs", {b: it["caffe"][b + "@diff"] for b in r["blobs"] if b + "@diff" in it["caffe"]})
            _samples(g, "params", {f"{ln}/{i}": d for (ln, i), d in it["params"].items()})
            if NETS[name][1] == "TRAIN":   # and what Caffe's solver made of the weights: the change by its updates
                sr = compare_solver(runner, os.path.join(work, name + "_fixture"), it["x"], it["labels"], double=True)
                g.attrs["solver"] = SOLVER
                g.attrs["solver_iters"] = sr["iters"]
                _samples(g, "updates", {k: v - weights[k].detach().numpy() for k, v in sr["_caffe"].items()})
                print(f"fixture {name}: after {sr['iters']} solver updates "
                      + summary({k: {'w': v} for k, v in sr["weights"].items()}, "w"), flush=True)
            print(f"fixture {name}: {len(r['blobs'])} blobs, {len(it['params'])} parameter diffs; "
                  + summary(r["blobs"], "data") + "; diffs " + summary(r["blobs"], "diff"), flush=True)


def time_forward(name: str, runner: str, proto_dir: str, size: int, reps: int, threads: int, work: str,
                 seed: int) -> dict:
    fname, phase = NETS[name]
    proto = os.path.join(proto_dir, fname)
    model, _ = pi.to_attnscale(proto, None, phase=phase)
    randomize(model, seed)
    weights = os.path.join(work, name + "_t.caffemodel.h5")
    write_weights(model, weights)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255.0 - 120.0
    out = run_caffe(runner, proto, weights, {"data": x.numpy()}, os.path.join(work, name + "_t"), phase, reps)
    caffe_ms = [float(line.split()[1]) for line in out.splitlines() if line.startswith("forward_ms")]
    torch.set_num_threads(threads)
    ours = []
    with torch.no_grad():
        model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            ours.append(1e3 * (time.perf_counter() - t))
    return {"net": name, "size": size, "caffe_ms": caffe_ms, "attnscale_ms": ours,
            "ratio_of_medians": float(np.median(caffe_ms) / np.median(ours))}


def summary(rows: dict, key: str) -> str:
    """The worst blob by each measure of :func:`rel_err`."""
    have = {k: v[key] for k, v in rows.items() if key in v}
    if not have:
        return f"no {key}"
    return ", ".join(f"{m} {max(have.values(), key=lambda e: e[m])[m]:.1e} ({max(have, key=lambda k: have[k][m])})"
                     for m in ("max", "l2", "far"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runner", required=True, help="the compiled benchmarks/caffe_runner.cpp")
    ap.add_argument("--prototxt-dir", default=os.path.join(ROOT, "..", "shared", "prototxt"))
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--size", type=int, default=0, help="input size (default: 513 deploy, 321 training)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-ops", action="store_true", help="the pure-PyTorch references, not our ops")
    ap.add_argument("--double", action="store_true", help="both in float64 (Caffe's Net<double>): no ReLU mask or "
                    "MAX pooling choice flips on float32 rounding, so the gradients compare to rounding")
    ap.add_argument("--solver", action="store_true", help="for the training net also SOLVER_ITERS updates of "
                    "Caffe's SGD solver and of ours, and the weights after them compared")
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time N forwards of each deploy net")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--write-fixture", default="", metavar="H5", help="instead: write Caffe's float64 results for "
                    "FIXTURE_NETS at --fixture-width, batch 2 (tests/data/caffe_reference.h5)")
    ap.add_argument("--fixture-width", type=float, default=1 / 64)
    a = ap.parse_args(argv)
    if not (os.path.isfile(a.runner) and os.access(a.runner, os.X_OK)):
        ap.error(f"--runner {a.runner}: not an executable file (compile benchmarks/caffe_runner.cpp against a Caffe)")
    torch.set_num_threads(a.threads)
    results = {"compare": [], "time": []}
    with tempfile.TemporaryDirectory() as work:
        if a.write_fixture:
            write_fixture(a.write_fixture, a.runner, a.prototxt_dir, a.fixture_width, 2, a.seed, work)
            return 0
        for name in a.nets:
            size = a.size or (321 if NETS[name][1] == "TRAIN" else 513)
            t = time.time()
            r = compare(name, a.runner, os.path.join(a.prototxt_dir, NETS[name][0]), NETS[name][1], size, a.batch,
                        a.seed, work, a.reference_ops, a.double)
            line = f"{name} ({r['phase']}, {size}x{size}): {len(r['blobs'])} blobs; " + summary(r["blobs"], "data")
            if "loss" in r:
                line += (f"; blob diffs: {summary(r['blobs'], 'diff')}; {len(r['params'])} parameter diffs: "
                         f"{summary({k: {'p': v} for k, v in r['params'].items()}, 'p')}; losses (ours, caffe): "
                         + ", ".join(f"{k} {o:.6f} {c:.6f}" for k, (o, c) in r["loss"].items()))
            if r["shape_mismatch"]:
                line += f"; SHAPES DIFFER: {r['shape_mismatch']}"
            print(line + f" [{time.time() - t:.0f} s]", flush=True)
            internal = r.pop("_internal")
            if a.solver and NETS[name][1] == "TRAIN":
                sr = compare_solver(a.runner, os.path.join(work, name), internal["x"], internal["labels"],
                                    a.reference_ops, a.double)
                sr.pop("_caffe")
                r["solver"] = sr
                print(f"  after {sr['iters']} solver updates: {len(sr['weights'])} parameters; "
                      + summary({k: {'w': v} for k, v in sr["weights"].items()}, "w"), flush=True)
            results["compare"].append(r)
            if a.time and NETS[name][1] == "TEST":
                tr = time_forward(name, a.runner, a.prototxt_dir, size, a.time, a.threads, work, a.seed)
                print(f"  forward {size}x{size}: caffe {np.median(tr['caffe_ms']):.0f} ms, attnscale "
                      f"{np.median(tr['attnscale_ms']):.0f} ms ({tr['ratio_of_medians']:.2f}x)", flush=True)
                results["time"].append(tr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
