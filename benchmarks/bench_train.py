"""Throughput of the product's own training loop, ``attnscale.train.train``: images per second of Caffe's
SGD updates on the 3-scale attention model with E-Supv (VGG-16 widths), read from disk like VOC (JPEG
images, PNG labels: the synthetic set exported to a temporary DeepLab layout), cropped, mirrored, batched
by the loader's workers, checked and copied to the device, forward (in the chosen precision), backward,
update.  ``bench_e2e.py`` times a bare step on one fixed batch; this is what ``python -m attnscale.train``
runs, so the data pipeline and the per-update host work count.

Timing: the loop logs every update (``display: 1``) after its one device sync per update; the time from
the log line of update ``warmup`` to that of update ``warmup + iters`` is the measured span (the final
checkpoint is written after the last line).  The loader alone (same workers, no model) is timed too: if
it is slower than the loop, the data are the limit.  Each log line also holds the main thread's time in
the update's phases (``attnscale.train.HOST_PHASES``: data, passes, wait, step), averaged over the span:
on a GPU, little ``wait`` (the device sync) means the host sets the pace, and the other phases say where.

    python benchmarks/bench_train.py                                      # CPU: tiny settings
    python benchmarks/bench_train.py --device cuda --precision bf16 --channels-last --workers 12
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale.config import TrainConfig
from attnscale.data import SegDataset, SyntheticSource, make_loader
import attnscale.train as trainer
from attnscale.train import HOST_PHASES, build_source, train, transform_config
from timing import add_malloc_option, positive_float, positive_int, tune_malloc, write_json

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) iter (\d+) .*; host ms/update: (.*)$")


def read_log(log_path: str) -> tuple[dict, dict]:
    """From ``train.log``: update number -> the time its log line was written (asctime, millisecond clock),
    and update number -> the main thread's milliseconds in each phase of it (``attnscale.train.HOST_PHASES``;
    with ``display: 1`` each line holds one update's)."""
    times, phases = {}, {}
    with open(log_path) as f:
        for line in f:
            m = LOG_LINE.match(line.rstrip("\n"))
            if m:
                it = int(m.group(2))
                times[it] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                phases[it] = {k: float(v) for k, v in (kv.split() for kv in m.group(3).split(", "))}
    return times, phases


def loader_images_per_s(cfg: TrainConfig, batches: int, raw: bool) -> float:
    """The training loader alone (the run's workers, data and transforms, the batches as bytes or floats as
    the loop takes them, pinned on a GPU), after one batch of warm-up."""
    ds = SegDataset(build_source(cfg, "train"), transform_config(cfg), train=True, seed=cfg.seed, raw=raw)
    it = iter(make_loader(ds, cfg.batch_size, cfg.workers, cfg.seed, pin_memory=cfg.device.startswith("cuda")))
    next(it)
    t0 = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(batches))
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--width", type=positive_float, default=None, help="channel multiplier (default 1 on CUDA, 1/8 on CPU)")
    ap.add_argument("--crop", type=positive_int, default=None, help="training crop (default 321 on CUDA, 97 on CPU)")
    ap.add_argument("--batch", type=positive_int, default=10, help="images per pass (the paper: 10 x iter_size 3)")
    ap.add_argument("--iter-size", type=positive_int, default=3)
    ap.add_argument("--warmup", type=positive_int, default=3,
                    help="updates before the timed span (at least 1: the span starts at an update's log line)")
    ap.add_argument("--iters", type=positive_int, default=None, help="timed updates (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: CPUs - 2, at most 12)")
    ap.add_argument("--images", type=positive_int, default=120, help="images exported for the run")
    ap.add_argument("--threads", type=positive_int, default=None, help="CPU threads of the training process")
    ap.add_argument("--batches", choices=("bytes", "floats"), default=None,
                    help="how batches travel (attnscale.train.loads_bytes): the crops' bytes, made floats on the "
                         "device, or the floats made by the loader's workers (default: the loop's choice, "
                         "bytes on a GPU)")
    ap.add_argument("--json", default=None)
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is available")
    width = args.width or (1.0 if cuda else 0.125)
    crop = args.crop or (321 if cuda else 97)
    iters = args.iters or (20 if cuda else 3)
    workers = args.workers if args.workers is not None else max(0, min(12, (os.cpu_count() or 2) - 2))
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": " ".join(sys.argv),
           "malloc_tuned": tune_malloc(args), "cpus": os.cpu_count()}
    print(f"# bench_train: {env}")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "VOC2012")
        # square synthetic scenes a little larger than the crop, stored as JPEG + PNG (VOC images are 500x375)
        SyntheticSource(args.images, seed=0, size=max(crop + 32, 97)).export(root, "train_aug")
        cfg = TrainConfig(dataset="voc12", data_root=root, scales=[1.0, 0.75, 0.5], merge="attention",
                          extra_supervision=True, width=width, crop_size=crop, batch_size=args.batch,
                          iter_size=args.iter_size, max_iter=args.warmup + iters, stepsize=10 ** 6, snapshot=0,
                          base_lr=1e-5,  # random weights: a small rate keeps the loss finite (the time is the point)
                          display=1, workers=workers, device=args.device, precision=args.precision,
                          channels_last=args.channels_last, out_dir=os.path.join(tmp, "run"),
                          torch_threads=args.threads or 0).validate()
        per_update = args.batch * args.iter_size
        raw = trainer.loads_bytes(torch.device(args.device)) if args.batches is None else args.batches == "bytes"
        trainer.loads_bytes = lambda device: raw      # this process only: the loop loads as chosen
        loader = loader_images_per_s(cfg, max(2, min(20, iters * args.iter_size)), raw)
        if cuda:
            torch.backends.cudnn.benchmark = True
        result = train(cfg, progress=False)
        times, phases = read_log(os.path.join(cfg.out_dir, "train.log"))
    span = times[args.warmup + iters] - times[args.warmup]
    timed = range(args.warmup + 1, args.warmup + iters + 1)
    host = {k: sum(phases[i][k] for i in timed) / iters for k in HOST_PHASES}
    row = {"device": args.device, "batches": "bytes" if raw else "floats",
           "precision": args.precision, "channels_last": args.channels_last, "width": width,
           "crop": crop, "images_per_update": per_update, "workers": workers, "warmup": args.warmup, "iters": iters,
           "seconds": span, "s_per_update": span / iters, "images_per_s": iters * per_update / span,
           "loader_images_per_s": loader, "final_loss": result.last_loss, "host_ms_per_update": host}
    print(f"  train loop  {args.precision:5s} {'NHWC' if args.channels_last else 'NCHW'}  width {width:g}  crop {crop}  "
          f"{per_update} img/update  {workers} workers  batches as {row['batches']}:  {row['s_per_update'] * 1e3:8.1f} ms/update  "
          f"{row['images_per_s']:7.1f} img/s   (loader alone {loader:7.1f} img/s)")
    busy = sum(v for k, v in host.items() if k != "wait")
    print("  the main thread per update (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items())
          + (f"  -- it waits for the GPU {host['wait'] / (busy + host['wait']):.0%} of the update: "
             + ("the host sets the pace" if host["wait"] < 0.1 * busy else "the GPU sets the pace") if cuda else ""))
    if cuda:
        mins = 6000 * per_update / row["images_per_s"] / 60
        print(f"  the paper's 6000 updates of {per_update} images at this rate: {mins:.1f} minutes")
    if args.json:
        write_json(args.json, {"env": env, "rows": [row]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
