"""Kernel launches and GPU time of scale_merge, fused op vs the eager reference, by torch.profiler.

Issue 2's CUDA targets are "one kernel launch forward and one backward" and "at least 5x less GPU time
than eager".  bench_merge.py times wall clock (launch overhead included); this script counts the
device kernels each pass launches and sums their device time (CUPTI), so launch gaps are left out:

    python benchmarks/merge_kernels.py --json merge_kernels.json

Per shape of bench_merge.py and pass (fwd, fwd+bwd): kernels per call and GPU microseconds per call,
median over --reps profiled calls, for both implementations, and the ratio eager / fused.  The fused
kernels' names are printed, so a stray copy or fill kernel shows.  On CPU (no CUDA) it only checks
that it runs: it counts the attnscale ops called per pass instead of kernels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnscale.ops import scale_merge, scale_merge_reference  # noqa: E402
from bench_merge import SHAPES, closures  # noqa: E402
from timing import write_json  # noqa: E402


def profile_calls(fn, device: str, reps: int):
    """(kernels per call, device us per call (median), names of one call's kernels)."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    counts, times, names = [], [], []
    for _ in range(reps):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        if device == "cuda":
            ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            times.append(sum(e.device_time for e in ev))
        else:  # dry run: the attnscale ops called (no device kernels to count)
            ev = [e for e in prof.events() if e.name.startswith("attnscale::")]
            times.append(0.0)
        counts.append(len(ev))
        names = [e.name for e in ev]
    return statistics.median(counts), statistics.median(times), names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="attention", choices=("attention", "avg", "max"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    print("| shape | pass | fused kernels | eager kernels | fused GPU us | eager GPU us | eager / fused |")
    print("|---|---|---|---|---|---|---|")
    for shape, (n, sizes) in SHAPES.items():
        for passes in ("fwd", "fwd+bwd"):
            res = {}
            for impl_name, impl in (("fused", scale_merge), ("eager", scale_merge_reference)):
                res[impl_name] = profile_calls(closures(impl, n, sizes, args.mode, args.device, passes),
                                               args.device, args.reps)
            (fk, ft, fnames), (ek, et, _) = res["fused"], res["eager"]
            ratio = et / ft if ft > 0 else None
            rows.append({"shape": shape, "pass": passes, "mode": args.mode, "fused_kernels": fk,
                         "eager_kernels": ek, "fused_gpu_us": ft, "eager_gpu_us": et,
                         "eager_over_fused": ratio, "fused_kernel_names": fnames})
            print(f"| {shape} | {passes} | {fk:g} | {ek:g} | {ft:.1f} | {et:.1f} | "
                  f"{'-' if ratio is None else f'{ratio:.2f}x'} |", flush=True)
            if passes == "fwd+bwd":
                print(f"  fused kernels: {fnames}", flush=True)
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "reps": args.reps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
