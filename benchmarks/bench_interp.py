"""DeepLab ``Interp`` on the CPU: the C++ kernel ``attnscale.ops.caffe_interp`` (what ``attnscale.caffe.interp``
runs without gradients) vs the differentiable index_select path ``attnscale.caffe.interp_gather`` (the same
values) vs ``F.interpolate(mode="bilinear", align_corners=True)`` (what a PyTorch user would write; its
index arithmetic is not Caffe's float one, so its values differ in the last bits), float32, forward, on the
resizes of the 3-scale model at 513x513:

  zoom8       predict's Interp zoom_factor 8 of the merged scores, 21 x 65x65 -> 513x513
  fc7_res075  the attention head's resize of fc7, 1024 x 49x49 -> 65x65 (and 1024 x 33x33 -> 65x65)
  input075    the input's scale 0.75, 3 x 513x513 -> 385x385

Medians of interleaved rounds (benchmarks/timing.py).

    python benchmarks/bench_interp.py [--threads 2 1] [--rounds 9] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale import caffe
from attnscale.ops import caffe_interp, require_extension
from timing import add_malloc_option, interleaved_ms, positive_int, tune_malloc, write_json

CASES = [("zoom8", (1, 21, 65, 65), (513, 513)),
         ("fc7_res075", (1, 1024, 49, 49), (65, 65)),
         ("fc7_res05", (1, 1024, 33, 33), (65, 65)),
         ("input075", (1, 3, 513, 513), (385, 385))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=positive_int, default=9)
    ap.add_argument("--json", default=None)
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    require_extension()
    env = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "malloc_tuned": tune_malloc(args)}
    print(f"# bench_interp: {env}")
    rows = []
    for threads in args.threads:
        for name, shape, out_hw in CASES:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            assert torch.equal(caffe_interp(x, out_hw), caffe.interp_gather(x, out_hw))

            def kernel():
                caffe_interp(x, out_hw)

            def gather():
                with torch.no_grad():
                    caffe.interp_gather(x, out_hw)

            def interpolate():
                F.interpolate(x, size=out_hw, mode="bilinear", align_corners=True)

            ms = interleaved_ms({"kernel": kernel, "gather": gather, "interpolate": interpolate}, threads,
                                args.rounds, number=3)
            row = {"threads": threads, "case": name, "shape": list(shape), "out": list(out_hw), **ms,
                   "vs_gather": ms["gather"] / ms["kernel"], "vs_interpolate": ms["interpolate"] / ms["kernel"]}
            rows.append(row)
            print(f"  thr {threads} {name:10s} caffe_interp {ms['kernel']:7.2f} ms  index_select {ms['gather']:7.2f} ms "
                  f"({row['vs_gather']:.1f}x)  F.interpolate {ms['interpolate']:7.2f} ms ({row['vs_interpolate']:.1f}x)",
                  flush=True)
    print("\n| threads | resize | caffe_interp ms | index_select path ms | speed-up | F.interpolate ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['case']} {'x'.join(map(str, r['shape'][1:]))} -> {r['out'][0]} | "
              f"{r['kernel']:.2f} | {r['gather']:.2f} | {r['vs_gather']:.1f}x | {r['interpolate']:.2f} | "
              f"{r['vs_interpolate']:.1f}x |")
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
