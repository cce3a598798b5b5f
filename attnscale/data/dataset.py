"""Image/label sources, the training ``Dataset``, a resumable sampler and the DataLoader.

Files are decoded as DeepLab's ``ImageSegData`` does: the image with OpenCV in colour (BGR
order, ``cv::IMREAD_COLOR``, EXIF orientation ignored as OpenCV 2.4 did), the label as a one-channel 8-bit PNG whose values are the class
indices (DeepLab reads it with ``is_color=false``).  A label that decodes to three channels is a
colour/palette PNG (e.g. VOC's ``SegmentationClass``): OpenCV would turn its palette into grey
levels, silently producing wrong labels, so it is rejected (for VOC + SBD,
``python -m attnscale.data.sbd`` writes proper ``SegmentationClassAug`` index PNGs).  Given the
class count, a source also rejects a label file holding class ids that are neither a class nor
the ignore label (Caffe does not check: ``SoftmaxWithLoss`` reads out of bounds in a release
build), naming the file and its list line: training sees only the pixels the label shrinking
samples, so such a file could otherwise train without any error.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .lists import IGNORE_LABEL, read_list_lines
from .transforms import TransformConfig, crop_pair, finish_image


def read_image(path: str) -> np.ndarray:
    """Decode an image as uint8 HxWx3 BGR; missing or corrupt files raise naming the file.

    The stored pixel grid, as Caffe's OpenCV 2.4 ``CV_LOAD_IMAGE_COLOR`` decoded it: newer OpenCV's
    ``IMREAD_COLOR`` turns a JPEG by its EXIF Orientation tag, which the label never is, so the tag
    is ignored (``IMREAD_IGNORE_ORIENTATION``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError(f"cannot decode image file (corrupt or not an image): {path}")
    return img


def read_label(path: str) -> np.ndarray:
    """Decode a label PNG as uint8 HxW class indices (255 = ignore)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path}")
    lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"cannot decode label file (corrupt or not an image): {path}")
    if lab.ndim == 3:
        raise ValueError(f"label file {path} has {lab.shape[2]} channels: expected a one-channel "
                         "PNG of class indices (255 = ignore). Colour/palette PNGs must be converted to "
                         "index PNGs first (for VOC + SBD: `python -m attnscale.data.sbd`).")
    if lab.dtype != np.uint8:
        raise ValueError(f"label file {path} has dtype {lab.dtype}; expected 8-bit class indices")
    return lab


def check_label_values(lab: np.ndarray, num_classes: int, where: str) -> None:
    """Every value of ``lab`` must be a class id ``< num_classes`` or the ignore label."""
    counts = np.bincount(lab.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v >= num_classes and v != IGNORE_LABEL]
    if bad:
        n = int(sum(counts[v] for v in bad))
        raise ValueError(f"{where}: {n} pixel(s) hold class id(s) {[int(v) for v in bad[:8]]} outside "
                         f"0..{num_classes - 1} that are not the ignore label {IGNORE_LABEL}")


class FileSource:
    """(image, label) pairs from a DeepLab list file; every listed file must exist.  With
    ``num_classes``, each label's values are checked when it is loaded.  ``need_labels=False`` also
    takes a list of images only (VOC test): then ``has_labels`` is False and ``load`` gives None as
    the label; a list must not mix the two kinds of line."""

    def __init__(self, list_path: str, root: str = "", num_classes: int = 0, need_labels: bool = True):
        self.list_path = list_path
        self.num_classes = num_classes
        entries = read_list_lines(list_path, root, need_labels=need_labels, check_files=True)
        self.pairs = [pair for pair, _ in entries]
        self.lines = [line for _, line in entries]
        self.has_labels = self.pairs[0][1] is not None
        odd = next((line for (_, lab), line in entries if (lab is not None) != self.has_labels), None)
        if odd is not None:
            raise ValueError(f"{list_path}:{odd}: this line {'lacks' if self.has_labels else 'has'} a label path, "
                             f"line {self.lines[0]} {'has' if self.has_labels else 'lacks'} one: a list gives "
                             "labels on every line or on none")

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return os.path.splitext(os.path.basename(self.pairs[i][0]))[0]

    def load(self, i: int) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
        img_path, lab_path = self.pairs[i]
        img = read_image(img_path)
        if lab_path is None:
            return img, None, img_path
        lab = read_label(lab_path)
        if img.shape[:2] != lab.shape:
            raise ValueError(f"size mismatch: image {img_path} is {img.shape[1]}x{img.shape[0]} "
                             f"but label {lab_path} is {lab.shape[1]}x{lab.shape[0]} (WxH)")
        if self.num_classes:
            check_label_values(lab, self.num_classes, f"label file {lab_path} ({self.list_path}:{self.lines[i]})")
        return img, lab, img_path


class SegDataset(Dataset):
    """Training/test-phase samples.  Keys are ``(index, draw)`` pairs from
    :class:`ResumableSampler`: the random crop/mirror/scale of a sample is a pure function of
    ``(seed, draw)``, so results do not depend on worker count and resume exactly.

    A sample is (float32 (3, H, W) network input, uint8 (H, W) label); with ``raw=True`` it is (uint8
    (H, W, 3) crop, int32 (3,) valid rectangle, uint8 label), the input's arithmetic left to
    :func:`attnscale.data.network_input` on the device (a batch travels as bytes)."""

    def __init__(self, source, tcfg: TransformConfig, train: bool = True, seed: int = 0, raw: bool = False):
        self.source, self.tcfg, self.train, self.seed, self.raw = source, tcfg, train, seed, raw

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        idx, draw = key if isinstance(key, tuple) else (key, key)
        img, lab, name = self.source.load(int(idx))
        if self.raw and img.dtype != np.uint8:
            raise ValueError(f"{name}: the image is {img.dtype}; SegDataset(raw=True) sends the pixels as bytes "
                             "(uint8), for network_input to make the floats on the device")
        rng = np.random.default_rng([self.seed, 7, int(draw)]) if self.train else None
        img, lab, valid = crop_pair(img, lab, self.tcfg, rng, name)
        if self.raw:
            return torch.from_numpy(img), torch.tensor(valid, dtype=torch.int32), torch.from_numpy(lab)
        return torch.from_numpy(finish_image(img, valid, self.tcfg)), torch.from_numpy(lab)


class ResumableSampler(Sampler):
    """Endless shuffled stream of ``(index, draw)`` keys, resumable at any sample.

    Epoch ``e`` uses the permutation ``default_rng([seed, e]).permutation(n)``; with
    ``world > 1`` the permutation is padded to a multiple of ``world`` by repeating its head and
    rank ``r`` takes every ``world``-th entry from ``r`` -- the sharding of
    ``torch.utils.data.DistributedSampler``, which cannot itself restart mid-epoch.
    ``start`` counts samples already consumed by this rank.
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if n <= 0:
            raise ValueError("ResumableSampler: empty data set")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world
        self.shuffle = shuffle
        self.per_rank = -(-n // world)

    def _perm(self, epoch: int) -> np.ndarray:
        p = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
             else np.arange(self.n))
        total = self.per_rank * self.world
        if total > self.n:
            p = np.concatenate([p, p[: total - self.n]])
        return p

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = self.start
        epoch, perm = -1, None
        while True:
            e, pos = divmod(g, self.per_rank)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            j = pos * self.world + self.rank
            yield int(perm[j]), int(e * self.per_rank * self.world + j)
            g += 1

    def __len__(self) -> int:  # one epoch (the stream itself is endless)
        return self.per_rank


def make_loader(dataset: SegDataset, batch_size: int, workers: int = 0, seed: int = 0,
                start_sample: int = 0, rank: int = 0, world: int = 1, pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader over ``dataset`` starting after ``start_sample`` samples; ``pin_memory`` (for a
    CUDA run) puts its batches in page-locked memory, so that their copies to the GPU run asynchronously."""
    sampler = ResumableSampler(len(dataset), seed, start_sample, rank, world)
    # A private generator: creating the iterator draws a base seed from it, which would otherwise
    # come from (and shift) the global torch RNG that dropout uses -- breaking exact resume.
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, persistent_workers=False, pin_memory=pin_memory, generator=gen,
                      worker_init_fn=_one_thread_worker if workers else None)


def _one_thread_worker(_: int) -> None:
    """A loader worker decodes and resizes with OpenCV on one thread: the workers are the parallelism (the
    DataLoader already gives each worker one torch thread), and an OpenCV pool of every core's size in each
    of them would compete with the training process for the CPUs (12 workers x 16 threads on a GPU
    machine's 16 cores)."""
    cv2.setNumThreads(1)
