"""Helpers shared by the benchmarks: medians over interleaved rounds (CPU), and the ``--json`` writer.

This machine type drifts by up to +-30 % over minutes, so every variant of a comparison is timed in
rounds (a, b, c, a, b, c, ...) and only ratios of medians from the same run are reported.
"""
from __future__ import annotations

import json
import os
import statistics

import torch.utils.benchmark as tb


def interleaved_ms(fns: dict, threads: int, rounds: int, number: int = 1) -> dict:
    """Median milliseconds per call of each closure in ``fns`` over ``rounds`` interleaved rounds of
    ``number`` calls each (after one warm-up call each), with ``threads`` intra-op threads."""
    timers = {k: tb.Timer("f()", globals={"f": f}, num_threads=threads) for k, f in fns.items()}
    for t in timers.values():
        t.timeit(1)  # warm-up
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            out[k].append(t.timeit(number).median)
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def write_json(path: str, doc: dict) -> None:
    """``--json PATH``: the results, written atomically (temp file, rename), folders created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
