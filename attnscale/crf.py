"""DeepLab's fully connected CRF post-processing (``DenseCRF`` layer; the paper's Table 4 test-set rows).

DeepLab-CRF runs its net, zooms the scores to the padded image size (``Interp zoom_factor 8``), then the
``DenseCRF`` layer (densecrf_layer.cpp of DeepLab's Caffe) on the scores, the data blob (mean-subtracted BGR)
and the image's real size: the negated scores as the unary (``unary_ = -bottom_data`` in DeepLab-v1's final
layer and in DeepLab-v2's, the Caffe of the attention nets), cropped to the real size, then ``max_iter``
mean-field steps of Krähenbühl & Koltun's inference with Potts kernels on position (``pos_w``,
``pos_xy_std``) and on position + colour (``bi_w``, ``bi_xy_std``, ``bi_rgb_std``); the output is the label
marginals, 0 outside the real size.  :func:`dense_crf` does the same from the zoomed scores and image;
:meth:`attnscale.model.AttentionToScale.predict` takes ``crf=CRFParams(...)``.  (deeplab-public's layer of
early 2015 took ``-log softmax`` of the scores instead: a per-pixel constant apart, the same CRF up to
rounding.)

No well-kept Python package runs this CRF today (``pydensecrf`` does not build on current Python; its forks
ship no wheels), so the lattice and the inference are our own C++ (``attnscale.ops.dense_crf``), in the
arithmetic of an x86-64 build of DeepLab's Caffe (every float operation in its order: a one-off audit
compared it with a line-by-line float32 transcription of DeepLab's code, bit for bit; never with a Caffe run);
:func:`attnscale.ops.reference.dense_crf_reference` is the numpy twin (tested bit for bit).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

#: the op's bound on mean-field steps (csrc/ops/dense_crf.cpp)
MAX_ITER = 1 << 20
_FLT_OVERFLOW = 3.4028235677973366e38   # the smallest double that rounds to float32 infinity
_FLT_MIN = 1.1754943508222875e-38       # the smallest normal float32

#: DeepLab-v1's published cross-validated CRF parameters per model (deeplab-public's README): (bi_w, bi_xy_std,
#: bi_rgb_std); pos_w 3 and pos_xy_std 3 for all.  The attention paper publishes none of its own.
DEEPLAB_PRESETS = {
    "plain": (5, 50, 10), "msc": (3, 95, 3), "coco": (5, 67, 3), "largefov": (4, 121, 5),
    "msc-largefov": (4, 83, 5), "coco-largefov": (5, 69, 5), "msc-coco-largefov": (4, 59, 5),
}


@dataclass(frozen=True)
class CRFParams:
    """The ``DenseCRFParameter`` of DeepLab's layer.  Defaults: DeepLab-LargeFOV's published values (``bi_w 4,
    bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3``, 10 steps; :meth:`deeplab` gives the other models').
    Each list holds one value per Potts kernel (the layer allows several of each kind); empty bilateral lists
    leave the image out."""
    max_iter: int = 10
    pos_w: Tuple[float, ...] = (3.0,)
    pos_xy_std: Tuple[float, ...] = (3.0,)
    bi_w: Tuple[float, ...] = (4.0,)
    bi_xy_std: Tuple[float, ...] = (121.0,)
    bi_rgb_std: Tuple[float, ...] = (5.0,)

    def __post_init__(self):
        for name in ("pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std"):
            v = getattr(self, name)
            if isinstance(v, Iterator):
                v = list(v)
            a = None if isinstance(v, (str, bytes)) else np.asarray(v)
            if a is None or a.dtype.kind not in "iuf" or a.ndim > 1:
                raise ValueError(f"CRFParams.{name} must be a number or a list of numbers, got {v!r}")
            v = tuple(float(x) for x in a.reshape(-1))
            # the layer's parameters are floats: a weight finite as one, a standard deviation a normal positive one
            # (a subnormal or zero one makes the features infinite)
            bad = [x for x in v if not abs(x) < _FLT_OVERFLOW or (name.endswith("std") and not x >= _FLT_MIN)]
            if bad:
                raise ValueError(f"CRFParams.{name}: {bad[0]!r} is not a "
                                 f"{'positive finite standard deviation' if name.endswith('std') else 'finite weight'}"
                                 " (as a float32)")
            object.__setattr__(self, name, v)
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or not (
                0 <= self.max_iter <= MAX_ITER):
            raise ValueError(f"CRFParams.max_iter must be an int in [0, {MAX_ITER}], got {self.max_iter!r}")
        object.__setattr__(self, "max_iter", int(self.max_iter))
        if len(self.pos_w) != len(self.pos_xy_std):
            raise ValueError(f"CRFParams: pos_w has {len(self.pos_w)} values, pos_xy_std {len(self.pos_xy_std)} "
                             "(the layer's CHECK: one of each per kernel)")
        if not len(self.bi_w) == len(self.bi_xy_std) == len(self.bi_rgb_std):
            raise ValueError(f"CRFParams: bi_w, bi_xy_std and bi_rgb_std have {len(self.bi_w)}, "
                             f"{len(self.bi_xy_std)}, {len(self.bi_rgb_std)} values (one of each per kernel)")

    @classmethod
    def deeplab(cls, model: str = "largefov") -> "CRFParams":
        """The parameters DeepLab published for one of its models: ``plain`` (DeepLab), ``msc``, ``coco``,
        ``largefov``, ``msc-largefov``, ``coco-largefov``, ``msc-coco-largefov`` (:data:`DEEPLAB_PRESETS`)."""
        if model not in DEEPLAB_PRESETS:
            raise ValueError(f"CRFParams.deeplab: unknown model {model!r}; known: {', '.join(DEEPLAB_PRESETS)}")
        w, xy, rgb = DEEPLAB_PRESETS[model]
        return cls(bi_w=(w,), bi_xy_std=(xy,), bi_rgb_std=(rgb,))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, base: "CRFParams | None" = None) -> "CRFParams":
        """``d``'s fields over ``base``'s (default: DeepLab-LargeFOV's)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"CRFParams: unknown field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{**(base or cls()).to_dict(), **d})


def check_params(params) -> None:
    if not isinstance(params, CRFParams):
        raise TypeError(f"crf must be an attnscale.crf.CRFParams, got {type(params).__name__}")


def dense_crf(scores: torch.Tensor, image: torch.Tensor, params: CRFParams = CRFParams(),
              size: Sequence[int] | None = None, use_reference: bool = False) -> torch.Tensor:
    """DeepLab's DenseCRF layer: scores (N, M, H, W) (the zoomed net output) and image (N, 3, H, W) (the
    data blob: mean-subtracted BGR, as :func:`attnscale.caffe.preprocess_bgr` makes it) → the label
    marginals (N, M, H, W), float32 on the CPU.  ``size`` = the image's real (h, w) inside a padded input
    (the layer's data_dims bottom): the CRF runs on that corner and the rest of the output is 0.  Without
    bilateral kernels in ``params`` the image is not used (may be None).  Needs the extension;
    ``use_reference``: the numpy twin instead (slow)."""
    check_params(params)
    if scores.dim() != 4:
        raise ValueError(f"dense_crf: scores must be (N, M, H, W), got {tuple(scores.shape)}")
    N, M, H, W = scores.shape
    h, w = (H, W) if size is None else (int(size[0]), int(size[1]))
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"dense_crf: size ({h}, {w}) must lie within the scores' ({H}, {W})")
    with torch.no_grad():
        unary = -scores[:, :, :h, :w].detach().cpu().float().contiguous()
        im = None
        if params.bi_w:
            if image is None or image.dim() != 4 or tuple(image.shape) != (N, 3, H, W):
                raise ValueError(f"dense_crf: the bilateral kernels need the image (N, 3, H, W) = {(N, 3, H, W)}, "
                                 f"got {None if image is None else tuple(image.shape)}")
            im = image[:, :, :h, :w].detach().cpu().float().contiguous()
        args = (unary, im, params.max_iter, params.pos_w, params.pos_xy_std, params.bi_w, params.bi_xy_std,
                params.bi_rgb_std)
        if use_reference:
            from .ops.reference import dense_crf_reference
            q = dense_crf_reference(*args)
        else:
            from .ops.dense_crf import dense_crf as op
            q = op(*args)
        if (h, w) == (H, W):
            return q
        out = q.new_zeros((N, M, H, W))
        out[:, :, :h, :w] = q
        return out


__all__ = ["CRFParams", "DEEPLAB_PRESETS", "dense_crf"]
