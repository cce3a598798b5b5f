"""Dataclass configs for training/evaluation, stored as JSON files.

Defaults are the paper's (Sec. 4) and DeepLab-LargeFOV's ``solver.prototxt``: SGD, momentum 0.9,
weight decay 5e-4, ``base_lr`` 1e-3 (the classifier x10 through the model's ``lr_mult``, the paper's
"0.01 for the final classifier layer"; the attention head, new like it, x10 too: our choice, the paper is
silent there), ``lr_policy: "step"`` with gamma 0.1, stepsize 2000, ``max_iter`` 6000, a
mini-batch of 30 images (``batch_size`` x ``iter_size``, Caffe accumulates ``iter_size``
forward/backward passes per update), 321x321 random crops with mirroring.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union


# Fields that do not change what a run computes (where and how fast it runs, how much it logs).
RUN_FIELDS = ("device", "workers", "out_dir", "display", "torch_threads", "use_reference_ops", "conv_impl",
              "fc6_impl", "channels_last")
# ... and those that may also change when a run is resumed: how often it snapshots, how long it runs
# on, where its data and its (already used) init weights now lie.
RESUME_FREE_FIELDS = RUN_FIELDS + ("snapshot", "max_iter", "data_root", "init")


def resume_free_fields(cfg: "TrainConfig") -> Tuple[str, ...]:
    """``RESUME_FREE_FIELDS`` for ``cfg``: under ``lr_policy: "poly"`` ``max_iter`` sets every rate, so a
    resumed run must keep it (Caffe would take the new one; a resume here continues the same run)."""
    return tuple(f for f in RESUME_FREE_FIELDS if not (f == "max_iter" and cfg.lr_policy == "poly"))


#: Caffe ``SGDSolver::GetLearningRate``'s policies (``attnscale.train.caffe_rate``)
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    dataset: str = "voc12"               # voc12 | person_part | coco_subset | synthetic
    data_root: str = ""                  # DeepLab data root (list paths are joined onto it)
    train_list: str = ""                 # default: the data set's list, relative to data_root
    val_list: str = ""
    num_classes: int = 0                 # 0: from the data set
    crop_size: int = 321
    mirror: bool = True
    random_scale: Optional[Tuple[float, float]] = None   # e.g. [0.5, 1.5]
    workers: int = 2
    # synthetic data set (dataset == "synthetic")
    synthetic_train: int = 600
    synthetic_val: int = 100
    synthetic_size: int = 97
    synthetic_seed: int = 2016
    # --- model (attnscale.model.AttentionToScale) ---------------------------------------------
    scales: List[float] = field(default_factory=lambda: [1.0])
    merge: Optional[str] = None          # None (one scale) | "max" | "avg" | "attention"
    extra_supervision: bool = False
    width: float = 1.0
    use_reference_ops: bool = False      # True: pure-PyTorch reference ops instead of attnscale._C
    conv_impl: str = "auto"              # 3x3 convs: "auto" (CPU inference: Winograd F(2x2,3x3) where it pays, model.winograd_pays; else torch), "auto4" (the same with F(4x4,3x3)), "torch" (oneDNN/cuDNN), "winograd" / "winograd4" (CPU F(2x2,3x3) / F(4x4,3x3) on every layer)
    fc6_impl: str = "auto"               # fc6: "auto" (our op on a CPU where it pays, model.cpu_prefers_onednn / dilated_pays; cuDNN on a GPU), "ops" (attnscale.ops.dilated_conv2d), "torch" (F.conv2d)
    classifier_name: str = ""            # "": the data set's (fc8_voc12 for VOC)
    dropout: float = 0.5                 # drop6 / drop7 / att_drop1 ratio
    fillers: dict = field(default_factory=dict)  # {}: attnscale's start (model.reset_parameters); else {layer:
                                         # [weight filler, bias filler]} as Caffe's, e.g. {"type": "gaussian",
                                         # "std": 0.01} (attnscale.caffe.caffe_fill), before init is copied in
    test_crop_size: int = 513            # DeepLab test crop (513 VOC, 641 COCO) used by predict
    init: str = ""                       # weights to start from: .caffemodel(.h5) (e.g. vgg16_20M) or checkpoint.pt
    # --- solver (Caffe SGDSolver) -----------------------------------------------------------
    base_lr: float = 1e-3
    lr_mults: Union[str, dict] = "paper"  # "paper": classifier + attention head x10; "prototxt": those of
                                         # attention3_train_esupv.prototxt; or {layer: [[lr_mult, decay_mult]
                                         # (weight), [..] (bias)]} for every conv (prototxt_import.param_mults)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "step"              # Caffe's: fixed, step, exp, inv, multistep, poly, sigmoid (train.caffe_rate)
    gamma: float = 0.1
    stepsize: int = 2000
    stepvalue: List[int] = field(default_factory=list)   # multistep: the updates at which the rate drops (none:
                                                         # base_lr throughout, as Caffe)
    power: float = 0.0                   # poly / inv exponent (Caffe's default 0; DeepLab-v2's poly: 0.9)
    max_iter: int = 6000
    clip_gradients: float = -1.0         # Caffe solver clip_gradients (< 0: off, Caffe's default)
    batch_size: int = 10                 # images per forward pass
    iter_size: int = 3                   # forward passes accumulated per update (30 images)
    # --- run ---------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/default"
    snapshot: int = 2000                 # checkpoint every N iterations (and at the end)
    display: int = 20                    # log every N iterations
    torch_threads: int = 0               # 0: leave torch's default
    precision: str = "fp32"              # "fp32" (IEEE float32 as Caffe; on CUDA TF32 off), "tf32" (CUDA: TF32
                                         # convolutions and matmuls), "bf16" (bfloat16 autocast forward; weights,
                                         # losses, gradients' accumulation and the solver in float32)
    channels_last: bool = False          # model and batches in channels_last (NHWC) memory: faster cuDNN;
                                         # dropout draws its masks in memory order, so other masks than NCHW

    def validate(self) -> "TrainConfig":
        self._check_types()
        if self.conv_impl not in ("auto", "auto4", "torch", "winograd", "winograd4"):
            raise ValueError(f"config.conv_impl must be 'auto', 'auto4', 'torch', 'winograd' or 'winograd4', "
                             f"got {self.conv_impl!r}")
        if self.fc6_impl not in ("auto", "ops", "torch"):
            raise ValueError(f"config.fc6_impl must be 'auto', 'ops' or 'torch', got {self.fc6_impl!r}")
        if self.precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"config.precision must be 'fp32', 'tf32' or 'bf16', got {self.precision!r}")
        if self.precision == "tf32" and not self.device.startswith("cuda"):
            raise ValueError(f"config.precision 'tf32' is a CUDA mode (TF32 tensor cores); device is {self.device!r}")
        if self.merge not in (None, "max", "avg", "attention"):
            raise ValueError(f"config.merge must be null, 'max', 'avg' or 'attention', got {self.merge!r}")
        if not self.scales:
            raise ValueError("config.scales must hold at least one scale")
        if len(self.scales) > 1 and self.merge is None:
            raise ValueError(f"config.scales={self.scales} needs a merge ('max', 'avg', 'attention')")
        if len(self.scales) == 1 and (self.merge is not None or self.extra_supervision):
            raise ValueError(f"config.scales={self.scales} is one scale: merge must be null and "
                             f"extra_supervision false (got {self.merge!r}, {self.extra_supervision})")
        if any(not 0 < s for s in self.scales):
            raise ValueError(f"config.scales must be positive, got {self.scales}")
        if isinstance(self.lr_mults, str) and self.lr_mults not in ("paper", "prototxt"):
            raise ValueError(f"config.lr_mults must be 'paper', 'prototxt' or {{layer: [[lr_mult, decay_mult], "
                             f"[lr_mult, decay_mult]]}}, got {self.lr_mults!r}")
        if self.lr_policy not in LR_POLICIES:
            raise ValueError(f"config.lr_policy must be one of Caffe's {', '.join(LR_POLICIES)}, "
                             f"got {self.lr_policy!r}")
        for k in ("max_iter", "batch_size", "iter_size", "stepsize", "display", "test_crop_size",
                  "synthetic_train", "synthetic_val"):
            if getattr(self, k) <= 0:
                raise ValueError(f"config.{k} must be positive, got {getattr(self, k)}")
        for k in ("crop_size", "snapshot", "workers", "torch_threads", "num_classes", "base_lr", "momentum",
                  "weight_decay"):
            if getattr(self, k) < 0:
                raise ValueError(f"config.{k} must be >= 0, got {getattr(self, k)}")
        if self.crop_size == 0 and self.batch_size > 1:
            raise ValueError(f"config.crop_size 0 (no crop: each image at its own size) needs batch_size 1, got "
                             f"{self.batch_size} (images of different sizes cannot be stacked into one batch)")
        if not self.width > 0:
            raise ValueError(f"config.width must be positive, got {self.width}")
        if self.lr_policy not in ("fixed", "poly") and self.gamma < 0:   # SGDSolver: CHECK_GE(gamma, 0)
            raise ValueError(f"config.gamma must be >= 0 for lr_policy {self.lr_policy!r}, got {self.gamma}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"config.seed must be in [0, 2^32), got {self.seed}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"config.dropout must be in [0, 1), got {self.dropout}")
        if self.synthetic_size < 14:
            raise ValueError(f"config.synthetic_size must be >= 14 (the synthetic scenes' smallest size), "
                             f"got {self.synthetic_size}")
        if self.random_scale is not None:
            if len(self.random_scale) != 2:
                raise ValueError(f"config.random_scale must be [lo, hi], got {list(self.random_scale)}")
            lo, hi = self.random_scale
            if not 0 < lo <= hi:
                raise ValueError(f"config.random_scale must be [lo, hi] with 0 < lo <= hi, got {self.random_scale}")
        return self

    def _check_types(self) -> None:
        """Each field holds the type of its default (a JSON file may hold "321" for 321)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "scales":
                ok = isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)
                want = "a list of finite numbers"
            elif f.name == "random_scale":
                ok = v is None or (isinstance(v, (list, tuple)) and all(_is_number(x) for x in v))
                want = "null or [lo, hi]"
            elif f.name == "stepvalue":
                ok = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                want = "a list of integers"
            elif f.name == "merge":
                ok, want = v is None or isinstance(v, str), "null or a string"
            elif f.name == "fillers":
                ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(m, (list, tuple)) and len(m) == 2
                                                 for k, m in v.items())
                want = "an object {layer: [weight filler, bias filler]}"
                if ok:   # each spec with every field its type reads: equal configs compare equal
                    from .caffe import check_filler
                    self.fillers = {k: [check_filler(spec, f"config.fillers[{k!r}] ({what})")
                                        for what, spec in zip(("weight", "bias"), m)] for k, m in v.items()}
            elif f.name == "lr_mults":
                ok = isinstance(v, str) or (isinstance(v, dict) and all(
                    isinstance(k, str) and _is_pairs(m) for k, m in v.items()))
                want = ("'paper', 'prototxt' or an object {layer: [[lr_mult, decay_mult], [lr_mult, decay_mult]]} "
                        "(weight, bias) of finite numbers")
            else:
                t = type(f.default)
                ok = (_is_number(v) if t is float else isinstance(v, t) and not (t is int and isinstance(v, bool)))
                want = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}[t]
            if not ok:
                raise ValueError(f"config.{f.name} must be {want}, got {v!r}")

    def differences(self, other: "TrainConfig", ignore: Tuple[str, ...] = ()) -> List[Tuple[str, object, object]]:
        """``(field, self's value, other's value)`` for every field that differs, except ``ignore``
        (a tuple equals the list with its values: JSON keeps no tuples)."""
        a, b = self.to_dict(), other.to_dict()
        same = lambda x, y: (list(x) if isinstance(x, tuple) else x) == (list(y) if isinstance(y, tuple) else y)  # noqa: E731
        return [(k, a[k], b[k]) for k in a if k not in ignore and not same(a[k], b[k])]

    # JSON round trip ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("random_scale"), list):
            d["random_scale"] = tuple(d["random_scale"])
        if isinstance(d.get("scales"), list) and all(_is_number(s) for s in d["scales"]):
            d["scales"] = [float(s) for s in d["scales"]]
        return cls(**d).validate()

    def save(self, path: str) -> None:
        """The config as JSON, written atomically (a temporary file renamed onto ``path``; its folder made)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config must be a JSON object")
        return cls.from_dict(d, source=path)


def _is_pairs(m) -> bool:
    """``[[lr_mult, decay_mult], [lr_mult, decay_mult]]``: a layer's weight and bias multipliers."""
    return (isinstance(m, (list, tuple)) and len(m) == 2 and
            all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(x) for x in p) for p in m))


def _is_number(x) -> bool:
    """An int or a finite float (JSON's NaN / Infinity would train to non-finite weights)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
