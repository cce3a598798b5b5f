"""Share-net *Attention to Scale* on a VGG-16 DeepLab-LargeFOV trunk, Caffe-faithful.

Layer (module/parameter) names equal the Caffe layer names of the reference prototxts
(``attention3_deploy.prototxt`` and the others the README lists): ``conv1_1`` …
``conv5_3``, ``fc6``, ``fc7``, the classifier (``classifier_name``, e.g. ``fc8_voc12``), ``att_conv1``,
``att_conv2``.  One parameter set serves every scale (the prototxts share blobs by ``param { name }``).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import caffe, switches
from .ops import (bias_relu, cpu_gemm, dilated_conv2d, dilated_conv2d_reference, scale_merge,
                  scale_merge_reference, winograd_applies, winograd_conv2d, winograd_weight)
from .ops.bias_relu import bias_relu_applies

__all__ = ["AttentionToScale", "ModelOutput", "TRUNK", "cpu_autocast", "cpu_prefers_onednn", "dilated_pays",
           "scale_suffix", "winograd_pays"]

#: VGG-16 DeepLab-LargeFOV trunk: (name, out channels, kernel, pad, dilation) and pools
#: (name, method, kernel, stride, pad), in Caffe order.
TRUNK: tuple[tuple, ...] = (
    ("conv", "conv1_1", 64, 3, 1, 1), ("conv", "conv1_2", 64, 3, 1, 1), ("pool", "pool1", "max", 3, 2, 1),
    ("conv", "conv2_1", 128, 3, 1, 1), ("conv", "conv2_2", 128, 3, 1, 1), ("pool", "pool2", "max", 3, 2, 1),
    ("conv", "conv3_1", 256, 3, 1, 1), ("conv", "conv3_2", 256, 3, 1, 1), ("conv", "conv3_3", 256, 3, 1, 1),
    ("pool", "pool3", "max", 3, 2, 1),
    ("conv", "conv4_1", 512, 3, 1, 1), ("conv", "conv4_2", 512, 3, 1, 1), ("conv", "conv4_3", 512, 3, 1, 1),
    ("pool", "pool4", "max", 3, 1, 1),
    ("conv", "conv5_1", 512, 3, 2, 2), ("conv", "conv5_2", 512, 3, 2, 2), ("conv", "conv5_3", 512, 3, 2, 2),
    ("pool", "pool5", "max", 3, 1, 1), ("pool", "pool5a", "ave", 3, 1, 1),
)
FC6 = dict(out=1024, kernel=3, pad=12, dilation=12)
FC7_OUT = 1024
ATT1_OUT = 512
MERGES = ("attention", "max", "avg")


# read once at import: a plain bool, so that torch.compile traces the choice as a constant
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_prefers_onednn(needs_grad: bool = False) -> bool:
    """Whether ``conv_impl="auto"`` / ``fc6_impl="auto"`` leave a CPU layer to oneDNN's convolution.  Never on
    AVX2 CPUs, where ours won (fc6 1.3-1.8x, inference 2.5-2.7 s against 4.1-4.5 s).  On CPUs with AVX-512
    (``torch.backends.cpu.get_cpu_capability()``): when our kernels' GEMMs run on the BLAS
    (:func:`attnscale.ops.cpu_gemm`; MKL runs its AVX2 code on AMD CPUs), and for a layer that needs a
    gradient (fc6: ours forward+backward 0.91-1.11x of oneDNN, parity at the training sizes).  With oneDNN
    GEMMs, Winograd F(2x2, 3x3) ran the 3x3 layers from conv2_1 up 1.04-1.69x faster than oneDNN's
    convolution (:func:`winograd_pays` for the others) and our fc6 forward 1.10-1.21x at the 513x513 image's
    sizes (:func:`dilated_pays` for small maps), and the 513x513 inference took 1.07 s against 1.35 s (AMD
    EPYC Zen 5, 2 threads, benchmarks/RESULTS.md)."""
    return _AVX512 and (needs_grad or cpu_gemm() == "blas")


def cpu_autocast(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor inside an enabled CPU ``torch.autocast`` region (bfloat16: a config's
    ``precision="bf16"``).  oneDNN runs its convolutions in that precision there, our CPU kernels in float32
    (they take float32/float64 only), so ``conv_impl="auto"`` and ``fc6_impl="auto"`` leave the layers to
    oneDNN: a 513x513 inference in bf16 took 951 ms that way, 1020 ms with the float32 Winograd and fc6
    kernels inside autocast (2 Zen 5 cores with AVX512-BF16; float32 ``auto`` 1018-1103 ms;
    benchmarks/RESULTS.md, fourteenth session); 741 ms since MAX pooling and Interp take bfloat16 in our
    CPU kernels (eighteenth session)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def winograd_pays(in_channels: int, out_channels: int, out_hw: Sequence[int]) -> bool:
    """Whether ``conv_impl="auto"`` runs a 3x3 inference layer by Winograd F(2x2, 3x3) (where
    :func:`cpu_prefers_onednn` leaves the choice to us) rather than by oneDNN's convolution, given its channel
    counts and its output size ``out_hw``.

    Winograd's 16 products, (out x in) @ (in x tiles), save multiplies, but its transforms read and write every
    tile once per input and once per output channel: their share of the work goes as 1/in + 1/out, so the
    rule is ``in * out / (in + out)`` above a threshold.  On AVX-512 36 (oneDNN's convolution at 400-470
    GFLOP/s on 2 Zen 5 cores): conv1_1 (2.9) ran at 0.28-0.34x of oneDNN, conv1_2 (32) at 0.62-0.85x,
    conv2_1 (43) at 0.9-1.06x, conv2_2 (64) at 0.94-1.25x, conv3_1 (85) and the wider layers at 1.07-1.65x,
    and a 513x513 inference with the threshold at 36 or 64 took 7 % less time than with every layer on
    Winograd, at 20 3 % less.  On AVX2 16: conv1_1 ran at 0.69x, conv1_2 and up at 1.30-1.54x (oneDNN held
    to AVX2 on the same machine).  And the maps must not be small, at least 20 pixels a side: 256 -> 256 at
    9x9 ran at 0.63x, 128 -> 128 at 17x17 0.68x, conv5 (dilation 2) at 17x17 0.9-1.1x and at 9x9 0.8-1.0x.
    benchmarks/RESULTS.md, 2026-11-26, fourteenth session."""
    return (in_channels * out_channels > (36 if _AVX512 else 16) * (in_channels + out_channels)
            and min(out_hw) >= 20)


def dilated_pays(hw: Sequence[int], dilation: int) -> bool:
    """Whether ``fc6_impl="auto"`` runs a CPU inference fc6 of input size ``hw`` through our ``dilated_conv2d``
    (where :func:`cpu_prefers_onednn` leaves the choice to us) rather than oneDNN's convolution.  Ours splits
    the output into rectangles with one set of live taps each (the others read padding) and runs one
    product per rectangle: on a map with no or a thin region where all nine taps are live those products
    are small, and oneDNN's convolution ran faster on AVX-512 (fc6, 512 -> 1024, d = 12, 2 Zen 5 cores:
    9x9 0.81x, 13x13 to 25x25 0.48-0.59x, 33x33 1.12x, 49x49 1.17x, 65x65 1.17-1.21x).  So that region must
    be at least 9 pixels a side there (``min(hw) - 2 d >= 9``: 33 for fc6).  On AVX2 ours won at every
    size (1.15-1.37x from 9x9 to 49x49, oneDNN held to AVX2).  benchmarks/RESULTS.md, fourteenth session."""
    return not _AVX512 or min(hw) - 2 * dilation >= 9


CONV_IMPLS = ("auto", "auto4", "torch", "winograd", "winograd4")
FC6_IMPLS = ("auto", "ops", "torch")


def scale_suffix(scale: float) -> str:
    """Caffe blob suffix of a scale: 1 → ``1``, 0.75 → ``075``, 0.5 → ``05`` (``loss_res075`` …)."""
    return "1" if scale == 1 else f"{scale:g}".replace(".", "")


def blob_suffix(scale: float) -> str:
    """What the prototxts append to a scale copy's layer and blob names: none for 1, ``_res075``, ``_res05``."""
    return "" if scale == 1 else "_res" + scale_suffix(scale)


# the blobs of the reference prototxts that a ReLU rewrites in place: every convolution's but the classifier's
# and att_conv2's
_IN_PLACE_RELU = re.compile(r"^(conv\d_\d|fc6|fc7)(_res\d+)?$|^att_conv1$")


def caffe_diff(name: str, blob: torch.Tensor) -> torch.Tensor:
    """What a Caffe net's diff of blob ``name`` holds after its backward, from the blob as
    :meth:`AttentionToScale.caffe_blobs` records it (its ``.grad`` retained): the gradient, except where a ReLU
    rewrote the blob in place (``relu1_1``: bottom = top = ``conv1_1``): there Caffe's ReLU backward turned the
    diff into the gradient of the value *before* the ReLU, ``grad * (blob > 0)``."""
    if blob.grad is None:
        raise ValueError(f"caffe_diff: {name} has no gradient (retain_grad() before the backward)")
    return blob.grad * (blob.detach() > 0) if _IN_PLACE_RELU.match(name) else blob.grad


@dataclass
class ModelOutput:
    """``merged`` (N,C,h,w) at the scale-1 output size (``fc8_attention`` / ``fc8_max`` / ``fc8_avg``, or
    the scale-1 scores for one scale); ``scales``: each scale's classifier scores at its own resolution
    (``fc8_voc12``, ``fc8_voc12_res075``, …); ``attention`` (N,S,h,w) merge weights or None (one scale)."""

    merged: torch.Tensor
    scales: list
    attention: torch.Tensor | None


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class AttentionToScale(nn.Module):
    """Share-net multi-scale DeepLab-LargeFOV with attention / max / average merging (Chen et al. 2016).

    Args:
        num_classes: classifier outputs (21 for VOC).
        scales: input scales, the first must be 1 (its output size is the merge resolution). 0.75 and 0.5 use
            the prototxts' Interp (shrink 4 + zoom 3, shrink 2); other scales an explicit Interp size
            (see :func:`attnscale.caffe.scale_interp_params`).
        merge: "attention" | "max" | "avg" for several scales, None for one scale (DeepLab-LargeFOV).
        extra_supervision: add one loss per scale on its own-resolution scores (E-Supv).
        width: multiplies every trunk/head channel count (tiny nets for tests); 1.0 is the real net.
        use_reference_ops: pure-PyTorch references instead of the C++ ops ``scale_merge``/``dilated_conv2d``.
        conv_impl: the 3x3 convolutions of the trunk (conv1_1 .. conv5_3) and of the attention head:
            "torch" (``nn.Conv2d``: oneDNN / cuDNN), "winograd" (:func:`attnscale.ops.winograd_conv2d`,
            Winograd F(2x2, 3x3), 2.25x less arithmetic, float32 rounding no worse than direct) or "winograd4"
            (F(4x4, 3x3), 4x less arithmetic, float32 errors a few times the direct convolution's), on CPU
            float32/float64 inputs; the dilated conv5 layers by polyphase components; anything else still runs
            through ``nn.Conv2d``.  "auto" (the default) is "winograd" where no gradient is needed (inference
            on a CPU: :meth:`predict`, evaluation, ``torch.no_grad()``) for the layers with channels enough
            (:func:`winograd_pays`: conv2_1 and up on AVX-512, conv1_2 and up on AVX2, on maps not too small)
            and "torch" otherwise,
            and always "torch" with ``use_reference_ops``, on a CPU where oneDNN is faster
            (:func:`cpu_prefers_onednn`: AVX-512 with BLAS GEMMs) and inside CPU autocast
            (:func:`cpu_autocast`: oneDNN computes in bfloat16, our kernels in float32).  "auto4" chooses the same layers and runs
            them by "winograd4": the fastest CPU inference (513x513: 1.14x "auto"), float32 errors a few
            times the direct convolution's.  Each weight's Winograd transform is kept until the weight
            changes, so the scales of one forward share it (16/9 of the 3x3 weights: ~0.2 GB for the full
            net; 4x for F(4x4, 3x3)).
        fc6_impl: fc6 (the dilated 3x3 convolution): "ops" (:func:`attnscale.ops.dilated_conv2d`, which skips
            the taps on padding), "torch" (``F.conv2d``: oneDNN / cuDNN) or "auto" (the default): "ops" on a
            CPU unless :func:`cpu_prefers_onednn` (AVX-512 and a gradient, or BLAS GEMMs), the map is small
            (:func:`dilated_pays`: under 33x33 for fc6 on AVX-512) or inside CPU autocast
            (:func:`cpu_autocast`), "torch" on a GPU,
            where cuDNN ran fc6 faster than our CUDA kernels (benchmarks/RESULTS.md, 2026-11-26).
            Ignored with ``use_reference_ops``.
        classifier_name: Caffe name of the classifier layer (``fc8_voc12``).
        dropout: ratio of ``drop6``/``drop7``/``att_drop1`` (0.5 in the deploy prototxts; the training
            prototxt used for gradient comparison has no Dropout layers: pass 0).
        test_crop_size: DeepLab test crop (513 for VOC, 641 for COCO; must be 8k+1) used by :meth:`predict`.
        scale_streams: on a GPU without gradients (inference, evaluation), run the coarser scales' trunks on
            side CUDA streams beside the finest one's (they are independent until the merge), so that the small
            maps' kernels fill the multiprocessors the large ones leave idle.  The same kernels as one stream, so
            the same numbers.  Ignored on a CPU, where a gradient is needed (training keeps one stream) and while
            a CUDA graph is captured (its replays went wrong with the side streams: see ``_scale_trunks``).
        fuse_bias_relu: on a GPU, every convolution followed by a ReLU runs without its bias and
            :func:`attnscale.ops.bias_relu` adds the bias and applies the ReLU in one pass (in backward: the
            ReLU's mask and the bias gradient's sum in one pass), where PyTorch's cuDNN path spends a kernel on
            the bias add and a reduction on its gradient.  The same values (the sum rounded as PyTorch's add
            rounds it); bias gradients equal up to summation order (under autocast the float32 sum, not rounded
            to the half type first).  Ignored on a CPU (oneDNN adds the bias inside its convolution), with
            ``use_reference_ops`` and under torch.compile (Inductor fuses them).
        pad_input_channels: on a GPU, conv1_1 runs on the image with a fourth, zero channel (and its weight
            with a zero fourth input channel): cuDNN has NHWC kernels for 4 input channels (MLPerf's ResNet-50
            pads its images so) where 3 take generic ones.  The same products plus zeros (the order of the
            float sums may differ); the weight and its gradient stay (64, 3, 3, 3).  Ignored on a CPU and
            with ``use_reference_ops``.
        fuse_dropout: with ``fuse_bias_relu`` in training, the Dropout after fc6's, fc7's and att_conv1's ReLU
            runs inside :func:`attnscale.ops.bias_relu` (its Philox mask drawn in the same pass and not stored:
            the backward reads it off the output), instead of ``F.dropout``'s passes and byte masks.  The
            same distribution and scaling, another random stream.  Not inside CUDA graph capture (the seed
            is drawn on the host).
        cache_weight_casts: in inference under ``torch.autocast``, keep each layer's weights cast to
            autocast's dtype between forwards (:meth:`_params`) instead of letting autocast cast them again
            on every forward.  The same values.

    ``ATTNSCALE_DISABLE`` (:mod:`attnscale.switches`: ``bias_relu``, ``dropout``, ``pad``, ``casts``)
    turns the matching features off whatever the arguments say.
    """

    def __init__(self, num_classes: int = 21, scales: Sequence[float] = (1.0, 0.75, 0.5),
                 merge: str | None = "attention", extra_supervision: bool = True, width: float = 1.0,
                 use_reference_ops: bool = False, classifier_name: str = "fc8_voc12",
                 dropout: float = 0.5, test_crop_size: int = 513, conv_impl: str = "auto",
                 fc6_impl: str = "auto", scale_streams: bool = True, fuse_bias_relu: bool = True,
                 fuse_dropout: bool = True, pad_input_channels: bool = True, cache_weight_casts: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        scales = tuple(float(s) for s in scales)
        if len(scales) == 0 or scales[0] != 1.0:
            raise ValueError(f"scales must start with 1.0 (the merge resolution), got {scales}")
        if any(not (0 < s <= 1) for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct values in (0, 1], got {scales}")
        if len(scales) == 1 and merge is not None:
            raise ValueError(f"one scale has nothing to merge: use merge=None (got merge={merge!r})")
        if len(scales) > 1 and merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES} for {len(scales)} scales, got {merge!r}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        if fc6_impl not in FC6_IMPLS:
            raise ValueError(f"fc6_impl must be one of {FC6_IMPLS}, got {fc6_impl!r}")
        if not (width > 0):
            raise ValueError(f"width must be > 0, got {width}")
        if not (0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_crop(test_crop_size, "test_crop_size")
        # any Caffe layer name (DeepLab's scripts make fc8_${EXP}, e.g. "fc8_exper/voc12") that a module can carry
        bad_name = ValueError(f"classifier_name {classifier_name!r} is not a usable, distinct layer name (non-empty, "
                              "no '.', not another layer's or one of the model's attributes)")
        if (not isinstance(classifier_name, str) or not classifier_name or "." in classifier_name
                or classifier_name in {t[1] for t in TRUNK} | {"fc6", "fc7", "att_conv1", "att_conv2"}
                or hasattr(AttentionToScale, classifier_name)):
            raise bad_name
        self.num_classes = num_classes
        self.scales = scales
        self.merge = merge
        self.extra_supervision = bool(extra_supervision)
        self.width = float(width)
        self.use_reference_ops = bool(use_reference_ops)
        self.conv_impl = conv_impl
        self.fc6_impl = fc6_impl
        self.scale_streams = bool(scale_streams)
        self.fuse_bias_relu = bool(fuse_bias_relu)
        self.fuse_dropout = bool(fuse_dropout)
        self.pad_input_channels = bool(pad_input_channels)
        self.cache_weight_casts = bool(cache_weight_casts)
        self._winograd_cache: dict[str, tuple] = {}  # layer name -> (weight, its version, its transform)
        self._cast_cache: dict[tuple, tuple] = {}  # (layer name, CUDA stream) -> autocast copies: _params
        self._graph_casts: list = []  # replaced copies a captured CUDA graph still reads
        self._cast_stream = None  # the stream whose copies _scale_trunks' side streams use
        self._blobs: dict | None = None  # caffe_blobs()' record, while one is open
        self.classifier_name = classifier_name
        self.dropout = float(dropout)
        self.test_crop_size = test_crop_size

        cin = 3
        self._layers: list[tuple] = []
        for spec in TRUNK:
            if spec[0] == "conv":
                _, name, cout, k, pad, dil = spec
                cout = _ch(cout, width)
                self.add_module(name, nn.Conv2d(cin, cout, k, padding=pad, dilation=dil))
                self._layers.append(("conv", name))
                cin = cout
            else:
                self._layers.append(spec)
        c6, c7 = _ch(FC6["out"], width), _ch(FC7_OUT, width)
        self.fc6 = nn.Conv2d(cin, c6, FC6["kernel"], padding=FC6["pad"], dilation=FC6["dilation"])
        self.fc7 = nn.Conv2d(c6, c7, 1)
        self.fc7_channels = c7
        try:  # after every attribute: a name that is one of them is refused here
            self.add_module(classifier_name, nn.Conv2d(c7, num_classes, 1))
        except (KeyError, TypeError):
            raise bad_name from None
        if merge == "attention":
            self.att_conv1 = nn.Conv2d(c7 * len(scales), _ch(ATT1_OUT, width), 3, padding=1)
            self.att_conv2 = nn.Conv2d(_ch(ATT1_OUT, width), len(scales), 1)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ params
    @property
    def classifier(self) -> nn.Conv2d:
        return getattr(self, self.classifier_name)

    def head_layer_names(self) -> list[str]:
        """Layers initialised fresh and trained with the ×10 learning rate: classifier (+ attention head)."""
        return [self.classifier_name] + (["att_conv1", "att_conv2"] if self.merge == "attention" else [])

    def reset_parameters(self) -> None:
        """Fresh initialisation.  Trunk (normally loaded from VGG-16/DeepLab-init): Caffe ``msra`` filler
        (gaussian, std sqrt(2 / fan_in)), bias 0.  Classifier and attention head: DeepLab's
        ``gaussian std 0.01``, bias ``constant 0``.  (``attention3_train_esupv.prototxt`` declares no
        fillers, i.e. Caffe's default ``constant 0``; that prototxt is meant to be run with loaded weights:
        from all-zero att_conv1/att_conv2 only att_conv2's bias gets a gradient (att_conv1's output is 0,
        att_conv2's weights pass nothing back), so the attention would learn one constant weight per scale.)"""
        head = set(self.head_layer_names())
        for name, m in self.named_children():
            if not isinstance(m, nn.Conv2d):
                continue
            if name in head:
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            nn.init.zeros_(m.bias)

    def param_groups(self, base_lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                     scheme: str | dict = "paper") -> list[dict]:
        """Parameter groups for ``torch.optim.SGD`` with Caffe's ``lr_mult``/``decay_mult``.

        ``scheme="paper"``: weights ``lr_mult 1, decay_mult 1``; biases ``lr_mult 2, decay_mult 0``; the
        classifier and the attention head ×``head_lr_mult`` (paper: 0.01 for the final classifier with base
        0.001, i.e. weights 10, biases 20; the paper says nothing of the attention head, which is new like
        the classifier and gets the same).
        ``scheme="prototxt"``: exactly the ``param`` lines of ``attention3_train_esupv.prototxt``: every
        layer 1/2 with bias decay 0, the classifier included, and att_conv* (no ``param`` lines) Caffe's
        default 1 and decay 1 for weights and biases alike.
        ``scheme={layer: [[lr_mult, decay_mult] of the weight, [...] of the bias]}`` for every convolution
        of the model: any training prototxt's ``param`` lines (``prototxt_import.param_mults``); one group per
        distinct pair.
        Each group carries ``lr`` (= base_lr × lr_mult), ``weight_decay`` (= weight_decay × decay_mult),
        ``lr_mult``, ``decay_mult`` and ``name`` so a step scheduler can rescale by ``lr_mult``.
        """
        if isinstance(scheme, dict):
            return self._explicit_groups(base_lr, weight_decay, scheme)
        if scheme not in ("paper", "prototxt"):
            raise ValueError(f"param_groups: scheme must be 'paper', 'prototxt' or a dict of layers, got {scheme!r}")
        head = set(self.head_layer_names())
        buckets: dict[str, list] = {"weights": [], "biases": [], "head_weights": [], "head_biases": []}
        for name, m in self.named_children():
            if not isinstance(m, nn.Conv2d):
                continue
            if scheme == "paper":
                pre = "head_" if name in head else ""
            else:
                pre = "head_" if name in ("att_conv1", "att_conv2") else ""
            buckets[pre + "weights"].append(m.weight)
            buckets[pre + "biases"].append(m.bias)
        mults = {"weights": (1.0, 1.0), "biases": (2.0, 0.0),
                 "head_weights": (head_lr_mult, 1.0), "head_biases": (2.0 * head_lr_mult, 0.0)}
        if scheme == "prototxt":
            mults["head_weights"] = mults["head_biases"] = (1.0, 1.0)   # Caffe's ParamSpec defaults
        groups = []
        for key, params in buckets.items():
            if not params:
                continue
            lr_mult, decay_mult = mults[key]
            groups.append({"params": params, "lr": base_lr * lr_mult, "weight_decay": weight_decay * decay_mult,
                           "lr_mult": lr_mult, "decay_mult": decay_mult, "name": key})
        return groups

    def _explicit_groups(self, base_lr: float, weight_decay: float, mults: dict) -> list[dict]:
        convs = [name for name, m in self.named_children() if isinstance(m, nn.Conv2d)]
        missing, unknown = [n for n in convs if n not in mults], sorted(set(mults) - set(convs))
        if missing or unknown:
            raise ValueError("lr_mults: " + "; ".join(
                ([f"no entry for the model's layer(s) {missing}"] if missing else []) +
                ([f"{unknown} are not layers of this model (its layers: {convs})"] if unknown else [])))
        buckets: dict[tuple[float, float], list] = {}
        for name in convs:
            m = getattr(self, name)
            for p, (lr_mult, decay_mult) in zip((m.weight, m.bias), mults[name]):
                buckets.setdefault((float(lr_mult), float(decay_mult)), []).append(p)
        return [{"params": params, "lr": base_lr * lr_mult, "weight_decay": weight_decay * decay_mult,
                 "lr_mult": lr_mult, "decay_mult": decay_mult, "name": f"lr_mult {lr_mult:g}, decay_mult {decay_mult:g}"}
                for (lr_mult, decay_mult), params in buckets.items()]

    # ----------------------------------------------------------------------------------- forward
    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether a convolution + ReLU on x runs as the convolution without bias, then :func:`bias_relu`."""
        return (self.fuse_bias_relu and not self.use_reference_ops and bias_relu_applies(x)
                and not switches.uses_torch("bias_relu"))

    def _params(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``name``'s (weight, bias) as its convolution on x takes them.  In inference under
        ``torch.autocast`` (no gradient) a copy in autocast's dtype, kept while the parameters are the same
        tensors, at the same version (an optimizer step or ``load_state_dict`` changes it) and address (a
        move to another device or dtype changes it; a write through ``.data`` changes neither: call
        :meth:`clear_caches` then): autocast would cast every layer's weights again on every forward (43 cast
        kernels, 0.13 ms of a 3.7 ms bf16 inference on an H100, replayed by a CUDA graph as well), and the
        copies hold the same rounded values.  Kept per CUDA stream: the caller's (the side streams of
        :meth:`_scale_trunks` use the caller's copies, made before the fork they wait for; a capture through
        torch.cuda.graph, which synchronises the device first, any stream's), and never freed once a graph
        captured them (a replay keeps reading them: capture again after changing the weights).  Not kept
        while torch.compile traces, under a dispatch mode (FakeTensorMode, make_fx) or for inference-mode
        parameters."""
        conv = getattr(self, name)
        w, b = conv.weight, conv.bias
        dev = x.device.type
        if (not self.cache_weight_casts or switches.uses_torch("casts")
                or torch.is_grad_enabled() or not torch.amp.is_autocast_available(dev)
                or not torch.is_autocast_enabled(dev) or w.dtype != torch.float32 or torch.compiler.is_compiling()
                or torch._C._len_torch_dispatch_stack() > 0 or w.is_inference()):
            return w, b
        dt = torch.get_autocast_dtype(dev)
        stream = None
        capturing = False
        if x.is_cuda:
            stream = self._cast_stream or torch.cuda.current_stream(x.device)
            capturing = torch.cuda.is_current_stream_capturing()
        key = (name, stream)
        state = (w.data_ptr(), w._version, w.device, None if b is None else (b.data_ptr(), b._version), dt)

        def valid(entry):
            return entry is not None and entry[0] is w and entry[1] is b and entry[2] == state

        hit = self._cast_cache.get(key)
        if capturing and not valid(hit):
            # torch.cuda.graph synchronised the device before capturing: any stream's copies are complete
            hit = next((v for (n, _), v in self._cast_cache.items() if n == name and valid(v)), hit)
        if valid(hit):
            if capturing:
                hit[4][0] = True  # a graph reads these copies now: never freed
            return hit[3]
        hit = self._cast_cache.get(key)
        with torch.inference_mode(False):
            casts = (w.to(dt), None if b is None else b.to(dt))
        if not capturing:  # copies made inside a capture belong to it
            if hit is not None and hit[4][0]:
                self._graph_casts.append(hit[3])  # a captured graph still reads the old copies
            self._cast_cache[key] = (w, b, state, casts, [False])
        return casts

    def _drop_casts(self) -> None:
        """Forget :meth:`_params`' copies, keeping alive those a captured CUDA graph reads."""
        self._graph_casts += [v[3] for v in self._cast_cache.values() if v[4][0]]
        self._cast_cache.clear()

    def clear_caches(self) -> None:
        """Drop the kept weight copies (:meth:`_params`' autocast casts, the Winograd transforms), e.g. after
        writing the parameters through ``.data``; moves between devices or dtypes drop them by themselves."""
        self._drop_casts()
        self._winograd_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            self._drop_casts()  # training never reads them
        return super().train(mode)

    def __setstate__(self, state):  # a model pickled before the caches existed
        super().__setstate__(state)
        for name, empty in (("_cast_cache", {}), ("_winograd_cache", {}), ("_graph_casts", []),
                            ("_cast_stream", None), ("cache_weight_casts", True), ("_blobs", None)):
            self.__dict__.setdefault(name, empty)

    def __getstate__(self):  # pickling and deepcopy leave the kept copies behind
        state = super().__getstate__()
        state["_cast_cache"], state["_winograd_cache"], state["_graph_casts"] = {}, {}, []
        return state

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._cast_cache, replica._winograd_cache, replica._graph_casts = {}, {}, []
        return replica

    def _dilated(self, x, bias: bool = True):
        """fc6 (without its bias when not ``bias``)."""
        conv = self.fc6
        impl = self.fc6_impl
        if impl == "auto":
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
            impl = "torch" if (x.is_cuda or cpu_prefers_onednn(needs_grad) or cpu_autocast(x)
                               or not dilated_pays(x.shape[-2:], conv.dilation[0])) else "ops"
        if self.use_reference_ops or impl == "torch":
            w, b = self._params("fc6", x)
            return dilated_conv2d_reference(x, w, b if bias else None, dilation=conv.dilation[0],
                                            padding=conv.padding[0])
        return dilated_conv2d(x, conv.weight, conv.bias if bias else None, dilation=conv.dilation[0],
                              padding=conv.padding[0])

    def _pads_input(self, x: torch.Tensor, conv: nn.Conv2d) -> bool:
        """Whether ``conv`` runs on x with a zero channel added (``pad_input_channels``: conv1_1 on a GPU)."""
        return (self.pad_input_channels and x.is_cuda and not self.use_reference_ops and conv.in_channels == 3
                and x.shape[1] == 3 and not switches.uses_torch("pad"))

    def _bias_relu(self, x, bias, drop: bool):
        """:func:`bias_relu` of a convolution's output without its bias; when ``drop``, the layer's Dropout
        after it (inside the op with ``fuse_dropout`` in training, else :meth:`_drop`)."""
        inside = (drop and self.fuse_dropout and self.training and self.dropout > 0
                  and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
                  and not switches.uses_torch("dropout"))
        y = bias_relu(x, bias, self.dropout if inside else 0.0)
        return self._drop(y) if drop and not inside else y

    def _conv(self, x, name: str, relu: bool = False, drop: bool = False):
        """Layer ``name`` (an ``nn.Conv2d``) on x, followed by its ReLU when ``relu``: through Winograd
        (F(2x2, 3x3) for "winograd" and for "auto" without gradients unless :func:`cpu_prefers_onednn` or
        :func:`winograd_pays` says no, F(4x4, 3x3) for "winograd4" and likewise for "auto4", the ReLU fused)
        when ``conv_impl`` asks for it and :func:`attnscale.ops.winograd_applies` (a 3x3 stride-1
        convolution on a CPU float input), else ``nn.Conv2d`` and ``F.relu`` (on a GPU the convolution without
        its bias, then :func:`bias_relu`: ``fuse_bias_relu``; the parameters of :meth:`_params`); then the
        layer's Dropout when ``drop``."""
        conv = getattr(self, name)
        impl = self.conv_impl
        if impl in ("auto", "auto4"):
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
            d, p = conv.dilation[0], conv.padding[0]
            out_hw = (x.shape[-2] + 2 * p - 2 * d, x.shape[-1] + 2 * p - 2 * d)
            impl = "torch" if (self.use_reference_ops or needs_grad or cpu_prefers_onednn() or cpu_autocast(x)
                               or not winograd_pays(conv.in_channels, conv.out_channels, out_hw)) else (
                "winograd4" if impl == "auto4" else "winograd")
        if impl == "torch" or not winograd_applies(x, conv):
            if conv._forward_hooks or conv._forward_pre_hooks:  # the module's own call, for its hooks
                y = F.relu(conv(x)) if relu else conv(x)
                return self._drop(y) if drop else y
            w, b = self._params(name, x)
            if self._pads_input(x, conv):  # (N, 4, H, W) and (K, 4, kh, kw), the fourth channel zero
                x, w = F.pad(x, (0, 0, 0, 0, 0, 1)), F.pad(w, (0, 0, 0, 0, 0, 1))
            if relu and self._fuses(x):  # the float32 bias goes in as it is (rounded inside under autocast)
                return self._bias_relu(conv._conv_forward(x, w, None), conv.bias, drop)
            y = conv._conv_forward(x, w, b)
            y = F.relu(y) if relu else y
            return self._drop(y) if drop else y
        w = conv.weight
        tile = 4 if impl == "winograd4" else 2
        hit = self._winograd_cache.get(name)
        if hit is None or hit[0] is not w or hit[1] != w._version or hit[2].shape[0] != (tile + 2) ** 2:
            hit = (w, w._version, winograd_weight(w, tile))
            self._winograd_cache[name] = hit
        y = winograd_conv2d(x, w, conv.bias, conv.padding[0], weight_winograd=hit[2], dilation=conv.dilation[0],
                            relu=relu)
        return self._drop(y) if drop else y

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    @contextlib.contextmanager
    def caffe_blobs(self):
        """Within the block, forwards record their blobs into the dict this yields, under the reference
        prototxts' names: conv1_1 ... pool5a, fc6, fc7 and the classifier, each coarser scale's with its
        suffix (``conv1_1_res075``), ``data_res075`` (the image Interp'ed to the scale),
        ``fc7_res075_interp``, ``fc8_voc12_res075_interp``, and for the merges ``fc7_concat``, ``att_conv1``,
        ``att_conv2``, ``attention``, ``fc8_attention`` / ``fc8_max`` / ``fc8_avg``: each as a Caffe net
        holds it after the forward, i.e. after its in-place ReLU and Dropout (the blob-by-blob comparison
        with Caffe's ``net.blobs``).  The tensors are the forward's own: ``retain_grad()`` on them before a
        backward gives their gradients (a Caffe blob with an in-place ReLU holds the gradient of the
        pre-ReLU value as its diff: ``grad * (blob > 0)``).  The scales run one after another while it is
        open, and the Interp'ed score blobs (for max / avg also fc7's) are computed for the record (the merge
        op interpolates inside)."""
        if self._blobs is not None:
            raise RuntimeError("caffe_blobs: a record is open already")
        self._blobs = {}
        try:
            yield self._blobs
        finally:
            self._blobs = None

    def _keep(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self._blobs is not None:
            self._blobs[name] = t
        return t

    def trunk(self, x: torch.Tensor, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """One scale through the shared net: returns (fc7 after relu7/drop7, classifier scores); ``suffix``
        names its blobs in :meth:`caffe_blobs`' record (``_res075``)."""
        for spec in self._layers:
            if spec[0] == "conv":
                x = self._conv(x, spec[1], relu=True)
            else:
                _, _, method, k, s, p = spec
                x = caffe.pool2d(x, k, s, p, method)
            self._keep(spec[1] + suffix, x)
        if self._fuses(x):
            x = self._bias_relu(self._dilated(x, bias=False), self.fc6.bias, drop=True)
        else:
            x = self._drop(F.relu(self._dilated(x)))
        fc7 = self._keep("fc7" + suffix, self._conv(self._keep("fc6" + suffix, x), "fc7", relu=True, drop=True))
        return fc7, self._keep(self.classifier_name + suffix, self._conv(fc7, self.classifier_name))

    def _scale_trunks(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fc7, scores) of every scale: the input Interp'ed to the scale (the prototxts' shrink/zoom
        Interp), then :meth:`trunk`; for attention each fc7 Interp'ed to the finest scale's size (the
        concatenation's input).  With ``scale_streams`` on a GPU without gradients the coarser scales
        run on side streams: each waits for the current stream first (so that ``x`` and everything before
        is ready, and memory they freed back to a side stream's pool earlier is no longer read), and the
        current stream waits for all of them before the merge.  Not while a CUDA graph is being captured:
        there the scales run one after another.  A graph captured with the side streams replayed the right
        values once and wrong ones from its second replay on (H100 and H200, 2026-11-27, with every kernel of
        ours off too; the cause is not found), while the serial graph replays the eager values bit for bit,
        and faster (2.31 ms per 513x513 bf16 image on the H100, benchmarks/RESULTS.md)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        size = self.output_size(hw)   # the finest scale's output: the merge resolution

        def one(s: float):
            p = caffe.scale_interp_params(s, hw)
            sfx = blob_suffix(s)
            fc7, scores = self.trunk(x if p is None else self._keep("data" + sfx, caffe.interp(x, p)), sfx)
            if (self.merge == "attention" or self._blobs is not None) and tuple(fc7.shape[-2:]) != size:
                fc7 = self._keep(f"fc7{sfx}_interp", caffe.interp(fc7, size))  # on the branch's own stream
            return fc7, scores

        if not (self.scale_streams and x.is_cuda and len(self.scales) > 1 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and self._blobs is None
                and not torch.cuda.is_current_stream_capturing()):
            return [one(s) for s in self.scales]
        main = torch.cuda.current_stream(x.device)
        for name, mod in self.named_children():  # autocast's weight copies made here, before the fork
            if isinstance(mod, nn.Conv2d):
                self._params(name, x)
        sides = _side_streams(x.device, len(self.scales) - 1)
        for st in sides:
            st.wait_stream(main)
        outs = [one(self.scales[0])]                 # the finest scale, most of the work, on the current stream
        self._cast_stream = main                     # the side streams read the copies made on main
        try:
            for st, s in zip(sides, self.scales[1:]):
                with torch.cuda.stream(st):
                    outs.append(one(s))
        finally:
            self._cast_stream = None
        for st in sides:
            main.wait_stream(st)
        return outs

    @staticmethod
    def output_size(hw: Sequence[int]) -> tuple[int, int]:
        """Output (h, w) of the trunk for an input (H, W), by Caffe's pooling formulas."""
        h, w = int(hw[0]), int(hw[1])
        for spec in TRUNK:
            if spec[0] == "pool":
                h, w = caffe.pool_output_shape((h, w), spec[3], spec[4], spec[5])
        return h, w

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"AttentionToScale: x must be (N,3,H,W) BGR mean-subtracted, got {tuple(x.shape)}")
        fc7s, scores = map(list, zip(*self._scale_trunks(x)))
        if len(self.scales) == 1:
            return ModelOutput(merged=scores[0], scales=scores, attention=None)
        logits = None
        if self.merge == "attention":
            # fc7_concat: fc7 of every scale, Interp'ed to the scale-1 size by _scale_trunks
            cat = self._keep("fc7_concat", torch.cat(fc7s, dim=1))
            a = self._keep("att_conv1", self._conv(cat, "att_conv1", relu=True, drop=True))
            logits = self._keep("att_conv2", self._conv(a, "att_conv2"))
        merge_fn = scale_merge_reference if self.use_reference_ops else scale_merge
        merged, weights = merge_fn(scores, logits, self.merge)
        if self._blobs is not None:
            size = tuple(scores[0].shape[-2:])
            for s, f in zip(self.scales[1:], scores[1:]):
                self._keep(f"{self.classifier_name}{blob_suffix(s)}_interp", caffe.interp(f, size))
            if self.merge == "attention":
                self._keep("attention", weights)
            self._keep(f"fc8_{self.merge}", merged)
        return ModelOutput(merged=merged, scales=scores, attention=weights)

    # -------------------------------------------------------------------------------------- loss
    def loss(self, out: ModelOutput, labels: torch.Tensor, labels_checked: bool = False) -> tuple[torch.Tensor, dict]:
        """Caffe ``SoftmaxWithLoss`` (ignore_label 255, normalization VALID) on the merged scores, plus,
        with extra supervision and several scales, one per scale on its own-resolution scores; weight 1 each.

        ``labels`` (N,H,W) int at input resolution; each loss gets ``caffe.shrink_label(labels, its size)``.
        Returns the total and its parts, named like the prototxt's loss layers: ``loss`` (merged),
        ``loss_res1``, ``loss_res075``, ``loss_res05``; each part a detached 0-dim tensor (``float()`` reads
        it), so that a GPU step does not wait for them.  The labels are checked once
        (:func:`check_labels`: one host sync on a GPU) unless ``labels_checked`` (the training loop checks
        each batch on the CPU before it goes to the device)."""
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.dim() != 3 or labels.is_floating_point():
            raise ValueError(f"loss: labels must be an integer (N,H,W) tensor, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if not labels_checked:
            check_labels(labels, out.merged.shape[1])  # shrinking only picks some of them
        terms = [("loss", out.merged)]
        if self.extra_supervision and len(self.scales) > 1:
            terms += [(f"loss_res{scale_suffix(s)}", f) for s, f in zip(self.scales, out.scales)]
        total = None
        parts = {}
        for name, scores in terms:
            lab = caffe.shrink_label(labels, tuple(scores.shape[-2:]))
            value = softmax_loss(scores, lab, check=False)
            parts[name] = value.detach()
            total = value if total is None else total + value
        return total, parts

    # ----------------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, image_bgr_uint8: np.ndarray, crop_size: int | None = None, crf=None):
        """DeepLab test protocol on one HxWx3 BGR uint8 image → (label_map HxW, attention (S,H,W) or None).

        Mean subtraction (:func:`attnscale.caffe.preprocess_bgr`), zero padding (= padding with the mean
        before subtraction) at the bottom/right to ``crop_size`` (default ``test_crop_size``, 513), the net in
        eval mode, ``Interp zoom_factor: 8`` on the merged scores (65 → 513), crop back to H×W, argmax.
        ``crf`` (:class:`attnscale.crf.CRFParams`): DeepLab-CRF's ``DenseCRF`` layer between the zoom and the
        argmax (on the CPU, over the H×W image: the layer's data_dims crop), as the paper's test-set rows.
        An image larger than the crop along an axis is padded to the next size ``8k+1`` on that axis instead
        (so zoom ×8 maps the output exactly onto it); DeepLab would have cropped it.  The label map is uint8
        when ``num_classes <= 256`` else int64.  Attention maps get the same zoom and crop.  Non-finite
        scores raise FloatingPointError (their argmax would be scored as if they were a prediction).
        """
        if not isinstance(image_bgr_uint8, np.ndarray) or image_bgr_uint8.dtype != np.uint8:
            raise TypeError("predict: image_bgr_uint8 must be a numpy uint8 HxWx3 BGR image")
        crop = int(crop_size or self.test_crop_size)
        _check_crop(crop, "crop_size")
        if crf is not None:    # before the net runs
            from .crf import check_params
            check_params(crf)
        x = caffe.preprocess_bgr(image_bgr_uint8)
        H, W = x.shape[-2:]
        ph = crop if H <= crop else 8 * math.ceil((H - 1) / 8) + 1
        pw = crop if W <= crop else 8 * math.ceil((W - 1) / 8) + 1
        x = F.pad(x, (0, pw - W, 0, ph - H))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = self(x.to(device))
        finally:
            self.train(was_training)
        if not bool(torch.isfinite(out.merged).all()):   # argmax would make labels of them: a silent score
            raise FloatingPointError(f"predict: the net's scores hold {int((~torch.isfinite(out.merged)).sum())} "
                                     "non-finite values (non-finite weights? check the checkpoint or caffemodel)")
        zoom = caffe.InterpParams(zoom_factor=8)
        scores = caffe.interp(out.merged.float(), zoom)[0, :, :H, :W]
        if crf is not None:
            from .crf import dense_crf
            scores = dense_crf(scores[None], x[:, :, :H, :W], crf)[0]
        # the first maximal class where several tie, like argmax;
        # torch.max's indices over the class axis take 4 ms for 21 x 500 x 375 on 2 CPU threads, argmax 36 ms
        label = scores.max(0).indices.cpu().numpy()
        label = label.astype(np.uint8 if self.num_classes <= 256 else np.int64)
        att = None
        if out.attention is not None:
            att = caffe.interp(out.attention.float(), zoom)[0, :, :H, :W].cpu().numpy()
        return label, att


_SIDE_STREAMS: dict = {}   # device index -> side CUDA streams of AttentionToScale's scale_streams


def _side_streams(device: torch.device, n: int) -> list:
    """``n`` side streams of ``device``, made once per process and shared by every model (each use waits
    for the caller's stream first, so that sharing them orders nothing wrongly)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    have = _SIDE_STREAMS.setdefault(index, [])
    while len(have) < n:
        have.append(torch.cuda.Stream(device=index))
    return have[:n]


def _check_crop(crop, name: str) -> None:
    """DeepLab test crops are 8k+1 (321, 513, 641): then ``Interp zoom_factor: 8`` of the output
    (k+1 → 8k+1) lands exactly on the padded input."""
    if not isinstance(crop, int) or crop < 1 or crop % 8 != 1:
        raise ValueError(f"{name} must be a positive int of the form 8k+1 (e.g. 513, 641), got {crop!r}")


def check_labels(labels: torch.Tensor, num_classes: int, ignore_label: int = caffe.IGNORE_LABEL) -> None:
    """ValueError unless every label is ``ignore_label`` or in [0, num_classes) (one host sync for a GPU
    tensor; nothing while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling():
        return
    if labels.dtype == torch.uint8 and labels.device.type == "cpu":
        # the data loader's labels: one pass, a histogram of the 256 byte values (0.5 ms for 10 x 321 x 321 on
        # one core; the element-wise test below takes 2 ms on bytes, 4.5 ms on int64)
        counts = torch.bincount(labels.reshape(-1), minlength=256)
        allowed = torch.arange(256) < num_classes
        if 0 <= ignore_label < 256:
            allowed[ignore_label] = True
        values = torch.nonzero((counts > 0) & ~allowed).flatten()
        if len(values):
            raise ValueError(f"label values {values.tolist()[:8]} are outside [0, {num_classes}) and not the "
                             f"ignore label {ignore_label}")
        return
    if labels.element_size() < 4:   # a narrow type would wrap the bounds (uint8: 300 >= 44, -1 == 255)
        labels = labels.int()
    bad = (labels != ignore_label) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"label values {labels[bad].unique().tolist()[:8]} are outside [0, {num_classes}) and "
                         f"not the ignore label {ignore_label}")


def softmax_loss(scores: torch.Tensor, labels: torch.Tensor, ignore_label: int = caffe.IGNORE_LABEL,
                 check: bool = True):
    """Caffe ``SoftmaxWithLoss`` with ``ignore_label`` and the default normalization ``VALID``: the sum of
    ``-log softmax`` at the label over non-ignored pixels of the whole batch divided by their count
    (``max(count, 1)``, as Caffe's ``get_normalizer``).  Caffe's forward takes ``-log(max(prob, FLT_MIN))``,
    so a pixel adds at most ``-log(FLT_MIN)`` = 87.34 to the loss, while its backward is ``prob - 1``
    unclamped: the per-pixel value is clamped here too and the gradient is left alone.  Computed in float32
    (float64 for float64 scores).  Labels other than ``ignore_label`` must lie in [0, C) (checked unless
    ``check=False``: :func:`check_labels`)."""
    if scores.shape[0] != labels.shape[0] or scores.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"softmax_loss: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    valid = labels != ignore_label
    if check:
        try:
            check_labels(labels, scores.shape[1], ignore_label)
        except ValueError as e:
            raise ValueError(f"softmax_loss: {e}") from None
    x = scores if scores.dtype == torch.float64 else scores.float()
    nll = F.cross_entropy(x, labels.long(), ignore_index=ignore_label, reduction="none")
    nll = nll - (nll - nll.clamp(max=_MAX_PIXEL_LOSS)).detach()   # the value clamped, the gradient not
    total = nll.sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


_MAX_PIXEL_LOSS = -math.log(float(np.finfo(np.float32).tiny))   # Caffe: -log(FLT_MIN)
