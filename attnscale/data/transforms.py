"""Caffe-faithful training transforms of DeepLab's ``ImageSegData`` layer.

Follows DeepLab's ``DataTransformer::TransformImgAndSeg`` step by step:

1. (optional; the paper's "randomly scaling input images (from 0.6 to 1.4)", Sec. 4.2) rescale
   the pair by a factor drawn uniformly from ``random_scale``, new size ``round(size * f)``: image
   with bilinear interpolation (``cv::INTER_LINEAR``), label with nearest neighbour (labels must
   never be blended).  This is our reading of the paper, not DeepLab-v2's ``scale_factors`` (a
   discrete list, drawn after the mirror flag, sizes truncated);
2. image to float; if smaller than ``crop_size`` pad at the **bottom and right only**
   (``cv::copyMakeBorder(img, 0, pad_h, 0, pad_w)``) with the *mean pixel* for the image and
   ``ignore_label`` (255) for the label -- the padded image pixels become exactly 0 after the mean
   subtraction and padded label pixels are ignored by the loss;
3. crop ``crop_size``: TRAIN phase at ``h_off = Rand(H - crop + 1)``, ``w_off = Rand(W - crop +
   1)``; TEST phase the centre crop ``(H - crop) / 2``;
4. mirror horizontally with probability 1/2 (``mirror && Rand(2)``, drawn before the crop offsets
   as in Caffe);
5. ``(pixel - mean[c]) * scale`` per BGR channel in float32, as Caffe's ``Dtype`` arithmetic
   (:func:`attnscale.caffe.subtract_mean`), written in CHW order; labels copied unchanged (255 stays
   255).

Randomness comes from an explicit ``numpy.random.Generator`` so that every sample's crop can be
re-derived from (seed, draw number): this is what makes data loading deterministic under any
number of workers and resumable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from .lists import IGNORE_LABEL

from attnscale.caffe import MEAN_BGR, subtract_mean  # DeepLab's mean_value lines (B, G, R)


@dataclass
class TransformConfig:
    crop_size: int = 321
    mirror: bool = True
    mean: Tuple[float, float, float] = MEAN_BGR
    scale: float = 1.0                      # Caffe transform_param.scale (multiplies after mean)
    random_scale: Optional[Tuple[float, float]] = None   # e.g. (0.5, 1.5); None: off
    ignore_label: int = IGNORE_LABEL


def rescale_pair(img: np.ndarray, lab: np.ndarray, factor: float) -> Tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and label (nearest) by ``factor`` (new size = round(size*f), >= 1)."""
    h, w = lab.shape
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    if (nh, nw) == (h, w):
        return img, lab
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return img, lab


def pad_to_crop(img: np.ndarray, lab: np.ndarray, crop: int, mean, ignore_label: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``crop`` x ``crop``: image with ``mean``, label with 255."""
    h, w = lab.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph == 0 and pw == 0:
        return img, lab
    img2 = np.empty((h + ph, w + pw, img.shape[2]), dtype=img.dtype)
    img2[...] = np.asarray(mean, dtype=img.dtype)
    img2[:h, :w] = img
    lab2 = np.full((h + ph, w + pw), ignore_label, dtype=lab.dtype)
    lab2[:h, :w] = lab
    return img2, lab2


def check_pair(img: np.ndarray, lab: np.ndarray, name: str = "") -> None:
    """Caffe's ``CHECK_EQ(img_height, seg_height)`` etc., as a ValueError naming the file."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: image must be HxWx3 (BGR), got shape {img.shape}")
    if lab.ndim != 2:
        raise ValueError(f"{name}: label must be HxW (one channel), got shape {lab.shape}")
    if img.shape[:2] != lab.shape:
        raise ValueError(f"{name}: image size {img.shape[1]}x{img.shape[0]} (WxH) differs from "
                         f"label size {lab.shape[1]}x{lab.shape[0]}")


def transform_train(img: np.ndarray, lab: np.ndarray, cfg: TransformConfig,
                    rng: np.random.Generator, name: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """One TRAIN-phase ``TransformImgAndSeg``: uint8 BGR HxWx3 + uint8 HxW label in,
    float32 (3, crop, crop) mean-subtracted image and int64 (crop, crop) label out."""
    check_pair(img, lab, name)
    if cfg.random_scale is not None:
        lo, hi = cfg.random_scale
        img, lab = rescale_pair(img, lab, float(rng.uniform(lo, hi)))
    do_mirror = bool(cfg.mirror and rng.integers(2))
    img = img.astype(np.float64)   # Caffe converts to CV_64F before padding with the mean
    c = cfg.crop_size
    if c:
        img, lab = pad_to_crop(img, lab, c, cfg.mean, cfg.ignore_label)
        h, w = lab.shape
        h_off = int(rng.integers(h - c + 1))
        w_off = int(rng.integers(w - c + 1))
        img = img[h_off:h_off + c, w_off:w_off + c]
        lab = lab[h_off:h_off + c, w_off:w_off + c]
    if do_mirror:
        img = img[:, ::-1]
        lab = lab[:, ::-1]
    out = subtract_mean(img, cfg.mean, cfg.scale)
    return np.ascontiguousarray(out.transpose(2, 0, 1)), np.ascontiguousarray(lab, dtype=np.int64)


def transform_test(img: np.ndarray, lab: np.ndarray, cfg: TransformConfig, name: str = ""
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """TEST-phase ``TransformImgAndSeg``: pad to ``crop_size`` then centre crop, no mirror."""
    check_pair(img, lab, name)
    img = img.astype(np.float64)
    c = cfg.crop_size
    if c:
        img, lab = pad_to_crop(img, lab, c, cfg.mean, cfg.ignore_label)
        h, w = lab.shape
        h_off, w_off = (h - c) // 2, (w - c) // 2
        img = img[h_off:h_off + c, w_off:w_off + c]
        lab = lab[h_off:h_off + c, w_off:w_off + c]
    out = subtract_mean(img, cfg.mean, cfg.scale)
    return np.ascontiguousarray(out.transpose(2, 0, 1)), np.ascontiguousarray(lab, dtype=np.int64)
