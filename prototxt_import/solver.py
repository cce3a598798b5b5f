"""A Caffe solver and its training net as an attnscale :class:`~attnscale.config.TrainConfig`
(:func:`train_config`; ``python -m prototxt_import config SOLVER.prototxt -o config.json``).

What Caffe's ``SGDSolver`` would do with the solver and the TRAIN phase of its net, field by field:

- solver: ``base_lr``, ``lr_policy`` (any of Caffe's) with the ``gamma``, ``stepsize``, ``stepvalue`` and
  ``power`` it reads, ``max_iter``, ``momentum``, ``weight_decay`` (``regularization_type`` L2), ``iter_size``,
  ``clip_gradients``, ``snapshot``, ``display``, ``random_seed``, ``weights`` (one file: ``init``);
- net (``net`` / ``net_param`` / ``train_net`` / ``train_net_param``, with ``train_state``): scales,
  merge, classes, classifier name, width and dropout as :func:`~prototxt_import.convert.to_attnscale`
  reads them; extra supervision from the losses (one on the merged scores, and one on each scale's or
  none); every layer's ``lr_mult`` / ``decay_mult`` (:func:`~prototxt_import.convert.param_mults`) and
  ``weight_filler`` / ``bias_filler`` (Caffe's default where none: constant 0);
- data: DeepLab's ``ImageSegData`` layer (``batch_size``, ``source``, ``root_folder``; ``crop_size``,
  ``mirror``), or the image input's shape (batch, crop).

Anything attnscale would train differently (another solver type, L1, a loss on other scores or labels, a
mean other than DeepLab's, a loss weight, ...) is an error naming the file and the field, as are Caffe's own
checks; fields with no effect on the weights (test nets, snapshot prefix, solver mode) are listed in the notes.
"""
from __future__ import annotations

import os

import numpy as np

from attnscale.config import LR_POLICIES

from . import layers as L
from .convert import _short
from .errors import CaffeImportError
from .readers import read_solver


def _f32_equal(got, want) -> bool:
    return len(got) == len(want) and all(np.float32(a) == np.float32(b) for a, b in zip(got, want))


def _solver_net(sp, source: str, net):
    """Caffe's ``Solver::InitTrainNet``: the training net from exactly one of four fields (or ``net``
    given here), its state merged with ``train_state``."""
    from .convert import _read
    given = [f for f in ("train_net_param", "train_net", "net_param", "net") if sp.HasField(f)]
    if net is not None:
        net_param, net_source = _read(net)
    elif len(given) != 1:
        raise CaffeImportError(f"{source}: {'no training net' if not given else 'several training nets'} "
                               f"({', '.join(given) or 'none of net, net_param, train_net, train_net_param'}); "
                               "Caffe needs exactly one (or pass the net)")
    elif given[0].endswith("_param"):
        net_param, net_source = getattr(sp, given[0]), f"{source} ({given[0]})"
    else:
        path = getattr(sp, given[0])
        if not os.path.isfile(path):
            raise CaffeImportError(f"{source}: {given[0]}: {path!r} is not a file (Caffe opens it from the "
                                   "working directory; pass the net to give it another way)")
        net_param, net_source = _read(path)
    if sp.HasField("train_state"):
        net_param = type(net_param).FromString(net_param.SerializeToString())
        net_param.state.MergeFrom(sp.train_state)
    return net_param, net_source


def _solver_fields(sp, source: str, base, notes: list[str]) -> dict:
    if sp.HasField("solver_type") and sp.HasField("type"):   # upgrade_proto.cpp UpgradeSolverType
        raise CaffeImportError(f"{source}: both solver_type and type are given (Caffe refuses the pair)")
    kind = (sp.DESCRIPTOR.fields_by_name["solver_type"].enum_type.values_by_number[sp.solver_type].name
            if sp.HasField("solver_type") else sp.type)
    if kind != "SGD":
        raise CaffeImportError(f"{source}: solver type {kind!r}: attnscale trains with Caffe's SGDSolver only")
    if sp.regularization_type != "L2":
        raise CaffeImportError(f"{source}: regularization_type {sp.regularization_type!r}: only L2 (Caffe's "
                               "default) is supported")
    if sp.lr_policy not in LR_POLICIES:
        raise CaffeImportError(f"{source}: {'lr_policy ' + repr(sp.lr_policy) if sp.lr_policy else 'no lr_policy'}: "
                               f"Caffe stops on an unknown learning rate policy (its: {', '.join(LR_POLICIES)})")
    if not sp.HasField("max_iter"):
        raise CaffeImportError(f"{source}: no max_iter")
    d = dict(base_lr=sp.base_lr, lr_policy=sp.lr_policy, max_iter=sp.max_iter, momentum=sp.momentum,
             weight_decay=sp.weight_decay, iter_size=sp.iter_size, clip_gradients=sp.clip_gradients,
             snapshot=sp.snapshot)
    if sp.lr_policy == "step" and sp.stepsize <= 0:
        raise CaffeImportError(f"{source}: lr_policy 'step' needs stepsize > 0, got {sp.stepsize} "
                               "(Caffe: CHECK_GT(stepsize, 0))")
    if sp.lr_policy == "sigmoid" and sp.stepsize <= 0:
        raise CaffeImportError(f"{source}: lr_policy 'sigmoid' needs stepsize > 0, got {sp.stepsize} "
                               "(Caffe: CHECK_GT(stepsize, 0))")
    if sp.lr_policy not in ("fixed", "poly") and sp.gamma < 0:
        raise CaffeImportError(f"{source}: gamma {sp.gamma:g} < 0 (Caffe: CHECK_GE(gamma, 0))")
    if sp.average_loss < 1:
        raise CaffeImportError(f"{source}: average_loss {sp.average_loss} < 1 (Caffe: CHECK_GE(average_loss, 1))")
    # the fields each policy reads (train.caffe_rate)
    reads = {"step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
             "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize")}
    d.update({k: list(sp.stepvalue) if k == "stepvalue" else getattr(sp, k) for k in reads.get(sp.lr_policy, ())})
    # solver fields are proto floats: their shortest float32 decimal (0.001, not 0.0010000000474974513)
    d = {k: _short(v) if isinstance(v, float) else v for k, v in d.items()}
    if sp.display:                          # Caffe logs when iter % display == 0: a negative display too
        d["display"] = abs(sp.display)
    elif sp.HasField("display"):
        notes.append(f"display 0 (Caffe: never log); attnscale logs every {base.display} iterations")
    if sp.random_seed >= 0:                 # Caffe::set_random_seed takes an unsigned int
        d["seed"] = sp.random_seed % 2 ** 32
        if d["seed"] != sp.random_seed:
            notes.append(f"random_seed {sp.random_seed} is {d['seed']} as Caffe's unsigned int seed")
    else:
        notes.append(f"no random_seed (Caffe seeds at random); attnscale's runs are seeded: seed {base.seed}")
    # Solver::LoadNetWeights: each entry is a comma-separated list, each name trimmed
    weights = [w.strip() for entry in sp.weights for w in entry.split(",")]
    if any(not w for w in weights):
        raise CaffeImportError(f"{source}: weights {list(sp.weights)} names an empty file")
    if len(weights) > 1:
        raise CaffeImportError(f"{source}: {len(weights)} weights files {weights}; attnscale's init takes one")
    if weights:
        d["init"] = weights[0]
    unused = [f.name for f, _ in sp.ListFields() if f.name in (
        "test_net", "test_net_param", "test_state", "test_iter", "test_interval", "test_compute_loss",
        "test_initialization", "snapshot_prefix", "snapshot_diff", "snapshot_format", "solver_mode",
        "device_id", "average_loss", "debug_info", "snapshot_after_train", "layer_wise_reduce")]
    if unused:
        notes.append(f"not used (no effect on the trained weights, or attnscale's own way): {', '.join(unused)}; "
                     "evaluate with python -m attnscale.evaluate, checkpoints go to out_dir, the device is "
                     "TrainConfig.device")
    return d


def _filler(fp, where: str) -> dict:
    """A ``FillerParameter`` as a ``TrainConfig.fillers`` spec: its type and the fields that type reads."""
    from attnscale.caffe import FILLER_FIELDS, check_filler
    if fp.type not in FILLER_FIELDS:
        raise CaffeImportError(f"{where}: unknown filler type {fp.type!r} (Caffe's GetFiller stops: "
                               f"{', '.join(FILLER_FIELDS)})")
    if fp.sparse != -1 and fp.type != "gaussian":
        raise CaffeImportError(f"{where}: sparse {fp.sparse} on a {fp.type} filler (Caffe: \"Sparsity not "
                               "supported by this Filler\")")
    spec = {"type": fp.type}
    for k in FILLER_FIELDS[fp.type]:
        v = getattr(fp, k)
        spec[k] = (fp.DESCRIPTOR.fields_by_name[k].enum_type.values_by_number[v].name if k == "variance_norm"
                   else v if isinstance(v, int) else _short(v))
    try:
        return check_filler(spec, where)
    except ValueError as exc:
        raise CaffeImportError(str(exc)) from None


def _fillers(owners: dict, source: str, init: str | None, notes: list[str]) -> dict:
    """Each layer's ``weight_filler`` / ``bias_filler`` (its blob owner's), else Caffe's default: constant 0."""
    out, zero = {}, []
    for m, (w_owner, b_owner) in owners.items():
        pair = []
        for lp, what in ((w_owner, "weight_filler"), (b_owner, "bias_filler")):
            cp = lp.convolution_param
            pair.append(_filler(getattr(cp, what), f"{source}: layer {lp.name!r}: {what}"))
            if what == "weight_filler" and not cp.HasField(what):
                zero.append(m)
        out[m] = pair
    if zero:
        notes.append(f"no weight_filler in {', '.join(zero)}: Caffe starts them at constant 0, and so does this "
                     "config" + (f", before the init weights ({init}) are copied in" if init else
                                 " (no init weights given: a net starting at all zeros learns only its last biases)")
                     + ("; an all-zero attention head learns only att_conv2's bias (the same weights at every "
                        "pixel): give att_conv1 / att_conv2 a weight_filler" if "att_conv1" in zero else ""))
    return out


def _label_size(g, node, crop: int, inputs, source: str, loss: str):
    """A loss's label size at the crop: a net input's declared shape, or the data layer's label (the crop)
    through Caffe's Interp sizes."""
    from attnscale import caffe
    if not isinstance(node[0], int):
        shape = dict(zip(inputs.names, inputs.shapes)).get(node[1])
        return None if shape is None else tuple(shape[-2:])
    lp = g.lps[node[0]]
    if lp.type == "Interp":
        return caffe.interp_output_shape(_label_size(g, g.bottoms[node[0]][0], crop, inputs, source, loss),
                                         L.interp_params(lp))
    if lp.type in L.DATA_TYPES:
        return (crop, crop)
    raise CaffeImportError(f"{source}: layer {loss!r}: its label comes from layer {lp.name!r} ({lp.type}); "
                           "attnscale's labels are the data layer's, shrunk by Interp to each score map's size")


def _losses(layout, cfg: dict, net_param, crop: int, source: str) -> bool:
    """Extra supervision from the TRAIN phase's ``SoftmaxWithLoss`` layers: one on the merged scores, plus one on
    each scale's classifier output or none, each against the label at its scores' size, and each as attnscale's
    loss (weight 1, ignore_label 255, VALID normalisation)."""
    from attnscale import caffe
    from attnscale.model import AttentionToScale

    from .readers import net_inputs
    g, inputs = layout.graph, net_inputs(net_param, source)
    size = {}
    if crop:    # crop 0: every image at its own size, so the label sizes are only known per image
        size = {"merged": AttentionToScale.output_size((crop, crop))}
        size.update({s: AttentionToScale.output_size(caffe.scaled_input_shape((crop, crop), s))
                     for s in cfg["scales"]})
    seen: dict = {}
    for i, lp in enumerate(layout.layers):
        if lp.type != "SoftmaxWithLoss":
            continue
        lo = lp.loss_param
        if list(lp.loss_weight) not in ([], [1.0]):
            raise CaffeImportError(f"{source}: layer {lp.name!r}: loss_weight {list(lp.loss_weight)}; "
                                   "attnscale sums its losses with weight 1")
        if not lo.HasField("ignore_label") or lo.ignore_label != 255:
            raise CaffeImportError(f"{source}: layer {lp.name!r}: ignore_label must be 255 (DeepLab's), got "
                                   f"{lo.ignore_label if lo.HasField('ignore_label') else 'none'}")
        valid = (lo.normalize if lo.HasField("normalize") and not lo.HasField("normalization")
                 else lo.normalization == lo.DESCRIPTOR.fields_by_name["normalization"].enum_type
                 .values_by_name["VALID"].number)
        if not valid:
            raise CaffeImportError(f"{source}: layer {lp.name!r}: the loss must be normalised over the valid "
                                   "(non-ignored) pixels, Caffe's default VALID, as attnscale's")
        if len(g.bottoms[i]) != 2:
            raise CaffeImportError(f"{source}: layer {lp.name!r}: a SoftmaxWithLoss takes scores and labels")
        role = layout.outputs.get(g.bottoms[i][0])
        if role is None:
            raise CaffeImportError(
                f"{source}: layer {lp.name!r}: its scores {g.name(g.bottoms[i][0])} are neither the merged scores "
                "nor a scale's classifier output: attnscale's losses take those")
        if role in seen:
            raise CaffeImportError(f"{source}: layers {seen[role]!r} and {lp.name!r} both put a loss on the "
                                   + ("merged scores" if role == "merged" else f"scale-{role:g} scores"))
        seen[role] = lp.name
        got = _label_size(g, g.bottoms[i][1], crop, inputs, source, lp.name) if crop else None
        if got is not None and tuple(got) != tuple(size[role]):
            raise CaffeImportError(f"{source}: layer {lp.name!r}: its label {g.name(g.bottoms[i][1])} is "
                                   f"{tuple(got)} at crop {crop}, its scores {tuple(size[role])}")
    if "merged" not in seen:
        raise CaffeImportError(f"{source}: no SoftmaxWithLoss on the merged scores in the TRAIN phase")
    per_scale = [s for s in seen if s != "merged"]
    if per_scale and len(per_scale) != len(cfg["scales"]):
        raise CaffeImportError(f"{source}: losses on the scale(s) {sorted(per_scale, reverse=True)} only: "
                               "attnscale's extra supervision puts one on every scale's scores")
    return bool(per_scale)


def _data_fields(layout, net_param, source: str, notes: list[str]) -> dict:
    """Batch and crop from DeepLab's ``ImageSegData`` layer (with its list and transform), or from the
    image input's shape."""
    from attnscale.caffe import IGNORE_LABEL, MEAN_BGR

    from .readers import net_inputs
    data = [lp for lp in layout.layers if lp.type in L.DATA_TYPES]
    if not data:
        shape = net_inputs(net_param, source).shapes[0]
        if shape is None or shape[-1] != shape[-2]:
            raise CaffeImportError(f"{source}: the image input has shape {shape}: attnscale's crops are square")
        notes.append(f"the net reads plain input blobs: batch {shape[0]} and crop {shape[-1]} from the image's "
                     "input shape; the data transform is DeepLab's ImageSegData (mean subtraction, random crop, "
                     "mirror as TrainConfig.mirror)")
        return dict(batch_size=shape[0], crop_size=shape[-1])
    lp = data[0]
    if lp.type != "ImageSegData":
        raise CaffeImportError(f"{source}: layer {lp.name!r}: data layer type {lp.type}; attnscale reads "
                               "DeepLab's ImageSegData lists (image and label paths)")
    ip, tp = lp.image_data_param, lp.transform_param
    bad = [(f, v) for f, v in (("transform_param.mean_file", tp.mean_file), ("image_data_param.mean_file",
                                ip.mean_file), ("new_height", ip.new_height), ("new_width", ip.new_width),
                               ("scale_factors", list(tp.scale_factors))) if v]
    if tp.scale != 1 or ip.scale != 1:
        bad.append(("scale", tp.scale if tp.scale != 1 else ip.scale))
    if not _f32_equal(list(tp.mean_value), MEAN_BGR):
        bad.append(("mean_value", list(tp.mean_value)))
    if ip.ignore_label != IGNORE_LABEL:
        bad.append(("ignore_label", ip.ignore_label))
    if bad:
        f, v = bad[0]
        raise CaffeImportError(f"{source}: layer {lp.name!r}: {f} {v}: attnscale's data transform is DeepLab's "
                               f"(mean_value {' '.join(f'{m:g}' for m in MEAN_BGR)}, scale 1, no resize, "
                               f"ignore_label {IGNORE_LABEL})")
    crop = (tp.crop_height, tp.crop_width) if tp.crop_height or tp.crop_width else (tp.crop_size, tp.crop_size)
    if crop[0] != crop[1]:
        raise CaffeImportError(f"{source}: layer {lp.name!r}: crop {crop[0]}x{crop[1]}: attnscale's crops are square")
    if not ip.shuffle:
        notes.append(f"layer {lp.name!r} reads its list in order (shuffle false); attnscale shuffles every epoch")
    d = dict(batch_size=ip.batch_size, crop_size=crop[0], mirror=tp.mirror)
    if ip.source:
        d["train_list"] = ip.source
    if ip.root_folder:
        d["data_root"] = ip.root_folder
    return d


def train_config(solver, net=None, base=None):
    """``(TrainConfig, notes)`` training as Caffe's ``SGDSolver`` would with ``solver`` (a path or text) and
    its training net (or ``net``: a path, text or ``NetParameter``, in place of the solver's).  Fields the
    Caffe files do not set (data set, device, out_dir, ...) come from ``base`` (default ``TrainConfig()``)."""
    cfg, notes, _ = _train_config(solver, net, base)
    return cfg, notes


def _train_config(solver, net, base, snapshot: bool = False):
    """:func:`train_config`, and (the model parameter of each of Caffe's learnable blobs in its order, the
    net's layout).  ``snapshot``: the weights will come from a snapshot, through the net's names."""
    from attnscale.config import TrainConfig

    from .convert import _analyse, _mults
    base = base if base is not None else TrainConfig()
    source = os.fspath(solver) if not isinstance(solver, str) or os.path.exists(solver) else "<solver string>"
    sp = read_solver(solver)
    notes: list[str] = []
    d = _solver_fields(sp, source, base, notes)
    net_param, net_source = _solver_net(sp, source, net)
    cfg, layout = _analyse(net_param, net_source, phase="TRAIN")
    mults, owners, order = _mults(layout, net_source)
    d.update(_data_fields(layout, net_param, net_source, notes))
    d.update(num_classes=cfg["num_classes"], scales=list(cfg["scales"]), merge=cfg["merge"],
             extra_supervision=_losses(layout, cfg, net_param, d["crop_size"], net_source), width=cfg["width"],
             classifier_name=cfg["classifier_name"], dropout=cfg["dropout"], lr_mults=mults,
             fillers=_fillers(owners, net_source, d.get("init") or base.init, notes))
    renamed = [f"{lps[0].name} ({m})" for m, lps in layout.copies.items() if lps[0].name != m]
    init = d.get("init") or base.init
    if renamed and init and not init.endswith(".pt") and not snapshot:   # a .pt init goes by the model's names
        raise CaffeImportError(f"{net_source}: the net names layers otherwise than attnscale's model "
                               f"({', '.join(renamed)})"
                               f", and Caffe copies the weights {init} by the net's names while attnscale's init goes "
                               "by the model's: convert them first (python -m prototxt_import convert NET WEIGHTS "
                               "-o init.pt --phase TRAIN) and give init.pt")
    if base.random_scale is not None:
        notes.append(f"random_scale {list(base.random_scale)} of the base dropped: the net's data layer has no "
                     "random scaling")
    d["random_scale"] = None
    loose = [lp.name for lps in layout.copies.values() for lp in lps if not lp.strict_dim]
    if loose:
        notes.append(f"strict_dim: false in {', '.join(loose)}: DeepLab-v1's Caffe copies init weights of the same "
                     "count in another shape there, attnscale's init takes the model's shapes: convert such weights "
                     "first (python -m prototxt_import convert NET WEIGHTS -o init.pt) and give init.pt")
    notes += layout.notes
    try:
        out = TrainConfig.from_dict({**base.to_dict(), **d}, source=f"{source} + {net_source}")
    except ValueError as exc:
        raise CaffeImportError(f"{source} + {net_source}: {exc}") from None
    check_classes(out, net_source)
    return out, notes, (order, layout)


def check_classes(cfg, source: str) -> None:
    """The net's classes must be the data set's: its labels and its per-class IoU names follow them."""
    from attnscale.train import dataset_classes
    try:
        names = dataset_classes(cfg)
    except ValueError as exc:
        raise CaffeImportError(f"{source}: {exc}") from None
    if cfg.num_classes != len(names):
        raise CaffeImportError(f"{source}: the net scores {cfg.num_classes} classes, the data set {cfg.dataset!r} has "
                               f"{len(names)} ({', '.join(names[:3])}, ...): give the base config its data set")


def resume_caffe_snapshot(solver, solverstate, net=None, base=None, weights=None):
    """``(TrainConfig, checkpoint, notes)``: a Caffe run's snapshot (``*.solverstate`` or ``*.solverstate.h5``,
    and the weights it names as ``learned_net``, or ``weights``) as an attnscale checkpoint at the same
    iteration, so that ``python -m attnscale.train CONFIG --resume`` goes on with Caffe's weights and momentum
    history.

    Caffe's ``SolverState.history`` holds one blob per learnable parameter in ``Net::learnable_params`` order
    (owners in net order); each goes to its model parameter's ``history``.  The data order and random streams
    are attnscale's own from that iteration (a solverstate holds neither)."""
    import dataclasses

    import torch

    from attnscale.train import build_model, caffe_multistep, make_optimizer, rng_state, seed_all, set_rng_state

    from .convert import ConversionReport, _load
    from .readers import read_solverstate, read_weights
    cfg, notes, (order, layout) = _train_config(solver, net, base, snapshot=True)
    # the weights come from the snapshot: a resumed run needs no init file; its checkpoint lies where a run
    # started elsewhere finds it
    if cfg.init:
        notes.append(f"init {cfg.init} dropped: the snapshot's weights replace it")
    cfg = dataclasses.replace(cfg, init="", out_dir=os.path.abspath(cfg.out_dir))
    state = read_solverstate(solverstate)
    path = state.path
    if len(state.history) != len(order):
        raise CaffeImportError(f"{path}: {len(state.history)} history blobs, but the net has {len(order)} learnable "
                               f"blobs ({', '.join(order[:4])}, ...): not a snapshot of this net")
    # Caffe snapshots after ++iter_: the counter is the one update iter - 1's GetLearningRate left
    step = caffe_multistep(cfg, state.iter - 1) if state.iter else 0
    if cfg.lr_policy == "multistep" and state.current_step != step:
        raise CaffeImportError(f"{path}: current_step {state.current_step} at iteration {state.iter}, but the solver's "
                               f"stepvalue {cfg.stepvalue} gives {step} there: attnscale computes the step from "
                               "stepvalue")
    weights = os.fspath(weights) if weights else state.learned_net
    if not weights or not os.path.isfile(weights):
        raise CaffeImportError(f"{path}: its weights {weights!r} (learned_net) are not a file; pass them")
    saved = rng_state()
    try:
        seed_all(cfg.seed)
        fresh = rng_state()     # the streams a run of this config starts with; the resumed run takes them on
        model = build_model(cfg)
        report = ConversionReport(path, weights)
        _load(model, layout, read_weights(weights), report)   # Net::CopyTrainedLayersFrom, by the net's names
        if report.fresh:
            raise CaffeImportError(f"{weights}: lacks {[n for n, _ in report.fresh][:4]}: not the weights of this "
                                   "snapshot's net")
        params = dict(model.named_parameters())
        opt = make_optimizer(model, cfg)
        for i, (name, h) in enumerate(zip(order, state.history)):
            p = params[name]
            if h.size != p.numel():
                raise CaffeImportError(f"{path}: history blob {i} has {h.size} values, {name} has {p.numel()}")
            opt.state[p]["history"] = torch.from_numpy(h.reshape(tuple(p.shape)).copy()).to(p.dtype)
        ck = {"iter": int(state.iter), "model": model.state_dict(), "optimizer": opt.state_dict(),
              "rng": fresh, "config": cfg.to_dict(), "samples_per_update": cfg.batch_size * cfg.iter_size,
              "world": 1}
    finally:
        set_rng_state(saved)
    notes.append(f"from Caffe's snapshot at iteration {state.iter} ({path} + {weights}); the data order and random "
                 "streams go on as attnscale's own (a solverstate holds neither), under one process")
    return cfg, ck, notes
