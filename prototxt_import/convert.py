"""Map a DeepLab-LargeFOV or attention-to-scale Caffe net (+ weights) onto
:class:`attnscale.AttentionToScale` (``to_attnscale``).

The prototxt (TEST phase) is followed as data flows, not by layer names: from the image, through
every layer of the VGG-16 LargeFOV trunk (conv: kernel, pad, dilation, stride 1, group 1, bias;
ReLU; pooling: method, kernel, stride, pad; optional Dropout), to the classifier, for scale 1 and for
every ``Interp`` on the image; then back from the scores to the merge.  Anything attnscale's model
would compute differently is an error naming the layer and the field.

- scales: the ``Interp`` on the image (shrink 4 + zoom 3 -> 0.75, shrink 2 -> 0.5, with
  ``InterpLayer::Reshape``'s precedence); its size, and the size of the Interp taking the scores back,
  must be what the model makes at the net's input size.  The model's scale order is the merge's
  bottom order (the Concat's for attention, which fixes att_conv1's input channels); scale 1 first;
- merge: ``SpatialProduct(score_s, Slice(Softmax(att_conv2(ReLU(att_conv1(Concat(fc7_s)))))))``
  summed by an ``Eltwise SUM`` -> ``"attention"`` (Slice top k must weight the scale of Concat block
  k); ``Eltwise MAX`` -> ``"max"``; ``Eltwise SUM`` with ``coeff`` 1/S -> ``"avg"``; one scale -> None;
- classes / classifier name: the ``Convolution`` on the scale-1 ``fc7`` (``fc8_voc12``);
- width: the first convolution's ``num_output`` / 64 (every other layer is checked against it);
- dropout: scale 1's ``drop6`` ratio (0 when the net has no Dropout, as the training prototxt); other
  ratios that differ are noted in the report;
- extra supervision: a loss on a per-scale classifier output (training nets); deploy nets say
  nothing, so the default (True, the paper's E-Supv) is kept unless given.

Weights follow ``Net::CopyTrainedLayersFrom`` on that net (see :func:`_load`).
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from . import layers as L
from .errors import CaffeImportError
from .net import blobs_to_copy, check_tops, layer_included
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
    #: the parameters of a DenseCRF layer after the scores (``predict(crf=)``, ``evaluate --crf-params``), or None
    crf: object = None

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


class _Graph:
    """A net's data flow as Caffe runs it: a node is one output (layer index, top index) or a net input;
    a bottom reads the latest node of its blob (an in-place layer makes a new one); a ``Split``'s tops
    are its bottom."""

    def __init__(self, lps, inputs: list[str], source: str):
        check_tops(lps, inputs, source)
        self.lps, self.source = lps, source
        self.bottoms: list[list] = []
        self.consumers: dict = defaultdict(list)
        self.blob: dict = {}
        self.first: dict[str, object] = {}
        cur: dict[str, object] = {}
        for i, lp in enumerate(lps):
            nodes = []
            for b in lp.bottom:
                if b not in cur and b in inputs:
                    cur[b] = self.first[b] = ("input", b)
                    self.blob[cur[b]] = b
                if b not in cur:
                    raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): bottom blob {b!r} is not "
                                           "produced by any earlier layer or net input")
                nodes.append(cur[b])
            self.bottoms.append(nodes)
            if lp.type == "Split" and len(nodes) == 1:
                for t in lp.top:
                    cur[t] = nodes[0]
                continue
            for n in dict.fromkeys(nodes):
                self.consumers[n].append(i)
            for k, t in enumerate(lp.top):
                cur[t] = (i, k)
                self.blob[(i, k)] = t
                self.first.setdefault(t, (i, k))

    def name(self, node) -> str:
        return repr(self.blob[node])

    def consumer(self, node, type_: str, role: str, chain: bool = True) -> int:
        """The one layer of type ``type_`` reading ``node`` (with ``chain``: checked to have one bottom
        and one top)."""
        found = [i for i in self.consumers[node] if self.lps[i].type == type_]
        if len(found) != 1:
            readers = ", ".join(f"{self.lps[i].name!r} ({self.lps[i].type})" for i in self.consumers[node])
            raise CaffeImportError(f"{self.source}: {role}: expected one {type_} layer reading blob "
                                   f"{self.name(node)}, found {len(found)} (its readers: {readers or 'none'})")
        return self.single(found[0], role) if chain else found[0]

    def producer(self, node, type_: str, role: str) -> int:
        """The layer of type ``type_`` that made ``node``."""
        if not isinstance(node[0], int) or self.lps[node[0]].type != type_:
            what = "a net input" if not isinstance(node[0], int) else (
                f"layer {self.lps[node[0]].name!r} ({self.lps[node[0]].type})")
            raise CaffeImportError(f"{self.source}: {role}: expected blob {self.name(node)} to come from "
                                   f"a {type_} layer, it comes from {what}")
        return node[0]

    def single(self, i: int, role: str) -> int:
        lp = self.lps[i]
        if len(lp.bottom) != 1 or len(lp.top) != 1:
            raise CaffeImportError(f"{self.source}: layer {lp.name!r} ({lp.type}, {role}) must have one "
                                   f"bottom and one top, it has {len(lp.bottom)} and {len(lp.top)}")
        return i


def _geometry(g: _Graph, i: int, fn):
    try:
        return fn(g.lps[i])
    except L.LayerError as exc:
        raise L.wrap_error(exc, g.source, g.lps[i]) from None


def _expect(g: _Graph, i: int, role: str, got, want) -> None:
    """Raise naming every field in which the layer differs from attnscale's model."""
    if got != want:
        diffs = [f"{f.name} {getattr(got, f.name)} where attnscale's model has {getattr(want, f.name)}"
                 for f in fields(got) if getattr(got, f.name) != getattr(want, f.name)]
        raise CaffeImportError(f"{g.source}: layer {g.lps[i].name!r} (taken as {role}): {'; '.join(diffs)}")


def _conv(g: _Graph, node, role: str, out: int | None, k: int, pad: int = 0, dil: int = 1) -> int:
    """The Convolution reading ``node``: stride 1, group 1, with bias, and the given geometry."""
    i = g.consumer(node, "Convolution", role)
    got = _geometry(g, i, L.conv_geometry)
    want = L.ConvGeometry(got.num_output if out is None else out, (k, k), (1, 1), (pad, pad), (dil, dil), 1, True)
    _expect(g, i, role, got, want)
    return i


def _relu(g: _Graph, node, role: str):
    i = g.consumer(node, "ReLU", f"the ReLU after {role}")
    if g.lps[i].relu_param.negative_slope != 0:
        raise CaffeImportError(f"{g.source}: layer {g.lps[i].name!r}: negative_slope "
                               f"{g.lps[i].relu_param.negative_slope} (attnscale's model: a plain ReLU)")
    return (i, 0)


def _relu_dropout(g: _Graph, node, role: str, ratios: list):
    """ReLU then an optional Dropout, or the Dropout first: the same function (Dropout's mask times
    1 / (1 - ratio) is non-negative, so it commutes with the ReLU; identity at test time)."""
    types = {g.lps[i].type for i in g.consumers[node]}
    if "ReLU" not in types and "Dropout" in types:
        return _relu(g, _dropout(g, node, role, ratios), role)
    return _dropout(g, _relu(g, node, role), role, ratios)


def _dropout(g: _Graph, node, role: str, ratios: list):
    """An optional Dropout on ``node`` (identity at test time); its ratio is appended to ``ratios``."""
    read = [i for i in g.consumers[node] if g.lps[i].type == "Dropout" and g.consumers[(i, 0)]]
    i = g.single(read[0], f"the Dropout after {role}") if len(read) == 1 else None
    ratios.append((float(g.lps[i].dropout_param.dropout_ratio), g.lps[i].name) if i is not None else (0.0, role))
    return node if i is None else (i, 0)


@dataclass
class _Branch:
    scale: float
    convs: dict[str, int]  # model layer -> layer index ("classifier" for the classifier)
    fc7: object            # node of fc7 after relu7 / drop7
    scores: object         # node of the classifier's output


def _walk_branch(g: _Graph, start, scale: float, width: float, num_classes: int | None, ratios: list) -> _Branch:
    """Follow one scale through the VGG-16 LargeFOV trunk from ``start``, checking every layer."""
    from attnscale.model import FC6, FC7_OUT, TRUNK, _ch

    at = f"scale {scale:g}"
    convs: dict[str, int] = {}
    x = start
    for spec in TRUNK:
        if spec[0] == "conv":
            _, name, cout, k, pad, dil = spec
            i = convs[name] = _conv(g, x, f"{name}, {at}", _ch(cout, width), k, pad, dil)
            x = _relu(g, (i, 0), f"{name}, {at}")
        else:
            _, name, method, k, stride, pad = spec
            i = g.consumer(x, "Pooling", f"{name}, {at}")
            _expect(g, i, f"{name}, {at}", _geometry(g, i, L.pool_geometry),
                    L.PoolGeometry(method, k, stride, pad, False))
            x = (i, 0)
    for name, out, k, pad, dil in (("fc6", FC6["out"], FC6["kernel"], FC6["pad"], FC6["dilation"]),
                                   ("fc7", FC7_OUT, 1, 0, 1)):
        i = convs[name] = _conv(g, x, f"{name}, {at}", _ch(out, width), k, pad, dil)
        x = _relu_dropout(g, (i, 0), f"{name}, {at}", ratios)
    i = convs["classifier"] = _conv(g, x, f"the classifier on fc7, {at}", num_classes, 1)
    return _Branch(scale, convs, x, (i, 0))


def _scale_of_interp(g: _Graph, i: int, in_hw) -> float:
    """The input scale an ``Interp`` on the image makes, with ``InterpLayer::Reshape``'s precedence
    (zoom only, shrink only, explicit height and width, shrink then zoom)."""
    lp = g.lps[i]
    p = L.interp_params(lp)
    if p.pad_beg or p.pad_end:
        raise CaffeImportError(f"{g.source}: layer {lp.name!r}: pad_beg/pad_end crop the image; attnscale's "
                               "model resizes the whole image")
    z, s = p.zoom_factor, p.shrink_factor
    if min(f for f in (z, s, 1) if f is not None) < 1:
        raise CaffeImportError(f"{g.source}: layer {lp.name!r}: zoom_factor and shrink_factor must be >= 1")
    if (z is None) != (s is None):
        scale = (z if z is not None else 1) / (s if s is not None else 1)
    elif p.height is not None and p.width is not None:
        if in_hw is None or in_hw[0] < 2:
            raise CaffeImportError(f"{g.source}: layer {lp.name!r}: an Interp with explicit height/width "
                                   "needs the net's input shape to give a scale")
        scale = (p.height - 1) / (in_hw[0] - 1)
    elif z is not None:
        scale = z / s
    else:
        raise CaffeImportError(f"{g.source}: layer {lp.name!r}: an Interp needs zoom_factor, shrink_factor "
                               "or both height and width")
    if not 0 < scale < 1:
        raise CaffeImportError(f"{g.source}: layer {lp.name!r}: input scale {scale:g} is not in (0, 1)")
    return round(scale, 6)


def _check_sizes(g: _Graph, scale: float, down: int, up: int, probes) -> None:
    """The Interp ``down`` (image to ``scale``) must give the input attnscale's model makes, and ``up``
    (scores back) the scale-1 score size, at the net's input size (or 321 and 513 when it has none)."""
    from attnscale import caffe
    from attnscale.model import AttentionToScale

    for hw in probes:
        try:
            want_in = caffe.scaled_input_shape(hw, scale)
            want_out = AttentionToScale.output_size(hw)
            got_in = caffe.interp_output_shape(hw, L.interp_params(g.lps[down]))
            got_out = caffe.interp_output_shape(AttentionToScale.output_size(got_in), L.interp_params(g.lps[up]))
        except ValueError as exc:
            raise CaffeImportError(f"{g.source}: scale {scale:g}: {exc}") from None
        if got_in != want_in:
            raise CaffeImportError(f"{g.source}: layer {g.lps[down].name!r}: gives a {got_in} image from a "
                                   f"{tuple(hw)} input, attnscale's scale {scale:g} gives {want_in}")
        if got_out != want_out:
            raise CaffeImportError(f"{g.source}: layer {g.lps[up].name!r}: gives {got_out} scores at input "
                                   f"{tuple(hw)}, but the scale-1 scores are {want_out}: the merge cannot add them")


def _order(g: _Graph, i: int, by_node: dict, role: str) -> list[float]:
    """The scales in the order of layer ``i``'s bottoms, which must be ``by_node``'s nodes, once each."""
    bottoms = g.bottoms[i]
    if len(bottoms) != len(by_node) or set(bottoms) != set(by_node):
        raise CaffeImportError(f"{g.source}: layer {g.lps[i].name!r} ({role}) reads "
                               f"{[g.blob[b] for b in bottoms]}, expected one each of "
                               f"{[g.blob[b] for b in by_node]}")
    return [by_node[b] for b in bottoms]


def _axis1(axis: int, role: str, g: _Graph, i: int) -> None:
    if axis not in (1, -3):
        raise CaffeImportError(f"{g.source}: layer {g.lps[i].name!r} ({role}): axis {axis}, attnscale's "
                               "model works on the channel axis (1)")


def _attention_head(g: _Graph, scores: dict, feats: dict, width: float, ratios: list):
    """Trace the attention pattern back from the scores: SpatialProduct(score_s, slice_k) -> Eltwise SUM;
    Slice <- Softmax <- att_conv2 <- [Dropout] <- ReLU <- att_conv1 <- Concat(fc7 of every scale)
    (the Dropout may also come before the ReLU: the same function).
    Returns (scales in Concat order, Eltwise index, {"att_conv1": i, "att_conv2": i})."""
    from attnscale.model import ATT1_OUT, _ch

    S = len(scores)
    prods = {}
    for node, s in scores.items():
        found = [i for i in g.consumers[node] if g.lps[i].type == "SpatialProduct" and len(g.bottoms[i]) == 2
                 and len(g.lps[i].top) == 1 and g.bottoms[i][0] == node]
        if len(found) != 1:
            raise CaffeImportError(f"{g.source}: attention merge: expected one SpatialProduct weighting the "
                                   f"scale-{s:g} scores {g.name(node)}, found {len(found)}")
        prods[s] = found[0]
    total = g.consumer((prods[1.0], 0), "Eltwise", "the attention merge's sum", chain=False)
    _order(g, total, {(i, 0): s for s, i in prods.items()}, "the attention merge's sum")
    ep = g.lps[total].eltwise_param
    if ep.operation != 1 or any(c != 1 for c in ep.coeff):
        raise CaffeImportError(f"{g.source}: layer {g.lps[total].name!r}: the attention merge must be an "
                               "Eltwise SUM with coefficients 1")
    slices = {g.bottoms[prods[s]][1] for s in prods}
    sl = g.producer(next(iter(slices)), "Slice", "the attention weights")
    if {n[0] for n in slices} != {sl} or len(g.lps[sl].top) != S or len(g.lps[sl].bottom) != 1:
        raise CaffeImportError(f"{g.source}: attention merge: the {S} SpatialProducts must take the {S} "
                               f"tops of one Slice layer, once each")
    sp = g.lps[sl].slice_param
    _axis1(sp.slice_dim if sp.HasField("slice_dim") else sp.axis, "the attention Slice", g, sl)
    if len(sp.slice_point) and list(sp.slice_point) != list(range(1, S)):
        raise CaffeImportError(f"{g.source}: layer {g.lps[sl].name!r}: slice_point {list(sp.slice_point)}, "
                               f"expected one channel per scale")
    sm = g.single(g.producer(g.bottoms[sl][0], "Softmax", "the attention Slice's input"), "attention softmax")
    _axis1(g.lps[sm].softmax_param.axis, "the attention Softmax", g, sm)
    a2 = g.single(g.producer(g.bottoms[sm][0], "Convolution", "the attention Softmax's input"), "att_conv2")
    _expect(g, a2, "att_conv2", _geometry(g, a2, L.conv_geometry), L.ConvGeometry(S, (1, 1), (1, 1), (0, 0), (1, 1), 1, True))
    def dropout_before(x):  # an optional Dropout producing x: (its ratio, name) and its input, else None
        if isinstance(x[0], int) and g.lps[x[0]].type == "Dropout":
            return (float(g.lps[x[0]].dropout_param.dropout_ratio), g.lps[x[0]].name), g.bottoms[g.single(x[0], "att_drop1")][0]
        return None, x

    drop, x = dropout_before(g.bottoms[a2][0])
    relu = g.single(g.producer(x, "ReLU", "att_conv2's input"), "att_relu1")
    if g.lps[relu].relu_param.negative_slope != 0:
        raise CaffeImportError(f"{g.source}: layer {g.lps[relu].name!r}: a leaky ReLU; attnscale's model has a plain one")
    x = g.bottoms[relu][0]
    if drop is None:
        drop, x = dropout_before(x)
    ratios.append(drop or (0.0, "att_conv1"))
    a1 = g.single(g.producer(x, "Convolution", "the attention ReLU's input"), "att_conv1")
    _expect(g, a1, "att_conv1", _geometry(g, a1, L.conv_geometry),
            L.ConvGeometry(_ch(ATT1_OUT, width), (3, 3), (1, 1), (1, 1), (1, 1), 1, True))
    cat = g.producer(g.bottoms[a1][0], "Concat", "att_conv1's input")
    cp = g.lps[cat].concat_param
    _axis1(cp.concat_dim if cp.HasField("concat_dim") else cp.axis, "the fc7 Concat", g, cat)
    order = _order(g, cat, {n: s for s, n in feats.items()}, "the Concat of the scales' fc7")
    for s, i in prods.items():
        k = g.bottoms[i][1][1]
        if order[k] != s:
            raise CaffeImportError(f"{g.source}: layer {g.lps[i].name!r} weights the scale-{s:g} scores with "
                                   f"attention channel {k}, but {g.lps[cat].name!r} puts scale {order[k]:g} "
                                   f"in block {k}")
    return order, total, {"att_conv1": a1, "att_conv2": a2}


@dataclass
class _Layout:
    """Which Caffe layers make each layer of attnscale's model (every scale's copy, in scale order)."""
    copies: dict[str, list] = field(default_factory=dict)
    param_owner: dict[str, str] = field(default_factory=dict)  # shared param name -> first layer declaring it
    net_names: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    layers: list = field(default_factory=list)  # the phase's layers, in net order
    graph: object = None                         # their _Graph
    #: the model's score nodes: the merged output ("merged") and, with several scales, each scale's classifier
    outputs: dict = field(default_factory=dict)
    #: a DenseCRF layer's parameters (attnscale.crf.CRFParams) after the scores, or None
    crf: object = None


def _read(prototxt):
    """``(NetParameter, source name)`` of a path, prototxt text or ``NetParameter``."""
    if hasattr(prototxt, "DESCRIPTOR"):
        return prototxt, "<NetParameter>"
    source = os.fspath(prototxt) if not isinstance(prototxt, str) or os.path.exists(prototxt) else "<string>"
    return read_net(prototxt), source


def _analyse(net_param, source: str, phase: str = "TEST") -> tuple[dict, _Layout]:
    # Net::FilterNet with the phase given and the file's own state { level stage }, as Caffe's Net(file, phase)
    state = net_param.state if net_param.HasField("state") else None
    rule = dict(level=state.level if state else 0, stages=tuple(state.stage) if state else ())
    every = upgraded_layers(net_param, source)
    lps = [lp for lp in every if layer_included(lp, phase, **rule)]
    train_lps = [lp for lp in every if layer_included(lp, "TRAIN", **rule)]
    inputs = net_inputs(net_param, source)
    if not inputs.names and not any(lp.type in L.DATA_TYPES for lp in lps):
        other = "TRAIN" if phase == "TEST" else "TEST"
        elsewhere = [lp.name for lp in every if lp.type in L.DATA_TYPES and layer_included(lp, other, **rule)]
        if elsewhere:
            raise CaffeImportError(f"{source}: no input in the {phase} phase: the data layer(s) {elsewhere} are in "
                                   f"the {other} phase only (to_attnscale(..., phase={other!r}) reads that phase)")
    g = _Graph(lps, inputs.names, source)
    data = inputs.names[0] if inputs.names else next(
        (lp.top[0] for lp in lps if lp.type in L.DATA_TYPES and lp.top), None)
    if data is None or data not in g.first:
        raise CaffeImportError(f"{source}: no image input found" if data is None else
                               f"{source}: no layer reads the image input {data!r}")
    if inputs.names:
        in_shape = inputs.shapes[0]
    else:
        lp = next(lp for lp in lps if data in lp.top)
        try:
            in_shape = L.data_layer_shapes(lp)[list(lp.top).index(data)]
        except L.LayerError as exc:
            raise L.wrap_error(exc, source, lp) from None
    if in_shape is not None and (len(in_shape) != 4 or in_shape[1] != 3 or min(in_shape[-2:]) < 1):
        raise CaffeImportError(f"{source}: the image input {data!r} has shape {tuple(in_shape)}; attnscale's "
                               "model takes (N, 3, H, W) with H, W >= 1")
    in_hw = tuple(in_shape[-2:]) if in_shape is not None else None
    probes = [in_hw] if in_hw else [(321, 321), (513, 513)]
    image = g.first[data]

    first = g.consumer(image, "Convolution", "conv1_1 (the first layer on the image)")
    width = _geometry(g, first, L.conv_geometry).num_output / 64.0
    ratios: list = []
    main = _walk_branch(g, image, 1.0, width, None, ratios)
    clf = lps[main.convs["classifier"]]
    num_classes = int(clf.convolution_param.num_output)
    branches = {1.0: main}
    down, up = {}, {}
    for i in g.consumers[image]:
        if lps[i].type != "Interp":
            continue
        s = _scale_of_interp(g, g.single(i, "an input scale"), in_hw)
        if s in branches:
            raise CaffeImportError(f"{source}: layer {lps[i].name!r}: a second branch at scale {s:g}")
        b = branches[s] = _walk_branch(g, (i, 0), s, width, num_classes, ratios)
        down[s], up[s] = i, g.consumer(b.scores, "Interp", f"the Interp of the scale-{s:g} scores to scale 1")
        _check_sizes(g, s, i, up[s], probes)
    head: dict[str, int] = {}
    merge, scales = None, [1.0]
    merged = main.scores
    if len(branches) > 1:
        scores = {main.scores: 1.0, **{(up[s], 0): s for s in up}}
        users = {lps[i].type for i in g.consumers[main.scores]}
        if "SpatialProduct" in users and "Eltwise" not in users:
            feats = {1.0: main.fc7}
            for s in up:
                i = g.consumer(branches[s].fc7, "Interp", f"the Interp of the scale-{s:g} fc7 to scale 1")
                _check_sizes(g, s, down[s], i, probes)
                feats[s] = (i, 0)
            scales, total, head = _attention_head(g, scores, feats, width, ratios)
            merge, merged = "attention", (total, 0)
        elif "Eltwise" in users and "SpatialProduct" not in users:
            e = g.consumer(main.scores, "Eltwise", "the merge of the scales", chain=False)
            scales = _order(g, e, scores, "the merge of the scales")
            merged = (e, 0)
            ep = lps[e].eltwise_param
            S = len(scales)
            if ep.operation == 2 and not len(ep.coeff):
                merge = "max"
            elif ep.operation == 1 and len(ep.coeff) == S and all(abs(c - 1.0 / S) < 1e-6 for c in ep.coeff):
                merge = "avg"
            else:
                raise CaffeImportError(f"{source}: layer {lps[e].name!r}: cannot tell the merge (expected "
                                       "Eltwise MAX, SUM with coeff 1/S, or the attention pattern)")
        else:
            raise CaffeImportError(f"{source}: {len(branches)} scales, but the scale-1 scores "
                                   f"{g.name(main.scores)} go to {sorted(users) or 'nothing'}: expected one "
                                   "Eltwise (max / avg merge) or SpatialProducts (attention merge)")
        if scales[0] != 1.0:
            raise CaffeImportError(f"{source}: the merge lists the scales as {scales}; attnscale's model "
                                   "needs the scale-1 branch first (it sets the merge resolution)")
    after, todo, seen_nodes = [], [merged], {merged}
    while todo:    # every layer fed (directly or not) by the model's output, which the model does not compute
        for i in g.consumers[todo.pop()]:
            if lps[i].type not in L.IGNORED_TYPES and lps[i].name not in after:
                after.append(lps[i].name)
            for k in range(len(lps[i].top)):
                if (i, k) not in seen_nodes:
                    seen_nodes.add((i, k))
                    todo.append((i, k))
    layout = _Layout(net_names={lp.name for lp in lps}, layers=lps, graph=g, outputs={merged: "merged"})
    if after:
        layout.notes.append(f"after the model's scores {g.name(merged)}, the net's layer(s) "
                            + ", ".join(f"{n!r} ({next(lp.type for lp in lps if lp.name == n)})" for n in after)
                            + " are not part of attnscale's model (it returns those scores; predict upsamples them)")
    zoomed, todo = {merged}, [merged]     # the scores and their Interp resizes: what predict hands a CRF
    while todo:
        for i in g.consumers[todo.pop()]:
            if lps[i].type == "Interp" and (i, 0) not in zoomed:
                zoomed.add((i, 0))
                todo.append((i, 0))
    for lp in lps:
        if lp.type == "DenseCRF" and lp.name not in after:
            layout.notes.append(f"DenseCRF {lp.name!r} does not read the model's merged scores: not taken as the "
                                "net's CRF")
    crfs = [i for i, lp in enumerate(lps) if lp.name in after and lp.type == "DenseCRF"]
    if len(crfs) > 1:
        layout.notes.append(f"{len(crfs)} DenseCRF layers after the scores "
                            f"({', '.join(lps[i].name for i in crfs)}): none taken as the net's CRF")
    elif crfs:
        lp = lps[crfs[0]]
        try:
            L.crf_params(lp)    # the layer's own checks
        except L.LayerError as exc:
            raise CaffeImportError(f"{source}: layer {lp.name!r} (DenseCRF): {exc}") from None
        # predict's CRF: the scores resized by Interp layers only, with the net's image (whose size the layer then
        # forces on the scores: the zoom to the input)
        scores_in, image_in = g.bottoms[crfs[0]][0], g.bottoms[crfs[0]][2]
        if scores_in in zoomed and image_in == image:
            layout.crf = L.crf_params(lp)
            layout.notes.append(f"DenseCRF {lp.name!r}: predict(crf=report.crf) or evaluate --crf-params "
                                f"'{json.dumps(layout.crf.to_dict())}' runs it after the net")
        else:
            layout.notes.append(f"DenseCRF {lp.name!r} reads {g.name(scores_in)} and {g.name(image_in)}, not the "
                                "model's scores resized by Interp layers only and the net's image: not taken as the "
                                "net's CRF (predict's CRF takes those)")
    if len(branches) > 1:
        layout.outputs.update({branches[s].scores: s for s in scales})
    for name in main.convs:
        layout.copies[clf.name if name == "classifier" else name] = [lps[branches[s].convs[name]] for s in scales]
    layout.copies.update({name: [lps[i]] for name, i in head.items()})
    for lp in lps:
        for p in lp.param:
            if p.name:
                layout.param_owner.setdefault(p.name, lp.name)
    inside = {lp.name for lst in layout.copies.values() for lp in lst}
    model_params = {p.name for lst in layout.copies.values() for lp in lst for p in lp.param if p.name}
    for lp in lps:
        shared = sorted({p.name for p in lp.param if p.name in model_params})
        if lp.name not in inside and shared:
            raise CaffeImportError(f"{source}: layer {lp.name!r} lies outside attnscale's model but shares its "
                                   f"parameter(s) {shared} (param {{ name }}): Caffe would copy weights into them "
                                   "through it too")
    counts = Counter(lp.name for lp in lps)
    dup = sorted({lp.name for lst in layout.copies.values() for lp in lst if counts[lp.name] > 1})
    if dup:
        raise CaffeImportError(f"{source}: layer name(s) {dup} used more than once: weights are copied by name")
    dropout = ratios[0][0]
    if any(r != dropout for r, _ in ratios):
        layout.notes.append("dropout ratios differ: " + ", ".join(f"{n} {r:g}" for r, n in ratios) +
                            f"; attnscale's model uses {dropout:g} everywhere (training only: Dropout is the "
                            "identity at test time)")
    clf_tops = {lp.top[0] for lp in layout.copies[clf.name]}
    # E-Supv: losses on the scales' own scores besides the merged one (one scale: its loss is the only one)
    per_scale_loss = len(scales) > 1 and any(
        lp.type == "SoftmaxWithLoss" and lp.bottom and lp.bottom[0] in clf_tops for lp in train_lps)
    has_loss = any(lp.type == "SoftmaxWithLoss" for lp in train_lps)
    cfg = dict(num_classes=num_classes, scales=tuple(scales), merge=merge,
               extra_supervision=per_scale_loss if has_loss else None, width=width,
               classifier_name=clf.name, dropout=dropout)
    return cfg, layout


def analyse(net_param, source: str = "<net>") -> dict:
    """Detect the ``AttentionToScale`` configuration of a Caffe net (see the module docstring)."""
    return _analyse(net_param, source)[0]


def to_attnscale(prototxt, weights=None, use_reference_ops: bool | None = None,
                 extra_supervision: bool | None = None, phase: str = "TEST"):
    """Build an :class:`attnscale.AttentionToScale` matching a DeepLab-LargeFOV / attention net and
    load its weights (.caffemodel, .caffemodel.h5 or a :class:`WeightFile`; None: fresh model).

    Returns ``(model, ConversionReport)``.  ``use_reference_ops``: None = use attnscale's compiled
    ops when they are available, else the pure-PyTorch references.  ``phase``: the net Caffe would build
    (``TEST``; ``TRAIN`` for a training prototxt whose data layer is TRAIN-only).
    """
    from attnscale.model import AttentionToScale

    from .net import ops_available

    if phase not in ("TEST", "TRAIN"):
        raise CaffeImportError(f"to_attnscale: phase must be 'TEST' or 'TRAIN', got {phase!r}")
    net_param, source = _read(prototxt)
    cfg, layout = _analyse(net_param, source, phase)
    notes = list(layout.notes)
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
    wf = None
    if weights is not None:
        wf = weights if isinstance(weights, WeightFile) else read_weights(weights)
    report = ConversionReport(source, wf.path if wf is not None else None,
                              dict(cfg, use_reference_ops=use_reference_ops), notes=notes, crf=layout.crf)
    _load(model, layout, wf, report)
    return model, report


def param_mults(prototxt) -> dict[str, list[list[float]]]:
    """Each layer of attnscale's model: ``[[lr_mult, decay_mult] of its weight, [...] of its bias]`` as the
    solver of a Caffe ``Net`` built from this prototxt in the TRAIN phase takes them (``Net::AppendParam``).

    A blob without a ``param`` line gets ``ParamSpec``'s defaults (1, 1).  A blob shared by
    ``param { name }`` is one learnable blob: its first layer sets both multipliers; a later sharing layer
    that sets one the first left unset gives its value, one that sets it otherwise stops Caffe ("Shared
    param ... has mismatched lr_mult"), and here too.  The scale copies of a layer must share their blobs:
    Caffe would train unshared copies apart, attnscale's model has one set of weights for all scales.
    The result is what ``TrainConfig.lr_mults`` takes (``model.param_groups``)."""
    net_param, source = _read(prototxt)
    _, layout = _analyse(net_param, source, phase="TRAIN")
    return _mults(layout, source)[0]


def _short(v: float) -> float:
    """A proto float (float32) as the shortest decimal that reads back as it (0.1, not 0.10000000149)."""
    return float(str(np.float32(v)))


def _mults(layout: _Layout, source: str) -> tuple[dict[str, list[list[float]]], dict[str, list], list[str]]:
    """:func:`param_mults`; each model layer's (weight, bias) owners: the layers whose blobs the net keeps
    (the first of a shared name; Caffe fills every copy, then the others share the owner's); and the model
    parameter (``"fc6.weight"``) of each of Caffe's learnable blobs, in ``Net::learnable_params`` order."""
    from .schema import message_class
    default = message_class("ParamSpec")()
    model_of = {lp.name: m for m, lps in layout.copies.items() for lp in lps}
    learnable: list[dict] = []            # Net::params_lr_ / has_params_lr_ (and decay), by learnable id
    owner: list = []                      # the layer owning each learnable blob
    by_name: dict[str, int] = {}          # Net::param_names_index_
    slot: dict[tuple[str, int], int] = {}
    for lp in layout.layers:
        if lp.name not in model_of:       # _analyse refuses a layer outside the model sharing its blobs
            continue
        if len(lp.param) > 2:
            raise CaffeImportError(f"{source}: layer {lp.name!r}: {len(lp.param)} param specs for its 2 blobs "
                                   "(Caffe: \"Too many params specified for layer\")")
        for j in range(2):
            spec = lp.param[j] if j < len(lp.param) else default
            if not spec.name or spec.name not in by_name:
                if spec.name:
                    by_name[spec.name] = len(learnable)
                slot[(lp.name, j)] = len(learnable)
                learnable.append({f: (getattr(spec, f), spec.HasField(f)) for f in ("lr_mult", "decay_mult")})
                owner.append(lp)
                continue
            own = learnable[slot.setdefault((lp.name, j), by_name[spec.name])]
            for f in ("lr_mult", "decay_mult"):
                if not spec.HasField(f):
                    continue
                if own[f][1] and own[f][0] != getattr(spec, f):
                    raise CaffeImportError(
                        f"{source}: layer {lp.name!r}: shared param {spec.name!r} has mismatched {f}: "
                        f"{getattr(spec, f):g} here, {own[f][0]:g} where it was set first (Caffe stops on this, "
                        "Net::AppendParam)")
                own[f] = (getattr(spec, f), True)
    users: dict[int, list] = defaultdict(list)   # learnable blob -> the model parameters it would be
    for m, lps in layout.copies.items():
        for j, what in enumerate(("weight", "bias")):
            for i in dict.fromkeys(slot[(lp.name, j)] for lp in lps):
                users[i].append(f"{m}.{what}")
    for i, params in users.items():
        if len(params) > 1:   # Net::ShareWeights would make them one blob; attnscale's model has one tensor each
            raise CaffeImportError(f"{source}: layer {owner[i].name!r}: {' and '.join(params)} share one blob "
                                   "(param { name }): Caffe would train them as one, attnscale's model cannot")
    out, owners = {}, {}
    for m, lps in layout.copies.items():
        pairs, owners[m] = [], []
        for j, what in enumerate(("weight", "bias")):
            ids = list(dict.fromkeys(slot[(lp.name, j)] for lp in lps))
            if len(ids) > 1:
                apart = [lp.name for lp in lps if slot[(lp.name, j)] != ids[0]]
                raise CaffeImportError(
                    f"{source}: layers {lps[0].name!r} and {apart[0]!r} do not share their {what} (no common "
                    "param { name }): Caffe would train each scale's copy apart, attnscale's model has one set of "
                    "weights for all scales")
            pairs.append([_short(learnable[ids[0]][f][0]) for f in ("lr_mult", "decay_mult")])
            owners[m].append(owner[ids[0]])
        out[m] = pairs
    return out, owners, [users[i][0] for i in range(len(learnable))]


def _params(conv: torch.nn.Conv2d) -> list[tuple[str, torch.nn.Parameter]]:
    return [("weight", conv.weight), ("bias", conv.bias)]


def _fresh_fill(head: bool, j: int, lp) -> str:
    """How attnscale's model starts blob ``j`` (0 weight, 1 bias) of a layer the weights lack
    (``AttentionToScale.reset_parameters``), beside what Caffe would fill it with: the prototxt's
    ``weight_filler`` / ``bias_filler``, else ``FillerParameter``'s default, constant 0."""
    from google.protobuf import text_format
    ours = "0" if j == 1 else ("gaussian std 0.01" if head else "msra (gaussian std sqrt(2 / fan_in))")
    cp, name = lp.convolution_param, ("weight_filler", "bias_filler")[j]
    caffe = (text_format.MessageToString(getattr(cp, name), as_one_line=True) if cp.HasField(name)
             else "constant 0, no filler given")
    return f"attnscale starts it at {ours}, Caffe at {caffe}"


def _load(model, layout: _Layout, wf: WeightFile | None, report: ConversionReport) -> None:
    """Caffe's ``Net::CopyTrainedLayersFrom`` (.caffemodel) / ``CopyTrainedLayersFromHDF5`` onto the net the
    prototxt describes, then onto attnscale's model.

    Source layers are copied in file order into the layer of the same name; a blob shared by
    ``param { name }`` is one blob, so the last copy written wins.  Blob counts and shapes are Caffe's
    checks (an HDF5 layer may lack the blobs it shares with an earlier layer); the one exception is a
    classifier whose shapes do not fit (ImageNet's 1000-way ``fc8``), which stays fresh.  Scale copies
    that do not share a blob must end up equal, since attnscale's model runs one set of weights."""
    head = set(model.head_layer_names())
    if wf is None:
        report.fresh += [(f"{n}.{p}", "no weights given") for n in layout.copies for p in ("weight", "bias")]
        return
    target = {lp.name: (m, lp) for m, lps in layout.copies.items() for lp in lps}

    def slot(lp, j):
        name = lp.param[j].name if j < len(lp.param) else ""
        return ("param", name) if name else ("layer", lp.name, j)

    writes: dict[tuple, list[tuple[str, np.ndarray]]] = defaultdict(list)
    kept_fresh: dict[str, str] = {}
    for name, _type, blobs in wf.layers:
        if name not in target:
            if any(b is not None for b in blobs):
                report.unmapped.append((name, "a layer of the prototxt outside attnscale's model"
                                        if name in layout.net_names else "no such layer in the prototxt"))
            continue
        m, lp = target[name]
        params = _params(getattr(model, m))
        present = blobs_to_copy(wf, name, "the prototxt layer", blobs, len(params),
                                lambda j: slot(lp, j)[0] == "param" and layout.param_owner[slot(lp, j)[1]] != name)
        bad = [(j, b) for j, b in present if not b.fits(params[j][1].shape, lp.strict_dim)]
        if bad:
            shapes = [tuple(b.data.shape) for _, b in present]
            if m == model.classifier_name:
                why = f"classifier shapes {shapes} in the weights do not fit {model.num_classes} classes (e.g. ImageNet's)"
                kept_fresh[m] = why
                report.unmapped.append((name, f"classifier of another task, shapes {shapes}; kept fresh "
                                        "(Caffe would stop on the shape mismatch)"))
                continue
            j, b = bad[0]
            raise CaffeImportError(f"{wf.path}: layer {name!r}: cannot copy blob {j}: shape mismatch, file "
                                   f"{tuple(b.data.shape)} vs the model's {m}.{params[j][0]} "
                                   f"{tuple(params[j][1].shape)}")
        for j, b in present:
            writes[slot(lp, j)].append((f"{name}[{j}]", b.data))
            shape = tuple(params[j][1].shape)
            same = tuple(b.data.shape) == shape if b.reshape else b.fits(shape)   # (a legacy 4-axis shape fits)
            if not same:
                why = ("DeepLab's Caffe reshapes the blob to the dataset" if b.reshape else
                       "strict_dim: false, DeepLab-v1's Caffe copies the same count in the layer's shape")
                report.notes.append(f"{name}[{j}]: {'HDF5' if b.reshape else 'file'} shape {tuple(b.data.shape)} read "
                                    f"as {shape} ({why}: same values in the same order)")
    if not writes and not kept_fresh:
        raise CaffeImportError(f"{wf.path}: no layer of the weights file is a layer of the net "
                               f"(file layers: {[n for n, _, _ in wf.layers][:8]} ...)")
    for m, lps in layout.copies.items():
        for j, (pname, p) in enumerate(_params(getattr(model, m))):
            slots = list(dict.fromkeys(slot(lp, j) for lp in lps))
            finals = [writes[sl][-1] if writes.get(sl) else None for sl in slots]
            if all(f is None for f in finals):
                why = kept_fresh.get(m) or ("new head layer, not in the weights" if m in head
                                            else "absent from the weights")
                report.fresh.append((f"{m}.{pname}", f"{why}; {_fresh_fill(m in head, j, lps[0])}"))
                continue
            for sl, f in zip(slots[1:], finals[1:]):  # scale copies that do not share the blob
                if f is None or finals[0] is None or not np.array_equal(f[1], finals[0][1]):
                    other = sl[1] if sl[0] == "layer" else sl
                    raise CaffeImportError(
                        f"{wf.path}: layers {lps[0].name!r} and {other!r} do not share blob {j} in the prototxt "
                        "(no common param { name }), and the weights give them "
                        + ("different values" if f is not None and finals[0] is not None else "a value only for one")
                        + ": Caffe would run different weights at different scales, attnscale's share-net one set")
            src, value = finals[0]
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(p.shape))
            first = f"{lps[0].name}[{j}]"
            for sl in slots:
                for w_src, w_val in writes.get(sl, []):
                    if np.array_equal(w_val.reshape(p.shape), value.reshape(p.shape)):
                        copy = "" if w_src == first else (" (shared copy)" if len(slots) == 1 else " (equal copy)")
                        report.mapped.append((w_src, f"{m}.{pname}{copy}", tuple(p.shape)))
                    else:
                        report.unmapped.append((w_src, f"overwritten by {src} (Caffe copies layers in file "
                                                "order: the last write to a shared blob wins)"))
