"""Evaluation: confusion matrix, IoU on hand-made matrices, the evaluate loop, attention PNGs."""
import os

import numpy as np
import pytest

from attnscale.evaluate import color_map, confusion_matrix, evaluate, iou_from_confusion


def test_confusion_matrix_by_hand_ignores_255():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(pred, gt, 3)
    expected = np.array([[1, 1, 0],    # gt 0: one right, one called 1
                         [0, 1, 1],    # gt 1: one right, one called 2
                         [0, 0, 1]])   # gt 2: right; the 255 pixel is not counted
    np.testing.assert_array_equal(cm, expected)


def test_iou_by_hand():
    cm = np.array([[3, 1], [2, 4]])
    r = iou_from_confusion(cm)
    assert r["per_class_iou"][0] == pytest.approx(3 / (3 + 1 + 2))
    assert r["per_class_iou"][1] == pytest.approx(4 / (4 + 2 + 1))
    assert r["miou"] == pytest.approx((0.5 + 4 / 7) / 2)
    assert r["pixel_accuracy"] == pytest.approx(7 / 10)


def test_absent_class_is_left_out_of_the_mean():
    cm = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 2]])
    r = iou_from_confusion(cm)
    assert r["per_class_iou"][1] is None
    assert r["miou"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    # a class only predicted (never in gt) counts, with IoU 0
    r2 = iou_from_confusion(np.array([[1, 1], [0, 0]]))
    assert r2["per_class_iou"] == [0.5, 0.0] and r2["miou"] == pytest.approx(0.25)


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 9]), np.array([0, 1]), 3)


class _Src:
    def __init__(self, n=3):
        r = np.random.default_rng(0)
        self.items = [(r.integers(0, 255, (9, 11, 3), dtype=np.uint8),
                       r.integers(0, 3, (9, 11)).astype(np.uint8), f"img{i}.jpg") for i in range(n)]

    def __len__(self):
        return len(self.items)

    def load(self, i):
        return self.items[i]


class _Model:
    scales = (1.0, 0.5)

    def __init__(self, mode):
        self.mode, self.src = mode, None

    def eval(self):
        return self

    def predict(self, img):
        gt = next(g for im, g, _ in self.src.items if im is img)
        lab = gt if self.mode == "perfect" else np.zeros_like(gt)
        att = np.stack([np.full(gt.shape, 0.3), np.full(gt.shape, 0.7)])
        return lab, att


def test_evaluate_loop_and_attention_pngs(tmp_path):
    src = _Src()
    m = _Model("perfect")
    m.src = src
    r = evaluate(m, src, 3, ["a", "b", "c"], attention_dir=str(tmp_path), progress=False)
    assert r["miou"] == pytest.approx(1.0) and r["num_images"] == 3
    pngs = sorted(os.listdir(tmp_path))
    assert pngs == ["img0.png", "img1.png", "img2.png"]
    assert os.path.getsize(tmp_path / "img0.png") > 1000
    m0 = _Model("zeros")
    m0.src = src
    r0 = evaluate(m0, src, 3, progress=False, max_images=2)
    gts = np.concatenate([g.ravel() for _, g, _ in src.items[:2]])
    assert r0["num_images"] == 2
    assert r0["per_class_iou"][0] == pytest.approx((gts == 0).mean())
    assert r0["per_class_iou"][1] == 0.0


def test_voc_palette():
    cm = color_map()
    assert tuple(cm[1]) == (128, 0, 0) and tuple(cm[15]) == (192, 128, 128) and tuple(cm[255]) == (255, 255, 255)
