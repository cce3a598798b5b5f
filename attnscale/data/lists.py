"""DeepLab list files and the data sets that use them.

DeepLab's ``ImageSegData`` layer reads a text file whose every line is
``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` -- an image path and a label path, both
relative to ``root_folder`` (the data root; a leading ``/`` is simply joined onto it, as Caffe
does with plain string concatenation ``root_folder + path``).  Test lists may hold only the
image path.  Every data set here (VOC 2012 + SBD, PASCAL-Person-Part, the MS-COCO subset) uses
this one interface; they differ only in class count, class names and default list names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from attnscale.caffe import IGNORE_LABEL  # noqa: F401  DeepLab's ignore_label (255), re-exported

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
PERSON_PART_CLASSES = ("background", "head", "torso", "upper_arms", "lower_arms",
                       "upper_legs", "lower_legs")
COCO_CLASSES = ("background",) + tuple(
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush".split())


@dataclass(frozen=True)
class DatasetSpec:
    """What distinguishes one list-file data set from another."""
    name: str
    class_names: Tuple[str, ...]
    train_list: str          # default list file, relative to the data root
    val_list: str
    classifier_name: str     # Caffe name of the classifier layer DeepLab uses for it

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS = {
    # VOC 2012 + SBD "train_aug" (10,582 images) / VOC 2012 val (1,449 images).
    "voc12": DatasetSpec("voc12", VOC_CLASSES, "list/train_aug.txt", "list/val.txt", "fc8_voc12"),
    # PASCAL-Person-Part (Chen et al. 2014): 1,716 train / 1,817 val person images, 7 classes.
    "person_part": DatasetSpec("person_part", PERSON_PART_CLASSES, "list/train_person_part.txt",
                               "list/val_person_part.txt", "fc8_person_part"),
    # The paper's random MS-COCO 2014 subset: 10k train / 1.5k val, 80 objects + background.
    "coco_subset": DatasetSpec("coco_subset", COCO_CLASSES, "list/train_coco10k.txt",
                               "list/val_coco1500.txt", "fc8_coco"),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown data set {name!r}; known: {sorted(DATASETS)} "
                         "(or 'synthetic')")
    return DATASETS[name]


def join_root(root: str, rel: str) -> str:
    """Caffe's ``root_folder + path`` (string concatenation), robust to a missing ``/``."""
    if not root:
        return rel
    return root.rstrip("/") + "/" + rel.lstrip("/")


def read_list(list_path: str, root: str = "", need_labels: bool = True, check_files: bool = False
              ) -> List[Tuple[str, Optional[str]]]:
    """Parse a DeepLab list file into ``[(image_path, label_path or None), ...]``.

    Paths are joined onto ``root``.  A line with other than one or two fields, a missing label
    when ``need_labels`` is true, a line that is not UTF-8 text or, with ``check_files``, a path
    that is not a file raises naming the file and the line number (so a missing image shows up
    before training, not when the sampler reaches it hours in).  A UTF-8 byte-order mark is
    dropped.
    """
    return [pair for pair, _ in read_list_lines(list_path, root, need_labels, check_files)]


def read_list_lines(list_path: str, root: str = "", need_labels: bool = True, check_files: bool = False
                    ) -> List[Tuple[Tuple[str, Optional[str]], int]]:
    """:func:`read_list` with each pair's line number: ``[((image, label), line), ...]``."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}")
    out: List[Tuple[Tuple[str, Optional[str]], int]] = []
    with open(list_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{list_path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                 "line)") from None
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'image [label]', got "
                                 f"{len(fields)} fields: {line.strip()!r}")
            if len(fields) == 1 and need_labels:
                raise ValueError(f"{list_path}:{lineno}: no label path on this line "
                                 f"({line.strip()!r}); training/evaluation needs labels")
            img = join_root(root, fields[0])
            lab = join_root(root, fields[1]) if len(fields) == 2 else None
            if check_files:
                for what, path in (("image", img), ("label", lab)):
                    if path is not None and not os.path.isfile(path):
                        raise FileNotFoundError(f"{list_path}:{lineno}: {what} file not found: {path}")
            out.append(((img, lab), lineno))
    if not out:
        raise ValueError(f"list file is empty: {list_path}")
    return out


def write_list(list_path: str, names: Sequence[str], image_dir: str = "JPEGImages",
               label_dir: Optional[str] = "SegmentationClassAug", image_ext: str = ".jpg",
               label_ext: str = ".png") -> None:
    """Write a DeepLab list file (``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines)."""
    os.makedirs(os.path.dirname(os.path.abspath(list_path)), exist_ok=True)
    with open(list_path, "w", encoding="utf-8") as f:
        for n in names:
            line = f"/{image_dir}/{n}{image_ext}"
            if label_dir is not None:
                line += f" /{label_dir}/{n}{label_ext}"
            f.write(line + "\n")


def find_voc_root(candidates: Optional[Sequence[str]] = None) -> Optional[str]:
    """Return the first directory that looks like a DeepLab VOC root (has JPEGImages/,
    SegmentationClassAug/ and list/train_aug.txt), or None.  Candidates default to
    ``$ATTNSCALE_DATA``, ``./data/VOC2012``, ``./data/VOCdevkit/VOC2012``,
    ``~/data/VOCdevkit/VOC2012``."""
    if candidates is None:
        candidates = [os.environ.get("ATTNSCALE_DATA", ""), "data/VOC2012",
                      "data/VOCdevkit/VOC2012", os.path.expanduser("~/data/VOCdevkit/VOC2012")]
    for c in candidates:
        if c and all(os.path.exists(os.path.join(c, p)) for p in
                     ("JPEGImages", "SegmentationClassAug", "list/train_aug.txt")):
            return c
    return None
