"""End-to-end benchmark of the 3-scale attention model (VGG-16 widths) on random data.

Measures, each with our C++/CUDA ops and with the pure-PyTorch references (``use_reference_ops``) in
the same run, so the ops' gain shows as a ratio (on a CPU also with the 3x3 convolutions through
``winograd_conv2d``: variants ``ops+winograd`` (F(2x2, 3x3)) and ``ops+winograd4`` (F(4x4, 3x3))):

- inference: ms per 513x513 image, 3 scales, eval mode (the paper: 350 ms on a K40; real Caffe with
  OpenBLAS on a 2-core CPU: ~4.3 s);
- predict (``--jobs predict``): ms per ``model.predict`` call on a 500x375 image (padding to 513, the net,
  the x8 Interp, argmax: what evaluation runs per image);
- training: images/s of forward + backward + SGD step at 321x321 (batch 30 on a GPU, smaller on a CPU),
  E-Supv loss.

Without gradients every variant, "reference" included, uses the CPU inference kernels of
``caffe.pool2d`` (max pooling) and ``caffe.interp``, so on a CPU "reference" is faster than plain eager
PyTorch there.  "ops" passes ``conv_impl="torch"``; "auto" (CPU) is the model as a user gets it,
``conv_impl="auto"``: in inference Winograd F(2x2, 3x3) for the layers whose channels pay
(:func:`attnscale.model.winograd_pays`), oneDNN for the others, and "ops" in training (and on an AVX-512
CPU whose GEMMs run on the BLAS: :func:`attnscale.model.cpu_prefers_onednn`, ``ATTNSCALE_CPU_GEMM``);
"auto4" (CPU) the same layers by F(4x4, 3x3).
"ops" and "auto" keep the model's default ``fc6_impl="auto"``: our ``dilated_conv2d`` on a CPU (oneDNN for
training on an AVX-512 CPU), cuDNN on a GPU; "ops+fc6" runs fc6 through our kernel whatever the device.

Precisions: fp32 everywhere; on CUDA also TF32 and bf16 autocast (channels_last with ``--channels-last``).
Like the train / evaluate / reproduce entry points it keeps freed memory in the process
(:func:`attnscale.malloc.keep_freed_memory`; ``--default-malloc`` leaves glibc's settings alone).
``torch.compile`` of our model is measured with ``--compile``.  On CUDA, inference also runs as "ops+graph":
the "ops" forward captured once as a CUDA graph and replayed (a fixed 513x513 input, as evaluation pads
every image to; the capture runs the scales one after another: the model's side streams are for eager
forwards), "ops+serial" the eager forward with the scales one after another on one stream (the ratio of
``scale_streams``),
"ops+torchpool+graph" takes ``F.max_pool2d`` for the MAX pooling instead of our inference kernel,
"ops+unfused+graph" the convolutions' bias add and ReLU as PyTorch runs them instead of ``bias_relu``
(``fuse_bias_relu=False``), "ops+nopad+graph" conv1_1 on the 3-channel image
(``pad_input_channels=False``) and "ops+nocache+graph" with autocast casting the weights in every forward
(``cache_weight_casts=False``); on a CPU inference also runs "auto+torchpool" (``F.max_pool2d`` instead of
our kernel: in bf16 PyTorch's bfloat16 CPU pooling).  Training on CUDA also runs "ops+scatter": the Interp
layers' index_select forward and autograd's ``index_add_`` backward (float atomics;
:func:`attnscale.caffe.torch_interp`) instead of the CUDA forward kernel and the gather-form
adjoint, "ops+torchpool": MAX pooling by ``F.max_pool2d`` instead of our training kernels (a byte of mask per
output), "ops+unfused": without ``bias_relu``, "ops+torchdrop": ``bias_relu`` without the Dropout inside it
(``fuse_dropout=False``: ``F.dropout`` after it, as before), and "ops+nopad": conv1_1 on 3 channels.

``ATTNSCALE_DISABLE`` (:mod:`attnscale.switches`; ``gpu_proof.sh`` sets it from ``gpu_preflight.py``)
turns features off in every variant; the JSON records it.  A variant that raises is reported and left
out, the others go on; after a CUDA error that leaves the device unusable the rows so far are saved and
the script exits with status 3.

``--profile`` then runs two more steps of each job's "auto" variant (CPU inference; else "ops"; first precision) under torch.profiler and
prints where the time goes: the timed step vs the device's busy time in it (a step that keeps the GPU busy
well under its wall time is bound by launches or the host, not by kernels), the top operators by self time
with their input shapes (the convolutions' shapes name the layers), and on CUDA the top kernels; the
JSON gets them under "profile".

    python benchmarks/bench_e2e.py                      # CPU: inference N=1, training batch 2
    python benchmarks/bench_e2e.py --device cuda --json results/e2e.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale import caffe, switches
from attnscale.model import AttentionToScale, check_labels
from attnscale.train import normalize_gradients
from timing import add_malloc_option, positive_int, tune_malloc, write_json


@dataclass
class Row:
    job: str          # "infer" | "train"
    variant: str      # "reference" | "ops" | "ops+fc6" | "ops+winograd" | "ops+winograd4" | "auto" | "auto4" | "auto+torchpool" (CPU) | "ops+graph" | "ops+serial" | "ops+torchpool[+graph]" | "ops+unfused[+graph]" | "ops+nopad[+graph]" | "ops+nocache+graph" | "ops+scatter" | "ops+torchdrop" | "ops+iter3" (GPU) | "ops+compile"
    precision: str    # "fp32" | "tf32" | "bf16"
    batch: int
    size: int
    median_s: float
    min_s: float
    reps: int

    @property
    def per_image_ms(self) -> float:
        return 1e3 * self.median_s / self.batch

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class DeviceLost(RuntimeError):
    """A CUDA error left the device unusable in this process (the error is sticky: every later call fails)."""


def _guarded(variant: str, stage: str, fn, device: str, failures: list):
    """fn() (and the device's completion of it); on an exception the variant is reported and None
    returned, unless the device is lost: DeviceLost."""
    try:
        out = fn()
        _sync(device)
        return out
    except Exception as e:  # a broken variant must not cost the others their numbers
        msg = f"{type(e).__name__}: {e}"
        print(f"  FAILED {variant} ({stage}): {msg.splitlines()[0][:300]}", flush=True)
        failures.append({"variant": variant, "stage": stage, "error": msg[:2000]})
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as lost:
                raise DeviceLost(f"{variant} ({stage}) left the device unusable: {lost}") from e
        return None


def _time_interleaved(steps: dict, device: str, warmup: int, reps: int, failures: list) -> dict:
    """Seconds per call of each step, timed in interleaved rounds (one call of each variant per
    round), so that a slow phase of a shared machine (this one drifts by +-30 % over minutes) hits
    every variant alike and the ratios stay meaningful.  A step that raises is left out (_guarded) and taken
    out of ``steps`` too, so that its model and buffers can be freed before the others go on."""
    def drop(k):
        del steps[k]
        if device == "cuda":
            torch.cuda.empty_cache()

    for k in list(steps):
        for _ in range(warmup):
            if _guarded(k, "warm-up", lambda: steps[k]() or True, device, failures) is None:
                drop(k)
                break
    out = {k: [] for k in steps}
    for _ in range(reps):
        for k in list(steps):
            t0 = time.perf_counter()
            if _guarded(k, "timing", lambda: steps[k]() or True, device, failures) is None:
                drop(k)
                del out[k]
                continue
            out[k].append(time.perf_counter() - t0)
    return out


def _build(makers: dict, device: str, failures: list) -> dict:
    """variant -> step, each made by its maker(); a variant whose maker raises is left out (_guarded)."""
    steps = {}
    for v, make in makers.items():
        step = _guarded(v, "set-up", make, device, failures)
        if step is not None:
            steps[v] = step
    return steps


def _model(variant: str, device: str, channels_last: bool) -> torch.nn.Module:
    parts = variant.split("+")
    m = AttentionToScale(21, (1.0, 0.75, 0.5), "attention", extra_supervision=True,
                         use_reference_ops=(parts[0] == "reference"),
                         conv_impl=parts[0] if parts[0] in ("auto", "auto4") else next(
                             (q for q in parts if q.startswith("winograd")), "torch"),
                         fc6_impl="ops" if "fc6" in parts else "auto",
                         scale_streams="serial" not in parts,
                         fuse_bias_relu="unfused" not in parts,
                         fuse_dropout="torchdrop" not in parts,
                         pad_input_channels="nopad" not in parts,
                         cache_weight_casts="nocache" not in parts).to(device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def infer_step(variant, precision, device, size, channels_last):
    m = _model(variant, device, channels_last).eval()
    fwd = torch.compile(m) if variant.endswith("compile") else m
    x = torch.randn(1, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=(precision == "bf16"))
    # "torchpool": MAX pooling by F.max_pool2d instead of our inference kernel (caffe.torch_max_pool)
    pool = caffe.torch_max_pool if "torchpool" in variant.split("+") else contextlib.nullcontext

    def step():
        with torch.no_grad(), ac, pool():
            fwd(x)
    return cuda_graph(step) if variant.endswith("graph") else step


def cuda_graph(step):
    """The step captured once as a CUDA graph and replayed: one launch for the ~200 kernels of a 3-scale
    forward, so the host's per-operator cost (dispatch, autocast, launches) is gone.  The input is a fixed
    tensor, as in evaluation, where every image is padded to 513x513.  Warm-up on a side stream first (cuDNN
    picks its algorithms and the caching allocator settles), as torch.cuda.graph requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def predict_step(variant, precision, device, channels_last):
    """``model.predict`` on a VOC-sized 500x375 BGR image: mean subtraction, padding to 513, the net, the
    x8 Interp of the scores and attention maps, crop and argmax (what evaluation runs per image)."""
    m = _model(variant, device, channels_last).eval()
    img = (torch.rand(500, 375, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=(precision == "bf16"))

    def step():
        with ac:
            m.predict(img)
    return step


def train_step(variant, precision, device, size, batch, channels_last):
    m = _model(variant, device, channels_last).train()
    fwd = torch.compile(m) if variant.endswith("compile") else m
    opt = torch.optim.SGD(m.param_groups(1e-3, 5e-4), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    check_labels(y, 21)  # once: the step then runs without a host sync, as attnscale.train's does
    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=(precision == "bf16"))

    # "scatter": the Interp layers' index_select forward, autograd's index_add_ backward (caffe.torch_interp);
    # "torchpool": MAX pooling by F.max_pool2d (int64 indices) instead of our training kernels
    # "iterK": the update as the product's loop makes it with iter_size K: K passes of batch / K images, each
    # one's gradients added to the last's, scaled by 1/K (Caffe's Normalize), then one step
    parts = variant.split("+")
    interp = caffe.torch_interp if "scatter" in parts else contextlib.nullcontext
    pool = caffe.torch_max_pool if "torchpool" in parts else contextlib.nullcontext
    passes = next((int(q[4:]) for q in parts if q.startswith("iter")), 1)
    if batch % passes:
        raise ValueError(f"{variant}: a batch of {batch} does not split into {passes} passes")
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        opt.zero_grad(set_to_none=True)
        with interp(), pool():
            for xi, yi in zip(x.chunk(passes), y.chunk(passes)):
                with ac:
                    out = fwd(xi)
                loss, _ = m.loss(out, yi, labels_checked=True)
                loss.backward()
        normalize_gradients(params, passes)
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", nargs="+", default=["infer", "train"], choices=["infer", "predict", "train"])
    ap.add_argument("--infer-size", type=positive_int, default=513)
    ap.add_argument("--train-size", type=positive_int, default=321)
    ap.add_argument("--train-batch", type=positive_int, default=None, help="default 30 on CUDA, 2 on CPU")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "tf32", "bf16"), default=None, help="default: fp32 on CPU; fp32 tf32 bf16 on CUDA")
    ap.add_argument("--compile", action="store_true", help="also torch.compile(our model)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=positive_int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--profile", action="store_true", help="also profile the \"ops\" variant of each job")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.device != "cuda" and "tf32" in (args.precisions or ()):
        ap.error("--precisions tf32 is a CUDA mode (TF32 tensor cores)")
    malloc_tuned = tune_malloc(args)

    dev = args.device
    cuda = dev == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.train_batch or (30 if cuda else 2)
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if cuda else ["fp32"])
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    reps = args.reps or (10 if cuda else 3)
    # ops+fc6: fc6 through our dilated_conv2d whatever fc6_impl="auto" picks on this device; ops+winograd(4):
    # also the 3x3 trunk / attention convolutions through winograd_conv2d, F(2x2, 3x3) or F(4x4, 3x3) (CPU only)
    variants = (["reference", "ops", "ops+fc6"] + ([] if cuda else ["ops+winograd", "ops+winograd4", "auto", "auto4"])
                + (["ops+compile"] if args.compile else []))
    # inference only: the "ops" forward as one CUDA graph (captured with the scales on one stream); "serial":
    # the eager forward with the scales on one stream (the model's scale_streams=False)
    # on a CPU "auto+torchpool": the model's defaults with F.max_pool2d for the MAX pooling instead of our kernel
    infer_variants = (["ops+graph", "ops+serial", "ops+torchpool+graph", "ops+unfused+graph",
                       "ops+nopad+graph", "ops+nocache+graph"] if cuda else ["auto+torchpool"])
    # training only: the Interp layers' index_select forward and autograd's index_add_ backward; MAX
    # pooling by F.max_pool2d; the convolutions' bias and ReLU as PyTorch runs them (no bias_relu); F.dropout
    # after bias_relu instead of inside it; "ops+iter3": three passes of a third of the batch per update, the
    # product's loop's update (batch 10 x iter_size 3), which bench_train.py times with its data and host work
    train_variants = (["ops+scatter", "ops+torchpool", "ops+unfused", "ops+torchdrop", "ops+nopad", "ops+iter3"]
                      if cuda else [])
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "argv": " ".join(sys.argv), "malloc_tuned": malloc_tuned,
           "disabled": sorted(switches.disabled())}
    print(f"# bench_e2e: {env}")

    rows: list[Row] = []
    profiles: list[dict] = []
    failures: list[dict] = []

    def save(complete: bool) -> None:
        if args.json:  # as it goes: a run stopped by a time limit keeps what it measured
            save_json(args.json, env, rows, profiles, failures, complete)

    try:
        for prec in precisions:
            if cuda:
                torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                torch.backends.cudnn.allow_tf32 = prec == "tf32"
                torch.backends.cudnn.benchmark = True
            for job in args.jobs:
                if job == "infer":
                    makers = {v: functools.partial(infer_step, v, prec, dev, args.infer_size, args.channels_last)
                              for v in variants + infer_variants}
                    n, size = 1, args.infer_size
                elif job == "predict":
                    makers = {v: functools.partial(predict_step, v, prec, dev, args.channels_last) for v in variants
                              if not v.endswith("compile")}
                    n, size = 1, 513
                else:
                    # "auto" / "auto4" train as "ops" does (oneDNN's convolutions where gradients are needed)
                    makers = {v: functools.partial(train_step, v, prec, dev, args.train_size, batch,
                                                   args.channels_last)
                              for v in variants + train_variants if not v.startswith("auto")}
                    n, size = batch, args.train_size
                steps = _build(makers, dev, failures)
                times = _time_interleaved(steps, dev, warmup, reps, failures)
                for v, t in times.items():
                    r = Row(job, v, prec, n, size, statistics.median(t), min(t), reps)
                    rows.append(r)
                    print(f"  {job:5s} {v:12s} {prec:5s} N={r.batch:<3d} {r.size}px  median {r.median_s * 1e3:9.1f} ms"
                          f"  ({r.per_image_ms:8.1f} ms/img, {r.images_per_s:7.2f} img/s)", flush=True)
                save(False)
                pv = next((q for q in ("auto", "ops") if q in times), None)
                if args.profile and prec == precisions[0] and pv is not None:
                    prof = _guarded(pv, "profile", functools.partial(
                        profile_step, steps[pv], dev, 1e3 * statistics.median(times[pv])), dev, failures)
                    if prof is not None:
                        profiles.append(prof | {"job": job, "variant": pv, "precision": prec, "batch": n,
                                                "size": size})
                    save(False)
                del steps
    except DeviceLost as e:
        print(f"\nSTOPPED: {e}", flush=True)
        save(False)
        return 3

    print("\n| job | precision | variant | batch | ms / image | images / s | speed-up vs reference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if (q.job, q.precision, q.variant) == (r.job, r.precision, "reference")), None)
        print(f"| {r.job} {r.size}px | {r.precision} | {r.variant} | {r.batch} | {r.per_image_ms:.1f} | "
              f"{r.images_per_s:.2f} | {f'{ref.median_s / r.median_s:.2f}x' if ref else '-'} |")
    for f in failures:
        print(f"FAILED: {f['variant']} ({f['stage']}): {f['error'].splitlines()[0][:300]}")
    save(True)
    return 1 if failures else 0


def profile_step(step, device: str, wall_ms: float, steps: int = 2, top: int = 20) -> dict:
    """Profile ``steps`` calls of an already warmed-up step: the device's busy time per step beside the
    step's timed (unprofiled) median ``wall_ms``, the top operators by self time (grouped by input shapes;
    device time on CUDA, CPU time on a CPU) and, on CUDA, the top kernels.  Printed and returned."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.device_time for e in kernels) / 1e3 / steps
        by_name: dict = {}
        for e in kernels:
            c, t = by_name.get(e.name, (0, 0.0))
            by_name[e.name] = (c + 1, t + e.device_time)
        top_kernels = [{"name": k, "calls": c / steps, "ms": t / 1e3 / steps}
                       for k, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]
    else:
        busy_ms, top_kernels = None, []

    def self_us(a):
        return a.self_device_time_total if cuda else a.self_cpu_time_total

    # operators only (on CUDA the averages also list the kernels themselves)
    ops = sorted((a for a in prof.key_averages(group_by_input_shape=True) if a.device_type == DeviceType.CPU),
                 key=lambda a: -self_us(a))
    top_ops = [{"name": a.key, "shapes": str(a.input_shapes)[:160], "calls": a.count / steps,
                "self_ms": self_us(a) / 1e3 / steps} for a in ops[:top] if self_us(a) > 0]
    what = "device" if cuda else "CPU"
    print(f"  profile: {wall_ms:.1f} ms per step (timed)" +
          (f", GPU busy {busy_ms:.1f} ms of it ({100 * busy_ms / wall_ms:.0f} %)" if cuda else ""))
    print(f"  | operator | input shapes | calls / step | self {what} ms / step |")
    print("  |---|---|---|---|")
    for o in top_ops:
        print(f"  | {o['name']} | {o['shapes']} | {o['calls']:g} | {o['self_ms']:.2f} |")
    if top_kernels:
        print("  | kernel | calls / step | ms / step |")
        print("  |---|---|---|")
        for k in top_kernels:
            print(f"  | {k['name'][:120]} | {k['calls']:g} | {k['ms']:.2f} |")
    return {"wall_ms": wall_ms, "busy_ms": busy_ms, "top_ops": top_ops, "top_kernels": top_kernels}


def save_json(path: str, env: dict, rows: list, profiles: list, failures: list, complete: bool = True) -> None:
    write_json(path, {"env": env, "complete": complete,
                      "rows": [asdict(r) | {"ms_per_image": r.per_image_ms, "images_per_s": r.images_per_s}
                               for r in rows], "profile": profiles, "failures": failures}, quiet=not complete)


if __name__ == "__main__":
    sys.exit(main())
