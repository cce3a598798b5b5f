"""Helpers shared by the benchmarks: medians over interleaved rounds (CPU), the ``--json`` writer,
environment variables set for a block, and the allocator setting of the CPU benchmarks.

This machine type drifts by up to +-30 % over minutes, so every variant of a comparison is timed in
rounds (a, b, c, a, b, c, ...) and only ratios of medians from the same run are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import math
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


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of threads, rounds, repetitions, pixels), else a usage error."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0, else a usage error."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def add_malloc_option(ap) -> None:
    """``--default-malloc`` on a benchmark's argument parser (see :func:`tune_malloc`)."""
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc's settings alone (default: attnscale.malloc.keep_freed_memory, as the "
                         "train / evaluate / reproduce entry points)")


def tune_malloc(args) -> bool:
    """The CPU benchmarks time what the product's entry points run: under
    :func:`attnscale.malloc.keep_freed_memory`, unless ``--default-malloc``.  With glibc's defaults every large
    output is a fresh ``mmap`` whose page faults are timed with the kernel that writes it (oneDNN's 64 -> 64
    convolution at 513x513: 46 ms tuned, about 100 ms not).  Returns whether the setting took."""
    from attnscale.malloc import keep_freed_memory
    return not args.default_malloc and keep_freed_memory()


def write_json(path: str, doc: dict, quiet: bool = False) -> None:
    """``--json PATH``: the results as strict JSON (NaN as null), written atomically (temp file,
    rename), folders created (``attnscale.evaluate.write_json``)."""
    from attnscale.evaluate import write_json as write
    write(path, doc)
    if not quiet:
        print(f"wrote {path}")


@contextlib.contextmanager
def environ(values: dict):
    """Environment variables set for a block, then restored: the CUDA kernels' knobs
    (ATTNSCALE_MERGE_BACKWARD, ATTNSCALE_MERGE_LOGIT_GROUPS), which the C++ glue reads at every call."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
