"""Build a ``torch.nn.Module`` that executes a Caffe net (``load_net``).

Caffe facts followed: ``Net::FilterNet`` / ``StateMeetsRule`` (include/exclude by phase, level,
stage), in-order execution with blobs by name (in-place layers overwrite their blob), output blobs
= blobs produced and never consumed afterwards (``Net::Init``'s ``available_blobs``), parameter
sharing by ``param { name }`` (``Net::AppendParam``), and ``Net::CopyTrainedLayersFrom``
(source layers matched by name, unknown ones ignored, blob count and shape must match; legacy
4-axis shapes compared with leading 1s as in ``Blob::ShapeEquals``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import layers as L
from .errors import CaffeImportError
from .readers import WeightFile, net_inputs, read_net, read_weights, upgraded_layers

PHASES = ("TRAIN", "TEST")


def _rule_met(rule, phase: int, level: int, stages: set[str]) -> bool:
    """Caffe ``Net::StateMeetsRule``."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(lp, phase: str, level: int = 0, stages: Sequence[str] = ()) -> bool:
    """Caffe ``Net::FilterNet``: with ``include`` rules a layer is kept iff one is met; otherwise
    it is kept unless an ``exclude`` rule is met."""
    ph = PHASES.index(phase)
    st = set(stages)
    if len(lp.include):
        return any(_rule_met(r, ph, level, st) for r in lp.include)
    return not any(_rule_met(r, ph, level, st) for r in lp.exclude)


def check_tops(lps, inputs, source: str) -> None:
    """Caffe ``Net::AppendTop``: a top naming the layer's bottom at the same index works in place; any
    other top naming a blob that exists already stops Caffe ("produced by multiple sources")."""
    seen = set(inputs)
    for lp in lps:
        for k, t in enumerate(lp.top):
            if k < len(lp.bottom) and lp.bottom[k] == t:
                continue
            if t in seen:
                raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): top blob {t!r} is produced by "
                                       "multiple sources (Caffe stops: a top works in place only under the name of "
                                       "the bottom at its index)")
            seen.add(t)


def ops_available() -> bool:
    """True when attnscale's compiled ``dilated_conv2d`` op is registered."""
    try:
        from attnscale.ops import has_extension
        if not has_extension():
            return False
        torch.ops.attnscale.dilated_conv2d  # noqa: B018 - raises if the op is not registered
        return True
    except (AttributeError, RuntimeError, ImportError):
        return False


@dataclass
class LayerRecord:
    """One layer as built: what ``inspect`` prints and what weight loading needs."""
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    top_shapes: list[tuple[int, ...]]
    status: str  # "run", "input", "ignored"
    key: str | None = None  # ModuleDict key of the module (run layers)
    param_names: list[str] = field(default_factory=list)
    strict_dim: bool = True  # DeepLab-v1's strict_dim: false copies a blob of the same count in another shape


def _module_key(name: str, taken: set[str]) -> str:
    key = name.replace(".", "_") or "layer"
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}__{i}"
    taken.add(key)
    return key


def blobs_to_copy(wf: WeightFile, name: str, target: str, blobs, n_params: int, shared_copy) -> list:
    """Caffe's blob-count check, then the ``(index, blob)`` pairs it copies.  A .caffemodel layer has
    exactly the target's number of blobs.  An HDF5 layer (``CopyTrainedLayersFromHDF5``) has at most that
    many links, may lack dataset ``j`` only when ``shared_copy(j)`` (the target shares it with an earlier
    layer), and only datasets ``0 .. n_params-1`` are read."""
    if wf.hdf5:
        count = wf.hdf5_links.get(name, sum(b is not None for b in blobs))
        ok = count <= n_params and all(j < len(blobs) and blobs[j] is not None or shared_copy(j)
                                       for j in range(n_params))
    else:
        count = len(blobs)
        ok = count == n_params
    if not ok:
        raise CaffeImportError(
            f"{wf.path}: layer {name!r}: incompatible number of blobs: the file has "
            f"{count}, {target} needs {n_params}"
            + (" (an HDF5 file may omit only the blobs shared with an earlier layer by param { name })"
               if wf.hdf5 else ""))
    return [(j, b) for j, b in enumerate(blobs[:n_params]) if b is not None]


class CaffeNet(nn.Module):
    """A Caffe net as a module.  ``net(*inputs)`` returns the output blob (or a tuple of them, in
    production order); ``net(*inputs, return_blobs=True)`` returns every blob by name, as Caffe's
    ``net.blobs`` after a forward.  Inputs are positional in ``net.input_names`` order or by name.
    """

    def __init__(self, net_param, source: str = "<net>", input_shapes=None, phase: str = "TEST",
                 use_ops: bool | str = "auto", level: int = 0, stages: Sequence[str] = (),
                 seed: int | None = 0, max_param_count: int = 1 << 30, max_blob_count: int = 1 << 32):
        super().__init__()
        if phase not in PHASES:
            raise CaffeImportError(f"{source}: phase must be 'TRAIN' or 'TEST', got {phase!r}")
        if use_ops == "auto":
            use_ops = ops_available()
        self.source = source
        self.name = net_param.name
        self.phase = phase
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ctx = L.BuildContext(use_ops=bool(use_ops), phase=phase, generator=gen, param_budget=max_param_count)
        self.layers = nn.ModuleDict()
        self.records: list[LayerRecord] = []
        lps = upgraded_layers(net_param, source)
        if net_param.HasField("state"):
            level = level or net_param.state.level
            stages = tuple(stages) or tuple(net_param.state.stage)
        kept = [lp for lp in lps if layer_included(lp, phase, level, stages)]

        shapes: dict[str, tuple[int, ...] | None] = {}
        declared = net_inputs(net_param, source)
        check_tops(kept, declared.names, source)
        overrides = self._normalise_overrides(input_shapes, declared.names, kept, source)
        all_inputs: list[str] = []
        for n, s in zip(declared.names, declared.shapes):
            shapes[n] = overrides.get(n, s)
            all_inputs.append(n)
        taken: set[str] = set()
        produced_by_run: list[str] = []
        self._plan: list[tuple[str, list[str], list[str]]] = []  # (key, bottoms, tops)
        for lp in kept:
            rec = LayerRecord(lp.name, lp.type, list(lp.bottom), list(lp.top), [], "run")
            if lp.type in L.DATA_TYPES:
                try:
                    dshapes = L.data_layer_shapes(lp)
                except L.LayerError as exc:
                    raise L.wrap_error(exc, source, lp) from None
                for t, s in zip(lp.top, dshapes):
                    s = overrides.get(t, s)
                    if s is not None and any(d < 0 for d in s):
                        raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): top {t!r} "
                                               f"has a negative dimension {s}")
                    shapes[t] = s
                    all_inputs.append(t)
                rec.status = "input"
                rec.top_shapes = [shapes[t] for t in lp.top]
                self.records.append(rec)
                continue
            if lp.type in L.IGNORED_TYPES:
                rec.status = "ignored"
                self.records.append(rec)
                continue
            builder = L.BUILDERS.get(lp.type)
            if builder is None:
                raise CaffeImportError(
                    f"{source}: layer {lp.name!r}: unsupported layer type {lp.type!r} (supported: "
                    f"{', '.join(sorted(L.BUILDERS))}; inputs: {', '.join(sorted(L.DATA_TYPES))}; "
                    f"ignored at deploy: {', '.join(sorted(L.IGNORED_TYPES))})")
            in_shapes = []
            for b in lp.bottom:
                if b not in shapes:
                    raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): bottom blob "
                                           f"{b!r} is not produced by any earlier layer or net input")
                if shapes[b] is None:
                    raise CaffeImportError(
                        f"{source}: layer {lp.name!r} ({lp.type}): the shape of input blob {b!r} is "
                        f"not given by the prototxt; pass input_shapes={{{b!r}: (N, C, H, W)}}")
                in_shapes.append(shapes[b])
            if not lp.top and lp.type != "Silence":
                raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}) has no top")
            try:
                if lp.type in L.NEEDS_TOPS:
                    mod = builder(lp, in_shapes, ctx, n_tops=len(lp.top))
                else:
                    mod = builder(lp, in_shapes, ctx)
                if len(mod.out_shapes) != len(lp.top):
                    raise L.LayerError(f"has {len(lp.top)} top(s) but produces {len(mod.out_shapes)}")
            except L.LayerError as exc:
                raise L.wrap_error(exc, source, lp) from None
            for t, s in zip(lp.top, mod.out_shapes):
                if math.prod(s) > max_blob_count:
                    raise CaffeImportError(f"{source}: layer {lp.name!r} ({lp.type}): top {t!r} would have "
                                           f"shape {s}, more than {max_blob_count} values")
            rec.key = _module_key(lp.name, taken)
            rec.top_shapes = list(mod.out_shapes)
            rec.param_names = [p.name for p in lp.param]
            rec.strict_dim = lp.strict_dim
            self.layers[rec.key] = mod
            self._plan.append((rec.key, list(lp.bottom), list(lp.top)))
            for t, s in zip(lp.top, mod.out_shapes):
                shapes[t] = s
                produced_by_run.append(t)
            self.records.append(rec)

        consumed_by_run = [b for _, bottoms, _ in self._plan for b in bottoms]
        self.input_names = [n for n in dict.fromkeys(all_inputs) if n in set(consumed_by_run)]
        self.unused_inputs = [n for n in dict.fromkeys(all_inputs) if n not in set(consumed_by_run)]
        # outputs: Caffe's available_blobs over the executed layers.  Unlike Caffe, net inputs that
        # no executed layer reads (labels of ignored losses, data_dim) are listed in
        # unused_inputs, not returned as outputs.
        available: dict[str, None] = {}
        for _, bottoms, tops in self._plan:
            for b in bottoms:
                available.pop(b, None)
            for t in tops:
                available[t] = None
        self.output_names = list(available)
        self.blob_shapes = shapes

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _normalise_overrides(input_shapes, declared: list[str], kept, source: str) -> dict:
        if input_shapes is None:
            return {}
        if isinstance(input_shapes, Mapping):
            out = {}
            for k, v in input_shapes.items():
                try:
                    out[str(k)] = tuple(int(d) for d in v)
                except (TypeError, ValueError):
                    raise CaffeImportError(f"{source}: input_shapes[{k!r}] must be a sequence of ints, "
                                           f"got {v!r}") from None
            return out
        try:
            shape = tuple(int(d) for d in input_shapes)
        except (TypeError, ValueError):
            raise CaffeImportError(f"{source}: input_shapes must be a dict name -> shape or one shape, "
                                   f"got {input_shapes!r}") from None
        first = declared[0] if declared else next(
            (lp.top[0] for lp in kept if lp.type in L.DATA_TYPES and len(lp.top)), None)
        if first is None:
            raise CaffeImportError(f"{source}: the net declares no input to give the shape {shape} to")
        return {first: shape}

    # ------------------------------------------------------------------ parameters
    def layer_blobs(self, layer_name: str) -> list[nn.Parameter]:
        """The learnable blobs of a layer in Caffe order (weight, bias)."""
        for rec in self.records:
            if rec.name == layer_name and rec.key is not None:
                mod = self.layers[rec.key]
                return mod.blobs() if hasattr(mod, "blobs") else []
        raise KeyError(layer_name)

    def layer_names(self) -> list[str]:
        return [r.name for r in self.records]

    def load_caffe_weights(self, weights) -> "WeightLoadReport":
        """Caffe ``Net::CopyTrainedLayersFrom``: copy every source layer's blobs into the layer of
        the same name (later duplicates win, shared blobs are written through every sharer);
        source layers absent here are ignored (listed in the report).

        A .caffemodel layer must have exactly the target's number of blobs, each ``ShapeEquals`` the
        target's, and goes to the first layer of that name.  An HDF5 layer
        (``CopyTrainedLayersFromHDF5``) goes to the last layer of that name, may lack the blobs the
        target layer shares with an earlier layer (``Net::ToHDF5`` writes only owned parameters), and
        its blobs need only the target's element count (DeepLab-v2's Caffe reshapes the blob to the
        dataset: :meth:`CaffeBlob.fits`), as do those of a DeepLab-v1 layer with ``strict_dim: false``."""
        wf = weights if isinstance(weights, WeightFile) else read_weights(weights)
        report = WeightLoadReport(wf.path)
        run = [r for r in self.records if r.key is not None]
        targets = {r.name: r for r in (run if wf.hdf5 else reversed(run))}
        owner: dict[str, str] = {}  # shared param name -> the first layer that declares it
        for r in run:
            for pname in r.param_names:
                if pname:
                    owner.setdefault(pname, r.name)
        for name, _type, blobs in wf.layers:
            rec = targets.get(name)
            if rec is None:
                report.ignored.append(name)
                continue
            mod = self.layers[rec.key]
            params = mod.blobs() if hasattr(mod, "blobs") else []
            copied = blobs_to_copy(wf, name, f"the prototxt layer ({rec.type})", blobs, len(params),
                                   lambda j: j < len(rec.param_names) and bool(rec.param_names[j])
                                   and owner[rec.param_names[j]] != rec.name)
            for j, blob in copied:
                p = params[j]
                target = tuple(p.shape)
                if not blob.fits(target, rec.strict_dim):
                    raise CaffeImportError(f"{wf.path}: layer {name!r}: cannot copy blob {j}: shape "
                                           f"mismatch, file {tuple(blob.data.shape)} vs prototxt layer {target}")
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.ascontiguousarray(blob.data)).reshape(target))
            report.loaded.append(name)
        return report

    # ------------------------------------------------------------------ forward
    def forward(self, *inputs, return_blobs: bool = False, **named):
        if len(inputs) > len(self.input_names):
            raise CaffeImportError(f"{self.source}: {len(inputs)} inputs given, the net takes "
                                   f"{len(self.input_names)} ({', '.join(self.input_names)})")
        blobs: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for k, v in named.items():
            if k not in self.input_names and k not in self.unused_inputs:
                raise CaffeImportError(f"{self.source}: {k!r} is not an input of the net "
                                       f"(inputs: {', '.join(self.input_names)})")
            blobs[k] = v
        missing = [n for n in self.input_names if n not in blobs]
        if missing:
            raise CaffeImportError(f"{self.source}: missing input blob(s) {missing} "
                                   f"(inputs in order: {', '.join(self.input_names)})")
        for key, bottoms, tops in self._plan:
            outs = self.layers[key](*[blobs[b] for b in bottoms])
            for t, o in zip(tops, outs):
                blobs[t] = o
        if return_blobs:
            return blobs
        outs = tuple(blobs[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------------------ summary
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        """Layers, tops with shapes and parameter counts (what ``inspect`` prints)."""
        lines = [f"net {self.name!r} ({self.source}), phase {self.phase}",
                 f"inputs: {', '.join(f'{n} {self.blob_shapes.get(n)}' for n in self.input_names)}"]
        if self.unused_inputs:
            lines.append(f"inputs used only by ignored layers: {', '.join(self.unused_inputs)}")
        w = max([len(r.name) for r in self.records] + [4])
        seen: set[int] = set()
        for r in self.records:
            n_params = 0
            shared = ""
            if r.key is not None and hasattr(self.layers[r.key], "blobs"):
                for p in self.layers[r.key].blobs():
                    if id(p) in seen:
                        shared = " (shared)"
                    else:
                        seen.add(id(p))
                        n_params += p.numel()
            tops = ", ".join(f"{t} {tuple(s) if s is not None else '?'}" for t, s in zip(r.tops, r.top_shapes)) \
                if r.status != "ignored" else ", ".join(r.tops)
            params = f"  params {n_params}{shared}" if (n_params or shared) else ""
            tag = "" if r.status == "run" else f"  [{r.status}]"
            lines.append(f"{r.name:<{w}}  {r.type:<14} {', '.join(r.bottoms) or '-'} -> {tops}{params}{tag}")
        lines.append(f"outputs: {', '.join(f'{n} {self.blob_shapes.get(n)}' for n in self.output_names)}")
        lines.append(f"parameters: {self.parameter_count()} (unique)")
        return "\n".join(lines)


@dataclass
class WeightLoadReport:
    """Which source layers were copied and which were ignored (absent from the prototxt)."""
    path: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.path}: copied {len(self.loaded)} layer(s)"
        if self.ignored:
            s += f"; ignored {len(self.ignored)} source layer(s) not in the net: {', '.join(self.ignored)}"
        return s


def load_net(prototxt, weights=None, input_shapes=None, phase: str = "TEST",
             use_ops: bool | str = "auto", level: int = 0, stages: Sequence[str] = (),
             seed: int | None = 0, max_param_count: int = 1 << 30) -> CaffeNet:
    """Build a :class:`CaffeNet` from a prototxt (path, text, or a ``NetParameter``) and
    optionally copy trained weights (.caffemodel, .caffemodel.h5, or a :class:`WeightFile`).

    ``input_shapes``: a dict blob name -> shape, or one shape for the first input, overriding
    the prototxt's.  ``use_ops``: ``"auto"`` (attnscale's compiled ops when built), True, False.
    Parameters without weights use the prototxt's fillers (seeded by ``seed``).
    """
    if hasattr(prototxt, "DESCRIPTOR"):
        net_param, source = prototxt, "<NetParameter>"
    else:
        net_param = read_net(prototxt)
        source = os.fspath(prototxt) if isinstance(prototxt, os.PathLike) or (
            isinstance(prototxt, str) and os.path.exists(prototxt)) else "<string>"
    net = CaffeNet(net_param, source, input_shapes=input_shapes, phase=phase, use_ops=use_ops,
                   level=level, stages=stages, seed=seed, max_param_count=max_param_count)
    if weights is not None:
        net.load_report = net.load_caffe_weights(weights)
    net.eval()
    return net
