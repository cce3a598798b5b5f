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
   255), as uint8: class ids and the ignore label fit a byte (label files are 8-bit PNGs), and a batch's
   labels then cost an eighth of int64's bytes in the loader's shared memory, the pinned copy and the
   copy to the GPU (the loss widens them on the device).

Steps 1-4 move bytes (:func:`crop_pair`: the padding is only recorded, as the crop's ``valid`` rectangle),
step 5 is the arithmetic (:func:`finish_image` in a loader worker, or :func:`network_input` on the GPU,
where a batch then travels as bytes); the two together give Caffe's floats bit for bit.

Randomness comes from an explicit ``numpy.random.Generator`` so that every sample's crop can be
re-derived from (seed, draw number): this is what makes data loading deterministic under any
number of workers and resumable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np
import torch

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

    def __post_init__(self):
        if not 0 <= self.ignore_label <= 255:
            raise ValueError(f"TransformConfig.ignore_label {self.ignore_label} does not fit the uint8 labels "
                             "(label files are 8-bit PNGs): use a value in 0..255")


def rescale_pair(img: np.ndarray, lab: np.ndarray, factor: float) -> Tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and label (nearest) by ``factor`` (new size = round(size*f), >= 1)."""
    h, w = lab.shape
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    if (nh, nw) == (h, w):
        return img, lab
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return img, lab


def pad_to_crop(img: np.ndarray, lab: np.ndarray, crop: int, fill, ignore_label: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``crop`` x ``crop``: image with ``fill`` (Caffe: the mean pixel), label
    with ``ignore_label``."""
    h, w = lab.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph == 0 and pw == 0:
        return img, lab
    img2 = np.empty((h + ph, w + pw, img.shape[2]), dtype=img.dtype)
    img2[...] = np.asarray(fill, dtype=img.dtype)
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
    if lab.dtype != np.uint8 and lab.size and (not np.issubdtype(lab.dtype, np.integer)
                                                or lab.min() < 0 or lab.max() > 255):
        raise ValueError(f"label of {name}: its values must be 8-bit class ids (0..255, 255 = ignore), got "
                         f"{lab.dtype} in [{lab.min()}, {lab.max()}]")


def crop_pair(img: np.ndarray, lab: np.ndarray, cfg: TransformConfig, rng: Optional[np.random.Generator],
              name: str = "") -> Tuple[np.ndarray, np.ndarray, Tuple[int, int, int]]:
    """Steps 1-4 of ``TransformImgAndSeg`` on the pixels as bytes: the TRAIN phase with ``rng`` (random scale,
    mirror flag, random crop offsets, in Caffe's order), the TEST phase without (the centre crop, no mirror).
    Returns the uint8 HxWx3 crop, the uint8 label crop and ``valid`` = (rows, first column, end column): the
    image's own pixels, the rest being padding, which Caffe fills with the mean pixel (so 0 after step 5).
    The padding here holds 0 bytes; :func:`finish_image` (or :func:`network_input` on the device) makes it 0."""
    check_pair(img, lab, name)
    do_mirror = False
    if rng is not None:
        if cfg.random_scale is not None:
            lo, hi = cfg.random_scale
            img, lab = rescale_pair(img, lab, float(rng.uniform(lo, hi)))
        do_mirror = bool(cfg.mirror and rng.integers(2))
    h, w = lab.shape
    c = cfg.crop_size
    if c:
        img, lab = pad_to_crop(img, lab, c, 0, cfg.ignore_label)
        ph, pw = lab.shape
        if rng is not None:
            h_off, w_off = int(rng.integers(ph - c + 1)), int(rng.integers(pw - c + 1))
        else:
            h_off, w_off = (ph - c) // 2, (pw - c) // 2
        img = img[h_off:h_off + c, w_off:w_off + c]
        lab = lab[h_off:h_off + c, w_off:w_off + c]
        h, w = min(h, c), min(w, c)      # padding is at the bottom/right, a crop offset is 0 where there is any
    width = lab.shape[1]
    if do_mirror:
        img = img[:, ::-1]
        lab = lab[:, ::-1]
    valid = (h, width - w, width) if do_mirror else (h, 0, w)
    # copies (np.array), never views: a crop or a mirror is a view, and a mirrored column of one pixel counts
    # as contiguous to numpy while its negative stride is refused by torch.from_numpy
    return np.array(img), np.array(lab, dtype=np.uint8), valid


def finish_image(img: np.ndarray, valid: Tuple[int, int, int], cfg: TransformConfig) -> np.ndarray:
    """Step 5 of ``TransformImgAndSeg`` on a :func:`crop_pair` crop: ``(pixel - mean[c]) * scale`` in float32
    (:func:`attnscale.caffe.subtract_mean`), 0 in the padding (Caffe's mean pixel, subtracted), CHW order."""
    out = subtract_mean(img, cfg.mean, cfg.scale)
    rows, c0, c1 = valid
    out[rows:] = 0
    out[:, :c0] = 0
    out[:, c1:] = 0
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def network_input(images: torch.Tensor, valid: torch.Tensor, cfg: TransformConfig,
                  channels_last: bool = False) -> torch.Tensor:
    """:func:`finish_image` on a batch where it lies (a GPU): ``images`` (N, H, W, 3) uint8 crops and ``valid``
    (N, 3) from :class:`SegDataset` with ``raw=True``, to the (N, 3, H, W) float32 network input, bit for bit
    the same.  A batch then travels as bytes, a quarter of the float32 input's (the loader's shared memory,
    the pinned copy and the copy to the GPU), and the loader's workers skip the float arithmetic.
    ``channels_last``: the result in that layout (a view of the NHWC arithmetic, no copy), else contiguous."""
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"network_input: images must be (N, H, W, 3) uint8, got {images.dtype} {tuple(images.shape)}")
    if valid.shape != (images.shape[0], 3) or valid.is_floating_point():
        raise ValueError(f"network_input: valid must be ({images.shape[0]}, 3) integers, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    # Python numbers, not a mean tensor: a tensor made on the host would be one more copy to the device (a
    # sync); ATen casts a number to the float32 it computes in, as Caffe's float mean_value and scale are
    x = images.float()
    for c, m in enumerate(cfg.mean):
        x[..., c] -= m
    if cfg.scale != 1.0:
        x *= cfg.scale
    rows = torch.arange(x.shape[1], device=x.device)
    cols = torch.arange(x.shape[2], device=x.device)
    valid = valid.to(x.device)
    inside = ((rows < valid[:, :1])[:, :, None]
              & ((cols >= valid[:, 1:2]) & (cols < valid[:, 2:]))[:, None, :])
    x = x.masked_fill_(~inside[..., None], 0.0).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def transform_train(img: np.ndarray, lab: np.ndarray, cfg: TransformConfig,
                    rng: np.random.Generator, name: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """One TRAIN-phase ``TransformImgAndSeg``: uint8 BGR HxWx3 + uint8 HxW label in,
    float32 (3, crop, crop) mean-subtracted image and uint8 (crop, crop) label out."""
    img, lab, valid = crop_pair(img, lab, cfg, rng, name)
    return finish_image(img, valid, cfg), lab


def transform_test(img: np.ndarray, lab: np.ndarray, cfg: TransformConfig, name: str = ""
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """TEST-phase ``TransformImgAndSeg``: pad to ``crop_size`` then centre crop, no mirror."""
    img, lab, valid = crop_pair(img, lab, cfg, None, name)
    return finish_image(img, valid, cfg), lab
