"""Evaluation: confusion matrix, IoU on hand-made matrices, the evaluate loop, attention PNGs."""
import json
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


def test_absent_class_scores_zero_as_in_myvocevalseg():
    """DeepLab's MyVOCevalseg.m (the paper's numbers): a class in neither ground truth nor prediction
    gets denom = 1, so IoU 0, and the mean divides by every class."""
    cm = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 2]])
    r = iou_from_confusion(cm)
    assert r["per_class_iou"][1] is None
    assert r["miou"] == pytest.approx((5 / 6 + 0 + 2 / 3) / 3)
    assert r["miou_present_classes"] == pytest.approx((5 / 6 + 2 / 3) / 2)
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
    assert pngs == ["0000_img0.png", "0001_img1.png", "0002_img2.png"]  # list order: names may repeat
    assert os.path.getsize(tmp_path / "0000_img0.png") > 1000
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


def test_evaluate_errors_name_the_image_and_bad_counts_are_refused():
    src = _Src()
    m = _Model("perfect")
    m.src = src
    src.items[1][1][0, 0] = 7                   # a class id outside 0..2 in img1's ground truth
    with pytest.raises(ValueError, match=r"img1.jpg: confusion_matrix: ground-truth label 7"):
        evaluate(m, src, 3, progress=False)
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        evaluate(m, src, 3, max_images=-1, progress=False)


def test_results_json_is_strict(tmp_path):
    """A NaN (no image evaluated, a class never seen) is written as null, not as a bare NaN that
    strict JSON readers refuse."""
    from attnscale.evaluate import write_json
    p = tmp_path / "r" / "eval.json"
    write_json(str(p), {"miou": float("nan"), "per_class_iou": [0.5, None, float("inf")]})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "miou": None, "per_class_iou": [0.5, None, None]}
