"""Which of our fast paths work here: a check per feature of :mod:`attnscale.switches`, before the benchmarks.

Each feature (our MAX pooling kernels, Interp kernels, ``bias_relu``, the Dropout inside it, conv1_1 on 4
channels, the kept weight casts) is checked on its own, in a process of its own, so that a CUDA error that
leaves the device unusable costs only the feature that caused it; every other feature is off there
(``ATTNSCALE_DISABLE``).  Two levels:

- the feature's ops (pooling, Interp, ``bias_relu``, the Dropout) on the device against the CPU ops or the
  pure-PyTorch references, bit for bit, as the CUDA tests compare them, at the model's channel counts in
  channels_last (the kernels that take 16 bytes of channels per thread, and an aligned channel slice for the
  Interp backward) and at an odd count in NCHW (the per-element kernels); the Dropout's mask against
  ``bias_relu_reference`` (the same Philox counter);
- a small 3-scale attention model with E-Supv as the benchmarks run it: one training step and one inference
  (in bf16 also as a CUDA graph), once with the feature and once within ``switches.torch_path(feature)``
  (PyTorch's path for the same values).  In float32 (TF32 off; NCHW and channels_last) the outputs, the loss
  and every parameter's gradient must agree to 1e-3 of their largest magnitude; in bf16 autocast with
  channels_last the outputs to 5e-2 and the gradients, by norm, to less than 1x their own (bf16's rounding
  at every layer moves the early layers' gradients of a freshly initialised net by up to 35 % against
  float32, so only a gross error is caught there); non-finite values must match everywhere.  With the
  Dropout (another random stream than ``F.dropout``'s) the step must stay finite.

Then, when two or more features passed, the model-level checks once more with all of them on together
against PyTorch's path for every feature (``combined``): a fault that shows only in combination (one
feature's output feeding another's kernel, e.g. ``bias_relu``'s output into the pooling kernels) turns them
all off, since the fault cannot be pinned on one; a combined run without an answer in time turns nothing off.

``gpu_proof.sh`` runs it beside the CUDA tests (``check``) or before ``bench`` and exports the failed
features as ``ATTNSCALE_DISABLE`` for the benchmarks (``--disabled-to``), so one broken kernel written
without a GPU does not cost the session the numbers of the others.  Exit status 1 when a feature failed.
All features run at once; ``--timeout`` bounds them, a feature without an answer by then fails;
``--combined-timeout`` bounds the combined run after them.

    python benchmarks/gpu_preflight.py --json preflight.json --disabled-to disabled.txt
    python benchmarks/gpu_preflight.py --device cpu --features pool,casts     # the same checks on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale import caffe, switches
from attnscale.model import AttentionToScale

# a feature that works only with others on
REQUIRES = {"dropout": ("bias_relu",)}
COMBINED = "combined"  # the features that passed, all on at once
TOLERANCE = {"fp32": (1e-3, None), "bf16": (5e-2, 1.0)}  # (values, gradients by norm: None = as values)


def _tensors(out, model) -> dict:
    """The values a step produced: outputs, and the parameters' gradients where there are any."""
    got = {"merged": out.merged, "attention": out.attention}
    got |= {f"scores{i}": s for i, s in enumerate(out.scales)}
    got |= {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float().cpu() for k, v in got.items() if v is not None}


def _run(feature: str, on: bool, precision: str, channels_last: bool, device: str, dropout: float,
         graph: bool) -> dict:
    """One training step and one inference of the small model (fixed weights and data), the feature on or
    within its torch_path block."""
    torch.manual_seed(0)
    m = AttentionToScale(5, (1.0, 0.75, 0.5), "attention", extra_supervision=True, width=0.25, dropout=dropout)
    bf16 = precision == "bf16"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = m.to(device, memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 97, 97, generator=g)
    y = torch.randint(0, 5, (2, 97, 97), generator=g)
    x = x.to(device, memory_format=fmt)
    y = y.to(device)
    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    res = {}
    with contextlib.ExitStack() as block:
        if not on:  # PyTorch's path for the feature (for every feature: combined)
            for f in (switches.FEATURES if feature == COMBINED else (feature,)):
                block.enter_context(switches.torch_path(f))
        m.train()
        with ac:
            out = m(x)
        loss, _ = m.loss(out, y)
        loss.backward()
        res |= {f"train {k}": v for k, v in _tensors(out, m).items()} | {"train loss": loss.detach().float().cpu()}
        m.eval()
        with torch.no_grad(), ac:
            out = m(x[:1])
        res |= {f"infer {k}": v for k, v in _tensors(out, m).items() if not k.startswith("grad")}
        if graph:
            static = {}

            def step():
                with torch.no_grad(), ac:
                    static["out"] = m(x[:1])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                step()
            for replay in (1, 2):  # a second replay too: one captured with side streams went wrong from there on
                cg.replay()
                torch.cuda.synchronize()
                res |= {f"graph replay {replay} {k}": v for k, v in _tensors(static["out"], m).items()
                        if not k.startswith("grad")}
    return res


def compare(got: dict, want: dict, tol: float, grad_norm_tol: float | None = None) -> list:
    """The entries of got that differ from want by more than tol times want's largest magnitude (gradients,
    with grad_norm_tol, by more than grad_norm_tol times want's norm), or are non-finite where want is
    finite or the reverse, as 'name: relative error' strings; an empty list when all agree."""
    bad = []
    for k, w in want.items():
        a = got.get(k)
        if a is None or a.shape != w.shape:
            bad.append(f"{k}: missing or shape {None if a is None else tuple(a.shape)} vs {tuple(w.shape)}")
            continue
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(a), finite):
            bad.append(f"{k}: non-finite values differ")
            continue
        d, w = (a[finite] - w[finite]).double(), w[finite].double()
        if grad_norm_tol is not None and k.startswith("train grad"):
            err = d.norm().item() / max(w.norm().item(), 1e-30)
            if err >= grad_norm_tol:  # (an all-zero gradient is off by exactly 1)
                bad.append(f"{k}: {err:.3g}")
            continue
        err = d.abs().max().item() / max(w.abs().max().item(), 1e-30) if w.numel() else 0.0
        if err > tol:
            bad.append(f"{k}: {err:.3g}")
    return bad


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, bit for bit on finite ones and NaN where NaN (on the CPU, in b's dtype)."""
    a = a.detach().cpu().to(b.dtype)
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _dtypes(device: str) -> tuple:
    return (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)  # the CPU ops: float


# Each op on the device against the CPU op (or the index_select path) bit for bit, as the CUDA tests compare
# them, at the model's channel counts in channels_last (the kernels that take 16 bytes of channels per
# thread) and at an odd count in NCHW (the per-element ones): the model-level comparison above sees a kernel
# that is wrong in a few places, or a backward that writes nothing, only faintly through bf16's rounding.
LAYOUTS = ((5, torch.contiguous_format), (64, torch.channels_last))


def _pool_ops(device: str) -> list:
    """caffe_max_pool2d, caffe_max_pool2d_with_mask and _backward at pool1's and pool4's geometry, ties and a NaN
    among the values."""
    ops = torch.ops.attnscale
    bad, g = [], torch.Generator().manual_seed(3)
    for dtype in _dtypes(device):
        for C, fmt in LAYOUTS:
            x = torch.randint(-3, 4, (2, C, 33, 40), generator=g).to(dtype)
            x[1, 3, 16, 20] = float("nan")
            xd, xr = x.to(device).contiguous(memory_format=fmt), x.float()
            for k, s, p in ((3, 2, 1), (3, 1, 1)):
                oh, ow = caffe.pool_output_shape((33, 40), k, s, p)
                out, mask = ops.caffe_max_pool2d_with_mask(xd, k, s, p, oh, ow)
                want, want_mask = ops.caffe_max_pool2d_with_mask(xr, k, s, p, oh, ow)
                gr = torch.randn(out.shape, generator=g).to(dtype)
                gx = ops.caffe_max_pool2d_backward(gr.to(device).contiguous(memory_format=fmt), mask, k, s, p, 33, 40)
                want_gx = ops.caffe_max_pool2d_backward(gr.float(), want_mask, k, s, p, 33, 40).to(dtype)
                for name, a, b in (("inference", ops.caffe_max_pool2d(xd, k, s, p, oh, ow), want), ("output", out, want),
                                   ("mask", mask, want_mask), ("gradient", gx, want_gx)):
                    if not _equal(a, b):
                        bad.append(f"pool {dtype} C={C} {(k, s, p)}: {name} differs from the CPU op")
    return bad


def _interp_ops(device: str) -> list:
    """caffe_interp (31x21 -> 41x41) against the index_select path on the device; caffe_interp_backward on a
    dense gradient and on a channel slice of a wider one (at channel 8: aligned) against the CPU op."""
    ops = torch.ops.attnscale
    bad, g = [], torch.Generator().manual_seed(4)
    for dtype in _dtypes(device):
        tables = [caffe.host_constants(caffe._interp_adjoint_tables, i, o, dtype, device=dev)
                  + caffe.host_constants(caffe._interp_adjoint_tables, j, q, dtype, device=dev)
                  for (i, o, j, q), dev in (((31, 41, 21, 41), device), ((31, 41, 21, 41), "cpu"))]
        for C, fmt in LAYOUTS:
            xd = torch.randn(2, C, 31, 21, generator=g).to(dtype).to(device).contiguous(memory_format=fmt)
            if not _equal(ops.caffe_interp(xd, 41, 41), caffe._interp_blend(xd, (41, 41)).cpu()):
                bad.append(f"interp {dtype} C={C}: forward differs from the index_select path")
            gr = torch.randn(2, C, 41, 41, generator=g).to(dtype)
            want = ops.caffe_interp_backward(gr.float(), *tables[1]).to(dtype)
            wide = torch.full((2, C + 16, 41, 41), float("nan"), dtype=dtype, device=device)
            wide = wide.contiguous(memory_format=fmt)
            wide[:, 8:8 + C] = gr.to(device)
            for name, gd in (("dense", gr.to(device).contiguous(memory_format=fmt)), ("slice", wide[:, 8:8 + C])):
                if not _equal(ops.caffe_interp_backward(gd, *tables[0]), want):
                    bad.append(f"interp {dtype} C={C}: backward ({name} gradient) differs from the CPU op")
    return bad


def _bias_relu_ops(device: str) -> list:
    """bias_relu against the pure-PyTorch reference, its input gradient exactly and its bias gradient closely."""
    from attnscale.ops import bias_relu
    from attnscale.ops.reference import bias_relu_reference
    bad, g = [], torch.Generator().manual_seed(5)
    for dtype in _dtypes(device):
        for C, fmt in LAYOUTS:
            x = torch.randn(3, C, 17, 19, generator=g).to(dtype).contiguous(memory_format=fmt)
            b, gr = torch.randn(C, generator=g), torch.randn(3, C, 17, 19, generator=g).to(dtype)
            xd, bd = x.to(device).requires_grad_(True), b.to(device).requires_grad_(True)
            out = bias_relu(xd, bd)
            want = bias_relu_reference(x, b)
            out.backward(gr.to(device).contiguous(memory_format=fmt))
            want_gx = torch.where(want > 0, gr, torch.zeros_like(gr))
            if not (_equal(out, want) and _equal(xd.grad, want_gx)):
                bad.append(f"bias_relu {dtype} C={C}: output or input gradient differs from the reference")
            elif not torch.allclose(bd.grad.cpu().double(), want_gx.double().sum((0, 2, 3)), rtol=1e-2, atol=1e-2):
                bad.append(f"bias_relu {dtype} C={C}: bias gradient differs from the reference's sum")
    return bad


def _dropout_ops(device: str) -> list:
    """bias_relu's mask against the reference (same seed), float32 and bf16 channels_last; its backward."""
    from attnscale.ops import bias_relu
    from attnscale.ops.reference import bias_relu_reference
    bad = []
    g = torch.Generator().manual_seed(2)
    cases = [(torch.float32, torch.contiguous_format)] + ([(torch.bfloat16, torch.channels_last)]
                                                         if device == "cuda" else [])  # the CPU kernel: float
    for dtype, fmt in cases:
        x = torch.randn(3, 64, 17, 19, generator=g).to(dtype).contiguous(memory_format=fmt)
        b = torch.randn(64, generator=g)
        xd = x.to(device).requires_grad_(True)
        out = bias_relu(xd, b.to(device), 0.5, 12345)
        want = bias_relu_reference(x, b, 0.5, 12345)
        if not torch.equal(out.detach().cpu(), want):
            bad.append(f"dropout {dtype}: mask or values differ from bias_relu_reference")
        out.sum().backward()
        if not torch.equal(xd.grad.cpu(), torch.where(want > 0, torch.full_like(want, 2.0), torch.zeros_like(want))):
            bad.append(f"dropout {dtype}: grad_input is not 2 where kept, 0 elsewhere")
    return bad


OP_CHECKS = {"pool": _pool_ops, "interp": _interp_ops, "bias_relu": _bias_relu_ops, "dropout": _dropout_ops}


def check_feature(feature: str, device: str) -> dict:
    """{"feature", "ok", "problems", "seconds"} for one feature on device (the other features as they are:
    the caller's ATTNSCALE_DISABLE); COMBINED: the model-level checks of every feature left on at once."""
    t0 = time.perf_counter()
    problems = []
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    problems += OP_CHECKS.get(feature, lambda d: [])(device)
    if feature == "dropout":
        res = _run(feature, True, "bf16", True, device, 0.5, graph=False)
        problems += [f"dropout model step: {k} not finite" for k, v in res.items() if not torch.isfinite(v).all()]
    else:
        for precision, channels_last in (("fp32", False), ("fp32", True), ("bf16", True)):
            graph = device == "cuda" and precision == "bf16"
            got = _run(feature, True, precision, channels_last, device, 0.0, graph)
            want = _run(feature, False, precision, channels_last, device, 0.0, graph)
            where = f"{precision}{' channels_last' if channels_last else ''}"
            problems += [f"{where} {p}" for p in compare(got, want, *TOLERANCE[precision])]
    if device == "cuda":
        torch.cuda.synchronize()
    return {"feature": feature, "ok": not problems, "problems": problems[:20],
            "seconds": round(time.perf_counter() - t0, 1)}


def _child(feature: str, device: str, keep: set) -> subprocess.Popen:
    """A process checking ``feature`` (each its own CUDA context), every feature but ``keep`` off there."""
    env = dict(os.environ, **{switches.ENV: ",".join(n for n in switches.FEATURES if n not in keep)})
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one", feature, "--device", device],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _answer(feature: str, p: subprocess.Popen, deadline: float, timeout: float) -> dict:
    """The child's result; a child that dies fails, one without an answer by ``deadline`` has "ok": None."""
    try:
        out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return {"feature": feature, "ok": None, "problems": [f"no answer in {timeout:g} s"]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (err.strip().splitlines() or ["(no output)"])[-1][:300]
    return {"feature": feature, "ok": False, "problems": [f"exit {p.returncode}: {tail}"]}


def disabled_after(results: list) -> list:
    """The features to turn off: each one that failed or gave no answer alone; all of them when their
    combined run failed (the fault is in no one feature); a combined run without an answer turns none off."""
    alone = [r for r in results if r["feature"] != COMBINED]
    failed = [r["feature"] for r in alone if not r["ok"]]
    if any(r["feature"] == COMBINED and r["ok"] is False for r in results):
        failed = [r["feature"] for r in alone]
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--features", default=",".join(switches.FEATURES), help="comma-separated (default: all)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds for all the features' processes")
    ap.add_argument("--combined-timeout", type=float, default=60, help="seconds for the combined run after them")
    ap.add_argument("--json", default=None)
    ap.add_argument("--disabled-to", default=None, help="write the failed features here, comma-separated")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: check this feature, print JSON
    args = ap.parse_args(argv)

    if args.one:
        print(json.dumps(check_feature(args.one, args.device)), flush=True)
        return 0

    features = [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = [f for f in features if f not in switches.FEATURES]
    if unknown:
        ap.error(f"unknown feature(s) {unknown}; known: {', '.join(switches.FEATURES)}")
    procs = {f: _child(f, args.device, {f, *REQUIRES.get(f, ())}) for f in features}  # all at once
    deadline = time.monotonic() + args.timeout  # one for all: they run at once
    results = [_answer(f, p, deadline, args.timeout) for f, p in procs.items()]
    passed = [r["feature"] for r in results if r["ok"]]
    if len(passed) >= 2:
        results.append(_answer(COMBINED, _child(COMBINED, args.device, set(passed)),
                               time.monotonic() + args.combined_timeout, args.combined_timeout))
    failed = disabled_after(results)
    print("| feature | ok | seconds | problems |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['feature']} | {'yes' if r['ok'] else 'no answer' if r['ok'] is None else 'NO'} | "
              f"{r.get('seconds', '-')} | "
              f"{'; '.join(r['problems'])[:400]} |")
    print(f"disabled for the benchmarks: {','.join(failed) or '(none)'}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "torch": torch.__version__, "results": results, "disabled": failed},
                      fh, indent=1)
    if args.disabled_to:
        with open(args.disabled_to, "w") as fh:
            fh.write(",".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
