"""Build DeepLab's ``SegmentationClassAug`` and ``train_aug`` / ``val`` lists from SBD + VOC 2012.

``python -m attnscale.data.sbd --sbd SBD/benchmark_RELEASE/dataset --voc VOCdevkit/VOC2012``

- every SBD ``cls/<name>.mat`` is read with ``scipy.io.loadmat``; its ``GTcls.Segmentation``
  matrix (class indices 0..20, no border) is written as a one-channel 8-bit PNG;
- every VOC ``SegmentationClass/<name>.png`` is a palette PNG whose *palette indices* are the
  labels (0..20, 255 = object border / "void"); the indices are written unchanged (255 kept), and
  VOC's annotation wins where both exist (it is the official one and the only one on ``val``);
- lists in DeepLab's form ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``:
  ``train_aug`` = (SBD train + SBD val + VOC train) minus VOC val (10,582 names for the official
  releases) and ``val`` = VOC 2012 val (1,449).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, List, Set

import cv2
import numpy as np

from .lists import write_list


def load_sbd_mat(path: str) -> np.ndarray:
    """``GTcls.Segmentation`` of one SBD ``cls/*.mat`` as uint8 HxW."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for broken files
        raise ValueError(f"cannot read SBD .mat file {path}: {e}") from e
    if "GTcls" not in mat:
        raise ValueError(f"SBD file {path} has no 'GTcls' struct (keys: "
                         f"{sorted(k for k in mat if not k.startswith('__'))})")
    gt = mat["GTcls"]
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise ValueError(f"SBD file {path}: GTcls has no 'Segmentation' field")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"SBD file {path}: GTcls.Segmentation has shape {seg.shape}, expected HxW")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise ValueError(f"SBD file {path}: labels outside 0..255 ({seg.min()}..{seg.max()})")
    return seg.astype(np.uint8)


def load_voc_png(path: str) -> np.ndarray:
    """Palette indices of a VOC ``SegmentationClass`` PNG as uint8 HxW (255 border kept)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"VOC label {path} has mode {im.mode!r}; expected a palette ('P') "
                                 "or one-channel ('L') PNG")
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read VOC label PNG {path}: {e}") from e


def write_label_png(path: str, lab: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    if not cv2.imwrite(tmp, lab):
        raise OSError(f"cannot write {path}")
    os.replace(tmp, path)


def _read_names(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image-set file not found: {path}")
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def convert(sbd_dir: str, voc_dir: str, out_dir: str = "", list_dir: str = "",
            progress: bool = True) -> dict:
    """Convert and write lists; returns counts ``{'sbd': n, 'voc': n, 'train_aug': n, 'val': n}``."""
    out_dir = out_dir or os.path.join(voc_dir, "SegmentationClassAug")
    list_dir = list_dir or os.path.join(voc_dir, "list")
    cls_dir = os.path.join(sbd_dir, "cls")
    voc_lab = os.path.join(voc_dir, "SegmentationClass")
    for d, what in ((cls_dir, "SBD cls/ folder (--sbd must be benchmark_RELEASE/dataset)"),
                    (voc_lab, "VOC SegmentationClass/ folder (--voc must be VOC2012)")):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{what} not found: {d}")
    sbd_names = sorted(f[:-4] for f in os.listdir(cls_dir) if f.endswith(".mat"))
    voc_names = sorted(f[:-4] for f in os.listdir(voc_lab) if f.endswith(".png"))
    try:
        from tqdm import tqdm
    except Exception:  # pragma: no cover
        progress = False
    voc_set = set(voc_names)
    it: Iterable[str] = [n for n in sbd_names if n not in voc_set]
    if progress:
        it = tqdm(list(it), desc="SBD .mat -> png", file=sys.stderr)
    for n in it:
        write_label_png(os.path.join(out_dir, n + ".png"), load_sbd_mat(os.path.join(cls_dir, n + ".mat")))
    it = tqdm(voc_names, desc="VOC png -> png", file=sys.stderr) if progress else voc_names
    for n in it:
        write_label_png(os.path.join(out_dir, n + ".png"), load_voc_png(os.path.join(voc_lab, n + ".png")))

    seg_sets = os.path.join(voc_dir, "ImageSets", "Segmentation")
    voc_val = _read_names(os.path.join(seg_sets, "val.txt"))
    voc_train = _read_names(os.path.join(seg_sets, "train.txt"))
    sbd_sets: Set[str] = set()
    for s in ("train.txt", "val.txt"):
        p = os.path.join(sbd_dir, s)
        if os.path.isfile(p):
            sbd_sets.update(_read_names(p))
    if not sbd_sets:
        sbd_sets = set(sbd_names)
    train_aug = sorted((sbd_sets | set(voc_train)) - set(voc_val))
    available = set(sbd_names) | voc_set
    missing = [n for n in train_aug + voc_val if n not in available]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images have no annotation, e.g. {missing[0]}")
    write_list(os.path.join(list_dir, "train_aug.txt"), train_aug)
    write_list(os.path.join(list_dir, "val.txt"), voc_val)
    return {"sbd": len(sbd_names), "voc": len(voc_names), "train_aug": len(train_aug),
            "val": len(voc_val)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnscale.data.sbd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sbd", required=True, help="SBD benchmark_RELEASE/dataset (has cls/, train.txt, val.txt)")
    ap.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (has SegmentationClass/, ImageSets/)")
    ap.add_argument("--out", default="", help="output label folder (default VOC2012/SegmentationClassAug)")
    ap.add_argument("--lists", default="", help="output list folder (default VOC2012/list)")
    a = ap.parse_args(argv)
    c = convert(a.sbd, a.voc, a.out, a.lists)
    print(f"wrote {c['sbd'] + c['voc']} labels; train_aug: {c['train_aug']} images, val: {c['val']}")
    if (c["train_aug"], c["val"]) != (10582, 1449):
        print("note: DeepLab's official split is train_aug 10,582 / val 1,449; yours differs "
              "(partial download?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
