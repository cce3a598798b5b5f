"""Switches for our fast paths beside PyTorch's: ``ATTNSCALE_DISABLE`` and the comparison blocks.

``ATTNSCALE_DISABLE`` (environment, comma-separated names of :data:`FEATURES`) turns paths of ours off
where PyTorch has its own for the same values, without a code change: an escape hatch for a kernel that
misbehaves on some GPU, and what ``benchmarks/gpu_proof.sh`` sets from ``benchmarks/gpu_preflight.py``'s
per-feature checks so that one broken kernel (written without a GPU) does not cost the benchmarks of the
others.  Read on every use, so it applies to models built before it was set (but torch.compile reads it
once, while it traces: a compiled model keeps the paths it was traced with); an unknown name is an error
naming the variable.  The test suite clears it (tests/conftest.py): tests choose their paths.

:func:`uses_torch` is what the layers ask; :func:`attnscale.caffe.torch_max_pool` and
:func:`attnscale.caffe.torch_interp` switch pooling and Interp within a block (benchmarks/bench_e2e.py's
comparisons); the model's own features are also its constructor arguments.
"""
from __future__ import annotations

import contextlib
import functools
import os

ENV = "ATTNSCALE_DISABLE"

FEATURES = {
    "pool": "pooling by our kernels (caffe.pool2d: MAX, and AVE on the CPU); off: F.max_pool2d / F.avg_pool2d",
    "interp": "DeepLab's Interp by our kernels (caffe.interp, interp_gather's forward and backward); off: "
              "the index_select path and autograd's index_add_ backward",
    "bias_relu": "a convolution's bias + ReLU in one kernel (the model's fuse_bias_relu); off: the "
                 "convolution with its bias, then F.relu",
    "dropout": "Dropout inside bias_relu (the model's fuse_dropout); off: F.dropout",
    "pad": "conv1_1 on a zero fourth input channel on a GPU (the model's pad_input_channels)",
    "casts": "autocast's weight casts kept between inference forwards (the model's cache_weight_casts)",
}

_BLOCKS = {name: 0 for name in FEATURES}  # open comparison blocks per feature


@functools.lru_cache(maxsize=16)
def _parse(raw: str) -> frozenset:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - FEATURES.keys())
    if unknown:
        raise ValueError(f"{ENV}={raw!r}: unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    return names


def disabled() -> frozenset:
    """The features ``ATTNSCALE_DISABLE`` names (empty when unset)."""
    return _parse(os.environ.get(ENV, ""))


def uses_torch(feature: str) -> bool:
    """Whether ``feature`` is off here: named by ``ATTNSCALE_DISABLE`` or inside a :func:`torch_path` block."""
    return _BLOCKS[feature] > 0 or feature in disabled()


@contextlib.contextmanager
def torch_path(feature: str):
    """Within the block ``feature`` takes PyTorch's path (blocks nest)."""
    if feature not in FEATURES:
        raise ValueError(f"torch_path: unknown feature {feature!r}; known: {', '.join(FEATURES)}")
    _BLOCKS[feature] += 1
    try:
        yield
    finally:
        _BLOCKS[feature] -= 1
