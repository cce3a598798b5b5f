"""A built-in, procedurally generated *scale* data set (no downloads, deterministic from a seed).

Why merging scales matters on it (the property the paper's Table 3 measures):

- 4 object classes + background.  Classes 1/2 share one colour, 3/4 another; within a colour
  pair the classes differ **only by shape** (disc vs. axis-aligned square).  The interior of an
  object is the same striped texture for both shapes, so a unit whose receptive field sits
  inside a *large* object cannot tell disc from square: it must see the outline, far away --
  easier on the 0.5-scale input, where the object is half as big relative to the receptive field.
- *Small* objects (radius 3..6 px) are discs or squares too; at scale 0.5 they shrink to a
  couple of pixels and the shape cue is gone -- they need the scale-1 input.
- Every image holds one large object (radius 28..42 % of the image) and several small ones of
  other classes, so a single fixed scale cannot be right everywhere.
- Object outlines carry a 1-pixel band of label 255 (ignored), like VOC's object borders.

Measured (benchmarks/RESULTS.md, seventh session): at 65 px the merged rows do not beat the
single-scale baseline (LargeFOV's theoretical receptive field, about 419 px, covers the whole image at
scale 1); at 161 px, ``reproduce --synthetic``'s size, extra supervision improves every merge and most
E-Supv rows beat the baseline by about a point.  The set checks the machinery and shows the direction
of the paper's effect, not its size.

Image ``i`` of a data set is drawn from ``numpy.random.default_rng([seed, i])``: any image can be
regenerated alone, in any worker, and the data set never changes between runs.  Images are
uint8 BGR and labels uint8, exactly what the file reader returns, so the same transforms, loader,
training and evaluation code run on it.
"""
from __future__ import annotations

import os
from typing import Tuple

import cv2
import numpy as np

SYNTHETIC_CLASSES = ("background", "disc_warm", "square_warm", "disc_cool", "square_cool")
_COLOURS = {1: (40, 90, 200), 2: (40, 90, 200), 3: (190, 120, 40), 4: (190, 120, 40)}  # BGR
_SHAPE = {1: "disc", 2: "square", 3: "disc", 4: "square"}


def _draw(mask: np.ndarray, shape: str, cx: int, cy: int, r: int) -> None:
    if shape == "disc":
        cv2.circle(mask, (cx, cy), r, 1, thickness=-1, lineType=cv2.LINE_8)
    else:  # square of the same area-ish extent: half-side r
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, thickness=-1)


def make_sample(seed: int, index: int, size: int = 97, n_small: Tuple[int, int] = (3, 6)
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the data set ``seed``: (uint8 HxWx3 BGR, uint8 HxW label)."""
    rng = np.random.default_rng([int(seed), int(index)])
    H = W = int(size)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # background: smooth random colour gradient + noise
    base = rng.uniform(70, 150, size=3)
    grad = rng.uniform(-30, 30, size=(2, 3))
    img = (base[None, None, :] + grad[0][None, None, :] * (yy[..., None] / H - .5)
           + grad[1][None, None, :] * (xx[..., None] / W - .5))
    lab = np.zeros((H, W), np.uint8)
    boundary = np.zeros((H, W), bool)

    def paint(cls: int, cx: int, cy: int, r: int) -> None:
        m = np.zeros((H, W), np.uint8)
        _draw(m, _SHAPE[cls], cx, cy, r)
        m = m.astype(bool)
        # class-pair colour with jitter, diagonal stripes (same texture for disc and square)
        col = np.asarray(_COLOURS[cls], np.float32) + rng.uniform(-20, 20, size=3)
        period = 6.0
        phase = rng.uniform(0, period)
        stripes = (np.sin(2 * np.pi * (xx + yy + phase) / period) > 0).astype(np.float32)
        tex = col[None, None, :] * (0.75 + 0.25 * stripes[..., None])
        img[m] = tex[m]
        lab[m] = cls
        edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        boundary[:] = boundary & ~m  # a newer object covers older outlines
        boundary[edge] = True

    big = int(rng.integers(1, 5))
    r_big = int(rng.uniform(0.28, 0.42) * H)
    paint(big, int(rng.integers(r_big // 2, W - r_big // 2)), int(rng.integers(r_big // 2, H - r_big // 2)), r_big)
    for _ in range(int(rng.integers(n_small[0], n_small[1] + 1))):
        r = int(rng.integers(3, 7))
        cls = int(rng.choice([c for c in (1, 2, 3, 4) if c != big]))   # visible on the large one
        paint(cls, int(rng.integers(r, W - r)), int(rng.integers(r, H - r)), r)
    img = img + rng.normal(0, 8, size=img.shape)
    lab[boundary] = 255
    return np.clip(img, 0, 255).astype(np.uint8), lab


class SyntheticSource:
    """``n`` synthetic images (same ``load`` interface as :class:`~attnscale.data.dataset.FileSource`)."""

    class_names = SYNTHETIC_CLASSES

    def __init__(self, n: int, seed: int = 0, size: int = 97):
        if n <= 0:
            raise ValueError(f"SyntheticSource: n must be positive, got {n}")
        self.n, self.seed, self.size = int(n), int(seed), int(size)
        self._cache: dict = {}   # per process (each DataLoader worker keeps its own)

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"synthetic_{self.seed}_{i:05d}"

    def load(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"SyntheticSource: index {i} out of range 0..{self.n - 1}")
        if i not in self._cache:
            self._cache[i] = make_sample(self.seed, i, self.size)
        img, lab = self._cache[i]
        return img.copy(), lab.copy(), self.name(i)

    def export(self, root: str, list_name: str) -> str:
        """Write the images/labels as JPEG/PNG under ``root`` in DeepLab's layout plus a list
        file ``root/list/<list_name>.txt``; returns the list path."""
        from .lists import write_list
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
        names = []
        for i in range(self.n):
            img, lab, name = self.load(i)
            cv2.imwrite(os.path.join(root, "JPEGImages", name + ".jpg"), img)
            cv2.imwrite(os.path.join(root, "SegmentationClassAug", name + ".png"), lab)
            names.append(name)
        path = os.path.join(root, "list", list_name + ".txt")
        write_list(path, names)
        return path
