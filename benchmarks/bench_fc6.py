"""Benchmark attnscale.ops.dilated_conv2d against F.conv2d on DeepLab-LargeFOV's fc6.

fc6: 3x3 convolution, dilation 12, pad 12, 512 -> 1024 channels at stride-8 resolution
(41/31/21 for a 321 crop at scales 1/0.75/0.5, 65/49/33 for a 513 test image).

CPU: ours vs oneDNN F.conv2d (float32), per thread count in --threads.
GPU: ours vs cuDNN (cudnn.benchmark=True) in IEEE fp32, TF32 and bf16 channels_last (--precisions); each
method gets its inputs, weight and output gradient in its own best layout: cuDNN NCHW in fp32 / TF32 and
channels_last in bf16, ours channels_last (the GEMM path's own layout, which its results keep).
Ours runs each implementation in --algos (ATTNSCALE_DILATED_CONV_ALGO): "gemm", GEMMs over rectangles
of live taps (the CUDA default), and "direct", the hand-written kernels (the CPU default); defaults:
the device's default.  --profile adds, on a GPU, the kernels of 3 forward+backward calls of each of
ours in bf16 at the first shape, by GPU time (torch.profiler).
Timings of all methods are interleaved round by round, so drift hits every method alike; the
report gives the median, the min-max spread, the speed-up of the medians from the same run,
TFLOP/s on nominal FLOPs (dense conv incl. zero padding) and on live-tap FLOPs (what our kernel
computes), and on GPU the % of the dense bf16/TF32 tensor-core peak.  A GPU sample is CUDA events
around 10 back-to-back calls (no launch or sync gap per call).  Each method's forward output is
checked against a float64 convolution; an error beyond its precision's bound is reported as a wrong
result and the script exits 1.

    python benchmarks/bench_fc6.py                      # CPU (or GPU when available), 2 threads
    python benchmarks/bench_fc6.py --threads 1 2 --json fc6.json
    python benchmarks/bench_fc6.py --quick              # fewer repeats, 2 shapes
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale
from attnscale.ops import dilated_conv2d  # noqa: E402
from timing import add_malloc_option, positive_int, tune_malloc, write_json  # noqa: E402

C_IN, C_OUT, K, DIL, PAD = 512, 1024, 3, 12, 12
ALL_SHAPES = [(1, 41), (10, 41), (30, 41), (10, 31), (10, 21), (1, 65), (1, 49), (1, 33)]
CPU_SHAPES = [(1, 41), (1, 31), (1, 21), (1, 65), (1, 49), (1, 33)]
QUICK_SHAPES = [(1, 41), (1, 21)]
GPU_INNER = 10   # calls per timed GPU sample
# forward relative error (vs float64) above which a result is flagged and the script exits 1
MAX_REL_ERR = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}

# Dense tensor-core peaks in TFLOP/s: (bf16, tf32).
GPU_PEAKS = {"H200": (989.0, 494.0), "H100 SXM": (989.0, 494.0), "H100 HBM3": (989.0, 494.0),
             "H100 PCIe": (756.0, 378.0), "H100 NVL": (835.0, 418.0), "A100": (312.0, 156.0)}


def live_taps_1d(size: int) -> int:
    """Sum over output positions of the number of kernel taps that read real data (one axis)."""
    out = size + 2 * PAD - DIL * (K - 1)
    return sum(sum(1 for k in range(K) if 0 <= o - PAD + k * DIL < size) for o in range(out))


def flops(n: int, h: int) -> tuple[float, float]:
    """(nominal, live) forward FLOPs: 2 * N * O * C * sum of taps."""
    out = h + 2 * PAD - DIL * (K - 1)
    nominal = 2.0 * n * C_OUT * C_IN * K * K * out * out
    live = 2.0 * n * C_OUT * C_IN * live_taps_1d(h) ** 2
    return nominal, live


def gpu_peaks(name: str) -> tuple[float, float] | None:
    for key, peaks in GPU_PEAKS.items():
        if all(part in name for part in key.split()):
            return peaks
    if "H100" in name:  # unknown H100 variant: assume SXM numbers
        return GPU_PEAKS["H100 SXM"]
    return None


@dataclass
class Result:
    device: str
    threads: int | None
    n: int
    h: int
    pass_: str          # "fwd" or "fwd+bwd"
    method: str
    precision: str
    median_ms: float
    min_ms: float
    max_ms: float
    speedup: float | None      # baseline median / this median (same run), None for baselines
    tflops_nominal: float
    tflops_live: float
    pct_peak: float | None
    max_rel_err: float | None  # forward output's norm-wise relative error against a float64 convolution


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _make_call(fn, x, w, b, backward: bool, gout):
    if not backward:
        return lambda: fn(x, w, b)

    def step():
        y = fn(x, w, b)
        torch.autograd.grad(y, (x, w, b), gout)
    return step


def run_shape(device: str, n: int, h: int, methods: dict, backward: bool, repeats: int, warmup: int,
              threads: int | None, peaks) -> list[Result]:
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(n, C_IN, h, h, generator=g)
    w32 = torch.randn(C_OUT, C_IN, K, K, generator=g) * (2.0 / (C_IN * K * K)) ** 0.5
    b32 = torch.randn(C_OUT, generator=g) * 0.1
    # float64 reference, on the device being measured (a GPU does it in milliseconds, a CPU core in seconds)
    ref = F.conv2d(*(t.double().to(device) for t in (x32, w32, b32)), padding=PAD, dilation=DIL).cpu()
    out = h + 2 * PAD - DIL * (K - 1)
    calls, errs = {}, {}
    for name, (fn, dtype, layout, setup) in methods.items():
        setup()
        x = x32.to(device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(backward)
        w = w32.to(device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(backward)
        b = b32.to(device=device, dtype=dtype).requires_grad_(backward)
        gout = torch.randn(n, C_OUT, out, out, generator=g).to(device=device, dtype=dtype).contiguous(
            memory_format=layout)  # in the layout of the method's output, as an upstream layer would give it
        with torch.no_grad():
            y = fn(x, w, b).double().cpu()
        errs[name] = ((y - ref).norm() / ref.norm()).item()
        calls[name] = (_make_call(fn, x, w, b, backward, gout), setup)
        for _ in range(warmup):
            calls[name][1]()
            calls[name][0]()
        _sync(device)
    times = {name: [] for name in calls}
    for _ in range(repeats):  # interleaved rounds
        for name, (call, setup) in calls.items():
            setup()
            _sync(device)
            if device == "cuda":  # CUDA events around GPU_INNER back-to-back calls: no launch/sync gaps per call
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(GPU_INNER):
                    call()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / GPU_INNER)
                continue
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    nominal, live = flops(n, h)
    mult = 3.0 if backward else 1.0
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    results = []
    for name, ts in times.items():
        baseline = methods[name][3].baseline
        med = medians[name]
        speedup = None if baseline is None else medians[baseline] / med
        precision = methods[name][3].precision
        pct = None
        if peaks is not None and precision in ("bf16", "tf32"):
            peak = peaks[0] if precision == "bf16" else peaks[1]
            pct = 100.0 * mult * nominal / (med * 1e-3) / 1e12 / peak
        results.append(Result(device, threads, n, h, "fwd+bwd" if backward else "fwd", name, precision, med,
                              min(ts), max(ts), speedup, mult * nominal / (med * 1e-3) / 1e12,
                              mult * live / (med * 1e-3) / 1e12, pct, errs[name]))
    return results


class Setup:
    """Per-method global state (cuDNN TF32 flags) applied before every call, plus report metadata."""

    def __init__(self, precision: str, baseline: str | None, tf32: bool | None = None, algo: str | None = None):
        self.precision, self.baseline, self.tf32, self.algo = precision, baseline, tf32, algo

    def __call__(self):
        if self.tf32 is not None:
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
        if self.algo is not None:  # read by the C++ op at every call
            os.environ["ATTNSCALE_DILATED_CONV_ALGO"] = self.algo


def conv_ref(x, w, b):
    return F.conv2d(x, w, b, padding=PAD, dilation=DIL)


def ours(x, w, b):
    return dilated_conv2d(x, w, b, DIL, PAD)


def cpu_methods(algos=("direct",)):
    methods = {"oneDNN F.conv2d": (conv_ref, torch.float32, torch.contiguous_format, Setup("fp32", None))}
    for algo in algos:
        name = "attnscale" if algo == "direct" else f"attnscale {algo}"
        methods[name] = (ours, torch.float32, torch.contiguous_format, Setup("fp32", "oneDNN F.conv2d", algo=algo))
    return methods


GPU_BASELINES = {  # precision: (cuDNN method, dtype, cuDNN's layout, TF32)
    "fp32": ("cuDNN fp32", torch.float32, torch.contiguous_format, False),
    "tf32": ("cuDNN tf32", torch.float32, torch.contiguous_format, True),
    "bf16": ("cuDNN bf16 NHWC", torch.bfloat16, torch.channels_last, True),
}


def gpu_methods(precisions=("fp32", "tf32", "bf16"), algos=("gemm",)):
    methods = {}
    for prec in precisions:
        base, dtype, layout, tf32 = GPU_BASELINES[prec]
        methods[base] = (conv_ref, dtype, layout, Setup(prec, None, tf32=tf32))
        for algo in algos:  # ours on NHWC, the layout the GEMM path works in (and keeps)
            methods[f"{algo} {prec}"] = (ours, dtype, torch.channels_last, Setup(prec, base, tf32=tf32, algo=algo))
    return methods


def profile_ours(n: int, h: int, algos, rows: int = 12) -> str:
    """The CUDA kernels of 3 forward+backward calls of ours in bf16, by GPU time."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(n, C_IN, h, h, generator=g).cuda().bfloat16().contiguous(memory_format=cl).requires_grad_()
    w = (torch.randn(C_OUT, C_IN, K, K, generator=g) * 0.02).cuda().bfloat16().contiguous(memory_format=cl)
    w.requires_grad_()
    b = torch.zeros(C_OUT, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = h + 2 * PAD - DIL * (K - 1)
    gout = torch.randn(n, C_OUT, out, out, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    text = []
    for algo in algos:
        os.environ["ATTNSCALE_DILATED_CONV_ALGO"] = algo
        step = _make_call(ours, x, w, b, True, gout)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        text.append(f"-- {algo}, N={n} H={h}, bf16 forward+backward x3, CUDA kernels by GPU time:\n"
                    + prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))
    return "\n".join(text)


def format_table(results: list[Result]) -> str:
    head = (f"{'dev':4} {'thr':>3} {'N':>3} {'H':>3} {'pass':8} {'method':18} {'median ms':>10} {'min-max ms':>17} "
            f"{'speed-up':>8} {'TF/s nom':>8} {'TF/s live':>9} {'%peak':>6} {'rel err':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        sp = f"{r.speedup:.2f}x" if r.speedup is not None else "base"
        pk = f"{r.pct_peak:.1f}" if r.pct_peak is not None else "-"
        lines.append(f"{r.device:4} {r.threads if r.threads else '-':>3} {r.n:>3} {r.h:>3} {r.pass_:8} {r.method:18} "
                     f"{r.median_ms:10.2f} {r.min_ms:8.2f}-{r.max_ms:<8.2f} {sp:>8} {r.tflops_nominal:8.3f} "
                     f"{r.tflops_live:9.3f} {pk:>6} {r.max_rel_err:8.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[2], help="CPU thread counts (torch.set_num_threads)")
    ap.add_argument("--shapes", type=str, default=None, help="comma-separated NxH list, e.g. 1x41,10x21")
    ap.add_argument("--all-shapes", action="store_true", help="on CPU also run the N>1 shapes")
    ap.add_argument("--repeats", type=positive_int, default=None,
                    help="timed rounds per shape (default 7 CPU, 10 GPU; a GPU sample times 10 calls with CUDA events)")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--quick", action="store_true", help="2 shapes, few repeats")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "tf32", "bf16"), default=["fp32", "tf32", "bf16"],
                    help="GPU precisions (default all three)")
    ap.add_argument("--algos", nargs="+", choices=("gemm", "direct"), default=None,
                    help="our implementations to time (default: the device's default, gemm on CUDA, direct on CPU)")
    ap.add_argument("--profile", action="store_true", help="GPU: kernels of ours (bf16 fwd+bwd) at the first shape")
    ap.add_argument("--json", type=str, default=None, help="write all results to this JSON file")
    add_malloc_option(ap)
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is available")
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
            ap.error(f"--shapes must look like 1x41,10x21 (positive N and H), got {args.shapes!r}")
    elif args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = ALL_SHAPES if (device == "cuda" or args.all_shapes) else CPU_SHAPES
    repeats = args.repeats or (3 if args.quick else (7 if device == "cpu" else 10))
    warmup = 1 if device == "cpu" else 5
    passes = [False] if args.no_backward else [False, True]
    algos = tuple(args.algos or (("gemm",) if device == "cuda" else ("direct",)))

    results: list[Result] = []
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
            or platform.machine(), "repeats": repeats, "shape": "N x 512 x H x H -> 1024, 3x3, d=12, p=12"}
    if device == "cpu":
        meta["note"] = "CPU shared with other processes: compare the min-max spreads before trusting ratios"
        meta["malloc_tuned"] = tune_malloc(args)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n, h in shapes:
                for bwd in passes:
                    results += run_shape("cpu", n, h, cpu_methods(algos), bwd, repeats, warmup, threads, None)
                    print(f"done threads={threads} N={n} H={h} {'fwd+bwd' if bwd else 'fwd'}", flush=True)
                    save_json(args.json, meta, results, complete=False)
    else:
        name = torch.cuda.get_device_name()
        peaks = gpu_peaks(name)
        meta.update(gpu=name, peaks_tflops={"bf16": peaks[0], "tf32": peaks[1]} if peaks else None)
        torch.backends.cudnn.benchmark = True
        for n, h in shapes:
            for bwd in passes:
                results += run_shape("cuda", n, h, gpu_methods(args.precisions, algos), bwd, repeats, warmup, None, peaks)
                print(f"done N={n} H={h} {'fwd+bwd' if bwd else 'fwd'}", flush=True)
                save_json(args.json, meta, results, complete=False)
    print()
    print(json.dumps(meta))
    print(format_table(results))
    if args.profile and device == "cuda":
        meta["profile"] = profile_ours(*shapes[0], algos)
        print(meta["profile"])
    bad = wrong(results)
    for r in bad:
        print(f"WRONG RESULT: {r.method} N={r.n} H={r.h}: relative error {r.max_rel_err:.1e} > "
              f"{MAX_REL_ERR[r.precision]:.0e} ({r.precision})")
    save_json(args.json, meta, results)
    return 1 if bad else 0


def wrong(results: list) -> list:
    """The results whose forward error exceeds their precision's bound (``MAX_REL_ERR``)."""
    return [r for r in results if not r.max_rel_err <= MAX_REL_ERR[r.precision]]


def save_json(path, meta: dict, results: list, complete: bool = True) -> None:
    """``--json``: written after every shape too, so a run stopped by a time limit keeps its rows."""
    if path:
        write_json(path, {"meta": meta, "complete": complete, "results": [asdict(r) for r in results],
                          "wrong_results": [asdict(r) for r in wrong(results)]}, quiet=not complete)


if __name__ == "__main__":
    raise SystemExit(main())
