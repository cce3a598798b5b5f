"""``attnscale.ops.dense_crf``: DeepLab's ``DenseCRF`` layer (the fully connected CRF of Krähenbühl & Koltun,
NIPS 2011, which DeepLab-CRF runs after its net), CPU only and forward only, as the layer.

``dense_crf(unary, image, max_iter, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std)`` takes the layer's unary
(the negated scores, (N, M, H, W) float32) and the image it reads its colours from ((N, 3,
H, W), the data blob: mean-subtracted BGR), and returns the label marginals after ``max_iter`` mean-field
steps.  The Gaussian filters run on the permutohedral lattice in the arithmetic of an x86-64 build of
DeepLab's Caffe (csrc/ops/cpu/dense_crf_kernel.cpp); :func:`attnscale.ops.reference.dense_crf_reference`
computes the same values (bit for bit, tested) with numpy.  Most callers want :func:`attnscale.crf.dense_crf`,
which computes the unary from scores and takes a :class:`~attnscale.crf.CRFParams`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._ext import has_extension, register_forward_only, require_extension

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED or not has_extension():
        return

    @torch.library.register_fake("attnscale::dense_crf")
    def _fake(unary, image, max_iter, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std):
        torch._check(unary.dim() == 4, lambda: f"dense_crf: unary must be 4-D, got {tuple(unary.shape)}")
        return torch.empty_like(unary, memory_format=torch.contiguous_format)

    register_forward_only("dense_crf", "nothing: DeepLab's DenseCRF layer has no backward either")
    _REGISTERED = True


_register()


def dense_crf(unary: torch.Tensor, image: torch.Tensor | None, max_iter: int, pos_w: Sequence[float],
              pos_xy_std: Sequence[float], bi_w: Sequence[float] = (), bi_xy_std: Sequence[float] = (),
              bi_rgb_std: Sequence[float] = ()) -> torch.Tensor:
    """The op (``torch.ops.attnscale.dense_crf``); every argument is checked there (dtype, shapes,
    contiguity, one value per kernel in each list, positive standard deviations, no NaN)."""
    require_extension()
    return torch.ops.attnscale.dense_crf(unary, image, int(max_iter), [float(v) for v in pos_w],
                                         [float(v) for v in pos_xy_std], [float(v) for v in bi_w],
                                         [float(v) for v in bi_xy_std], [float(v) for v in bi_rgb_std])
