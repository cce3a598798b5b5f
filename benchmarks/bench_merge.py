"""Benchmark of the fused scale merge (attnscale.ops.scale_merge) against the eager pure-PyTorch
reference (attnscale.ops.scale_merge_reference) and torch.compile(reference).

Shapes (C = 21 classes, S = 3 scales 1, 0.75, 0.5):
  train-N10 / train-N30: 321x321 crops -> score maps 41/31/21 (DeepLab-LargeFOV output stride 8)
  test-N1:               513x513 image -> score maps 65/49/33

CPU: at the ``--threads`` counts, 1 and 2 by default (torch.utils.benchmark.Timer(num_threads=...)).  CUDA (when present):
torch.utils.benchmark (synchronises) plus the achieved bandwidth from the bytes the fused op must move
and its fraction of a measured device-to-device copy bandwidth (a 256 MB copy, from DRAM; the merge's
4-40 MB stay in an H100's 50 MB L2 and its calls are short, so read the GB/s as an effective rate of the
whole call, launch included, not as DRAM traffic).  Every speed-up ratio is computed from
medians measured in the same run, in interleaved rounds (fused, eager, compiled, fused, ...) so that a
slow phase of a shared machine hits every implementation alike.

    python benchmarks/bench_merge.py                 # attention, all shapes, CPU (+ CUDA)
    python benchmarks/bench_merge.py --modes all     # attention, avg and max
    python benchmarks/bench_merge.py --quick         # fast smoke run
    python benchmarks/bench_merge.py --json results/bench_merge.json
    python benchmarks/bench_merge.py --cpu-time      # + thread CPU time at 1 thread (shared CPUs)
    python benchmarks/bench_merge.py --cuda-only     # GPU rows only
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch._dynamo
import torch.utils.benchmark as tb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attnscale.ops import scale_merge, scale_merge_reference  # noqa: E402
from attnscale.ops._ext import has_cuda_kernels, require_extension  # noqa: E402
from timing import add_malloc_option, positive_float, positive_int, tune_malloc, write_json  # noqa: E402

C = 21
SHAPES = {
    "train-N10": (10, (41, 31, 21)),
    "train-N30": (30, (41, 31, 21)),
    "test-N1": (1, (65, 49, 33)),
}


@dataclass
class Row:
    device: str
    threads: int
    shape: str
    mode: str
    passes: str            # "fwd" or "fwd+bwd"
    fused_us: float
    eager_us: float
    compiled_us: float | None
    speedup_eager: float   # eager / fused
    speedup_compiled: float | None
    gbps: float | None = None        # CUDA: bytes moved by the fused op / time
    pct_copy_bw: float | None = None  # CUDA: % of measured device-to-device copy bandwidth
    # --cpu-time (CPU, 1 thread): thread CPU time per call, min over blocks; robust on a shared CPU
    fused_cpu_us: float | None = None
    eager_cpu_us: float | None = None
    compiled_cpu_us: float | None = None


def make_inputs(n, sizes, device, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, C, h, h, generator=gen).to(device, dtype) for h in sizes]
    logits = torch.randn(n, len(sizes), sizes[0], sizes[0], generator=gen).to(device, dtype)
    for t in (*scores, logits):
        t.requires_grad_(requires_grad)
    return scores, logits


def bytes_moved(n, sizes, passes, elt=4):
    """Minimum bytes the fused op reads/writes (each tensor once)."""
    s = len(sizes)
    p0 = sizes[0] * sizes[0]
    scores = sum(n * C * h * h for h in sizes)
    fwd = scores + n * s * p0 + n * C * p0 + n * s * p0  # scores, logits in; merged, weights out
    if passes == "fwd":
        return fwd * elt
    bwd = n * C * p0 + scores + n * s * p0 + scores + n * s * p0  # grad in, scores+logits in, grads out
    return (fwd + bwd) * elt


def time_us(fn, threads, min_run_time):
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def time_interleaved_us(fns: dict, threads, min_run_time, rounds=9):
    """Median time per call of each closure, measured in interleaved rounds (fused, eager, compiled,
    fused, eager, ...) of about min_run_time / rounds each, so that a slow phase of a shared machine
    hits every implementation alike and the speed-up ratios stay meaningful."""
    timers = {k: tb.Timer(stmt="fn()", globals={"fn": f}, num_threads=threads) for k, f in fns.items()}
    number = {}
    for k, t in timers.items():  # calibrate the calls per block (and warm up)
        m = t.blocked_autorange(min_run_time=min_run_time / rounds)
        number[k] = max(1, round(min_run_time / rounds / m.median))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t.timeit(number[k]).median)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def cpu_time_us(fn, reps=20, blocks=7):
    """Thread CPU time per call (min over blocks): time this thread actually ran, so other
    processes sharing the cores inflate it far less than wall-clock time.  1 thread only."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float("inf")
        for _ in range(blocks):
            t0 = time.thread_time()
            for _ in range(reps):
                fn()
            best = min(best, (time.thread_time() - t0) / reps)
    finally:
        torch.set_num_threads(prev)
    return best * 1e6


def closures(impl, n, sizes, mode, device, passes):
    if passes == "fwd":
        scores, logits = make_inputs(n, sizes, device)

        def fwd():
            with torch.no_grad():
                impl(scores, logits, mode)
        return fwd
    scores, logits = make_inputs(n, sizes, device, requires_grad=True)
    grad = torch.randn(n, C, sizes[0], sizes[0], device=device)
    leaves = [*scores] + ([logits] if mode == "attention" else [])

    def fwd_bwd():
        out, _ = impl(scores, logits, mode)
        out.backward(grad)
        for t in leaves:  # keep accumulation out of the measurement
            t.grad = None
    return fwd_bwd


def copy_bandwidth_gbps(device):
    x = torch.empty(64 * 1024 * 1024, device=device)  # 256 MB
    y = torch.empty_like(x)
    t = time_us(lambda: y.copy_(x), 1, 0.5)
    return 2 * x.numel() * 4 / (t * 1e-6) / 1e9


def run(args):
    require_extension()
    modes = ("attention", "avg", "max") if args.modes == "all" else tuple(args.modes.split(","))
    shapes = {"train-N10": SHAPES["train-N10"]} if args.quick else SHAPES
    min_run = 0.05 if args.quick else args.min_run_time
    devices = [] if args.cuda_only else ["cpu"]
    if torch.cuda.is_available() and has_cuda_kernels() and not args.cpu_only:
        devices.append("cuda")
    elif args.cuda_only:
        raise SystemExit("bench_merge: --cuda-only needs a CUDA GPU and attnscale built with its CUDA kernels")
    compiled = None
    if not args.no_compile:
        # one graph per (shape, grad mode, thread count): raise dynamo's recompile limit so that
        # no configuration silently falls back to eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        compiled = torch.compile(scale_merge_reference, dynamic=False)
    rows: list[Row] = []
    copy_bw = copy_bandwidth_gbps("cuda") if "cuda" in devices else None
    for device in devices:
        thread_list = [int(t) for t in args.threads.split(",")] if device == "cpu" else [1]
        for threads in thread_list:
            for shape, (n, sizes) in shapes.items():
                for mode in modes:
                    for passes in ("fwd", "fwd+bwd"):
                        fns = {"fused": closures(scale_merge, n, sizes, mode, device, passes),
                               "eager": closures(scale_merge_reference, n, sizes, mode, device, passes)}
                        if compiled is not None:
                            fns["compiled"] = closures(compiled, n, sizes, mode, device, passes)
                            fns["compiled"]()  # compile outside the measurement
                        t = time_interleaved_us(fns, threads, min_run)
                        fused, eager, comp = t["fused"], t["eager"], t.get("compiled")
                        gbps = pct = None
                        if device == "cuda":
                            gbps = bytes_moved(n, sizes, passes) / (fused * 1e-6) / 1e9
                            pct = 100.0 * gbps / copy_bw
                        row = Row(device, threads, shape, mode, passes, fused, eager, comp,
                                  eager / fused, None if comp is None else comp / fused, gbps, pct)
                        if args.cpu_time and device == "cpu" and threads == 1:
                            row.fused_cpu_us = cpu_time_us(closures(scale_merge, n, sizes, mode, device, passes))
                            row.eager_cpu_us = cpu_time_us(
                                closures(scale_merge_reference, n, sizes, mode, device, passes))
                            if compiled is not None:
                                row.compiled_cpu_us = cpu_time_us(closures(compiled, n, sizes, mode, device, passes))
                        rows.append(row)
                        print_row(rows[-1], header=len(rows) == 1)
                        if args.json:  # row by row: a run stopped by a time limit keeps what it measured
                            save_json(args.json, rows, copy_bw, args.malloc_tuned, complete=False)
    return rows, copy_bw


def save_json(path: str, rows: list, copy_bw, malloc_tuned: bool, complete: bool = True) -> None:
    write_json(path, {"torch": torch.__version__, "copy_bw_gbps": copy_bw, "malloc_tuned": malloc_tuned, "complete": complete,
                      "rows": [asdict(r) for r in rows]}, quiet=not complete)


def print_row(r: Row, header=False):
    if header:
        print(f"{'device':6} {'thr':>3} {'shape':10} {'mode':9} {'pass':7} {'fused us':>9} {'eager us':>9} "
              f"{'compiled us':>11} {'x eager':>8} {'x compiled':>10} {'GB/s':>7} {'%copy':>6}")
    comp = f"{r.compiled_us:11.1f}" if r.compiled_us is not None else f"{'-':>11}"
    sc = f"{r.speedup_compiled:10.2f}" if r.speedup_compiled is not None else f"{'-':>10}"
    gb = f"{r.gbps:7.1f}" if r.gbps is not None else f"{'-':>7}"
    pc = f"{r.pct_copy_bw:6.1f}" if r.pct_copy_bw is not None else f"{'-':>6}"
    line = (f"{r.device:6} {r.threads:3d} {r.shape:10} {r.mode:9} {r.passes:7} {r.fused_us:9.1f} {r.eager_us:9.1f} "
            f"{comp} {r.speedup_eager:8.2f} {sc} {gb} {pc}")
    if r.fused_cpu_us is not None:
        line += f"  | cpu-time us: fused {r.fused_cpu_us:.1f} eager {r.eager_cpu_us:.1f} (x{r.eager_cpu_us / r.fused_cpu_us:.2f})"
        if r.compiled_cpu_us is not None:
            line += f" compiled {r.compiled_cpu_us:.1f} (x{r.compiled_cpu_us / r.fused_cpu_us:.2f})"
    print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (one shape, short timings)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--modes", default="attention", help="comma list of attention,avg,max or 'all'")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts (default 1,2)")
    ap.add_argument("--min-run-time", type=positive_float, default=1.0, help="seconds per measurement")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--cuda-only", action="store_true", help="GPU rows only (a GPU machine's time is short)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="also report thread CPU time per call at 1 thread (robust on a shared CPU)")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    try:
        [positive_int(t) for t in args.threads.split(",")]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--threads: a comma list of thread counts, each {e}")
    args.malloc_tuned = tune_malloc(args)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible; medians of 9 interleaved torch.utils.benchmark rounds; "
          f"malloc {'tuned (attnscale.malloc.keep_freed_memory)' if args.malloc_tuned else 'as glibc sets it'}")
    rows, copy_bw = run(args)
    if copy_bw is not None:
        print(f"CUDA device-to-device copy bandwidth: {copy_bw:.1f} GB/s ({torch.cuda.get_device_name()})")
    if args.json:
        save_json(args.json, rows, copy_bw, args.malloc_tuned)


if __name__ == "__main__":
    main()
