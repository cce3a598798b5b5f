"""Pure-PyTorch references of attnscale's ops (slow, obviously correct, used by tests and
selectable by the model with ``use_reference_ops=True``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
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
    - ``avg``: w_s = 1/S, out = sum_s f_s times float32(1/S) (Caffe Eltwise SUM with coeff 1/S: the
      prototxt's ``coeff`` is a float field, so a ``Net<double>`` multiplies by float32(1/S) as well);
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
        coeff = float(np.float32(1.0 / S))
        out = sum(ups) * coeff
        n = scores[0].shape[0]
        w = torch.full((n, S, h0, w0), coeff, dtype=scores[0].dtype, device=scores[0].device)
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


# --------------------------------------------------------------------------- DenseCRF
def _fast_exp(x: "np.ndarray") -> "np.ndarray":
    """Krähenbühl's fast_exp (the layer's), elementwise in float32 with the original's float literals and
    double comparisons."""
    import numpy as np

    f32 = np.float32
    x = np.asarray(x, dtype=f32)
    negative = x < 0
    a = np.abs(x)
    squarings = np.zeros(x.shape, dtype=np.int64)
    for bound, div, inc in ((0.69 * 8, 8, 3), (0.69 * 4, 4, 2), (0.69, 2, 1)):
        while True:
            m = (a.astype(np.float64) > bound) & (a <= 20)
            if not m.any():
                break
            a = np.where(m, a / f32(div), a)
            squarings += np.where(m, inc, 0)
    p = f32(0.0001413161) * a
    for c in (0.0013298820, 0.0083013598, 0.0416573475, 0.1666653019, 0.4999999206, 0.9999999995):
        p = a * (f32(c) - p)
    e = f32(1) - p
    for _ in range(int(squarings.max(initial=0))):
        e = np.where(squarings > 0, e * e, e)
        squarings -= 1
    with np.errstate(divide="ignore"):
        out = np.where(negative, e, f32(1) / e)
    return np.where(a > 20, f32(0), out).astype(f32)


def _lattice(features: "np.ndarray"):
    """The permutohedral lattice of DeepLab's x86-64 build (csrc/ops/cpu/dense_crf_kernel.cpp's comment):
    per point its d+1 vertex ids (+1; 0 is the missing neighbour) and barycentric weights, and per axis the
    vertices' two blur neighbours.  Vectorised over the points; vertex ids from np.unique, not insertion order
    (the values do not depend on them)."""
    import numpy as np

    f32 = np.float32
    n, d = features.shape
    d1 = d + 1
    pad = (-n) % 4            # the SSE code's last block of four: zero features whose vertices join the lattice
    f = np.concatenate([features.astype(f32), np.zeros((pad, d), f32)])
    inv_std = f32(np.sqrt(2.0 / 3.0) * d1)
    scale = [f32(1.0 / np.sqrt(float((i + 2) * (i + 1))) * float(inv_std)) for i in range(d)]
    down, up = f32(f32(1) / f32(d1)), f32(d1)
    elevated = np.zeros((len(f), d1), f32)
    sm = np.zeros(len(f), f32)
    for j in range(d, 0, -1):
        cf = f[:, j - 1] * scale[j - 1]
        elevated[:, j] = sm - f32(j) * cf
        sm = sm + cf
    elevated[:, 0] = sm
    if not np.all(np.abs(elevated) <= 2.0 ** 20):    # the kernel's bound, before any int conversion
        raise ValueError("dense_crf: a lattice coordinate does not fit DeepLab's 16-bit lattice keys")
    v = np.rint(down * elevated).astype(f32)          # half to even, as cvtps_epi32
    rem0 = v * up
    total = np.zeros(len(f), f32)
    for i in range(d1):
        total = total + v[:, i]
    rank = np.zeros((len(f), d1), np.int64)
    for i in range(d):
        di = elevated[:, i] - rem0[:, i]
        for j in range(i + 1, d1):
            c = di < elevated[:, j] - rem0[:, j]
            rank[:, i] += c
            rank[:, j] += ~c
    rank += total.astype(np.int64)[:, None]
    low, high = rank < 0, rank >= d1
    rank = rank + d1 * low - d1 * high
    rem0 = rem0 + up * low.astype(f32) - up * high.astype(f32)
    bary = np.zeros((len(f), d + 2), f32)
    rows = np.arange(len(f))
    for i in range(d1):
        w = (elevated[:, i] - rem0[:, i]) * down
        bary[rows, d - rank[:, i]] += w
        bary[rows, d - rank[:, i] + 1] -= w
    bary[:, 0] += f32(1) + bary[:, d + 1]
    r = np.arange(d1)
    canon = np.where(rank[:, None, :d] <= d - r[None, :, None], r[None, :, None], r[None, :, None] - d1)
    keys = (rem0[:, None, :d].astype(np.int64) + canon).reshape(-1, d)     # (points * (d+1), d)
    if keys.size and (keys.min() < -32768 or keys.max() > 32767):
        raise ValueError("dense_crf: a lattice coordinate does not fit DeepLab's 16-bit lattice keys")
    verts, ids = np.unique(keys, axis=0, return_inverse=True)
    ids = ids.reshape(len(f), d1)[:n] + 1
    neighbours = []
    for j in range(d1):
        n1, n2 = verts - 1, verts + 1
        if j < d:
            n1[:, j], n2[:, j] = verts[:, j] + d, verts[:, j] - d
        pair = []
        for q in (n1, n2):
            allk, inv = np.unique(np.concatenate([verts, q]), axis=0, return_inverse=True)
            slot = np.full(len(allk), -1)
            slot[inv[:len(verts)]] = np.arange(len(verts))
            pair.append(slot[inv[len(verts):]] + 1)
        neighbours.append(pair)
    return ids, bary[:n, :d1], neighbours, len(verts), d


def _lattice_filter(lat, values: "np.ndarray") -> "np.ndarray":
    """Splat (pixel order), blur along the d+1 axes, slice: the lattice's Gaussian filter of values (n, c)."""
    import numpy as np

    f32 = np.float32
    ids, bary, neighbours, nv, d = lat
    n, c = values.shape
    grid = np.zeros((nv + 1, c), f32)
    order = ids.reshape(-1)                                # pixel-major, then the d+1 vertices: the C++ order
    np.add.at(grid, order, (bary.reshape(-1, 1) * np.repeat(values, d + 1, axis=0)).astype(f32))
    for n1, n2 in neighbours:
        new = grid.copy()
        new[1:] = grid[1:] + f32(0.5) * (grid[n1] + grid[n2])
        grid = new
    alpha = f32(f32(1) / (f32(1) + f32(2.0 ** -d)))
    out = np.zeros((n, c), f32)
    for r in range(d + 1):
        out = out + (bary[:, r] * alpha)[:, None] * grid[ids[:, r]]
    return out


def _exp_normalize(x: "np.ndarray", scale: float) -> "np.ndarray":
    import numpy as np

    f32 = np.float32
    s = f32(scale) * x
    e = _fast_exp(s - s.max(axis=1, keepdims=True))
    total = np.zeros(len(x), f32)
    for j in range(x.shape[1]):           # label order, as the layer sums
        total = total + e[:, j]
    return e / total[:, None]


def dense_crf_reference(unary: torch.Tensor, image: torch.Tensor | None, max_iter: int, pos_w: Sequence[float],
                        pos_xy_std: Sequence[float], bi_w: Sequence[float] = (), bi_xy_std: Sequence[float] = (),
                        bi_rgb_std: Sequence[float] = ()) -> torch.Tensor:
    """DeepLab's DenseCRF layer on a unary (N, M, H, W) and image (N, 3, H, W) in numpy float32, vectorised
    (slow: for tests); the same values as ``torch.ops.attnscale.dense_crf`` bit for bit.  Arguments are
    those of :func:`attnscale.ops.dense_crf.dense_crf`, assumed valid."""
    import numpy as np

    f32 = np.float32
    u_all = unary.detach().cpu().numpy().astype(f32)
    if np.isnan(u_all).any() or (u_all == -np.inf).any() or np.isinf(u_all).all(axis=1).any():
        raise ValueError("dense_crf: unary holds NaN or -inf, or a pixel where no label is possible (the op's checks)")
    N, M, H, W = u_all.shape
    ys, xs = np.divmod(np.arange(H * W), W)
    out = np.zeros_like(u_all)
    for b in range(N):
        pots = []
        kernels = [(w, s, None) for w, s in zip(pos_w, pos_xy_std)]
        if image is not None:
            kernels += list(zip(bi_w, bi_xy_std, bi_rgb_std))
        for w, s, rgb in kernels:
            cols = [xs.astype(f32) / f32(s), ys.astype(f32) / f32(s)]
            if rgb is not None:
                im = image[b].detach().cpu().numpy().astype(f32).reshape(3, -1)
                cols += [im[ch] / f32(rgb) for ch in range(3)]
            lat = _lattice(np.stack(cols, axis=1))
            norm = f32(1) / (_lattice_filter(lat, np.ones((H * W, 1), f32))[:, 0] + f32(1e-20))
            pots.append((lat, f32(w), norm))
        u = u_all[b].reshape(M, -1).T
        q = _exp_normalize(u, -1.0)
        for _ in range(max_iter):
            nxt = -u
            for lat, w, norm in pots:
                nxt = nxt + (w * norm)[:, None] * _lattice_filter(lat, q)
            q = _exp_normalize(nxt, 1.0)
        out[b] = q.T.reshape(M, H, W)
    return torch.from_numpy(out)
