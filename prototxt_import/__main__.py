"""``python -m prototxt_import inspect NET.prototxt [WEIGHTS]``,
``python -m prototxt_import convert NET.prototxt WEIGHTS -o model.pt [--config eval.json]`` and
``python -m prototxt_import config SOLVER.prototxt [--net NET.prototxt] [--base config.json] -o config.json
[--snapshot X.solverstate]``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CaffeImportError


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace("x", ",").split(",") if d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 1,3,65,65 or 1x3x65x65, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"shape must be positive ints, got {text!r}")
    return dims


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prototxt_import",
                                 description="Inspect Caffe/DeepLab nets and convert them to attnscale.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="layers, blob shapes and parameter counts of a net")
    ins.add_argument("prototxt")
    ins.add_argument("weights", nargs="?", help=".caffemodel or .caffemodel.h5 to check against the net")
    ins.add_argument("--input-shape", type=_shape, default=None,
                     help="override the first input's shape, e.g. 1,3,321,321")
    ins.add_argument("--phase", choices=("TEST", "TRAIN"), default="TEST")
    conv = sub.add_parser("convert", help="map a DeepLab/attention net + weights onto attnscale's model")
    conv.add_argument("prototxt")
    conv.add_argument("weights")
    conv.add_argument("-o", "--output", required=True, help="where to torch.save the state_dict")
    conv.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    conv.add_argument("--phase", choices=("TEST", "TRAIN"), default="TEST",
                      help="the net Caffe would build (TRAIN: a training prototxt with a TRAIN-only data layer)")
    conv.add_argument("--config", default=None, metavar="JSON", help="also write a TrainConfig JSON of the model, "
                      "for python -m attnscale.evaluate JSON --checkpoint OUTPUT")
    conv.add_argument("--base", default=None, help="TrainConfig JSON giving --config the fields the net does not "
                      "(dataset, data_root, device, ...)")
    cf = sub.add_parser("config", help="a Caffe solver + its training net as a TrainConfig JSON "
                        "(python -m attnscale.train trains it)")
    cf.add_argument("solver", help="solver.prototxt")
    cf.add_argument("--net", default=None, help="the training net, in place of the solver's net / train_net")
    cf.add_argument("--base", default=None, help="TrainConfig JSON giving the fields Caffe's files do not "
                    "(dataset, device, out_dir, ...)")
    cf.add_argument("-o", "--output", required=True, help="where to write the TrainConfig JSON")
    cf.add_argument("--snapshot", default=None, metavar="SOLVERSTATE", help="a Caffe run's *.solverstate: also "
                    "write OUT_DIR/checkpoint.pt at its iteration (its weights and momentum history), to go on "
                    "with python -m attnscale.train JSON --resume")
    cf.add_argument("--weights", default=None, help="with --snapshot: the snapshot's .caffemodel, in place of the "
                    "learned_net path it names")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            from .net import load_net
            net = load_net(args.prototxt, input_shapes=args.input_shape, phase=args.phase, use_ops=False)
            print(net.summary())
            if args.weights:
                print(net.load_caffe_weights(args.weights))
        elif args.cmd == "config":
            _config(args)
        else:
            from attnscale.train import atomic_save

            from .convert import to_attnscale
            base = _base(args.base) if args.config else None     # a bad --base stops before any work
            _writable(args.output, "converted model")
            if args.config:
                _writable(args.config, "config")
            model, report = to_attnscale(args.prototxt, args.weights, phase=args.phase)
            cfg = _model_config(args, base, report.config) if args.config else None
            try:
                atomic_save(model.state_dict(), args.output)
            except (OSError, RuntimeError) as exc:
                raise CaffeImportError(f"{args.output}: cannot write the converted model: {exc}") from None
            if not args.quiet:
                print(report)
            print(f"saved state_dict ({len(model.state_dict())} tensors) to {args.output}; "
                  f"config: {report.config}")
            if cfg is not None:
                _write_config(cfg, args.config)
                crf = "" if report.crf is None else f" --crf-params '{json.dumps(report.crf.to_dict())}'"
                print(f"wrote {args.config}; evaluate with: python -m attnscale.evaluate {args.config} "
                      f"--checkpoint {args.output}{crf}")
    except CaffeImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _base(path):
    from attnscale.config import TrainConfig
    try:
        return TrainConfig.load(path) if path else TrainConfig()
    except (OSError, ValueError) as exc:
        raise CaffeImportError(f"--base: {exc}") from None


def _write_config(cfg, path: str) -> None:
    try:
        cfg.save(path)      # atomic
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot write the config: {exc}") from None


def _writable(path: str, what: str) -> None:
    """Refuse, before anything is written, a path that cannot take a file: a folder, or under a file or an
    unwritable folder (the nearest existing ancestor)."""
    if os.path.isdir(path):
        raise CaffeImportError(f"{path}: cannot write the {what}: it is a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        if os.path.islink(parent):       # a link to nowhere: no folder can be made there
            raise CaffeImportError(f"{path}: cannot write the {what}: {parent} is a link to nothing")
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CaffeImportError(f"{path}: cannot write the {what}: {parent} is "
                               f"{'not a folder' if not os.path.isdir(parent) else 'not writable'}")


def _write_checkpoint(ck: dict, path: str) -> None:
    """A checkpoint written atomically where the config's run keeps it."""
    from attnscale.train import atomic_save
    try:
        atomic_save(ck, path)
    except (OSError, RuntimeError) as exc:
        raise CaffeImportError(f"{path}: cannot write the checkpoint: {exc}") from None


def _model_config(args, base, found: dict):
    """``convert --config``: the base config with the converted model's fields."""
    from attnscale.config import TrainConfig

    from .solver import check_classes
    keys = ("num_classes", "scales", "merge", "extra_supervision", "width", "classifier_name", "dropout")
    d = {**base.to_dict(), **{k: found[k] for k in keys}}
    d["scales"] = list(d["scales"])
    if len(d["scales"]) == 1:     # a one-scale net has no per-scale losses to add (nor a merge)
        d["extra_supervision"] = False
    try:
        cfg = TrainConfig.from_dict(d, source=args.prototxt)
    except ValueError as exc:
        raise CaffeImportError(f"--config: {exc}") from None
    check_classes(cfg, args.prototxt)
    return cfg


def _config(args) -> None:
    from .solver import resume_caffe_snapshot, train_config
    if args.weights and not args.snapshot:
        raise CaffeImportError("--weights goes with --snapshot (the solver's own weights field gives init)")
    _writable(args.output, "config")
    if args.snapshot:
        cfg, ck, notes = resume_caffe_snapshot(args.solver, args.snapshot, net=args.net, base=_base(args.base),
                                               weights=args.weights)
        ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
        if os.path.exists(ckpt):
            raise CaffeImportError(f"{ckpt} exists: a checkpoint is never overwritten (another out_dir in --base, "
                                   "or move the file away)")
        _writable(ckpt, "checkpoint")
        _write_config(cfg, args.output)
        _write_checkpoint(ck, ckpt)
    else:
        cfg, notes = train_config(args.solver, net=args.net, base=_base(args.base))
        _write_config(cfg, args.output)
    for n in notes:
        print(f"note: {n}")
    if args.snapshot:
        print(f"wrote {os.path.join(cfg.out_dir, 'checkpoint.pt')} at iteration {ck['iter']}; go on with: "
              f"python -m attnscale.train {args.output} --resume")
        return
    print(f"wrote {args.output}: {cfg.max_iter} iterations of {cfg.batch_size} x {cfg.iter_size} images, "
          f"scales {cfg.scales}, merge {cfg.merge}, extra supervision {cfg.extra_supervision}; "
          f"train with: python -m attnscale.train {args.output}")


if __name__ == "__main__":
    sys.exit(main())
