"""Kernel launches and GPU time of scale_merge, fused op vs the eager reference, by torch.profiler.

Issue 2's CUDA targets are "one kernel launch forward and one backward" and "at least 5x less GPU time
than eager".  bench_merge.py times wall clock (launch overhead included); this script counts the
device kernels each pass launches and sums their device time (CUPTI), so launch gaps are left out:

    python benchmarks/merge_kernels.py --json merge_kernels.json

Per shape of bench_merge.py and pass (fwd, fwd+bwd): kernels per call and GPU microseconds per call,
median over --reps profiled calls, for both implementations, and the ratio eager / fused.  The fused
kernels' names are printed, so a stray copy or fill kernel shows.  On CPU (no CUDA) it only checks
that it runs: it counts the attnscale ops called per pass instead of kernels.

``--logit-groups 1 2 4 8`` and/or ``--backward element pixel`` also time the attention forward+backward
with each number of warp lanes per pixel in the backward's logit gradient (ATTNSCALE_MERGE_LOGIT_GROUPS;
the default is the kernel's own rule) and each backward layout (ATTNSCALE_MERGE_BACKWARD: a thread per
gradient element or per pixel and class chunk, the attention default since an H100 run of this sweep),
every combination; ``--chunk-threads`` likewise the pixel layout's class chunks
(ATTNSCALE_MERGE_BACKWARD_THREADS: chunks sized for about that many threads in all, 131072 by default).
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
from timing import environ, positive_int, write_json  # noqa: E402


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


def sweep_backward(args, rows: list) -> None:
    """Fused attention forward+backward GPU time per backward layout and lanes per pixel of the logit
    gradient (unset: the default layout, the kernel's rule), appended to ``rows``."""
    print("\n| shape | backward | lanes per pixel | pixel layout's threads | fused fwd+bwd GPU us |")
    print("|---|---|---|---|---|")
    for shape, (n, sizes) in SHAPES.items():
        for layout in args.backward or [""]:
            for g in args.logit_groups or [""]:
                for threads in (args.chunk_threads if layout != "element" else []) or [""]:
                    with environ({"ATTNSCALE_MERGE_BACKWARD": layout, "ATTNSCALE_MERGE_LOGIT_GROUPS": str(g),
                                  "ATTNSCALE_MERGE_BACKWARD_THREADS": str(threads)}):
                        k, t, _ = profile_calls(closures(scale_merge, n, sizes, "attention", args.device,
                                                         "fwd+bwd"), args.device, args.reps)
                    rows.append({"shape": shape, "pass": "fwd+bwd", "mode": "attention",
                                 "backward": layout or "pixel", "logit_groups": g or "rule",
                                 "chunk_threads": threads or "rule", "fused_kernels": k, "fused_gpu_us": t})
                    print(f"| {shape} | {layout or 'pixel'} | {g or 'rule'} | {threads or 'rule'} | {t:.1f} |",
                          flush=True)
                    save(args, rows, complete=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="attention", choices=("attention", "avg", "max"))
    ap.add_argument("--reps", type=positive_int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--logit-groups", nargs="*", default=[], type=int, metavar="G",
                    help="attention: also time forward+backward with G lanes per pixel (powers of two, 1 to 32)")
    ap.add_argument("--backward", nargs="*", default=[], choices=("element", "pixel"),
                    help="attention: also time forward+backward with these backward layouts")
    ap.add_argument("--chunk-threads", nargs="*", default=[], type=int, metavar="T",
                    help="attention, pixel layout: also time forward+backward with its class chunks sized for "
                         "about T threads (ATTNSCALE_MERGE_BACKWARD_THREADS; 1: one chunk of every class)")
    args = ap.parse_args(argv)
    if any(t < 1 or t > 1 << 30 for t in args.chunk_threads):
        ap.error(f"--chunk-threads: integers from 1 to 2^30, got {args.chunk_threads}")
    if any(g < 1 or g > 32 or g & (g - 1) for g in args.logit_groups):
        ap.error(f"--logit-groups: powers of two from 1 to 32, got {args.logit_groups}")
    if (args.logit_groups or args.backward or args.chunk_threads) and args.mode != "attention":
        ap.error("--logit-groups, --backward and --chunk-threads are for --mode attention")
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
            save(args, rows, complete=False)
    if args.logit_groups or args.backward or args.chunk_threads:
        sweep_backward(args, rows)
    save(args, rows)
    return 0


def save(args, rows: list, complete: bool = True) -> None:
    """The rows so far (as they come: a run stopped by a time limit keeps what it measured)."""
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "reps": args.reps, "complete": complete, "rows": rows},
                   quiet=not complete)


if __name__ == "__main__":
    sys.exit(main())
