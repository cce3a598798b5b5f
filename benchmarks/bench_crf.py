"""DeepLab's DenseCRF (``attnscale.crf.dense_crf``, the C++ kernel ``attnscale.ops.dense_crf``) on the CPU, with
DeepLab-LargeFOV's parameters (10 mean-field steps, Potts on position and on position + colour), 21 labels:

  voc     a VOC-size image, 500x375: what ``predict(crf=...)`` adds to each image of an evaluation
  small   125x94, where the numpy twin (``attnscale.ops.reference.dense_crf_reference``, the same values
          bit for bit; the only other implementation a user can run today: pydensecrf does not build on
          current Python) is timed beside it

The image is a smooth synthetic photo (blurred colour blocks + noise: the lattice of a random-noise image is
several times larger than a real image's); the scores are random.  Medians of interleaved rounds
(benchmarks/timing.py), the lattice construction included (the layer builds it for every image).

    python benchmarks/bench_crf.py [--threads 2 1] [--rounds 3] [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's attnscale

from attnscale import caffe
from attnscale.crf import CRFParams, dense_crf
from attnscale.ops import require_extension
from timing import add_malloc_option, interleaved_ms, positive_int, tune_malloc, write_json


def synthetic_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    blocks = (rng.random((h // 25 + 1, w // 25 + 1, 3)) * 255).astype(np.float32)
    img = cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)
    img = cv2.GaussianBlur(img, (0, 0), 3) + rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="small images (a check that it runs)")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    require_extension()
    env = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "malloc_tuned": tune_malloc(args)}
    print(f"# bench_crf: {env}")
    params = CRFParams()
    rows = []
    sizes = (("voc", (47, 63)), ("small", (24, 32))) if args.quick else (("voc", (375, 500)), ("small", (94, 125)))
    for case, (h, w) in sizes:
        image = caffe.preprocess_bgr(synthetic_photo(h, w))
        scores = torch.randn(1, 21, h, w, generator=torch.Generator().manual_seed(0)) * 3
        fns = {"ours": lambda: dense_crf(scores, image, params)}
        if case == "small":
            assert torch.equal(dense_crf(scores, image, params), dense_crf(scores, image, params, use_reference=True))
            fns["numpy"] = lambda: dense_crf(scores, image, params, use_reference=True)
        for threads in args.threads:
            ms = interleaved_ms(fns, threads, args.rounds)
            row = {"case": case, "size": [h, w], "threads": threads, **ms}
            if "numpy" in ms:
                row["vs_numpy"] = ms["numpy"] / ms["ours"]
            rows.append(row)
            extra = f"  numpy twin {ms['numpy']:9.1f} ms ({row['vs_numpy']:.0f}x)" if "numpy" in ms else ""
            print(f"  {case:5s} {h}x{w} thr {threads}: ours {ms['ours']:8.1f} ms{extra}", flush=True)
    print("\n| image | threads | dense_crf ms | numpy twin ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        tw = f"{r['numpy']:.0f} | {r['vs_numpy']:.0f}x" if "numpy" in r else "– | –"
        print(f"| {r['case']} {r['size'][1]}x{r['size'][0]} | {r['threads']} | {r['ours']:.1f} | {tw} |")
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
