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


# Philox4x32-10 (Salmon et al., SC'11; Random123's constants), as csrc/ops/philox.h computes it
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of m * c for c holding uint32 values in int64, without overflow: 16-bit halves."""
    a, b = m * (c & 0xFFFF), m * (c >> 16)          # each < 2^48
    low = a + ((b & 0xFFFF) << 16)                  # < 2^49
    return (b >> 16) + (low >> 32), low & _U32


def philox4x32_10(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (four int64 tensors of uint32 values, broadcast) under a 2-word key: the four
    output words (int64 tensors).  The pure-PyTorch reference of ``csrc/ops/philox.h``."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key[0] & _U32, key[1] & _U32
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_keep(seed: int, n: int, p: float) -> torch.Tensor:
    """Which of n elements (memory order) a ``bias_relu`` call with this seed and ratio keeps: word i % 4 of
    Philox4x32-10(counter (i // 4, 0, 0, 0), key = the seed's two 32-bit halves) >= floor(p * 2^32)."""
    q = torch.arange((n + 3) // 4, dtype=torch.int64)
    words = philox4x32_10((q & _U32, q >> 32, 0, 0), (seed & _U32, (seed >> 32) & _U32))
    threshold = min(int(p * 2.0 ** 32), _U32) if p > 0 else 0
    return torch.stack(words, 1).reshape(-1)[:n] >= threshold


def bias_relu_reference(x: torch.Tensor, bias: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Pure-PyTorch ``bias_relu``: ``F.relu(x + bias)`` (bias at x's dtype), then with ``p > 0`` the dropout
    of the op's mask (:func:`dropout_keep` over the output's memory order, the layout
    ``suggest_memory_format`` gives x) times ``1 / (1 - p)``, dropped units 0."""
    y = F.relu(x + bias.to(x.dtype).view(1, -1, 1, 1))
    if p == 0:
        return y
    N, C, H, W = y.shape
    keep = dropout_keep(seed, y.numel(), p).to(y.device)
    if torch._prims_common.suggest_memory_format(x) == torch.channels_last:
        keep = keep.view(N, H, W, C).permute(0, 3, 1, 2)
    return torch.where(keep.view(N, C, H, W), y * (1.0 / (1.0 - p)), torch.zeros((), dtype=y.dtype, device=y.device))
