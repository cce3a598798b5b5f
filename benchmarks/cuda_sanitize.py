"""One forward and one backward of every CUDA op, small shapes, for ``compute-sanitizer`` (issue 7):

    compute-sanitizer --tool memcheck  python3 benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck python3 benchmarks/cuda_sanitize.py

scale_merge in its three modes (float32, bfloat16, float16; exact and inexact Interp ratios, a map of the
same size as scale 0; in float32 also the backward's pixel layout, with a ratio below 1/2 too, and 32 logit
lanes per pixel) and dilated_conv2d (fc6's dilation 12 at 21x21 and a small odd case; both implementations,
the GEMM path and the direct kernels, in float32 with TF32 and exact, bfloat16, float16, float64), each with
every input requiring a gradient; and caffe_max_pool2d (inference) with the training pair
caffe_max_pool2d_with_mask / caffe_max_pool2d_backward (pool1's and pool4's geometry, NCHW and
channels_last, every dtype); bias_relu (forward and backward, vectorised and scalar paths, both layouts,
every dtype); and caffe_interp with caffe_interp_backward (both layouts, every dtype).  After each op it
synchronises (a kernel fault surfaces at the op that made it)
and compares with the CPU kernels run on the same values (inputs rounded to the GPU side's dtype),
loosely (the tests do it exactly), so that a launch that silently wrote nothing is caught too.  Exits 1
on any mismatch.  ``--cpu-dry-run`` runs the same script with the CPU kernels on both sides, so that CI
keeps it working.  Run memcheck with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (gpu_proof.sh does): inside
the caching allocator's 2 MB blocks a small overrun lands in memory that is allocated and goes unseen.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale import caffe
from attnscale.ops import bias_relu, dilated_conv2d, has_cuda_kernels, scale_merge
from attnscale.ops.interp import caffe_interp
from attnscale.ops.pooling import caffe_max_pool2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, also when imported by a test
from timing import environ  # noqa: E402

DEV = "cuda"  # "cpu" with --cpu-dry-run
HALF = (torch.float16, torch.bfloat16)


def dev_dtype(dev: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of one side: the CPU kernels take float32 or float64 (the reference side, a dry run)."""
    return dtype if dev == "cuda" or dtype == torch.float64 else torch.float32


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``'s values as the GPU side holds them (rounded to ``dtype``), so that both sides compute on
    the same inputs: otherwise rounding alone can flip which scale wins a max merge."""
    return t.to(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32)


def leaf(t: torch.Tensor, dev: str, dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf copy of ``t`` on one side: its own ``.grad``, never shared with the other side's
    (``t.to`` returns ``t`` itself when nothing changes, and a non-leaf once ``t`` requires grad)."""
    return t.detach().to(dev, dev_dtype(dev, dtype), copy=True).requires_grad_()


def on_side(t: torch.Tensor, dev: str, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A copy of ``t`` for one side of the comparison, in that side's dtype and in the layout under test."""
    t = t.to(dev, dev_dtype(dev, dtype), copy=True)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def report(failures: list, name: str, bad: list) -> None:
    failures.extend(f"{name}: output {i} differs from the CPU kernel" for i in bad)
    print(f"{'FAIL' if bad else 'ok  '}{name}", flush=True)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def close(a: torch.Tensor | None, b: torch.Tensor | None, tol: float) -> bool:
    if a is None or b is None:  # a gradient that was never written
        return False
    a, b = a.double().cpu(), b.double().cpu()
    return bool(torch.isfinite(a).all()) and (a - b).norm().item() <= tol * max(b.norm().item(), 1e-30)


def check_scale_merge(failures: list) -> None:
    for sizes in ((9, 7, 5), (8, 6, 5), (13, 13, 7)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
            for mode in ("attention", "avg", "max"):
                merge_case(failures, sizes, dtype, tol, mode)
        # the backward's other layout (a thread per pixel and class chunk) and its widest logit lane groups
        for mode in ("attention", "avg"):
            merge_case(failures, sizes, torch.float32, 1e-5, mode, {"ATTNSCALE_MERGE_BACKWARD": "pixel"})
        merge_case(failures, sizes, torch.float32, 1e-5, "attention", {"ATTNSCALE_MERGE_LOGIT_GROUPS": "32"})
    # ratios below 1/2: the pixel layout's wide-footprint path
    for mode in ("attention", "avg"):
        merge_case(failures, (13, 9, 4), torch.float32, 1e-5, mode, {"ATTNSCALE_MERGE_BACKWARD": "pixel"})


def merge_case(failures: list, sizes, dtype, tol, mode, env=None) -> None:
    """One forward and backward of scale_merge on both sides, under the environment variables ``env``
    (the CUDA backward's knobs; the CPU kernels ignore them)."""
    env = env or {}
    with environ(env):
        gen = torch.Generator().manual_seed(0)
        cpu = [rounded(torch.randn(2, 5, h, h + 1, generator=gen), dtype) for h in sizes]
        lg = rounded(torch.randn(2, len(sizes), sizes[0], sizes[0] + 1, generator=gen), dtype)
        g = rounded(torch.randn(2, 5, sizes[0], sizes[0] + 1, generator=gen), dtype)
        res = {}
        for side, dev in (("ref", "cpu"), ("dev", DEV)):
            sc = [leaf(t, dev, dtype) for t in cpu]
            lgd = leaf(lg, dev, dtype)
            out, w = scale_merge(sc, lgd if mode == "attention" else None, mode)
            out.backward(g.to(dev, out.dtype))
            sync(dev)
            res[side] = [out, w] + [t.grad for t in sc] + ([lgd.grad] if mode == "attention" else [])
    # max: a near-tie in the merged values may still pick another scale for the gradients in low precision;
    # the tests check them
    knobs = "".join(f" {k}={v}" for k, v in env.items())
    report(failures, f"scale_merge {mode} {dtype} {sizes}{knobs}",
           [i for i, (a, b) in enumerate(zip(res["dev"], res["ref"]))
            if not (mode == "max" and i > 1) and not close(a, b, tol)])


def check_dilated_conv(failures: list) -> None:
    fc6, odd = (1, 32, 24, 21, 21, 12), (2, 5, 7, 9, 11, 3)
    # (shape, dtype, tolerance, TF32): each CUDA kernel path once at fc6's geometry, for both
    # implementations (ATTNSCALE_DILATED_CONV_ALGO: the GEMM path's copy kernels + cuBLAS, and the
    # hand-written kernels)
    cases = ((fc6, torch.float32, 5e-3, True), (fc6, torch.float32, 1e-5, False), (fc6, torch.bfloat16, 3e-2, True),
             (fc6, torch.float16, 5e-3, True), (fc6, torch.float64, 1e-10, True), (odd, torch.float32, 5e-3, True))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for algo in ("gemm", "direct"):
        for (n, c, k, h, w, d), dtype, tol, allow_tf32 in cases:
            gen = torch.Generator().manual_seed(1)
            x = rounded(torch.randn(n, c, h, w, generator=gen), dtype)
            wt = rounded(torch.randn(k, c, 3, 3, generator=gen) * 0.1, dtype)
            b = rounded(torch.randn(k, generator=gen), dtype)
            gy = rounded(torch.randn(n, k, h, w, generator=gen), dtype)
            res = {}
            # the CUDA float32 paths' choice (TF32 or exact): cuDNN's flag for the hand-written
            # kernels, cuBLAS's for the GEMM path
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            try:
                for side, dev in (("ref", "cpu"), ("dev", DEV)):
                    with environ({"ATTNSCALE_DILATED_CONV_ALGO": algo if side == "dev" else "direct"}):
                        xs, ws, bs = (leaf(t, dev, dtype) for t in (x, wt, b))
                        y = dilated_conv2d(xs, ws, bs, dilation=d, padding=d)
                        y.backward(gy.to(dev, y.dtype))
                        sync(dev)
                    res[side] = [y, xs.grad, ws.grad, bs.grad]
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            report(failures, f"dilated_conv2d {algo} {dtype}{'' if allow_tf32 or dtype != torch.float32 else ' no-TF32'} "
                   f"{(n, c, k, h, w, d)}",
                   [i for i, (a, e) in enumerate(zip(res["dev"], res["ref"])) if not close(a, e, tol)])


def check_max_pool(failures: list) -> None:
    """caffe_max_pool2d (inference) and the training pair caffe_max_pool2d_with_mask / _backward: DeepLab's
    pool1 geometry (3, 2, 1) and pool4's (3, 1, 1) on odd sizes, NCHW and channels_last (with 16 channels:
    the kernels that take 16 bytes of channels per thread), every CUDA dtype; the maximum is an input value
    and the mask an offset, so exact; the gradient loosely."""
    for (k, s, p) in ((3, 2, 1), (3, 1, 1)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for channels_last, C in ((False, 5), (True, 5), (True, 16)):
                gen = torch.Generator().manual_seed(2)
                x = rounded(torch.randn(2, C, 13, 10, generator=gen), dtype)
                oh, ow = caffe.pool_output_shape((13, 10), k, s, p)
                grad = rounded(torch.randn(2, C, oh, ow, generator=gen), dtype)
                res = {}
                for side, dev in (("ref", "cpu"), ("dev", DEV)):
                    xs = on_side(x, dev, dtype, channels_last)
                    out, mask = torch.ops.attnscale.caffe_max_pool2d_with_mask(xs, k, s, p, oh, ow)
                    g = grad.to(dev, out.dtype)
                    gx = torch.ops.attnscale.caffe_max_pool2d_backward(g, mask, k, s, p, 13, 10)
                    res[side] = [caffe_max_pool2d(xs, k, s, p, (oh, ow)), out, mask.float(), gx]
                    sync(dev)
                report(failures, f"caffe_max_pool2d (+ with_mask, backward) {dtype} {(k, s, p)} C={C}"
                       f"{' channels_last' if channels_last else ''}",
                       [i for i, (a, e) in enumerate(zip(res["dev"], res["ref"]))
                        if not close(a, e, 0.0 if i < 3 else 1e-2)])


def check_bias_relu(failures: list) -> None:
    """bias_relu forward and backward (through autograd: the masked gradient and the bias gradient's partial
    sums): 64 channels (vectorised in both layouts) and 21 channels at 5x7 (scalar paths), NCHW and
    channels_last, every CUDA dtype (the half types with a float32 bias), without and with the fused dropout
    (the same seed on both sides: the same Philox mask)."""
    for shape, p in itertools.product(((2, 64, 9, 8), (3, 21, 5, 7)), (0.0, 0.5)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for channels_last in (False, True):
                gen = torch.Generator().manual_seed(3)
                x = rounded(torch.randn(shape, generator=gen), dtype)
                b = rounded(torch.randn(shape[1], generator=gen), dtype)
                gy = rounded(torch.randn(shape, generator=gen), dtype)
                res = {}
                for side, dev in (("ref", "cpu"), ("dev", DEV)):
                    # a half-type map takes its bias in float32 (autocast's case: the values are the rounded ones)
                    xs, bs = leaf(x, dev, dtype), leaf(b, dev, torch.float32 if dtype in HALF else dtype)
                    if channels_last:
                        xs = xs.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                    y = bias_relu(xs, bs, p, seed=7)
                    y.backward(gy.to(dev, y.dtype))
                    sync(dev)
                    res[side] = [y, xs.grad, bs.grad]
                # the CPU side sums in float32 without rounding to the half type: y loosely there; the
                # masked gradient is a copy of gy's (rounded) values, exact
                exact_y = dtype in (torch.float32, torch.float64)
                report(failures, f"bias_relu {dtype} {shape} p={p}{' channels_last' if channels_last else ''}",
                       [i for i, (a, e), tol in zip(range(3), zip(res["dev"], res["ref"]),
                                                    (0.0 if exact_y else 1e-2, 0.0, 1e-2)) if not close(a, e, tol)])


def check_interp(failures: list) -> None:
    """caffe_interp and caffe_interp_backward (interp_gather's forward and backward on a GPU): the attention
    head's 31 -> 41 and a shrink 13x10 -> 7x9, NCHW and channels_last (with 16 channels: the kernels that take
    16 bytes of channels per thread), every CUDA dtype, the backward's gradient dense and a channel slice; exact
    in float32 / float64 (the CPU kernels' arithmetic), loosely for the half types (rounded on the GPU only)."""
    for (h, w), (oh, ow) in (((31, 21), (41, 41)), ((13, 10), (7, 9))):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for channels_last, C in ((False, 5), (True, 5), (True, 16)):
                gen = torch.Generator().manual_seed(4)
                x = rounded(torch.randn(2, C, h, w, generator=gen), dtype)
                grad = rounded(torch.randn(2, C, oh, ow, generator=gen), dtype)
                res = {}
                for side, dev in (("ref", "cpu"), ("dev", DEV)):
                    xs = on_side(x, dev, dtype, channels_last)
                    tables = (caffe.host_constants(caffe._interp_adjoint_tables, h, oh, dtype, device=dev)
                              + caffe.host_constants(caffe._interp_adjoint_tables, w, ow, dtype, device=dev))
                    g = on_side(grad, dev, dtype, channels_last)
                    # and the gradient as a channel slice of a wider one (read in place through its strides)
                    # (at channel 8 of 16 + C + 8 for C = 16: aligned, so the vector kernel)
                    lo = 2 if C == 5 else 8
                    wide = on_side(torch.cat([grad[:, :lo], grad, grad[:, :lo]], 1), dev, dtype, channels_last)
                    res[side] = [caffe_interp(xs, (oh, ow)), torch.ops.attnscale.caffe_interp_backward(g, *tables),
                                 torch.ops.attnscale.caffe_interp_backward(wide[:, lo:lo + C], *tables)]
                    sync(dev)
                tol = 0.0 if dtype in (torch.float32, torch.float64) else 1e-2
                report(failures, f"caffe_interp {dtype} {(h, w)}->{(oh, ow)} C={C}"
                       f"{' channels_last' if channels_last else ''}",
                       [i for i, (a, e) in enumerate(zip(res["dev"], res["ref"])) if not close(a, e, tol)])


def main(argv=None) -> int:
    global DEV
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv == ["--cpu-dry-run"]:
        DEV = "cpu"
    elif argv:
        print(f"cuda_sanitize: unknown arguments {argv} (only --cpu-dry-run)", file=sys.stderr)
        return 2
    elif not (torch.cuda.is_available() and has_cuda_kernels()):
        print("cuda_sanitize: needs a CUDA GPU and attnscale built with its CUDA kernels "
              "(pip install -e . --no-build-isolation with a CUDA torch and nvcc)", file=sys.stderr)
        return 2
    failures: list[str] = []
    check_scale_merge(failures)
    check_dilated_conv(failures)
    check_max_pool(failures)
    check_bias_relu(failures)
    check_interp(failures)
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
