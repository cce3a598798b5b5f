"""Evaluation: confusion matrix, IoU on hand-made matrices, the evaluate loop, attention PNGs."""
import json
import os
import re

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
        if self.mode == "nan":
            raise FloatingPointError("predict: the net's scores hold 5 non-finite values")
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
    # a list without labels (VOC test) still gets its figures, without the ground-truth panel
    src.has_labels = False
    figs = tmp_path / "unlabelled"
    r1 = evaluate(m, src, 3, attention_dir=str(figs), predictions_dir=str(tmp_path / "pred"), progress=False,
                  max_images=2)
    assert "miou" not in r1 and sorted(os.listdir(figs)) == ["0000_img0.png", "0001_img1.png"]
    from PIL import Image
    with Image.open(figs / "0000_img0.png") as a, Image.open(tmp_path / "0000_img0.png") as b:
        assert a.size[0] < b.size[0]   # one panel fewer


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
    bad = _Model("nan")
    with pytest.raises(FloatingPointError, match=r"img0.jpg: predict: the net's scores hold 5 non-finite"):
        evaluate(bad, src, 3, progress=False)


def test_results_json_is_strict(tmp_path):
    """A NaN (no image evaluated, a class never seen) is written as null, not as a bare NaN that
    strict JSON readers refuse."""
    from attnscale.evaluate import write_json
    p = tmp_path / "r" / "eval.json"
    write_json(str(p), {"miou": float("nan"), "per_class_iou": [0.5, None, float("inf")]})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "miou": None, "per_class_iou": [0.5, None, None]}


def test_label_png_is_voc_indexed_and_reads_back(tmp_path):
    """Predictions are written as VOC's own label files are: 8-bit palette PNGs whose indices are the
    class ids (the evaluation server's format); the VOC label reader gets the same ids back."""
    from PIL import Image
    from attnscale.data.sbd import load_voc_png
    from attnscale.evaluate import save_label_png
    lab = np.random.default_rng(3).integers(0, 21, (7, 13)).astype(np.int64)
    lab[0, :3] = 255
    p = tmp_path / "sub" / "x.png"
    save_label_png(str(p), lab)
    with Image.open(p) as im:
        assert im.mode == "P" and im.size == (13, 7)
        assert np.array_equal(np.asarray(im), lab)
        assert np.array_equal(np.asarray(im.getpalette(), np.uint8).reshape(-1, 3), color_map())
    assert np.array_equal(load_voc_png(str(p)), lab) and not list(tmp_path.rglob("*.tmp"))
    for bad in (np.zeros((2, 2, 3), np.uint8), np.full((2, 2), 256), np.zeros((2, 2), np.float32)):
        with pytest.raises(ValueError, match="x.png: a label PNG needs"):
            save_label_png(str(p), bad)


def test_predictions_of_val_and_of_an_unlabelled_list(tmp_path, capsys):
    """``evaluate --predictions``: the val run writes one palette PNG per image, equal to
    ``model.predict``, beside unchanged scores; a list of images only (VOC test) is predicted, not scored,
    and leaves the val run's eval.json alone; a list mixing the two kinds of line is refused."""
    import torch
    from PIL import Image
    from attnscale.config import TrainConfig
    from attnscale.data import FileSource, SyntheticSource
    from attnscale.evaluate import load_model_from_checkpoint, main
    from attnscale.train import train
    root = tmp_path / "VOC2012"
    SyntheticSource(2, seed=0, size=33).export(str(root), "train_aug")
    SyntheticSource(3, seed=1, size=33).export(str(root), "val")
    cfg = TrainConfig(dataset="voc12", data_root=str(root), scales=[1.0, 0.5], merge="attention", width=1 / 32,
                      crop_size=33, test_crop_size=33, batch_size=1, iter_size=1, max_iter=1, workers=0,
                      out_dir=str(tmp_path / "run"), torch_threads=1)
    train(cfg, progress=False)
    cfg.save(str(tmp_path / "cfg.json"))
    assert main([str(tmp_path / "cfg.json"), "--predictions", str(tmp_path / "val_pred")]) == 0
    scored = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scored["num_images"] == 3 and "miou" in scored
    # --crf: DeepLab's DenseCRF after the net, its results beside (not over) the val run's eval.json
    assert main([str(tmp_path / "cfg.json"), "--crf-params", '{"max_iter": 2, "bi_xy_std": 20}']) == 0
    with_crf = json.loads((tmp_path / "run" / "eval_crf.json").read_text())
    assert with_crf["crf"]["max_iter"] == 2 and with_crf["crf"]["bi_xy_std"] == [20.0] and "miou" in with_crf
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == scored
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cfg.json"), "--crf-params", '{"bi_w": [1, 2]}'])
    model, _ = load_model_from_checkpoint(cfg, str(tmp_path / "run" / "checkpoint.pt"))
    val = FileSource(str(root / "list" / "val.txt"), str(root))
    for i in range(len(val)):
        img, _, name = val.load(i)
        with torch.no_grad():
            want = np.asarray(model.predict(img)[0])
        with Image.open(tmp_path / "val_pred" / (val.name(i) + ".png")) as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im), want), name
    test_list = root / "list" / "test.txt"
    test_list.write_text("".join(ln.split()[0] + "\n" for ln in (root / "list" / "val.txt").read_text().splitlines()))
    assert main([str(tmp_path / "cfg.json"), "--list", "list/test.txt", "--predictions", str(tmp_path / "test_pred"),
                 "--crf-params", '{"max_iter": 0}']) == 0
    assert "3 predictions (no labels to score)" in capsys.readouterr().out
    record = json.loads((tmp_path / "test_pred.json").read_text())  # what made them, beside the folder
    assert record["list"] == "list/test.txt" and record["num_images"] == 3 and record["crf"]["max_iter"] == 0
    assert record["checkpoint"].endswith("checkpoint.pt") and "miou" not in record
    assert sorted(os.listdir(tmp_path / "test_pred")) == sorted(os.listdir(tmp_path / "val_pred"))
    for f in os.listdir(tmp_path / "test_pred"):
        assert (tmp_path / "test_pred" / f).read_bytes() == (tmp_path / "val_pred" / f).read_bytes()
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == scored
    # bad input: a message naming the file and line on stderr and exit status 2, no traceback
    assert main([str(tmp_path / "cfg.json"), "--list", str(test_list)]) == 2
    assert re.search("^error: .*no labels to score against", capsys.readouterr().err)
    lines = (root / "list" / "val.txt").read_text().splitlines()
    test_list.write_text(lines[0] + "\n" + lines[1].split()[0] + "\n")
    assert main([str(tmp_path / "cfg.json"), "--list", str(test_list), "--predictions", str(tmp_path / "p")]) == 2
    assert re.search(r"^error: .*test.txt:2: this line lacks a label path, line 1 has one", capsys.readouterr().err)
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    # two images of one name (in other folders) would write one prediction file: refused before any work
    first = lines[0].split()[0]
    (root / "Other").mkdir()
    (root / "Other" / os.path.basename(first)).write_bytes((root / first.lstrip("/")).read_bytes())
    test_list.write_text(f"{first}\n/Other/{os.path.basename(first)}\n")
    assert main([str(tmp_path / "cfg.json"), "--list", str(test_list), "--predictions", str(tmp_path / "dup")]) == 2
    assert re.search(r"test.txt: images 1 and 2 are both named .*would be one file", capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "dup") or not os.listdir(tmp_path / "dup")


def test_evaluation_runs_in_the_configs_precision(tmp_path, monkeypatch):
    """evaluate.run computes in config.precision, as training does: the forward under bfloat16 autocast for
    "bf16" (nothing for "fp32"), TF32 off unless "tf32", the switches restored after."""
    import dataclasses
    import torch
    import attnscale.model as model_mod
    from attnscale.config import TrainConfig
    from attnscale.evaluate import run
    from attnscale.train import train
    cfg = TrainConfig(dataset="synthetic", scales=[1.0, 0.5], merge="attention", width=1 / 32, crop_size=33,
                      test_crop_size=33, synthetic_size=33, synthetic_train=2, synthetic_val=2, batch_size=1,
                      iter_size=1, max_iter=1, workers=0, out_dir=str(tmp_path / "run"), torch_threads=1)
    train(cfg, progress=False)
    seen = []
    real_forward = model_mod.AttentionToScale.forward
    monkeypatch.setattr(model_mod.AttentionToScale, "forward", lambda self, x: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.backends.cudnn.allow_tf32))
        or real_forward(self, x))
    ck = str(tmp_path / "run" / "checkpoint.pt")
    torch.backends.cudnn.allow_tf32 = True
    r32 = run(cfg, ck, progress=False)
    rbf = run(dataclasses.replace(cfg, precision="bf16"), ck, progress=False)
    assert seen == [(False, torch.bfloat16, False)] * 2 + [(True, torch.bfloat16, False)] * 2
    assert torch.backends.cudnn.allow_tf32 and not torch.is_autocast_enabled("cpu")
    assert rbf["num_images"] == r32["num_images"] == 2 and 0 <= rbf["miou"] <= 1
