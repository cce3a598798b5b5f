"""Training: ``python -m attnscale.train CONFIG.json [--resume] [--device cuda]``.

Caffe ``SGDSolver`` semantics, exactly:

- learning rate, ``lr_policy: "step"``: ``rate = base_lr * gamma ^ floor(iter / stepsize)`` (and Caffe's
  other policies: :func:`caffe_rate`)
  where ``iter`` is the number of updates already done (Caffe's ``iter_`` in ``ApplyUpdate``);
- ``iter_size`` forward/backward passes accumulate their *unscaled* gradients per update; the sum
  is clipped (``ClipGradients``, if on) and then multiplied by the float ``1 / iter_size``
  (``SGDSolver::Normalize``), in Caffe's order, i.e. the loss is averaged over the passes;
- per parameter (``Regularize`` + ``ComputeUpdateValue`` + ``Blob::Update``)::

      g     += decay_mult * weight_decay * w         (L2)
      v      = momentum * v + lr_mult * rate * g
      w     -= v

  Note the learning rate sits *inside* the history: when the rate drops 10x at a step, the
  momentum still carries the old, larger steps (``torch.optim.SGD`` instead keeps
  ``v = m v + g`` and applies ``lr`` outside, which rescales the history too).
  :class:`CaffeSGD` implements Caffe's rule.

Checkpoints are atomic (temporary file + fsync + ``os.replace``) and hold the model, the momentum
history, the iteration, the torch/numpy/python RNG states and the data position, so
``--resume`` continues bit-for-bit as if never interrupted (and refuses a checkpoint written by
another config or rank count); without it a run refuses to start over an existing checkpoint.  Under
``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel (NCCL for a CUDA
device, gloo otherwise) and every rank reads its own shard of each epoch's permutation; each rank draws
``batch_size x iter_size`` images per update, so the batch grows with the rank count.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import TrainConfig, resume_free_fields
from .data import (FileSource, SegDataset, SyntheticSource, TransformConfig, get_spec, make_loader,
                   network_input)
from .data.lists import join_root
from .data.synthetic import SYNTHETIC_CLASSES
from .malloc import keep_freed_memory
from .model import check_labels

CHECKPOINT = "checkpoint.pt"
HOST_PHASES = ("data", "passes", "wait", "step")   # the main thread's time per update, in train.log


# ------------------------------------------------------------------------------------------
# Caffe SGD
# ------------------------------------------------------------------------------------------
class CaffeSGD(torch.optim.Optimizer):
    """Caffe's ``SGDSolver`` update: ``v = m v + lr (g + wd w); w -= v``.

    Every parameter is updated, as in Caffe, where a parameter no loss reached has a zero diff.
    Each param group holds ``lr`` (the *current* local rate, i.e. ``rate * lr_mult``),
    ``weight_decay`` (``weight_decay * decay_mult``) and ``momentum``.  The history ``v`` is
    stored per parameter as ``state[p]['history']`` (Caffe's ``history_``).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"CaffeSGD: lr, momentum, weight_decay must be >= 0 "
                             f"(got {lr}, {momentum}, {weight_decay})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = list(group["params"])
            if not params:
                continue
            # Caffe's diff of a parameter no loss reached is zero, not absent: decay and momentum still act
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            history = []
            for p in params:
                st = self.state[p]
                if "history" not in st:
                    st["history"] = torch.zeros_like(p)
                history.append(st["history"])
            # the same element-wise operations for the whole group at once (a few kernels on a GPU, not
            # four per parameter)
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(history, m)
            torch._foreach_add_(history, grads, alpha=lr)
            torch._foreach_sub_(params, history)
        return loss


def clip_gradients(params, clip: float) -> float:
    """Caffe ``SGDSolver::ClipGradients``: if the L2 norm of all diffs (summed over the
    ``iter_size`` passes: Caffe clips *before* ``Normalize``) exceeds ``clip``, scale every diff by
    ``clip / norm``.  Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    if clip >= 0 and norm > clip:
        for g in grads:
            g.mul_(clip / norm)
    return norm


def normalize_gradients(params, iter_size: int) -> None:
    """Caffe ``SGDSolver::Normalize``: the accumulated diff times ``Dtype(1) / iter_size`` (that
    float, not an exact division); nothing when ``iter_size`` is 1."""
    if iter_size == 1:
        return
    for p in params:
        if p.grad is not None:
            scale = float(np.float32(1) / np.float32(iter_size)) if p.grad.dtype == torch.float32 else 1.0 / iter_size
            p.grad.mul_(scale)


def _f32(x: float) -> float:
    return float(np.float32(x))


def caffe_rate(cfg: TrainConfig, it: int) -> float:
    """Caffe ``SGDSolver::GetLearningRate`` at update ``it``, for every ``lr_policy``:

    - ``fixed``: ``base_lr``; ``step``: ``base_lr * gamma ^ floor(it / stepsize)``; ``exp``: ``base_lr *
      gamma ^ it``; ``multistep``: ``base_lr * gamma ^ current_step``, where ``current_step`` rises by one at
      the first update at or past each ``stepvalue`` (at most once per update, as Caffe's counter does);
      these form the product in double from the proto *floats* ``base_lr`` and ``gamma`` (0.001 is
      0.0010000000474974513);
    - ``poly``: ``base_lr * (1 - it / max_iter) ^ power``; ``inv``: ``base_lr * (1 + gamma * it) ^ -power``;
      ``sigmoid``: ``base_lr / (1 + exp(-gamma * (it - stepsize)))``: Caffe writes their operands in ``Dtype``,
      so float32 here.  Its unqualified ``pow`` / ``exp`` take the float overloads only where the build puts
      them in the global namespace (libstdc++ 6 and later with ``<math.h>``), the C double ones otherwise:
      a build of the other kind may differ from these rates by an ulp at some iterations.

    :func:`set_rate` rounds the result to the parameters' ``Dtype``, as Caffe's ``Dtype rate = ...`` does."""
    f32 = np.float32
    base, gamma, policy = _f32(cfg.base_lr), _f32(cfg.gamma), cfg.lr_policy
    if policy == "fixed":
        return base
    if policy == "step":
        return base * math.pow(gamma, it // cfg.stepsize)
    if policy == "exp":
        return base * math.pow(gamma, it)
    if policy == "multistep":
        return base * math.pow(gamma, caffe_multistep(cfg, it))
    with np.errstate(all="ignore"):
        if policy == "poly":
            r = f32(1) - f32(it) / f32(cfg.max_iter)
            return float(f32(base) * f32(np.power(r, f32(cfg.power))))
        if policy == "inv":
            return float(f32(base) * np.power(f32(1) + f32(gamma) * f32(it), -f32(cfg.power)))
        return float(f32(base) * (f32(1) / (f32(1) + np.exp(-f32(gamma) * (f32(it) - f32(cfg.stepsize))))))


def caffe_multistep(cfg: TrainConfig, it: int) -> int:
    """``multistep``'s ``current_step_`` at update ``it``: Caffe raises it by one at the first update at or past
    each ``stepvalue`` in turn, at most once per update (so unsorted or repeated values climb one at a time)."""
    step, at = 0, -1
    for v in cfg.stepvalue:      # the update at which the counter passes each stepvalue
        at = max(v, at + 1)
        step += at <= it
    return step


def _is_float32(group: dict) -> bool:
    return all(p.dtype == torch.float32 for p in group["params"])


def _local(value: float, mult: float, float32: bool) -> float:
    """Caffe's ``local_rate = rate * net_params_lr[id]`` / ``local_decay = weight_decay *
    net_params_weight_decay[id]``: a ``Dtype`` times a ``float``, in float32 for a float net."""
    if float32:
        return float(np.float32(value) * np.float32(mult))
    return value * _f32(mult)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> CaffeSGD:
    """Groups from ``model.param_groups`` (Caffe ``lr_mult`` / ``decay_mult``); each group keeps
    its ``lr_mult`` so :func:`set_rate` can apply the schedule."""
    groups = model.param_groups(base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, scheme=cfg.lr_mults)
    out = []
    for g in groups:
        g = dict(g)
        lr = g.get("lr", cfg.base_lr)
        g.setdefault("lr_mult", lr / cfg.base_lr if cfg.base_lr else 1.0)
        g.setdefault("weight_decay", cfg.weight_decay)
        if "decay_mult" in g:
            g["weight_decay"] = _local(_f32(cfg.weight_decay), g["decay_mult"], _is_float32(g))
        g["lr"] = lr
        g["momentum"] = _f32(cfg.momentum)   # SolverParameter.momentum is a float: float32(0.9) in every Dtype
        out.append(g)
    return CaffeSGD(out, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def freeze_zero_rate(opt: torch.optim.Optimizer) -> None:
    """Caffe computes no diff for a blob with ``lr_mult`` 0 (``Net::Init``: ``param_propagate_down`` is
    ``lr_mult != 0``), so it stays 0: no gradient here either (``requires_grad`` off), which keeps it out of
    ``clip_gradients``' norm as Caffe's ``ClipGradients`` leaves it; the update moves it by nothing."""
    frozen = [p for g in opt.param_groups if g.get("lr_mult", 1.0) == 0 for p in g["params"]]
    if frozen and len(frozen) == sum(len(g["params"]) for g in opt.param_groups):
        raise ValueError("config.lr_mults: every lr_mult is 0, so nothing would train")
    for p in frozen:
        p.requires_grad_(False)


def set_rate(opt: torch.optim.Optimizer, rate: float) -> None:
    """Each group's local rate ``rate * lr_mult``, with Caffe's rounding (:func:`_local`)."""
    for g in opt.param_groups:
        g["lr"] = _local(rate, g.get("lr_mult", 1.0), _is_float32(g))


def apply_update(opt: CaffeSGD, cfg: TrainConfig) -> None:
    """The end of Caffe's ``Solver::Step`` iteration, ``ApplyUpdate``, on the diffs the ``iter_size`` passes
    summed: ``ClipGradients`` (before the normalisation, as Caffe), ``Normalize`` (1/iter_size), then
    ``Regularize``, ``ComputeUpdateValue`` and ``Update`` (:class:`CaffeSGD`) at the groups' current rates
    (:func:`set_rate`).  Checked against a real Caffe's solver (tests/test_caffe_reference.py)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if cfg.clip_gradients >= 0:
        clip_gradients(params, cfg.clip_gradients)
    normalize_gradients(params, cfg.iter_size)
    opt.step()


# ------------------------------------------------------------------------------------------
# model / data construction
# ------------------------------------------------------------------------------------------
def dataset_classes(cfg: TrainConfig) -> List[str]:
    if cfg.dataset == "synthetic":
        return list(SYNTHETIC_CLASSES)
    return list(get_spec(cfg.dataset).class_names)


def num_classes(cfg: TrainConfig) -> int:
    return cfg.num_classes or len(dataset_classes(cfg))


def classifier_name(cfg: TrainConfig) -> str:
    if cfg.classifier_name:
        return cfg.classifier_name
    return "fc8_synthetic" if cfg.dataset == "synthetic" else get_spec(cfg.dataset).classifier_name


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """``AttentionToScale`` as the config describes (initialised from ``cfg.init`` if given)."""
    try:
        from .model import AttentionToScale
    except ImportError as e:  # pragma: no cover - only before model.py exists
        raise RuntimeError(f"attnscale.model.AttentionToScale is not available: {e}") from e
    merge = cfg.merge if len(cfg.scales) > 1 else None
    model = AttentionToScale(num_classes=num_classes(cfg), scales=tuple(cfg.scales), merge=merge,
                             extra_supervision=cfg.extra_supervision, width=cfg.width,
                             use_reference_ops=cfg.use_reference_ops, conv_impl=cfg.conv_impl, fc6_impl=cfg.fc6_impl,
                             classifier_name=classifier_name(cfg), dropout=cfg.dropout,
                             test_crop_size=cfg.test_crop_size)
    if cfg.fillers:
        fill_layers(model, cfg.fillers)
    if cfg.init:
        init_from_caffemodel(model, cfg.init)
    return model


def fill_layers(model: torch.nn.Module, fillers: dict) -> None:
    """Caffe's layer set-up: each layer of ``fillers`` starts its weight and bias from its
    ``weight_filler`` / ``bias_filler`` (``attnscale.caffe.caffe_fill``), in the model's layer order;
    ``init`` is copied in afterwards, as ``solver --weights`` after the net's set-up."""
    from .caffe import caffe_fill
    layers = {n: m for n, m in model.named_children() if isinstance(m, torch.nn.Conv2d)}
    unknown = sorted(set(fillers) - set(layers))
    if unknown:
        raise ValueError(f"config.fillers: {unknown} are not layers of this model (its layers: {list(layers)})")
    for name, m in layers.items():
        if name in fillers:
            for what, p, spec in zip(("weight", "bias"), (m.weight, m.bias), fillers[name]):
                try:
                    caffe_fill(p, spec)
                except ValueError as exc:
                    raise ValueError(f"config.fillers[{name!r}] ({what}): {exc}") from None


def init_from_caffemodel(model: torch.nn.Module, weights: str) -> List[str]:
    """Caffe's ``Net::CopyTrainedLayersFrom`` (``solver --weights``), used for DeepLab
    fine-tuning: every layer of ``weights`` whose *name* is a layer of ``model`` gives it its blobs
    (blob 0 -> ``.weight``, blob 1 -> ``.bias``); layers of the file the model lacks are skipped
    (ImageNet's ``fc8`` when the model's classifier is ``fc8_voc12``), layers of the model the file
    lacks keep their fresh initialisation (classifier, attention head); a same-named layer whose
    blob count or shapes differ is an error, as in Caffe.  ``weights``: a ``.caffemodel`` /
    ``.caffemodel.h5`` (read with ``prototxt_import.read_weights``) or a ``.pt`` (one of our
    checkpoints, or a bare ``state_dict``).  Returns the parameter names copied."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"init weights not found: {weights} (config.init / --init)")
    own = dict(model.named_parameters())
    copied: List[str] = []
    if weights.endswith(".pt"):
        state = load_checkpoint(weights)["model"]
        for k, v in state.items():
            if k in own:
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(f"{weights}: cannot copy {k}: shape {tuple(v.shape)} in the file, "
                                     f"{tuple(own[k].shape)} in the model")
                with torch.no_grad():
                    own[k].copy_(v.to(own[k].dtype))
                copied.append(k)
    else:
        try:
            from prototxt_import import read_weights  # type: ignore
        except ImportError as e:
            raise RuntimeError(f"reading {weights} needs prototxt_import.read_weights: {e}") from e
        layers = dict(model.named_children())
        for name, blobs in read_weights(weights).by_name().items():
            layer = layers.get(name)
            if layer is None:
                continue
            targets = [(n, p) for n, p in layer.named_parameters(recurse=False) if n in ("weight", "bias")]
            if len(blobs) != len(targets):  # Caffe: CHECK_EQ(target_blobs.size(), source_layer.blobs_size())
                raise ValueError(f"{weights}: layer {name!r} has {len(blobs)} blob(s) where the model's has "
                                 f"{len(targets)} ({', '.join(n for n, _ in targets) or 'none'}): Caffe's "
                                 "'Incompatible number of blobs for layer'")
            for (pname, p), blob in zip(targets, blobs):
                if blob is None:  # an HDF5 file's shared copy (Net::ToHDF5 writes owned blobs only)
                    continue
                if not blob.fits(p.shape):
                    raise ValueError(f"{weights}: cannot copy layer {name!r} {pname}: shape "
                                     f"{tuple(blob.data.shape)} in the file, {tuple(p.shape)} in the "
                                     "model (Caffe: 'shape mismatch'); rename the layer to re-initialise it")
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.ascontiguousarray(blob.data)).reshape(p.shape).to(p.dtype))
                copied.append(f"{name}.{pname}")
    if not copied:
        raise ValueError(f"{weights}: no layer of the file has the name of a model layer "
                         f"(model layers: {sorted(dict(model.named_children()))[:6]} ...)")
    logging.getLogger("attnscale.train").info("init: copied %d tensors from %s; %d keep their "
                                              "initialisation", len(copied), weights, len(own) - len(copied))
    return copied


def build_source(cfg: TrainConfig, split: str):
    """The image/label source of ``split`` ('train' or 'val')."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.dataset == "synthetic":
        n = cfg.synthetic_train if split == "train" else cfg.synthetic_val
        # train and val are disjoint: different seeds
        return SyntheticSource(n, seed=cfg.synthetic_seed + (0 if split == "train" else 1),
                               size=cfg.synthetic_size)
    return FileSource(build_list_paths(cfg)[split], cfg.data_root, num_classes(cfg))


def build_list_paths(cfg: TrainConfig) -> dict[str, str]:
    """The list files of a file data set, by split (``resolve_list`` of the config's or the data set's)."""
    spec = get_spec(cfg.dataset)
    return {split: resolve_list(given, default, cfg.data_root, f"config.{split}_list")
            for split, given, default in (("train", cfg.train_list, spec.train_list),
                                          ("val", cfg.val_list, spec.val_list))}


def resolve_list(given: str, default: str, data_root: str, what: str) -> str:
    """The list file to read.  The data set's default list is the data root's (``list/val.txt``
    under ``data_root``).  A given absolute path is used as is; a given relative one may name a file
    under ``data_root`` or from the working directory (as Caffe's ``source`` does), but not two
    different files, which would silently pick a split."""
    if not given:
        return join_root(data_root, default)
    if os.path.isabs(given) or not data_root:
        return given
    under_root = join_root(data_root, given)
    found = [p for p in (under_root, given) if os.path.isfile(p)]
    if len(found) == 2 and not os.path.samefile(*found):
        raise ValueError(f"{what}={given!r} names two different files, {os.path.abspath(given)} (from the working "
                         f"directory) and {under_root} (under data_root): give an absolute path")
    return found[0] if found else under_root


def loads_bytes(device: torch.device) -> bool:
    """Whether the training batches travel as the crops' bytes (``SegDataset(raw=True)``) and become the
    network's floats on the device (:func:`attnscale.data.network_input`): on a GPU, where that quarters the
    images' bytes that the loader, the pinned copy and the copy to the GPU move; on a CPU the loader's workers compute
    them, in parallel with the training process."""
    return device.type == "cuda"


def transform_config(cfg: TrainConfig) -> TransformConfig:
    return TransformConfig(crop_size=cfg.crop_size, mirror=cfg.mirror,
                           random_scale=tuple(cfg.random_scale) if cfg.random_scale else None)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmp``, flush + fsync, ``os.replace`` onto ``path``, fsync the
    directory: a crash at any point leaves either the old or the new file, never a torn one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass


def seed_all(seed: int, rank: int = 0) -> None:
    """A run's random streams at its start: Python's and numpy's from ``seed``, torch's from ``seed + rank``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + rank)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """The states :func:`rng_state` saved (torch takes its generator states as CPU byte tensors,
    wherever a checkpoint was loaded to)."""
    torch.set_rng_state(st["torch"].cpu())
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


RESUME_KEYS = ("iter", "model", "optimizer", "rng", "config")


def run_device(device: str) -> torch.device:
    """``config.device`` as a torch.device, refused with the reason when this machine cannot run on it (else
    a CUDA device on a CPU-only machine surfaced later as an unreadable checkpoint or a deep traceback)."""
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"config.device {device!r}: {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.device {device!r}: this machine has no CUDA device usable by this torch "
                         f"({torch.__version__}; torch.cuda.is_available() is False)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"config.device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return d


def load_checkpoint(path: str, map_location="cpu", keys=("model",)) -> dict:
    """One of our checkpoints, as a dict holding at least ``keys`` (a bare ``state_dict`` of tensors
    counts as ``{"model": state_dict}``).  Anything else raises naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(ck, dict) and ck and all(torch.is_tensor(v) for v in ck.values()) and "model" not in ck:
        ck = {"model": ck}
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        found = sorted(map(str, ck))[:8] if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path}: not an attnscale checkpoint: it lacks {missing} (holds {found})")
    return ck


# ------------------------------------------------------------------------------------------
# training loop
# ------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    checkpoint: str
    iterations: int
    seconds: float
    last_loss: float


def _dist_info(device_type: str = "cpu"):
    """(rank, world size, local rank); under torchrun, joins the process group with the backend of
    the training device (NCCL for CUDA, gloo for a CPU run, also on a machine that has GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _logger(out_dir: str, rank: int) -> logging.Logger:
    log = logging.getLogger("attnscale.train")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    log.propagate = False
    return log


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_at: Optional[int] = None, model_factory: Optional[Callable] = None) -> TrainResult:
    """Train ``cfg.max_iter`` updates (or stop after update ``stop_at``, checkpointing there --
    what an interruption looks like), writing ``cfg.out_dir/checkpoint.pt``.  ``cfg.torch_threads``
    and the backend switches (``cfg.precision``'s TF32, cuDNN's benchmark mode: :func:`backend_switches`)
    apply for the duration of the call only."""
    threads = torch.get_num_threads()
    try:
        with backend_switches(cfg.precision):
            return _train(cfg, resume, progress, stop_at, model_factory)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def backend_switches(precision: str):
    """For the block (a run, an evaluation), then restored: cuDNN's and cuBLAS's TF32 switches on for
    ``precision`` "tf32" only (float32 as Caffe computed it otherwise; PyTorch's default lets cuDNN use
    TF32), and ``cudnn.benchmark`` on: every batch has the crop's size (evaluation pads to the test crop),
    so cuDNN times its algorithms once per layer shape and keeps the fastest (Caffe's cuDNN layers took
    cuDNN's heuristic choice; the arithmetic is the same convolution either way)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = before


def forward_precision(precision: str, device_type: str):
    """The context of a forward pass: bfloat16 autocast for ``precision`` "bf16", else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(cfg: TrainConfig, resume: bool, progress: bool, stop_at: Optional[int],
           model_factory: Optional[Callable]) -> TrainResult:
    cfg.validate()
    device = run_device(cfg.device)
    rank, world, local_rank = _dist_info(device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    log = _logger(cfg.out_dir, rank)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT)

    seed_all(cfg.seed, rank)
    model = (model_factory or build_model)(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    freeze_zero_rate(opt)
    it = 0
    if os.path.exists(ckpt_path) and not os.path.isfile(ckpt_path):
        raise ValueError(f"{ckpt_path} is not a file: the run's checkpoint cannot be read or written there")
    if not resume and os.path.exists(ckpt_path):
        raise FileExistsError(f"{ckpt_path} exists: continue that run with --resume (resume=True), or train "
                              f"into another out_dir (--out) or move the file away first; a checkpoint is "
                              f"never overwritten by a fresh run")
    if resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path, keys=RESUME_KEYS)  # on the CPU: load_state_dict moves what it takes
        free = resume_free_fields(cfg)
        diff = cfg.differences(TrainConfig.from_dict(ck["config"], source=ckpt_path), ignore=free)
        if diff:
            raise ValueError(f"--resume: {ckpt_path} was written by another config: " + "; ".join(
                f"{k} {old!r} there, {new!r} now" for k, new, old in diff) + " (resume with the same settings, "
                f"or train into a new out_dir; only {', '.join(free)} may change)")
        # the rank count sets the images per update and each rank's shard and random stream: a run resumes
        # bit-identically only under the count it was written with (one RNG state per rank is saved)
        old_world = ck.get("world", len(ck["rng"]) if isinstance(ck["rng"], list) else 1)
        if old_world != world:
            raise ValueError(f"--resume: {ckpt_path} was written by {old_world} rank(s), this run has {world}: "
                             f"resume under the same rank count (WORLD_SIZE), or train into a new out_dir")
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ValueError(f"--resume: {ckpt_path} does not fit the model: {e}") from e
        opt.load_state_dict(ck["optimizer"])
        it = int(ck["iter"])
        set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        log.info("resumed from %s at iteration %d", ckpt_path, it)
    elif resume:
        log.info("--resume: no checkpoint at %s, starting from scratch", ckpt_path)
        if rank == 0:
            print(f"warning: --resume: no checkpoint at {os.path.abspath(ckpt_path)}; training starts from "
                  "iteration 0", file=sys.stderr)
    end = cfg.max_iter if stop_at is None else min(stop_at, cfg.max_iter)
    if it >= end:
        return TrainResult(ckpt_path, it, 0.0, float("nan"))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    tcfg = transform_config(cfg)
    raw = loads_bytes(device)
    ds = SegDataset(build_source(cfg, "train"), tcfg, train=True, seed=cfg.seed, raw=raw)
    if isinstance(ds.source, FileSource):
        log.info("train list: %s (%d images)", os.path.abspath(ds.source.list_path), len(ds.source))
    per_update = cfg.batch_size * cfg.iter_size
    loader = make_loader(ds, cfg.batch_size, cfg.workers, cfg.seed, start_sample=it * per_update,
                         rank=rank, world=world, pin_memory=device.type == "cuda")
    batches = iter(loader)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=it, desc=os.path.basename(cfg.out_dir.rstrip("/")) or "train",
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    log.info("training %s: iterations %d..%d, %d image(s)/update x %d rank(s)", cfg.out_dir, it,
             end, per_update, world)
    model.train()
    t0 = time.time()
    last = float("nan")
    n_classes = model.num_classes

    def save():
        # the loss is checked before each update, the weights after it, here: a non-finite weight never
        # replaces the last good checkpoint (every rank holds the same weights, so all stop together)
        named = list(model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()   # one device sync
        bad = [n for (n, _), ok in zip(named, finite) if not ok]
        if bad:
            raise FloatingPointError(f"{cfg.out_dir}: non-finite weights after iteration {it} ({', '.join(bad[:4])}"
                                     f"{', ...' if len(bad) > 4 else ''}); {ckpt_path} is left as it was")
        rngs = rng_state()
        if world > 1:  # every rank takes part in the gather; rank 0 writes
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if rank != 0:
            return
        atomic_save({"iter": it, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": rngs, "config": cfg.to_dict(), "samples_per_update": per_update, "world": world},
                    ckpt_path)

    def device_batch():
        """The next batch: its labels checked on the CPU (no device sync), copied to the device (from pinned
        memory on a GPU: asynchronous) and put in NHWC order there if asked (after the copy, so that the
        CPU does no layout copy and the pinned batch is what travels).  On a GPU the images travel as the
        crops' bytes and become the network's floats there (network_input: Caffe's arithmetic, bit for bit)."""
        batch = next(batches)
        y = batch[-1]
        check_labels(y, n_classes)
        y = y.to(device, non_blocking=True)
        if raw:
            images, valid = (t.to(device, non_blocking=True) for t in batch[:2])
            return network_input(images, valid, tcfg, cfg.channels_last), y
        x = batch[0].to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    # Each pass's batch is prepared while the device still runs the pass before (after its backward is
    # queued, before the update's sync): the CPU's share of a batch (the label check, the copy's launch)
    # no longer leaves the GPU idle between updates.  The data order is the loader's, as before.
    nxt = device_batch() if it < end else None
    # the main thread's time per update, logged with the loss: in ``data`` (waiting for the loader, the label
    # check, the copies' launch), ``passes`` (launching forward, loss and backward; on a CPU, computing them),
    # ``wait`` (the update's device sync: the GPU still busy) and ``step`` (clipping, scaling, the SGD step).
    # Little ``wait`` on a GPU means the host, not the device, sets the pace.
    host = dict.fromkeys(HOST_PHASES, 0.0)
    host_updates = 0

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        host[phase] += now - since
        return now
    while it < end:
        rate = caffe_rate(cfg, it)
        set_rate(opt, rate)
        opt.zero_grad(set_to_none=True)
        sums: Dict[str, torch.Tensor] = {}   # the passes' losses, on the device until the update's end
        for k in range(cfg.iter_size):
            x, y = nxt
            sync = world == 1 or k == cfg.iter_size - 1
            ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            t = time.perf_counter()
            with ctx:
                with forward_precision(cfg.precision, device.type):
                    out = net(x)
                loss, parts = model.loss(out, y, labels_checked=True)
                loss.backward()
            del x, y, out
            for n, v in (("total", loss.detach()), *parts.items()):
                sums[n] = sums[n] + v if n in sums else v
            t = lap("passes", t)
            nxt = device_batch() if (it + 1 < end or k + 1 < cfg.iter_size) else None
            lap("data", t)
        # the update's one device sync: the losses, averaged over the passes, for the log and the check
        t = time.perf_counter()
        values = (torch.stack(list(sums.values())).double() / cfg.iter_size).tolist()
        t = lap("wait", t)
        total, parts_sum = values[0], dict(zip(list(sums)[1:], values[1:]))
        if not math.isfinite(total):
            raise FloatingPointError(f"{cfg.out_dir}: loss is {total} at iteration {it}")
        apply_update(opt, cfg)
        lap("step", t)
        host_updates += 1
        it += 1
        last = total
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{rate:.1e}")
        if it % cfg.display == 0 or it == end:
            log.info("iter %d lr %.3g total loss %.5f (%s); host ms/update: %s", it, rate, total,
                     ", ".join(f"{n} {v:.5f}" for n, v in sorted(parts_sum.items())),
                     ", ".join(f"{n} {1e3 * v / host_updates:.1f}" for n, v in host.items()))
            host.update(dict.fromkeys(HOST_PHASES, 0.0))
            host_updates = 0
        if (cfg.snapshot and it % cfg.snapshot == 0) or it == end:
            save()
    if bar is not None:
        bar.close()
    secs = time.time() - t0
    log.info("stopped at iteration %d after %.1f s", it, secs)
    if world > 1:
        dist.barrier()
    return TrainResult(ckpt_path, it, secs, last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnscale.train",
                                 description="Train AttentionToScale with Caffe's SGD (see module doc).")
    ap.add_argument("config", help="JSON file holding a TrainConfig (attnscale/config.py)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    ap.add_argument("--device", default=None, help="override config.device (cpu, cuda)")
    ap.add_argument("--out", default=None, help="override config.out_dir")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    keep_freed_memory()
    try:
        cfg = TrainConfig.load(a.config)
        if a.device:
            cfg.device = a.device
        if a.out:
            cfg.out_dir = a.out
        r = train(cfg, resume=a.resume, progress=not a.no_progress)
    except (ValueError, OSError, FloatingPointError) as exc:   # bad config, files, checkpoints: said, not traced
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {r.iterations} iterations in {r.seconds:.1f} s, checkpoint {r.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
