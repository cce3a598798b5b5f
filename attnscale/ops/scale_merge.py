"""Fused scale merge: on-the-fly DeepLab ``Interp`` + attention / average / max over scales.

``torch.ops.attnscale.scale_merge`` (C++/CUDA, csrc/ops/scale_merge.cpp) with its backward
``torch.ops.attnscale.scale_merge_backward`` and its autograd kernel (C++,
csrc/ops/autograd/scale_merge_autograd.cpp); this module adds the fake (meta) kernels, the
double-backward error and a friendly Python entry point :func:`scale_merge`.

Semantics (the spec is :func:`attnscale.ops.reference.scale_merge_reference`):

- ``scores``: S tensors (N, C, H_s, W_s), scale 0 the finest; every coarser map is resized to
  (H_0, W_0) with DeepLab's Interp layer (bilinear, aligned corners, the source coordinate
  ``dst * float(in-1)/(out-1)`` computed in float as Caffe does), on the fly, never materialised.
- ``mode="attention"``: w = softmax over scales of ``logits`` (N, S, H_0, W_0), max-subtracted,
  computed in fp32 (fp64 for fp64 inputs); out = sum_s w_s up(f_s).
- ``mode="avg"``: w_s = 1/S (Caffe Eltwise SUM with coeff 1/S).
- ``mode="max"``: Caffe Eltwise MAX with the tie rule of Caffe's CPU layer: scale 1 wins over
  scale 0 unless scale 0 is strictly greater (``a > b ? 0 : 1``), every later scale only if strictly
  greater, so the gradient reaches exactly one scale.  (Caffe's GPU kernel gives a tie to the last
  tied bottom instead.)  The returned weights are, per pixel, the fraction of the C classes whose maximum came from
  each scale.  The backward recomputes the winning scale with the forward's own routines
  (bit-identical values), so nothing but the inputs is saved.

Returns ``(merged (N, C, H_0, W_0), weights (N, S, H_0, W_0))``.  The backward is a gather through
the inverse Interp mapping (no atomics): deterministic on CPU and CUDA.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._ext import has_extension, require_extension

MODES = ("attention", "avg", "max")


def _check_python_side(scores, logits, mode) -> list[torch.Tensor]:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"scale_merge: mode must be one of {MODES}, got {mode!r}")
    if isinstance(scores, torch.Tensor) or not isinstance(scores, (list, tuple)):
        raise TypeError("scale_merge: scores must be a list of S tensors (N, C, H_s, W_s), "
                        f"got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError("scale_merge: scores is an empty list (need at least one scale)")
    for i, s in enumerate(scores):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"scale_merge: scores[{i}] must be a tensor, got {type(s).__name__}")
        if s.device != scores[0].device:
            raise ValueError(f"scale_merge: scores[{i}] is on {s.device} but scores[0] is on "
                             f"{scores[0].device} (mixed devices)")
    if mode == "attention":
        if logits is None:
            raise ValueError("scale_merge: mode='attention' needs logits of shape (N, S, H0, W0)")
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"scale_merge: logits must be a tensor, got {type(logits).__name__}")
        if logits.device != scores[0].device:
            raise ValueError(f"scale_merge: logits is on {logits.device} but scores[0] is on "
                             f"{scores[0].device} (mixed devices)")
    return list(scores)


def _check_fake(scores, logits, mode) -> None:
    """The C++ kernels' checks (csrc/ops/scale_merge.cpp), for the fake kernels: tracing must refuse what
    running refuses, and a mixed device call (e.g. CPU and meta) must not reach the meta kernel."""
    _check_python_side(scores, logits, mode)
    s0 = scores[0]
    torch._check(s0.dim() == 4 and s0.is_floating_point(),
                 lambda: f"scale_merge: scores[0] must be a 4-D floating-point tensor, got {s0.dim()}-D {s0.dtype}")
    n, c, h, w = s0.shape
    for i, s in enumerate(scores):
        torch._check(s.dim() == 4 and s.dtype == s0.dtype and s.shape[0] == n and s.shape[1] == c
                     and s.shape[2] <= h and s.shape[3] <= w,
                     lambda: f"scale_merge: scores[{i}] must be ({n}, {c}, <= {h}, <= {w}) {s0.dtype}, got "
                     f"{tuple(s.shape)} {s.dtype}")
    if mode == "attention":
        torch._check(tuple(logits.shape) == (n, len(scores), h, w) and logits.dtype == s0.dtype,
                     lambda: f"scale_merge: logits must be ({n}, {len(scores)}, {h}, {w}) {s0.dtype}, got "
                     f"{tuple(logits.shape)} {logits.dtype}")


def _autocast_inputs(scores, logits):
    """Inside ``torch.autocast`` the score maps come from autocast convolutions (bf16/fp16) while other
    inputs may be fp32: merge them all in the widest dtype among them (on CPU at least float32, the
    CPU kernels' dtype).  Outside autocast, inputs are passed through and mixed dtypes are an error."""
    if len(scores) == 0 or not isinstance(scores[0], torch.Tensor):
        return scores, logits
    device_type = scores[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return scores, logits
    dt = torch.float32 if device_type == "cpu" else scores[0].dtype
    for t in list(scores) + ([logits] if logits is not None else []):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    scores = [s.to(dt) if isinstance(s, torch.Tensor) and s.is_floating_point() else s for s in scores]
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        logits = logits.to(dt)
    return scores, logits


def scale_merge(scores: Sequence[torch.Tensor], logits: torch.Tensor | None = None,
                mode: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge multi-scale score maps at scale 0's resolution (see the module docstring).

    Args:
        scores: S score maps (N, C, H_s, W_s); scale 0 is the finest, no map may be larger.
        logits: (N, S, H_0, W_0) attention logits (required for ``mode="attention"``, ignored
            otherwise).
        mode: ``"attention"`` | ``"avg"`` | ``"max"``.

    Returns:
        ``(merged (N, C, H_0, W_0), weights (N, S, H_0, W_0))``.
    """
    require_extension()
    scores, logits = _autocast_inputs(scores, logits)
    scores = _check_python_side(scores, logits, mode)
    if mode != "attention":
        logits = None
    return torch.ops.attnscale.scale_merge(scores, logits, mode)


if has_extension():

    @torch.library.register_fake("attnscale::scale_merge")
    def _scale_merge_fake(scores, logits, mode):
        _check_fake(scores, logits, mode)
        n, c, h, w = scores[0].shape
        return scores[0].new_empty((n, c, h, w)), scores[0].new_empty((n, len(scores), h, w))

    @torch.library.register_fake("attnscale::scale_merge_backward")
    def _scale_merge_backward_fake(grad_merged, grad_weights, scores, logits, mode, weights=None):
        _check_fake(scores, logits, mode)
        n, c, h, w = scores[0].shape
        for name, t, shape in (("grad_merged", grad_merged, (n, c, h, w)),
                               ("grad_weights", grad_weights, (n, len(scores), h, w)),
                               ("weights", weights, (n, len(scores), h, w))):
            if t is None:  # grad_weights and weights are optional
                continue
            torch._check(tuple(t.shape) == shape and t.device == scores[0].device and t.dtype == scores[0].dtype,
                         lambda: f"scale_merge_backward: {name} must be {shape} ({scores[0].dtype} on {scores[0].device}), "
                         f"got {tuple(t.shape)} ({t.dtype} on {t.device})")
        grads = [s.new_empty(s.shape) for s in scores]
        if mode == "attention":
            glogits = logits.new_empty(logits.shape)
        else:
            glogits = scores[0].new_empty((0,))
        return grads, glogits

    # The autograd formula of scale_merge is a C++ kernel (csrc/ops/autograd/scale_merge_autograd.cpp:
    # the Python wrapper of register_autograd cost ~0.3 ms per call at the training shape); it calls
    # scale_merge_backward, whose own formula below forbids differentiating it again.
    def _setup_context_bwd(ctx, inputs, output):
        pass

    def _double_backward(ctx, *grads):
        raise RuntimeError("scale_merge: double backward (differentiating scale_merge_backward) is not "
                           "supported; use attnscale.ops.scale_merge_reference for higher-order gradients")

    torch.library.register_autograd("attnscale::scale_merge_backward", _double_backward,
                                    setup_context=_setup_context_bwd)
