"""3x3 convolutions of the share-net: ``winograd_conv2d`` (Winograd F(2x2, 3x3) and F(4x4, 3x3), CPU) vs
``F.conv2d``
(oneDNN's direct convolution), forward and forward+backward, on the layer shapes of the 513x513 test
image at scale 1 (one layer of each channel pair from conv1_1 to conv4_2 at its size, and the attention
head's 3072 -> 512 layer).  The column "auto" says which one ``conv_impl="auto"`` runs for the layer in
inference on this CPU (:func:`attnscale.model.cpu_prefers_onednn`, :func:`attnscale.model.winograd_pays`).

All are timed in interleaved rounds (median of each), so a slow phase of a shared machine hits them
alike, under the entry points' malloc setting (``--default-malloc``: glibc's; timing.tune_malloc).
GFLOP/s are nominal: the direct convolution's 2 * H * W * C * K * 9 multiply-adds, for both, so the
Winograd figures can exceed the machine's FMA peak (they do 16/36 and 9/36 of the multiplies).

    python benchmarks/bench_winograd.py                  # 2 and 1 threads
    python benchmarks/bench_winograd.py --threads 2 --json results/winograd.json
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

from attnscale.model import cpu_prefers_onednn, winograd_pays
from attnscale.ops import require_extension, winograd_conv2d, winograd_weight
from timing import add_malloc_option, interleaved_ms, positive_int, tune_malloc, write_json

# (name, C, K, H=W) at the 513x513 input's scale 1
LAYERS = [
    ("conv1_1", 3, 64, 513),
    ("conv1_2", 64, 64, 513),
    ("conv2_1", 64, 128, 257),
    ("conv2_2", 128, 128, 257),
    ("conv3_1", 128, 256, 129),
    ("conv3_2", 256, 256, 129),
    ("conv4_2", 512, 512, 65),
    ("att_conv1", 3072, 512, 65),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--layers", default="", help="comma-separated names (default all)")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--json", default=None)
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    require_extension()
    wanted = [n for n in args.layers.split(",") if n]
    unknown = [n for n in wanted if n not in {lay[0] for lay in LAYERS}]
    if unknown:
        ap.error(f"--layers: unknown layer(s) {unknown}; known: {', '.join(lay[0] for lay in LAYERS)}")
    layers = [lay for lay in LAYERS if not wanted or lay[0] in wanted]
    env = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "malloc_tuned": tune_malloc(args)}
    print(f"# bench_winograd: {env}")
    rows = []
    for threads in args.threads:
        for name, c, k, hw in layers:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, hw, hw, generator=gen)
            w = torch.randn(k, c, 3, 3, generator=gen) * (2.0 / (9 * c)) ** 0.5
            b = torch.randn(k, generator=gen)
            u2, u4 = winograd_weight(w, 2), winograd_weight(w, 4)
            gflop = 2 * hw * hw * c * k * 9 / 1e9

            def direct():
                with torch.no_grad():
                    F.conv2d(x, w, b, padding=1)

            def wino2():
                with torch.no_grad():
                    winograd_conv2d(x, w, b, 1, weight_winograd=u2)

            def wino4():
                with torch.no_grad():
                    winograd_conv2d(x, w, b, 1, weight_winograd=u4)

            fns = {"direct": direct, "winograd": wino2, "winograd4": wino4}
            if not args.no_backward:
                xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
                g = torch.randn(1, k, hw, hw, generator=gen)

                def direct_fb():
                    F.conv2d(xg, wg, bg, padding=1).backward(g)
                    xg.grad = wg.grad = bg.grad = None

                def wino2_fb():
                    winograd_conv2d(xg, wg, bg, 1, weight_winograd=u2).backward(g)
                    xg.grad = wg.grad = bg.grad = None

                def wino4_fb():
                    winograd_conv2d(xg, wg, bg, 1, weight_winograd=u4).backward(g)
                    xg.grad = wg.grad = bg.grad = None

                fns |= {"direct_fb": direct_fb, "winograd_fb": wino2_fb, "winograd4_fb": wino4_fb}
            ms = interleaved_ms(fns, threads, args.rounds)
            for p in ("fwd", "fwd+bwd"):
                if p == "fwd+bwd" and args.no_backward:
                    continue
                sfx = "" if p == "fwd" else "_fb"
                d, w2, w4 = ms["direct" + sfx], ms["winograd" + sfx], ms["winograd4" + sfx]
                flop = gflop if p == "fwd" else 3 * gflop
                auto = "oneDNN" if p == "fwd+bwd" or cpu_prefers_onednn() or not winograd_pays(c, k, (hw, hw)) else "F(2x2)"
                rows.append({"threads": threads, "layer": name, "C": c, "K": k, "hw": hw, "pass": p,
                             "onednn_ms": d, "winograd_ms": w2, "winograd4_ms": w4, "speedup": d / w2,
                             "speedup4": d / w4, "onednn_gflops": flop / d * 1e3, "auto": auto})
                print(f"  thr {threads} {name:9s} {c:4d}->{k:4d} {hw:3d}px {p:7s}  oneDNN {d:8.1f} ms "
                      f"({flop / d * 1e3:5.0f} GFLOP/s)  F(2x2) {w2:8.1f} ms {d / w2:.2f}x  F(4x4) {w4:8.1f} ms "
                      f"{d / w4:.2f}x  auto: {auto}", flush=True)
    print("\n| threads | layer | C -> K | H=W | pass | oneDNN ms (GFLOP/s) | F(2x2,3x3) ms | speed-up | "
          "F(4x4,3x3) ms | speed-up | auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['layer']} | {r['C']} -> {r['K']} | {r['hw']} | {r['pass']} | "
              f"{r['onednn_ms']:.1f} ({r['onednn_gflops']:.0f}) | {r['winograd_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['winograd4_ms']:.1f} | {r['speedup4']:.2f}x | {r['auto']} |")
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
