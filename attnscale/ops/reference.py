"""Pure-PyTorch references of attnscale's ops (slow, obviously correct, used by tests and
selectable by the model with ``use_reference_ops=True``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MODES = ("attention", "avg", "max")


def scale_merge_reference(scores: Sequence[torch.Tensor], logits: torch.Tensor | None = None,
                          mode: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`attnscale.ops.scale_merge`.

    Every coarser score map is resized to scale 0's size with DeepLab's ``Interp`` rule, i.e.
    bilinear with aligned corners (src = dst * (in-1)/(out-1)), which is
    ``F.interpolate(align_corners=True)``.  Then

    - ``attention``: w = softmax over scales of ``logits`` (computed in fp32, fp64 for fp64 inputs),
      out = sum_s w_s f_s;
    - ``avg``: w_s = 1/S, out = mean_s f_s (Caffe Eltwise SUM with coeff 1/S);
    - ``max``: out = max_s f_s with the tie rule of Caffe's CPU ``EltwiseLayer`` (MAX): scale 1 wins
      over scale 0 unless scale 0 is strictly greater (``a > b ? 0 : 1``), and every later scale
      wins only if strictly greater, so the gradient reaches exactly one scale.  (Caffe's GPU
      kernel differs: there a tie goes to the last tied bottom.)  The returned weights are, per pixel, the fraction of
      the C classes whose maximum came from each scale (what a max-merge "attends" to).

    Returns ``(merged (N,C,H0,W0), weights (N,S,H0,W0))``.
    """
    if mode not in MODES:
        raise ValueError(f"scale_merge: mode must be one of {MODES}, got {mode!r}")
    if len(scores) == 0:
        raise ValueError("scale_merge: scores is an empty list")
    h0, w0 = scores[0].shape[-2:]
    ups = [scores[0]] + [
        F.interpolate(s, size=(h0, w0), mode="bilinear", align_corners=True) for s in scores[1:]
    ]
    S = len(ups)
    if mode == "attention":
        if logits is None:
            raise ValueError("scale_merge: mode='attention' needs logits (N, S, H0, W0)")
        # fp32 for half/bfloat16/float32 logits, fp64 for fp64 (as the kernels)
        w = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1).to(scores[0].dtype)
        out = sum(w[:, s:s + 1] * ups[s] for s in range(S))
        return out, w
    if mode == "avg":
        out = sum(ups) / S
        n = scores[0].shape[0]
        w = torch.full((n, S, h0, w0), 1.0 / S, dtype=scores[0].dtype, device=scores[0].device)
        return out, w
    out = ups[0]
    idx = torch.zeros_like(ups[0], dtype=torch.long)
    for s in range(1, S):
        # Caffe's CPU EltwiseLayer: bottom 1 wins over bottom 0 unless bottom 0 is greater
        # (``a > b ? 0 : 1``); a later bottom wins only if strictly greater
        greater = ~(out > ups[s]) if s == 1 else ups[s] > out
        out = torch.where(greater, ups[s], out)
        idx = torch.where(greater, torch.full_like(idx, s), idx)
    w = torch.stack([(idx == s).to(out.dtype).mean(1) for s in range(S)], dim=1)
    return out, w


def dilated_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             dilation: int = 12, padding: int = 12) -> torch.Tensor:
    """Reference of :func:`attnscale.ops.dilated_conv2d`: stride-1 ``F.conv2d`` (Caffe Convolution
    with ``dilation`` and ``pad``; zero padding)."""
    return F.conv2d(x, weight, bias, stride=1, padding=padding, dilation=dilation)
