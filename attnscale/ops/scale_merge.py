"""Fused scale merge op (placeholder until csrc/ops/scale_merge.cpp lands)."""
from __future__ import annotations

from ._ext import require_extension


def scale_merge(scores, logits=None, mode="attention"):
    require_extension()
    raise NotImplementedError("scale_merge kernel not built yet")
