"""Evaluation: ``python -m attnscale.evaluate CONFIG --checkpoint RUN/checkpoint.pt``.

DeepLab's protocol: every validation image is segmented *whole* by ``model.predict`` (the
test-time net: pad with the mean, run all scales, merge, upsample, crop back), predictions are
accumulated into one confusion matrix over all pixels whose ground truth is not 255, and the
score is the PASCAL VOC IoU of every class, ``TP / (TP + FP + FN)``, averaged over the classes
(``mIoU``) as DeepLab's ``matlab/my_script/MyVOCevalseg.m`` (which gave the paper's numbers) does: a
class that occurs neither in the ground truth nor in a prediction scores 0 and still counts in the
mean (its ``per_class_iou`` entry is ``null``; ``miou_present_classes`` is the mean over the other
classes).  On the full VOC val set every class occurs, so this matters for subsets
(``--max-images``), small data sets and rare classes.  With ``--attention-dir``, writes for each of the
first ``--attention-images`` (10) images a PNG ``NNNN_<image>.png``: image, ground truth, prediction and
one heat map of merge weights per scale (the attention weights, or the max / avg merge's; the paper's
Figs. 4-6).  With ``--predictions DIR``, writes every prediction as ``DIR/<image>.png`` in VOC's indexed
format; ``--list`` runs another list, and a list of images only (VOC test) is predicted, not scored.
``--crf`` runs DeepLab's fully connected CRF between the net and the argmax (:mod:`attnscale.crf`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .config import TrainConfig
from .data.lists import IGNORE_LABEL
from .malloc import keep_freed_memory


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """``cm[g, p]`` = number of pixels with ground truth ``g`` predicted ``p`` (pixels whose
    ground truth is ``ignore_label`` are skipped).  Labels outside ``0..num_classes-1`` raise."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: prediction has {pred.size} pixels, ground truth {gt.size}")
    keep = gt != ignore_label
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"confusion_matrix: ground-truth label {int(gt.max() if gt.max() >= num_classes else gt.min())} "
                         f"outside 0..{num_classes - 1} (and not {ignore_label})")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"confusion_matrix: predicted label outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> Dict[str, object]:
    """Per-class IoU ``TP/(TP+FP+FN)`` (None where the class has no pixel in gt or prediction),
    ``miou`` as MyVOCevalseg.m computes it (``denom = 1`` for such a class, so it scores 0, and the
    sum divided by all classes), the mean over the other classes, and pixel accuracy."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"iou_from_confusion: expected a square matrix, got shape {cm.shape}")
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    defined = ~np.isnan(iou)
    total = cm.sum()
    return {
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "miou": float(np.where(defined, iou, 0.0).sum() / len(iou)) if len(iou) else float("nan"),
        "miou_present_classes": float(iou[defined].mean()) if defined.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def _unpack_prediction(res):
    if isinstance(res, tuple):
        lab, att = res[0], (res[1] if len(res) > 1 else None)
    else:
        lab, att = res, None
    lab = lab.cpu().numpy() if torch.is_tensor(lab) else np.asarray(lab)
    if att is not None:
        att = att.cpu().numpy() if torch.is_tensor(att) else np.asarray(att)
        att = att.reshape((-1,) + att.shape[-2:])
    return lab.reshape(lab.shape[-2:]), att


@torch.no_grad()
def evaluate(model, source, num_classes: int, class_names: Optional[Sequence[str]] = None,
             max_images: int = 0, attention_dir: str = "", attention_images: int = 10,
             progress: bool = True, predictions_dir: str = "", crf=None) -> Dict[str, object]:
    """Run ``model.predict`` over ``source`` (``load(i) -> (bgr uint8, label uint8, name)``).
    ``predictions_dir``: also write each prediction as ``<image>.png`` (:func:`save_label_png`).  A
    source without labels (``has_labels`` False, e.g. VOC test) is predicted only: no scores.  ``crf``
    (:class:`attnscale.crf.CRFParams`): DeepLab's DenseCRF after the net (``predict(crf=)``)."""
    model.eval()
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0 (0: all), got {max_images}")
    scored = getattr(source, "has_labels", True)
    if not scored and not predictions_dir:
        raise ValueError(f"{getattr(source, 'list_path', 'the source')}: no labels to score against; "
                         "give a predictions folder to write the predictions to")
    n = len(source) if not max_images else min(max_images, len(source))
    if predictions_dir and hasattr(source, "name"):  # one file per image: two with one name would overwrite
        first: Dict[str, int] = {}
        for i in range(n):
            j = first.setdefault(source.name(i), i)
            if j != i:
                where = getattr(source, "list_path", "the source")
                raise ValueError(f"{where}: images {j + 1} and {i + 1} are both named {source.name(i)!r}: their "
                                 f"predictions would be one file, {source.name(i)}.png, in {predictions_dir}")
    cm = np.zeros((num_classes, num_classes), np.int64)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="eval" if scored else "predict", file=sys.stderr, leave=False, dynamic_ncols=True)
    for i in it:
        img, gt, name = source.load(i)
        try:
            lab, att = _unpack_prediction(model.predict(img) if crf is None else model.predict(img, crf=crf))
        except FloatingPointError as e:
            raise FloatingPointError(f"{name}: {e}") from None
        except ValueError as e:   # e.g. the CRF's lattice keys overflow on this image
            raise ValueError(f"{name}: {e}") from None
        stem = os.path.basename(str(name)).rsplit(".", 1)[0]
        if predictions_dir:
            save_label_png(os.path.join(predictions_dir, stem + ".png"), lab)
        if scored and lab.shape != gt.shape:
            raise ValueError(f"{name}: prediction is {lab.shape}, ground truth {gt.shape}")
        if attention_dir and i < attention_images:
            save_attention_png(os.path.join(attention_dir, f"{i:04d}_{stem}.png"), img, gt if scored else None,
                               lab, att, getattr(model, "scales", None), getattr(model, "merge", "attention"))
        if not scored:
            continue
        try:
            cm += confusion_matrix(lab, gt, num_classes)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    res = iou_from_confusion(cm) if scored else {}
    res["num_images"] = n
    if scored:
        res["confusion_matrix"] = cm.tolist()
    if predictions_dir:
        res["predictions_dir"] = os.path.abspath(predictions_dir)
    if class_names is not None:
        res["class_names"] = list(class_names)
    if crf is not None:
        res["crf"] = crf.to_dict()
    return res


def color_map(n: int = 256) -> np.ndarray:
    """PASCAL VOC's label palette (bit-interleaved), as an (n, 3) uint8 RGB array; 255 is white."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap[255] = (255, 255, 255)
    return cmap


def save_label_png(path: str, lab: np.ndarray) -> None:
    """A label map (class ids 0..255) as an 8-bit indexed PNG with VOC's palette (:func:`color_map`),
    the format of VOC's ``SegmentationClass`` files and of its evaluation server's results, written
    atomically (Pillow: OpenCV cannot write a palette)."""
    from PIL import Image
    lab = np.asarray(lab)
    if lab.ndim != 2 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() > 255:
        raise ValueError(f"{path}: a label PNG needs a non-empty 2-D map of class ids 0..255, got "
                         f"{lab.dtype} of shape {lab.shape}")
    im = Image.fromarray(np.ascontiguousarray(lab, dtype=np.uint8))
    im.putpalette(color_map().tobytes())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_attention_png(path: str, img_bgr: np.ndarray, gt: Optional[np.ndarray], pred: np.ndarray,
                       attention: Optional[np.ndarray], scales: Optional[Sequence[float]] = None,
                       merge: Optional[str] = "attention") -> None:
    """Image | ground truth (when there is one) | prediction | one heat map of merge weights per scale
    (Figs. 4-6: the attention weights; for max / avg merging the share of classes each scale won / 1/S),
    via matplotlib (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cmap = color_map()
    panels = ([("image", img_bgr[:, :, ::-1], None)] + ([] if gt is None else [("ground truth", cmap[gt], None)])
              + [("prediction", cmap[pred], None)])
    if attention is not None:
        for s in range(attention.shape[0]):
            sc = scales[s] if scales is not None and s < len(scales) else s
            panels.append((f"scale-{sc:g} {'attention' if merge in (None, 'attention') else merge + ' weight'}",
                           attention[s], "jet"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for ax, (title, im, cm) in zip(np.atleast_1d(axes), panels):
        if cm is None:
            ax.imshow(im)
        else:
            ax.imshow(im, cmap=cm, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_model_from_checkpoint(cfg: TrainConfig, checkpoint: str, device: str = "cpu"):
    from .train import build_model, load_checkpoint, run_device
    ck = load_checkpoint(checkpoint, map_location=run_device(device))
    init, cfg.init = cfg.init, ""   # weights come from the checkpoint
    try:
        model = build_model(cfg)
    finally:
        cfg.init = init
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"{checkpoint}: does not fit the model of this config: {e}") from e
    return model.to(device), int(ck.get("iter", -1))


def run(cfg: TrainConfig, checkpoint: str, out: str = "", max_images: int = 0,
        attention_dir: str = "", attention_images: int = 10, progress: bool = True,
        predictions_dir: str = "", list_path: str = "", crf=None) -> Dict[str, object]:
    """Evaluate (or, for a list without labels, predict) ``cfg``'s model from ``checkpoint`` on the
    val list, or on ``list_path`` (DeepLab form, paths under ``cfg.data_root``), in ``cfg.precision``
    (bf16: the forward under bfloat16 autocast; TF32 on a GPU only for "tf32"); ``crf``: with DeepLab's
    DenseCRF after the net."""
    from .data import FileSource
    from .train import (backend_switches, build_source, dataset_classes, forward_precision, num_classes,
                        resolve_list)
    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        source = (FileSource(resolve_list(list_path, "", cfg.data_root, "--list"), cfg.data_root, num_classes(cfg),
                             need_labels=False) if list_path else build_source(cfg, "val"))
        model, it = load_model_from_checkpoint(cfg, checkpoint, cfg.device)
        # the run's arithmetic (config.precision), as in training
        with backend_switches(cfg.precision), forward_precision(cfg.precision, torch.device(cfg.device).type):
            res = evaluate(model, source, num_classes(cfg), dataset_classes(cfg),
                           max_images, attention_dir, attention_images, progress, predictions_dir, crf)
    finally:
        torch.set_num_threads(threads)
    res["checkpoint"] = checkpoint
    res["iteration"] = it
    res["list"] = list_path or "val"
    res["precision"] = cfg.precision
    if out:
        write_json(out, res)
    if predictions_dir:  # what made the PNGs (checkpoint, list, CRF), beside the folder: the folder stays PNGs only
        write_json(predictions_record(predictions_dir), res)
    return res


def predictions_record(predictions_dir: str) -> str:
    """The JSON file ``run`` writes beside a predictions folder: ``DIR.json`` for ``DIR/``."""
    return os.path.normpath(os.path.abspath(predictions_dir)) + ".json"


def strict_json(x):
    """NaN / inf (an IoU of a class absent from the evaluated images) as JSON ``null``: strict JSON,
    which ``json.dumps`` would otherwise break with a bare ``NaN``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def write_json(path: str, obj) -> None:
    """``obj`` as strict JSON, written atomically (temporary file + ``os.replace``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _crf_params(model, text):
    """``--crf [MODEL]`` / ``--crf-params``: None, DeepLab's published CRFParams for MODEL, or the JSON's fields
    (a JSON object, or a file holding one) over MODEL's (default DeepLab-LargeFOV's)."""
    from .crf import CRFParams

    if text is None:
        return CRFParams.deeplab(model) if model else None
    src = "--crf-params"
    if os.path.isfile(text) or not text.lstrip().startswith("{"):
        src = f"--crf-params {text}"
        try:
            with open(text, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{src}: neither a JSON object nor a readable JSON file ({e})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{src}: expected a JSON object of CRF parameters, got {type(d).__name__}")
    try:
        return CRFParams.from_dict(d, CRFParams.deeplab(model or "largefov"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{src}: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnscale.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the TrainConfig JSON the model was trained with")
    ap.add_argument("--checkpoint", default="", help="default: OUT_DIR/checkpoint.pt of the config")
    ap.add_argument("--out", default="", help="JSON results file (default OUT_DIR/eval.json; none with --list)")
    ap.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only")
    ap.add_argument("--attention-dir", default="", help="write merge-weight figures (PNG) here")
    ap.add_argument("--attention-images", type=int, default=10, help="how many images, from the first, get a "
                    "figure (default 10)")
    ap.add_argument("--predictions", default="", metavar="DIR", help="write every prediction here as "
                    "<image>.png, an indexed PNG with VOC's palette (VOC's evaluation server format), and what "
                    "made them (checkpoint, list, CRF parameters) to DIR.json beside it")
    ap.add_argument("--list", default="", help="a DeepLab list to run instead of the val list; a list of "
                    "images only (VOC test) is predicted, not scored, and needs --predictions")
    from .crf import DEEPLAB_PRESETS
    ap.add_argument("--crf", nargs="?", const="largefov", default=None, choices=list(DEEPLAB_PRESETS),
                    help="DeepLab's fully connected CRF after the net (DenseCRF layer) with the parameters DeepLab "
                    "published for MODEL: plain, msc, coco, largefov (the default), msc-largefov, coco-largefov, "
                    "msc-coco-largefov (give it after the config, which --crf would otherwise take for MODEL); results to "
                    "OUT_DIR/eval_crf.json by default")
    ap.add_argument("--crf-params", default=None, metavar="JSON", help="the CRF's parameters (implies --crf): a JSON "
                    "object or file with any of max_iter, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std (lists "
                    "for several kernels) over --crf MODEL's, e.g. the one prototxt_import convert prints for a net "
                    "with a DenseCRF")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-root", default=None, help="override config.data_root")
    a = ap.parse_args(argv)
    try:
        crf = _crf_params(a.crf, a.crf_params)
    except ValueError as e:
        ap.error(str(e))
    keep_freed_memory()
    try:
        cfg = TrainConfig.load(a.config)
        if a.device:
            cfg.device = a.device
        if a.data_root is not None:
            cfg.data_root = a.data_root
        ck = a.checkpoint or os.path.join(cfg.out_dir, "checkpoint.pt")
        # the val evaluation's file (reproduce reuses it) is never written by a run of another list
        out = a.out or ("" if a.list else os.path.join(cfg.out_dir, "eval_crf.json" if crf else "eval.json"))
        res = run(cfg, ck, out, a.max_images, a.attention_dir, a.attention_images, predictions_dir=a.predictions,
                  list_path=a.list, crf=crf)
    except (ValueError, OSError, FloatingPointError) as exc:  # bad config, list, image, checkpoint: said, not traced
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "miou" not in res:
        print(f"{res['num_images']} predictions (no labels to score) -> {res['predictions_dir']}")
        return 0
    names = res.get("class_names") or [str(i) for i in range(len(res["per_class_iou"]))]
    for n, v in zip(names, res["per_class_iou"]):
        print(f"{n:>14s}: {'  n/a' if v is None else f'{100 * v:6.2f}'}")
    print(f"mIoU {100 * res['miou']:.2f} over {res['num_images']} images ({'DenseCRF, ' if crf else ''}MyVOCevalseg; "
          f"{100 * res['miou_present_classes']:.2f} over the classes present)" + (f" -> {out}" if out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
