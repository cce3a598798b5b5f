"""Reproduce the paper's tables: ``python -m attnscale.reproduce --table 3``.

Every row of a table is a :class:`~attnscale.config.TrainConfig` (baseline DeepLab-LargeFOV; scales
{1, 0.5} and {1, 0.75, 0.5}; max / average / attention merging; without and with extra
supervision = 13 rows).  Each row is trained (``attnscale.train``) and evaluated
(``attnscale.evaluate``) in its own run folder; a row whose evaluation already exists for the
same config and the same number of val images is skipped, a row with a partial checkpoint resumes -- so the
command can be interrupted and re-run.  Results go to ``OUT/table<N>[_synthetic][_quick].json`` and
``.md`` with the paper's number, ours and the difference in every cell; with ``--rows``, the other
rows' earlier results fill their cells.

Without data (no ``--data-root`` and no VOC found) the same protocol runs on the built-in
synthetic scale data set (:mod:`attnscale.data.synthetic`) with a reduced-width network: those
numbers demonstrate the machinery and are **not** comparable with the paper's.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .config import RUN_FIELDS, TrainConfig
from .data.lists import find_voc_root
from .malloc import keep_freed_memory

# (scales, merge, extra supervision) of each row, in the paper's order.
S2, S3 = (1.0, 0.5), (1.0, 0.75, 0.5)
MERGE_NAMES = {"max": "Max-Pooling", "avg": "Average-Pooling", "attention": "Attention"}


@dataclass(frozen=True)
class Row:
    id: str
    scales: Tuple[float, ...]
    merge: Optional[str]
    esupv: bool


def table_rows() -> List[Row]:
    rows = [Row("baseline", (1.0,), None, False)]
    for sc, tag in ((S2, "s2"), (S3, "s3")):
        for merge in ("max", "avg", "attention"):
            for es in (False, True):
                rows.append(Row(f"{tag}-{merge}" + ("-esupv" if es else ""), sc, merge, es))
    return rows


def _paper(baseline, s2, s3) -> Dict[str, float]:
    """``s2``/``s3``: ((max, max_esupv), (avg, avg_esupv), (att, att_esupv))."""
    d = {"baseline": baseline}
    for tag, vals in (("s2", s2), ("s3", s3)):
        for merge, (a, b) in zip(("max", "avg", "attention"), vals):
            d[f"{tag}-{merge}"] = a
            d[f"{tag}-{merge}-esupv"] = b
    return d


@dataclass(frozen=True)
class TableSpec:
    number: int
    title: str
    dataset: str
    metric: str                # "miou" or "class_iou:<index>"
    paper: Dict[str, float]
    init_note: str


TABLES: Dict[int, TableSpec] = {
    1: TableSpec(1, "PASCAL-Person-Part val, mIoU", "person_part", "miou",
                 _paper(51.91, ((52.90, 55.26), (52.71, 55.17), (53.49, 55.85)),
                        ((53.02, 55.78), (52.56, 55.72), (53.12, 56.39))), "ImageNet (vgg16_20M)"),
    3: TableSpec(3, "PASCAL VOC 2012 val, mIoU, pretrained with ImageNet", "voc12", "miou",
                 _paper(62.28, ((64.81, 67.43), (64.86, 67.79), (65.27, 68.24)),
                        ((65.15, 67.79), (63.92, 67.98), (64.37, 69.08))), "ImageNet (vgg16_20M)"),
    5: TableSpec(5, "PASCAL VOC 2012 val, mIoU, pretrained with MS-COCO", "voc12", "miou",
                 _paper(67.58, ((69.15, 70.01), (69.22, 70.44), (69.90, 70.76)),
                        ((69.70, 70.06), (68.82, 70.55), (69.47, 71.42))),
                 "MS-COCO-pretrained DeepLab-LargeFOV"),
    6: TableSpec(6, "MS-COCO subset val, mIoU", "coco_subset", "miou",
                 _paper(31.22, ((32.95, 34.70), (33.69, 35.14), (34.03, 35.41)),
                        ((33.58, 35.08), (33.74, 35.72), (33.42, 35.78))), "ImageNet (vgg16_20M)"),
    7: TableSpec(7, "MS-COCO subset val, person-class IoU", "coco_subset", "class_iou:1",
                 _paper(68.76, ((70.07, 71.06), (70.38, 71.60), (70.66, 72.20)),
                        ((69.97, 71.43), (69.69, 71.70), (70.14, 72.72))), "ImageNet (vgg16_20M)"),
}


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------
def real_config(spec: TableSpec, row: Row, data_root: str, init: str, iters: int,
                device: str, run_dir: str, workers: int) -> TrainConfig:
    """The paper's setting (Sec. 4): batch 30 (10 x iter_size 3), 321 crops, lr 1e-3 step 2000."""
    cfg = TrainConfig(dataset=spec.dataset, data_root=data_root, scales=list(row.scales),
                      merge=row.merge, extra_supervision=row.esupv, init=init, device=device,
                      out_dir=run_dir, workers=workers,
                      test_crop_size=641 if spec.dataset == "coco_subset" else 513)
    if iters:
        cfg.max_iter = iters
        cfg.stepsize = max(1, round(iters * 2000 / 6000))   # keep the paper's 1/3 step point
        cfg.snapshot = max(1, min(cfg.snapshot, iters // 3))   # a row killed midway resumes from a third
    return cfg.validate()


# 161 px images: at 65 px the net's receptive field covers every object at scale 1 and merging scales
# gains nothing; at 161 px the direction of the paper's effect shows (benchmarks/RESULTS.md, seventh session).
SYNTH = dict(width=1 / 16, synthetic_size=161, crop_size=161, test_crop_size=161, synthetic_train=400,
             synthetic_val=60, batch_size=10, iter_size=1, clip_gradients=10.0, display=10,
             dropout=0.0,        # at 1/16 width, dropout 0.5 on 64-channel fc6/fc7 stalls learning
             torch_threads=1)    # tiny convs: one thread is fastest, and robust on a busy CPU
SYNTH_PRETRAIN_ITERS = 800
SYNTH_ROW_ITERS = 250


def synthetic_pretrain_config(run_dir: str, device: str, quick: bool, workers: int) -> TrainConfig:
    """The synthetic stand-in for ImageNet pre-training (``vgg16_20M.caffemodel``): one
    single-scale net trained once on the synthetic set; its classifier is named ``fc8_pretrain`` so
    that, as with ImageNet's ``fc8``, the rows do not copy it (Caffe copies layers by name)."""
    cfg = TrainConfig(dataset="synthetic", scales=[1.0], merge=None, device=device, out_dir=run_dir,
                      workers=workers, classifier_name="fc8_pretrain", base_lr=0.01,
                      max_iter=SYNTH_PRETRAIN_ITERS, stepsize=600, snapshot=200, **SYNTH)
    if quick:
        _quick(cfg)
    return cfg.validate()


def _quick(cfg: TrainConfig) -> None:
    """Seconds-long settings for tests: one 33x33 image per batch at train and test time (the
    same tensor shapes everywhere, so oneDNN builds its kernels once), 2 iterations."""
    cfg.synthetic_size = cfg.crop_size = cfg.test_crop_size = 33
    cfg.synthetic_train, cfg.synthetic_val = 4, 2
    cfg.batch_size, cfg.max_iter, cfg.stepsize, cfg.snapshot = 1, 2, 1, 2
    cfg.width = 1 / 32
    cfg.workers = 0


def synthetic_config(row: Row, iters: int, device: str, run_dir: str, quick: bool,
                     workers: int, init: str = "") -> TrainConfig:
    """Reduced-width net on the built-in synthetic set, sized for a 2-core CPU (about 15 min / 13 rows),
    fine-tuned from the synthetic pre-training like the paper's rows from vgg16_20M."""
    cfg = TrainConfig(dataset="synthetic", scales=list(row.scales), merge=row.merge,
                      extra_supervision=row.esupv, device=device, out_dir=run_dir, workers=workers,
                      init=init, base_lr=3e-3, max_iter=SYNTH_ROW_ITERS, stepsize=170, **SYNTH)
    if quick:
        _quick(cfg)
    if iters:
        cfg.max_iter = iters
        cfg.stepsize = max(1, round(iters * 0.7))
    cfg.snapshot = max(1, cfg.max_iter // 10)   # a row killed midway resumes from its last tenth
    return cfg.validate()


def default_workers() -> int:
    """Loader workers for ``reproduce``: the CPU count minus 2 (the training process and its GPU feeding keep
    those), between 2 and 12 (benchmarks/bench_train.py: one worker reads, decodes and crops 175-200 VOC-size
    images/s on a Zen 5 core)."""
    return max(2, min(12, (os.cpu_count() or 2) - 2))


#: config fields added after rows were first keyed, with the value that computes what the rows did before
KEY_LATER_FIELDS = {"precision": "fp32", "fillers": {}, "stepvalue": [], "power": 0.0}


def config_key(cfg: TrainConfig) -> str:
    """Hash of everything that changes the result (not ``RUN_FIELDS``: device, worker count, out_dir, ...).
    The data enter by what the train and val lists say, not by where they lie: a data root moved
    (or lists given by another path) keeps a row's checkpoint and its evaluation."""
    d = cfg.to_dict()
    for k in RUN_FIELDS:
        d.pop(k, None)
    for k, default in KEY_LATER_FIELDS.items():  # fields newer than a row's key leave it as it was at their default
        if d.get(k) == default:
            d.pop(k)
    if cfg.dataset != "synthetic":
        from .train import build_list_paths
        lists = {}
        for split, path in build_list_paths(cfg).items():
            try:
                with open(path, "rb") as f:
                    lists[split] = hashlib.sha256(f.read()).hexdigest()
            except OSError:  # no list (yet): the path stands for it
                lists[split] = path
        for k in ("data_root", "train_list", "val_list"):
            d.pop(k)
        d["lists"] = lists
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------
def metric_of(res: dict, metric: str) -> float:
    if metric == "miou":
        return 100.0 * float(res["miou"])
    idx = int(metric.split(":")[1])
    v = res["per_class_iou"][idx]
    return float("nan") if v is None else 100.0 * float(v)


#: beside a row's checkpoint: the config key it trains under (its lists may since have moved)
KEY_FILE = "config_key.txt"


def _drop_stale_checkpoint(cfg: TrainConfig, log=print) -> bool:
    """True if ``cfg.out_dir`` holds a checkpoint of this very config (resume it): by ``KEY_FILE``,
    else by the checkpoint's config.  A checkpoint of another config, or one that cannot be read, is
    kept as ``checkpoint.pt.stale`` (``.stale.1``, ... beside older ones; never deleted: it may be hours
    of training) and the row retrains."""
    from .train import CHECKPOINT, load_checkpoint
    ck = os.path.join(cfg.out_dir, CHECKPOINT)
    if not os.path.isfile(ck):
        return False
    try:
        old = load_checkpoint(ck).get("config", {})
        try:
            with open(os.path.join(cfg.out_dir, KEY_FILE)) as f:
                old_key = f.read().strip()
        except OSError:
            old_key = config_key(TrainConfig.from_dict(old)) if old else ""
        same = bool(old) and old_key == config_key(cfg)
        why = "is from a different config"
    except (TypeError, ValueError) as e:
        same, why = False, f"cannot be used ({e})"
    if not same:
        stale = ck + ".stale"
        k = 0
        while os.path.exists(stale):
            k += 1
            stale = f"{ck}.stale.{k}"
        log(f"  {ck} {why}: kept as {os.path.basename(stale)}, retraining")
        os.replace(ck, stale)
    return same


def eval_images(cfg: TrainConfig, max_eval: int) -> int:
    """How many val images an evaluation of ``cfg`` with ``max_eval`` (0: all) covers."""
    from .train import build_source
    n = len(build_source(cfg, "val"))
    return min(max_eval, n) if max_eval else n


def reusable_eval(cfg: TrainConfig, max_eval: int) -> Optional[dict]:
    """``out_dir/eval.json`` if it was made by this config over the images this evaluation would
    cover (a quick ``--max-eval`` look is never taken for the full evaluation) and with the current
    mIoU rule (MyVOCevalseg's, which added ``miou_present_classes``), else None."""
    ev_path = os.path.join(cfg.out_dir, "eval.json")
    if not os.path.isfile(ev_path):
        return None
    try:
        with open(ev_path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    if (res.get("config_key") != config_key(cfg) or res.get("num_images") != eval_images(cfg, max_eval)
            or "miou_present_classes" not in res):
        return None
    return res


def run_row(cfg: TrainConfig, progress: bool, max_eval: int = 0, log=print) -> dict:
    """Train (resuming) + evaluate one row unless ``eval.json`` already holds its result."""
    from .evaluate import run as run_eval, write_json
    from .train import train
    os.makedirs(cfg.out_dir, exist_ok=True)
    res = reusable_eval(cfg, max_eval)
    if res is not None:
        res["skipped"] = True
        return res
    resume = _drop_stale_checkpoint(cfg, log)
    cfg.save(os.path.join(cfg.out_dir, "config.json"))
    with open(os.path.join(cfg.out_dir, KEY_FILE + ".tmp"), "w") as f:
        f.write(config_key(cfg) + "\n")
    os.replace(os.path.join(cfg.out_dir, KEY_FILE + ".tmp"), os.path.join(cfg.out_dir, KEY_FILE))
    t0 = time.time()
    tr = train(cfg, resume=resume, progress=progress)
    t1 = time.time()
    # Attention / merge-weight maps of the first few val images (the paper's Figs. 4-6).
    figs = os.path.join(cfg.out_dir, "attention") if len(cfg.scales) > 1 else ""
    res = run_eval(cfg, tr.checkpoint, "", max_images=max_eval, attention_dir=figs, attention_images=4,
                   progress=progress)
    t2 = time.time()
    res.update(config_key=config_key(cfg), train_seconds=t1 - t0, eval_seconds=t2 - t1, skipped=False)
    write_json(os.path.join(cfg.out_dir, "eval.json"), res)
    return res


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None or v != v else f"{v:.2f}"


def markdown(spec: TableSpec, results: Dict[str, float], synthetic: bool, note: str) -> str:
    def cell(rid: str) -> str:
        if rid not in results:
            return "paper " + _fmt(spec.paper[rid]) + " / ours – / Δ –"
        ours = results[rid]
        if synthetic:
            return f"ours {_fmt(ours)}"
        diff = "–" if ours is None or ours != ours else f"{ours - spec.paper[rid]:+.2f}"
        return f"{_fmt(spec.paper[rid])} / {_fmt(ours)} / {diff}"

    head = "ours" if synthetic else "paper / ours / Δ"
    lines = [f"### Table {spec.number}: {spec.title}" + (" — SYNTHETIC DATA" if synthetic else ""), "",
             note, ""]
    if synthetic:
        lines += ["**Synthetic data set: these numbers are NOT comparable with the paper's.**", ""]
    lines += [f"| Merging method | w/o E-Supv ({head}) | w/ E-Supv ({head}) |", "|---|---|---|",
             f"| Baseline: DeepLab-LargeFOV (1 scale) | {cell('baseline')} | |"]
    for tag, label in (("s2", "Scales = {1, 0.5}"), ("s3", "Scales = {1, 0.75, 0.5}")):
        lines.append(f"| *{label}* | | |")
        for merge in ("max", "avg", "attention"):
            lines.append(f"| {MERGE_NAMES[merge]} | {cell(f'{tag}-{merge}')} | {cell(f'{tag}-{merge}-esupv')} |")
    if synthetic:
        lines += ["", "Paper's numbers for reference (real data): " + ", ".join(
            f"{k} {v:.2f}" for k, v in spec.paper.items())]
    return "\n".join(lines) + "\n"


def run_group(spec: TableSpec, synthetic: bool, init: str, quick: bool = False, precision: str = "fp32") -> str:
    """The folder under ``OUT/runs`` that holds a table's row runs.  Tables 6 and 7 share theirs
    (same data, same rows); runs from different init files get different folders, even when the
    files share a name (the folder name holds a hash of the file's absolute path), and so do runs in
    another precision than float32 (``-bf16``, ``-tf32``)."""
    group = "synthetic" if synthetic else f"{spec.dataset}-" + (
        os.path.splitext(os.path.basename(init))[0] + "-" +
        hashlib.sha256(os.path.abspath(init).encode()).hexdigest()[:8] if init else "noinit")
    return group + ("" if precision == "fp32" else f"-{precision}") + ("-quick" if quick else "")


def reproduce(table: int, data_root: str = "", init: str = "", rows: Optional[Sequence[str]] = None,
              iters: int = 0, device: str = "cpu", out: str = "results", quick: bool = False,
              synthetic: Optional[bool] = None, workers: int = 2, max_eval: int = 0,
              reference_ops: bool = False, progress: bool = True, log=print, conv_impl: str = "auto",
              precision: str = "fp32", channels_last: bool = False) -> dict:
    if table not in TABLES:
        raise ValueError(f"--table must be one of {sorted(TABLES)}, got {table}")
    TrainConfig(device=device, precision=precision).validate()  # a bad --precision fails before any work
    if max_eval < 0:
        raise ValueError(f"--max-eval must be >= 0 (0: every val image), got {max_eval}")
    spec = TABLES[table]
    all_rows = table_rows()
    requested = {r.id for r in all_rows}
    if rows:
        bad = [r for r in rows if r not in requested]
        if bad:
            raise ValueError(f"--rows: unknown row(s) {bad}; rows are {[r.id for r in all_rows]}")
        requested = set(rows)
    if synthetic is None:
        found = data_root or (find_voc_root() if spec.dataset == "voc12" else "")
        synthetic = not found
        if synthetic:
            log(f"No data root given and no {spec.dataset} data found: running Table {table}'s protocol "
                "on the built-in SYNTHETIC scale data set (reduced-width net) - these are NOT the paper's numbers.")
        elif not data_root:
            data_root = found
            log(f"Found {spec.dataset} data at {found} (no --data-root given): running the real protocol "
                "(pass --synthetic for the synthetic data set).")
    elif synthetic and data_root:
        log(f"warning: --data-root {data_root} is not used: this run is on the synthetic data set")
    if not synthetic and not os.path.isdir(data_root):
        raise FileNotFoundError(f"--data-root: not a folder: {data_root}")
    if not synthetic and not init:
        log("warning: no --init weights: the rows train from random initialisation, which is not "
            f"the paper's protocol (Table {table}'s rows fine-tune {spec.init_note})")
    elif not synthetic:  # the file is not inspected: Tables 3 and 5 differ only in it (and share their runs)
        log(f"Table {table}'s rows fine-tune {spec.init_note} in the paper: --init {init} must be those weights")
    group = run_group(spec, synthetic, init, quick, precision)
    run_fields = dict(use_reference_ops=bool(reference_ops), conv_impl=conv_impl, precision=precision,
                      channels_last=bool(channels_last))
    max_eval = 0 if quick else max_eval
    results, per_row = {}, []
    t_start = time.time()
    pre_ck = ""
    if synthetic:
        pre = synthetic_pretrain_config(os.path.join(out, "runs", group, "pretrain"), device, quick, workers)
        pre = dataclasses.replace(pre, **run_fields).validate()
        from .train import CHECKPOINT, train
        pre_ck = os.path.join(pre.out_dir, CHECKPOINT)
        _drop_stale_checkpoint(pre, log)
        t0 = time.time()
        r = train(pre, resume=True, progress=progress)
        log(f"[0/{len(requested)}] synthetic pre-training (stand-in for ImageNet init): "
            f"{r.iterations} iterations ({time.time() - t0:.0f} s)")
    done = 0
    full_val = None
    for row in all_rows:
        run_dir = os.path.join(out, "runs", group, row.id)
        cfg = (synthetic_config(row, iters, device, run_dir, quick, workers, pre_ck) if synthetic
               else real_config(spec, row, data_root, init, iters, device, run_dir, workers))
        cfg = dataclasses.replace(cfg, **run_fields).validate()
        if full_val is None:
            full_val = eval_images(cfg, 0)
        t0 = time.time()
        if row.id in requested:
            res = run_row(cfg, progress, max_eval, log)
            done += 1
        else:  # not asked for: its earlier result, if one matches, still fills its cell
            res = reusable_eval(cfg, max_eval)
            if res is None:
                continue
            res["skipped"] = True
        val = metric_of(res, "class_iou:1" if synthetic and table == 7 else spec.metric)
        results[row.id] = val
        entry = {"id": row.id, "scales": list(row.scales), "merge": row.merge, "extra_supervision": row.esupv,
                 "ours": val, "paper": spec.paper[row.id],
                 "diff": None if synthetic else val - spec.paper[row.id],
                 "num_images": res.get("num_images"), "run_dir": run_dir, "skipped": res.get("skipped", False),
                 "train_seconds": res.get("train_seconds"), "eval_seconds": res.get("eval_seconds"),
                 "iterations": cfg.max_iter}
        per_row.append(entry)
        if row.id in requested:
            log(f"[{done}/{len(requested)}] {row.id:<22s} ours {_fmt(val):>6s}   paper {_fmt(spec.paper[row.id]):>6s}"
                + ("   (already done)" if entry["skipped"] else f"   ({time.time() - t0:.0f} s)"))
    total = time.time() - t_start
    note = (f"Synthetic scale data set, {per_row and per_row[0]['iterations']} iterations per row, "
            "reduced-width network; numbers show the protocol works and are not the paper's."
            if synthetic else f"{spec.dataset}, init {init or 'none (random!)'} (the paper's: {spec.init_note}), "
            f"{per_row and per_row[0]['iterations']} iterations per row.")
    partial = sorted({e["num_images"] for e in per_row if e["num_images"] != full_val})
    if partial:
        note += (f" Evaluated on the first {', '.join(map(str, partial))} of the {full_val} val images "
                 "(--max-eval), not the whole set.")
    md = markdown(spec, results, synthetic, note)
    name = (f"table{table}" + ("_synthetic" if synthetic else "") + ("" if precision == "fp32" else f"_{precision}")
            + ("_quick" if quick else ""))
    doc = {"table": table, "title": spec.title, "dataset": "synthetic" if synthetic else spec.dataset,
           "synthetic": synthetic, "metric": spec.metric, "val_images": full_val, "rows": per_row,
           "seconds": total, "precision": precision, "note": note, "init": "" if synthetic else init,
           "paper_init": spec.init_note}
    from .evaluate import write_json
    write_json(os.path.join(out, f"{name}.json"), doc)
    p = os.path.join(out, f"{name}.md")
    with open(p + ".tmp", "w") as f:
        f.write(md)
    os.replace(p + ".tmp", p)
    log("")
    log(md)
    log(f"wrote {os.path.join(out, name + '.json')} and .md ({total:.0f} s)")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnscale.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=int, default=3, choices=sorted(TABLES))
    ap.add_argument("--data-root", default="", help="DeepLab data root (JPEGImages/, SegmentationClassAug/, list/)")
    ap.add_argument("--init", default="", help="initial weights, e.g. vgg16_20M.caffemodel")
    ap.add_argument("--rows", default="", help="comma-separated row ids (default all 13): "
                    + ",".join(r.id for r in table_rows()))
    ap.add_argument("--iters", type=int, default=0, help=f"iterations per row (default: paper 6000 / synthetic {SYNTH_ROW_ITERS})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="data loader workers (default: the CPU count - 2, from 2 to 12; one decodes and crops about "
                         "200 VOC-size images/s, so a GPU training at 500 images/s needs several)")
    ap.add_argument("--max-eval", type=int, default=0, help="evaluate only the first N val images")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic data set even if data exist")
    ap.add_argument("--quick", action="store_true", help="tiny synthetic run (seconds) for tests")
    ap.add_argument("--reference-ops", action="store_true",
                    help="use the slow pure-PyTorch reference ops instead of attnscale._C's kernels")
    ap.add_argument("--conv", default="auto", choices=("auto", "auto4", "torch", "winograd", "winograd4"),
                    help="3x3 convolutions: torch (oneDNN/cuDNN) or, on a CPU, Winograd F(2x2,3x3) / F(4x4,3x3) "
                         "(attnscale.ops.winograd_conv2d); auto (default): Winograd F(2x2,3x3) where no gradient "
                         "is needed and it is faster (evaluation: attnscale.model.winograd_pays), torch for training; "
                         "auto4: the same with F(4x4,3x3)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="training precision (config.precision): fp32 as Caffe (default), tf32 (CUDA), bf16 autocast; "
                         "rows in another precision than fp32 train in runs/<group>-<precision> and report in "
                         "table<N>_<precision>.json")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory for training (faster cuDNN)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    keep_freed_memory()
    if a.init and not os.path.isfile(a.init):
        raise SystemExit(f"--init: file not found: {a.init}")
    synthetic = True if (a.synthetic or a.quick) else None
    if synthetic and (a.quick or a.synthetic):
        print("Running on the built-in SYNTHETIC scale data set - these are NOT the paper's numbers.")
    try:
        reproduce(a.table, a.data_root, a.init, [r for r in a.rows.split(",") if r] or None, a.iters,
                  a.device, a.out, a.quick, synthetic, a.workers, a.max_eval,
                  a.reference_ops, not a.no_progress, conv_impl=a.conv, precision=a.precision,
                  channels_last=a.channels_last)
    except (ValueError, OSError, FloatingPointError) as exc:  # bad rows, data, weights: said, not traced
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
