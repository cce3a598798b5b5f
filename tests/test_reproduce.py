"""Table reproduction: the 13 rows, the paper's numbers, the quick synthetic run end to end."""
import json
import os

import pytest
import torch

from attnscale.reproduce import TABLES, markdown, reproduce, table_rows


def test_thirteen_rows_and_paper_numbers():
    rows = table_rows()
    assert len(rows) == 13
    assert rows[0].id == "baseline" and rows[0].scales == (1.0,) and rows[0].merge is None
    assert {(r.scales, r.merge, r.esupv) for r in rows[1:]} == {
        (s, m, e) for s in ((1.0, 0.5), (1.0, 0.75, 0.5)) for m in ("max", "avg", "attention")
        for e in (False, True)}
    t3 = TABLES[3].paper
    assert t3["baseline"] == 62.28 and t3["s2-attention"] == 65.27 and t3["s3-attention-esupv"] == 69.08
    assert t3["s3-avg"] == 63.92 and t3["s2-max-esupv"] == 67.43
    t1 = TABLES[1].paper
    assert t1["baseline"] == 51.91 and t1["s3-attention-esupv"] == 56.39 and t1["s2-avg"] == 52.71
    assert TABLES[5].paper["baseline"] == 67.58 and TABLES[6].paper["s3-attention-esupv"] == 35.78
    assert TABLES[7].metric == "class_iou:1" and TABLES[7].paper["s2-attention-esupv"] == 72.20
    for t in TABLES.values():
        assert set(t.paper) == {r.id for r in rows}


def test_markdown_has_paper_ours_and_difference():
    spec = TABLES[3]
    ours = {r.id: spec.paper[r.id] - 1.0 for r in table_rows()}
    md = markdown(spec, ours, synthetic=False, note="n")
    assert "| Baseline: DeepLab-LargeFOV (1 scale) | 62.28 / 61.28 / -1.00 |" in md
    assert "| Attention | 64.37 / 63.37 / -1.00 | 69.08 / 68.08 / -1.00 |" in md
    md_s = markdown(spec, ours, synthetic=True, note="n")
    assert "SYNTHETIC" in md_s and "NOT comparable" in md_s


def test_quick_synthetic_table_end_to_end_and_resumable(tmp_path):
    lines = []
    doc = reproduce(3, quick=True, out=str(tmp_path), progress=False, log=lines.append, workers=0)
    text = "\n".join(lines)
    assert "SYNTHETIC" in text and "NOT the paper's numbers" in text
    assert len(doc["rows"]) == 13 and doc["synthetic"] is True
    for r in table_rows():
        assert any(f"] {r.id} " in ln for ln in lines), r.id
    assert all(0.0 <= row["ours"] <= 100.0 for row in doc["rows"])
    with open(tmp_path / "table3_synthetic_quick.json") as f:
        assert len(json.load(f)["rows"]) == 13
    md = (tmp_path / "table3_synthetic_quick.md").read_text()
    assert md.count("| ours ") == 13
    assert os.path.isfile(tmp_path / "runs" / "synthetic-quick" / "s3-attention-esupv" / "eval.json")
    # every row trained its own model: its scales, merge and E-Supv, in the config and in the weights
    for r in table_rows():
        run = tmp_path / "runs" / "synthetic-quick" / r.id
        with open(run / "config.json") as f:
            cfg = json.load(f)
        assert (tuple(cfg["scales"]), cfg["merge"], cfg["extra_supervision"]) == (r.scales, r.merge, r.esupv), r.id
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
        assert ("att_conv2.weight" in state) == (r.merge == "attention"), r.id
        if r.merge == "attention":
            assert state["att_conv2.weight"].shape[0] == len(r.scales), r.id
    figs = tmp_path / "runs" / "synthetic-quick" / "s3-attention-esupv" / "attention"
    assert sorted(p.suffix for p in figs.iterdir()) and all(p.suffix == ".png" for p in figs.iterdir())
    assert not (tmp_path / "runs" / "synthetic-quick" / "baseline" / "attention").exists()
    # a second run skips every finished row
    lines2 = []
    doc2 = reproduce(3, quick=True, out=str(tmp_path), progress=False, log=lines2.append, workers=0,
                     rows=["baseline", "s2-max"])
    assert all(r["skipped"] for r in doc2["rows"])
    assert sum("already done" in ln for ln in lines2) == 2
    assert doc2["rows"][0]["ours"] == doc["rows"][0]["ours"]
    # the rows not asked for keep their finished results in the rewritten table
    assert [r["ours"] for r in doc2["rows"]] == [r["ours"] for r in doc["rows"]]
    assert (tmp_path / "table3_synthetic_quick.md").read_text().count("| ours ") == 13
    # an evaluation over fewer val images (--max-eval) is never reused for the full one, nor the reverse
    from attnscale.config import TrainConfig
    from attnscale.reproduce import reusable_eval
    run = tmp_path / "runs" / "synthetic-quick" / "baseline"
    cfg = TrainConfig.load(str(run / "config.json"))
    assert reusable_eval(cfg, 0)["num_images"] == 2 and reusable_eval(cfg, 5) is not None
    assert reusable_eval(cfg, 1) is None
    ev = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps(dict(ev, num_images=1)))
    assert reusable_eval(cfg, 0) is None and reusable_eval(cfg, 1) is not None
    # an evaluation made before MyVOCevalseg's mIoU rule is redone
    (run / "eval.json").write_text(json.dumps({k: v for k, v in ev.items() if k != "miou_present_classes"}))
    assert reusable_eval(cfg, 0) is None


def test_stale_or_unreadable_checkpoint_is_kept_aside_not_deleted(tmp_path):
    from attnscale.config import TrainConfig
    from attnscale.reproduce import _drop_stale_checkpoint
    from attnscale.train import atomic_save
    cfg = TrainConfig(dataset="synthetic", out_dir=str(tmp_path), max_iter=3)
    ck = tmp_path / "checkpoint.pt"
    atomic_save({"iter": 1, "model": {}, "config": TrainConfig(dataset="synthetic", max_iter=4).to_dict()}, str(ck))
    assert _drop_stale_checkpoint(cfg, log=lambda *_: None) is False
    assert not ck.exists() and (tmp_path / "checkpoint.pt.stale").exists()
    ck.write_bytes(b"torn")
    assert _drop_stale_checkpoint(cfg, log=lambda *_: None) is False
    assert (tmp_path / "checkpoint.pt.stale.1").read_bytes() == b"torn"   # beside the older one
    assert (tmp_path / "checkpoint.pt.stale").stat().st_size > 100
    atomic_save({"iter": 1, "model": {}, "config": cfg.to_dict()}, str(ck))
    assert _drop_stale_checkpoint(cfg, log=lambda *_: None) is True and ck.exists()


def test_run_folders_of_same_named_init_files_differ(tmp_path):
    from attnscale.reproduce import run_group
    a, b = tmp_path / "a" / "init.caffemodel", tmp_path / "b" / "init.caffemodel"
    ga, gb = run_group(TABLES[3], False, str(a)), run_group(TABLES[5], False, str(b))
    assert ga.startswith("voc12-init-") and gb.startswith("voc12-init-") and ga != gb
    assert run_group(TABLES[3], False, str(a)) == ga and run_group(TABLES[3], True, "", True) == "synthetic-quick"


def test_precision_keeps_old_keys_and_runs_apart(tmp_path):
    """config.precision is part of a row's key, but at "fp32" (what every row trained before the field
    existed) the key is the one it had (the value below, from the code before it); a bf16 table trains in
    its own folders and reports to its own files; --precision tf32 is refused on a CPU before any work."""
    from attnscale.config import TrainConfig
    from attnscale.reproduce import config_key, run_group
    c = TrainConfig(dataset="synthetic", scales=[1.0, 0.5], merge="attention", extra_supervision=True, max_iter=7)
    assert config_key(c) == "41c9efa57acdb2ea"
    bf = TrainConfig(**dict(c.to_dict(), precision="bf16"))
    assert config_key(bf) != config_key(c)
    assert config_key(TrainConfig(**dict(c.to_dict(), channels_last=True))) == config_key(c)   # a run field
    assert run_group(TABLES[3], True, "", True, "bf16") == "synthetic-bf16-quick"
    doc = reproduce(3, quick=True, out=str(tmp_path), progress=False, log=lambda *_: None, workers=0,
                    rows=["baseline"], precision="bf16", channels_last=True)
    assert doc["precision"] == "bf16" and (tmp_path / "table3_synthetic_bf16_quick.json").exists()
    with open(tmp_path / "runs" / "synthetic-bf16-quick" / "baseline" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["precision"] == "bf16" and cfg["channels_last"] is True
    with pytest.raises(ValueError, match="'tf32' is a CUDA mode"):
        reproduce(3, quick=True, out=str(tmp_path / "t"), progress=False, log=lambda *_: None, precision="tf32")
    assert not (tmp_path / "t").exists()


def test_markdown_without_a_value_has_no_nan_difference():
    md = markdown(TABLES[3], {"baseline": float("nan")}, synthetic=False, note="n")
    assert "| Baseline: DeepLab-LargeFOV (1 scale) | 62.28 / – / – |" in md and "nan" not in md


def test_bad_row_and_table_names():
    with pytest.raises(ValueError, match="s4-max"):
        reproduce(3, quick=True, rows=["s4-max"], progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="table"):
        reproduce(4, quick=True, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--max-eval must be >= 0"):   # before any row trains
        reproduce(3, quick=True, max_eval=-1, progress=False, log=lambda *_: None)


def test_cli_says_what_is_wrong_without_a_traceback(tmp_path, capsys):
    from attnscale.reproduce import main
    assert main(["--quick", "--rows", "s4-max", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "s4-max" in err and "Traceback" not in err


def test_voc_layout_on_disk_trains_and_evaluates(tmp_path):
    """The real-data path: DeepLab list files + JPEG/PNG files under a data root (here the
    synthetic images written to disk in VOC's layout)."""
    from attnscale.config import TrainConfig
    from attnscale.data import SyntheticSource
    from attnscale.evaluate import run as run_eval
    from attnscale.train import train
    root = str(tmp_path / "VOC2012")
    SyntheticSource(4, seed=0, size=33).export(root, "train_aug")
    SyntheticSource(2, seed=1, size=33).export(root, "val")
    cfg = TrainConfig(dataset="voc12", data_root=root, width=1 / 32, crop_size=33, test_crop_size=33,
                      batch_size=1, iter_size=1, max_iter=2, workers=0, use_reference_ops=False,
                      out_dir=str(tmp_path / "run"), torch_threads=1)
    r = train(cfg, progress=False)
    res = run_eval(cfg, r.checkpoint, str(tmp_path / "run" / "eval.json"), progress=False)
    assert res["num_images"] == 2 and len(res["per_class_iou"]) == 21
    assert res["class_names"][15] == "person"
    assert os.path.isfile(tmp_path / "run" / "eval.json")


def test_moved_data_root_keeps_the_rows_result(tmp_path):
    """A row's checkpoint and evaluation are keyed by what the data lists say, not by where the data
    root lies: the same data moved is reused; a changed list retrains."""
    import shutil
    from attnscale.config import TrainConfig
    from attnscale.data import SyntheticSource
    from attnscale.reproduce import config_key, run_row
    root = tmp_path / "a" / "VOC2012"
    SyntheticSource(3, seed=0, size=33).export(str(root), "train_aug")
    SyntheticSource(2, seed=1, size=33).export(str(root), "val")

    def cfg(data_root):
        return TrainConfig(dataset="voc12", data_root=str(data_root), width=1 / 32, crop_size=33,
                           test_crop_size=33, batch_size=1, iter_size=1, max_iter=1, snapshot=1, workers=0,
                           out_dir=str(tmp_path / "run"), torch_threads=1)
    first = run_row(cfg(root), progress=False, log=lambda *_: None)
    assert first["skipped"] is False and first["num_images"] == 2
    moved = tmp_path / "b" / "VOC2012"
    shutil.copytree(root, moved)
    shutil.rmtree(tmp_path / "a")
    assert config_key(cfg(moved)) == first["config_key"]
    again = run_row(cfg(moved), progress=False, log=lambda *_: None)
    assert again["skipped"] is True and again["miou"] == first["miou"]
    # an interrupted row (checkpoint, no evaluation yet) resumes after a move: its checkpoint is not stale
    os.remove(tmp_path / "run" / "eval.json")
    moved_again = tmp_path / "c" / "VOC2012"
    shutil.move(moved, moved_again)
    resumed = run_row(cfg(moved_again), progress=False, log=lambda *_: None)
    assert resumed["skipped"] is False and resumed["miou"] == first["miou"]
    assert not list((tmp_path / "run").glob("*.stale*"))
    moved = moved_again
    val = next(moved.rglob("val.txt"))
    val.write_text("\n".join(val.read_text().splitlines()[:1]) + "\n")
    assert config_key(cfg(moved)) != first["config_key"]


@pytest.mark.parametrize("table,init", [(3, ""), (5, ""), (5, "w.caffemodel")])
def test_each_table_names_the_init_weights_its_paper_rows_start_from(tmp_path, monkeypatch, table, init):
    """Tables 3 and 5 run the same rows on the same data and differ only in the paper's starting weights
    (ImageNet VGG-16 / MS-COCO-pretrained DeepLab-LargeFOV): the log, the note and the JSON say which
    (the weights file is not inspected), so that Table 3's runs are not read as Table 5's unawares."""
    import attnscale.reproduce as rp
    from attnscale.data import SyntheticSource
    root = str(tmp_path / "VOC2012")
    SyntheticSource(1, seed=0, size=33).export(root, "train_aug")
    SyntheticSource(1, seed=1, size=33).export(root, "val")
    monkeypatch.setattr(rp, "run_row", lambda cfg, *a, **k: {"miou": 0.5, "num_images": 1})
    lines = []
    doc = reproduce(table, data_root=root, init=init and str(tmp_path / init), rows=["baseline"],
                    out=str(tmp_path / "out"), progress=False, log=lines.append, workers=0)
    want = TABLES[table].init_note
    assert want == ("ImageNet (vgg16_20M)" if table == 3 else "MS-COCO-pretrained DeepLab-LargeFOV")
    said = [ln for ln in lines if f"Table {table}'s rows fine-tune {want}" in ln]
    assert len(said) == 1 and (said[0].startswith("warning: no --init") if not init else init in said[0])
    assert doc["paper_init"] == want and f"the paper's: {want}" in doc["note"]
    assert json.loads((tmp_path / "out" / f"table{table}.json").read_text())["paper_init"] == want


def test_rows_checkpoint_on_the_way(tmp_path):
    """A row killed midway resumes from a recent checkpoint: rows snapshot every tenth of their iterations
    (synthetic) or every third, at most 2000 (real; the paper's 6000 keep Caffe's 2000), never only at the end."""
    from attnscale.reproduce import real_config, synthetic_config
    row = table_rows()[-1]
    for iters, every in ((0, 25), (20000, 2000), (7, 1)):
        assert synthetic_config(row, iters, "cpu", str(tmp_path), False, 0, "").snapshot == every
    for iters, every in ((0, 2000), (6000, 2000), (900, 300), (2, 1), (20000, 2000)):
        assert real_config(TABLES[3], row, str(tmp_path), "", iters, "cpu", str(tmp_path), 0).snapshot == every
