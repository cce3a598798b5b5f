"""Map a DeepLab-LargeFOV or attention-to-scale Caffe net (+ weights) onto
:class:`attnscale.AttentionToScale` (``to_attnscale``).

What is read from the prototxt (names as in ``/work/shared/prototxt``):

- scales: ``Interp`` layers on the image input; ``zoom_factor / shrink_factor`` is the scale
  (shrink 4 + zoom 3 -> 0.75, shrink 2 -> 0.5); scale 1 is the trunk on the image itself;
- merge: an ``Eltwise`` whose inputs come from ``SpatialProduct`` layers weighted by a
  ``Softmax`` -> ``"attention"``; ``Eltwise MAX`` -> ``"max"``; ``Eltwise SUM`` with ``coeff``
  1/S -> ``"avg"``; one scale -> ``None``;
- classes / classifier name: the ``Convolution`` on the scale-1 ``fc7`` (``fc8_voc12``);
- width: ``conv1_1``'s ``num_output`` / 64 (every other layer is checked against it);
- dropout: ``drop6``'s ratio (0 when the net has no Dropout, as the training prototxt);
- extra supervision: a loss on a per-scale classifier output (training nets); deploy nets say
  nothing, so the default (True, the paper's E-Supv) is kept unless given.

Weights: every model layer takes the blobs of the Caffe layer of the same name (scale copies
``<name>_res075`` ... hold equal shared blobs and are used when the plain name is absent).  A
classifier whose shape does not fit (e.g. ImageNet's 1000-way ``fc8``) and an absent attention head
stay freshly initialised; a trunk layer that does not fit is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import CaffeImportError
from .net import layer_included
from .readers import WeightFile, net_inputs, read_net, read_weights, upgraded_layers


@dataclass
class ConversionReport:
    """What :func:`to_attnscale` found and did."""
    prototxt: str
    weights: str | None
    config: dict = field(default_factory=dict)
    #: (caffe blob "layer[i]", model parameter, shape)
    mapped: list[tuple[str, str, tuple]] = field(default_factory=list)
    #: (caffe blob or layer, reason) for everything in the weights file not used
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    #: model parameters left at their fresh initialisation, with the reason
    fresh: list[tuple[str, str]] = field(default_factory=list)
    #: anything else worth knowing (defaults taken where the prototxt says nothing)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"to_attnscale: {self.prototxt}" + (f" + {self.weights}" if self.weights else " (no weights)"),
                 "model: " + ", ".join(f"{k}={v!r}" for k, v in self.config.items())]
        lines.append(f"mapped ({len(self.mapped)}):")
        lines += [f"  {src:<32} -> {dst:<24} {tuple(shape)}" for src, dst, shape in self.mapped]
        lines.append(f"unmapped ({len(self.unmapped)}):")
        lines += [f"  {src:<32}    {why}" for src, why in self.unmapped]
        lines.append(f"freshly initialised ({len(self.fresh)}):")
        lines += [f"  {dst:<32}    {why}" for dst, why in self.fresh]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _scale_of_interp(lp, in_hw, source) -> float:
    ip = lp.interp_param
    if ip.HasField("height") or ip.HasField("width"):
        if in_hw is None or in_hw[0] < 2:
            raise CaffeImportError(f"{source}: layer {lp.name!r}: an Interp with explicit height/width "
                                   "needs the input shape to give a scale")
        return (ip.height - 1) / (in_hw[0] - 1)
    zoom = ip.zoom_factor if ip.HasField("zoom_factor") else 1
    shrink = ip.shrink_factor if ip.HasField("shrink_factor") else 1
    if zoom < 1 or shrink < 1:
        raise CaffeImportError(f"{source}: layer {lp.name!r}: zoom/shrink factors must be >= 1")
    return zoom / shrink


def _fits(blob, shape) -> bool:
    src = tuple(blob.data.shape)
    shape = tuple(shape)
    if blob.legacy:
        return len(shape) <= 4 and (1,) * (4 - len(shape)) + shape == src
    return src == shape


def analyse(net_param, source: str = "<net>") -> dict:
    """Detect the ``AttentionToScale`` configuration of a Caffe net (see the module docstring)."""
    from attnscale.model import FC6, FC7_OUT, TRUNK, _ch

    lps = [lp for lp in upgraded_layers(net_param, source) if layer_included(lp, "TEST")]
    train_lps = [lp for lp in upgraded_layers(net_param, source) if layer_included(lp, "TRAIN")]
    by_name = {lp.name: lp for lp in lps}
    producers = {}
    for lp in lps:
        for t in lp.top:
            producers.setdefault(t, lp)
    inputs = net_inputs(net_param, source)
    data = inputs.names[0] if inputs.names else next(
        (lp.top[0] for lp in lps if lp.type in ("Input", "Data", "ImageSegData", "ImageData", "MemoryData")), None)
    if data is None:
        raise CaffeImportError(f"{source}: no image input found")
    in_shape = inputs.shapes[0] if inputs.names else None
    in_hw = tuple(in_shape[-2:]) if in_shape else None

    for needed in ("conv1_1", "fc6", "fc7"):
        if needed not in by_name or by_name[needed].type != "Convolution":
            raise CaffeImportError(f"{source}: not a DeepLab-LargeFOV net: no Convolution layer {needed!r}")
    if list(by_name["conv1_1"].bottom) != [data]:
        raise CaffeImportError(f"{source}: layer 'conv1_1' must read the image input {data!r}")
    classifiers = [lp for lp in lps if lp.type == "Convolution" and list(lp.bottom) == ["fc7"]]
    if len(classifiers) != 1:
        raise CaffeImportError(f"{source}: expected exactly one Convolution on 'fc7' (the classifier), "
                               f"found {[lp.name for lp in classifiers]}")
    clf = classifiers[0]
    num_classes = int(clf.convolution_param.num_output)

    width = by_name["conv1_1"].convolution_param.num_output / 64.0
    expected = {spec[1]: spec[2] for spec in TRUNK if spec[0] == "conv"}
    expected.update(fc6=FC6["out"], fc7=FC7_OUT)
    for name, full in expected.items():
        lp = by_name.get(name)
        if lp is None or lp.type != "Convolution":
            raise CaffeImportError(f"{source}: not a DeepLab-LargeFOV net: no Convolution layer {name!r}")
        if lp.convolution_param.num_output != _ch(full, width):
            raise CaffeImportError(f"{source}: layer {name!r} has num_output "
                                   f"{lp.convolution_param.num_output}, but width {width:g} (from conv1_1) "
                                   f"gives {_ch(full, width)}")

    scales = [1.0]
    for lp in lps:
        if lp.type == "Interp" and list(lp.bottom) == [data]:
            s = _scale_of_interp(lp, in_hw, source)
            if not 0 < s < 1:
                raise CaffeImportError(f"{source}: layer {lp.name!r}: input scale {s:g} is not in (0, 1)")
            scales.append(round(s, 6))

    types = {lp.type for lp in lps}
    merge = None
    if len(scales) > 1:
        if "SpatialProduct" in types and "Softmax" in types:
            merge = "attention"
        else:
            elt = [lp for lp in lps if lp.type == "Eltwise"]
            if not elt:
                raise CaffeImportError(f"{source}: {len(scales)} scales but no merge layer "
                                       "(Eltwise / SpatialProduct) found")
            op = elt[-1].eltwise_param.operation
            if op == 2:
                merge = "max"
            elif op == 1 and len(elt[-1].eltwise_param.coeff) and all(
                    abs(c - 1.0 / len(scales)) < 1e-6 for c in elt[-1].eltwise_param.coeff):
                merge = "avg"
            else:
                raise CaffeImportError(f"{source}: layer {elt[-1].name!r}: cannot tell the merge "
                                       "(expected Eltwise MAX, SUM with coeff 1/S, or the attention pattern)")
    drops = [lp for lp in lps if lp.type == "Dropout"]
    dropout = float(drops[0].dropout_param.dropout_ratio) if drops else 0.0
    per_scale_loss = any(lp.type == "SoftmaxWithLoss" and lp.bottom and
                         producers.get(lp.bottom[0]) is not None and
                         producers[lp.bottom[0]].type == "Convolution" and   # a scale's own scores,
                         producers[lp.bottom[0]].name.startswith(clf.name) for lp in train_lps)  # not a merge
    has_loss = any(lp.type == "SoftmaxWithLoss" for lp in train_lps)
    return dict(num_classes=num_classes, scales=tuple(scales), merge=merge,
                extra_supervision=per_scale_loss if has_loss else None, width=width,
                classifier_name=clf.name, dropout=dropout)


def to_attnscale(prototxt, weights=None, use_reference_ops: bool | None = None,
                 extra_supervision: bool | None = None):
    """Build an :class:`attnscale.AttentionToScale` matching a DeepLab-LargeFOV / attention net and
    load its weights (.caffemodel, .caffemodel.h5 or a :class:`WeightFile`; None: fresh model).

    Returns ``(model, ConversionReport)``.  ``use_reference_ops``: None = use attnscale's compiled
    ops when they are available, else the pure-PyTorch references.
    """
    from attnscale.model import AttentionToScale

    from .net import ops_available

    net_param = prototxt if hasattr(prototxt, "DESCRIPTOR") else read_net(prototxt)
    source = "<NetParameter>" if hasattr(prototxt, "DESCRIPTOR") else (
        os.fspath(prototxt) if not isinstance(prototxt, str) or os.path.exists(prototxt) else "<string>")
    cfg = analyse(net_param, source)
    notes = []
    if extra_supervision is not None:
        cfg["extra_supervision"] = bool(extra_supervision)
    elif cfg["extra_supervision"] is None:
        cfg["extra_supervision"] = True
        notes.append("the net has no loss layers, so extra_supervision cannot be read from it; "
                     "kept the default True (pass extra_supervision= to choose)")
    if use_reference_ops is None:
        use_reference_ops = not ops_available()
    try:
        model = AttentionToScale(num_classes=cfg["num_classes"], scales=cfg["scales"], merge=cfg["merge"],
                                 extra_supervision=cfg["extra_supervision"], width=cfg["width"],
                                 use_reference_ops=use_reference_ops,
                                 classifier_name=cfg["classifier_name"], dropout=cfg["dropout"])
    except ValueError as exc:
        raise CaffeImportError(f"{source}: the detected configuration {cfg} is not a valid "
                               f"AttentionToScale: {exc}") from None
    model.eval()
    _check_structure(model, net_param, source)
    wf = None
    if weights is not None:
        wf = weights if isinstance(weights, WeightFile) else read_weights(weights)
    report = ConversionReport(source, wf.path if wf is not None else None,
                              dict(cfg, use_reference_ops=use_reference_ops), notes=notes)
    _load(model, wf, report)
    return model, report


def _model_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_children() if isinstance(m, torch.nn.Conv2d)}


def _check_structure(model, net_param, source) -> None:
    """Every model layer must exist in the prototxt with the same kernel/pad/dilation/channels."""
    lps = {lp.name: lp for lp in upgraded_layers(net_param, source) if layer_included(lp, "TEST")}
    for name, conv in _model_layers(model).items():
        lp = lps.get(name)
        if lp is None:
            raise CaffeImportError(f"{source}: the detected model needs a layer {name!r} the prototxt lacks")
        cp = lp.convolution_param
        k = cp.kernel_size[0] if len(cp.kernel_size) else cp.kernel_h
        pad = cp.pad[0] if len(cp.pad) else cp.pad_h
        dil = cp.dilation[0] if len(cp.dilation) else 1
        got = (int(cp.num_output), int(k), int(pad), int(dil))
        want = (conv.out_channels, conv.kernel_size[0], conv.padding[0], conv.dilation[0])
        if got != want:
            raise CaffeImportError(f"{source}: layer {name!r} is (num_output, kernel, pad, dilation) = "
                                   f"{got} but attnscale's model has {want}")


def _load(model, wf: WeightFile | None, report: ConversionReport) -> None:
    layers = _model_layers(model)
    head = set(model.head_layer_names())
    if wf is None:
        report.fresh += [(f"{n}.{p}", "no weights given") for n in layers for p in ("weight", "bias")]
        return
    file_layers = wf.by_name()
    suffixes = ("_res075", "_res05", "_res1") + tuple(f"_res{str(s).replace('.', '')}" for s in model.scales)
    used: set[str] = set()
    loaded: set[str] = set()
    for name, conv in layers.items():
        params = [("weight", conv.weight), ("bias", conv.bias)]
        src_name = name if name in file_layers else next(
            (name + suf for suf in suffixes if name + suf in file_layers), None)
        if src_name is None:
            why = ("new head layer, not in the weights" if name in head
                   else "absent from the weights")
            report.fresh += [(f"{name}.{p}", why) for p, _ in params]
            continue
        blobs = file_layers[src_name]
        fits = len(blobs) == 2 and all(_fits(b, p.shape) for b, (_, p) in zip(blobs, params))
        if not fits:
            shapes = [tuple(b.data.shape) for b in blobs]
            if name == model.classifier_name:
                report.fresh += [(f"{name}.{p}", f"classifier shapes {shapes} in the weights do not fit "
                                  f"{model.num_classes} classes (e.g. ImageNet's)") for p, _ in params]
                report.unmapped.append((src_name, f"classifier of another task, shapes {shapes}"))
                used.add(src_name)
                continue
            want = [tuple(p.shape) for _, p in params]
            raise CaffeImportError(f"{wf.path}: layer {src_name!r}: blobs {shapes} do not fit the "
                                   f"model's {name} {want}")
        with torch.no_grad():
            for i, (b, (pname, p)) in enumerate(zip(blobs, params)):
                p.copy_(torch.from_numpy(np.ascontiguousarray(b.data)).reshape(p.shape))
                report.mapped.append((f"{src_name}[{i}]", f"{name}.{pname}", tuple(p.shape)))
        used.add(src_name)
        loaded.add(name)
    # scale copies: equal shared blobs, recorded (and checked) rather than silently dropped
    for lname, blobs in file_layers.items():
        if lname in used:
            continue
        base = next((lname[:-len(s)] for s in suffixes if lname.endswith(s) and lname[:-len(s)] in layers), None)
        if base is not None and len(blobs) == 2 and base in loaded:
            conv = layers[base]
            same = all(_fits(b, p.shape) and np.array_equal(
                b.data.reshape(p.shape), p.detach().numpy()) for b, p in zip(blobs, (conv.weight, conv.bias)))
            if same:
                for i, pname in enumerate(("weight", "bias")):
                    report.mapped.append((f"{lname}[{i}]", f"{base}.{pname} (shared copy)",
                                          tuple(blobs[i].data.shape)))
            else:
                report.unmapped.append((lname, f"scale copy of {base!r} whose blobs differ from "
                                        f"{base!r}'s; {base!r}'s were used"))
            continue
        if blobs:
            report.unmapped.append((lname, "no such layer in attnscale's model"))
