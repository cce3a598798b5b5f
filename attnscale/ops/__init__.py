"""attnscale's custom ops (``torch.ops.attnscale.*``) and their pure-PyTorch references.

- :func:`scale_merge` — fused on-the-fly Interp + softmax-over-scales weighted sum / average / max.
- :func:`dilated_conv2d` — stride-1 dilated convolution that skips taps landing on zero padding.
- :func:`winograd_conv2d` — 3x3 stride-1 convolution by Winograd F(2x2, 3x3) or F(4x4, 3x3) (CPU; its
  reference is ``F.conv2d``), with :func:`winograd_weight` (the weight transform, kept by callers).
- :func:`caffe_max_pool2d` — Caffe MAX pooling forward for inference (CPU and CUDA; used by ``caffe.pool2d``),
  and ``caffe_max_pool2d_train`` with a gradient (``caffe.pool2d``'s on a GPU).
- :func:`caffe_interp` — DeepLab Interp forward (CPU and CUDA; used by ``caffe.interp`` for inference, and on a
  GPU with ``caffe_interp_backward`` by ``caffe.interp_gather`` for training).
- :func:`bias_relu` — a convolution's bias + ReLU (+ training's Dropout) in one pass, forward and backward (the
  model's on a GPU; reference :func:`bias_relu_reference`).
- :func:`dense_crf` — DeepLab's DenseCRF layer (CPU, forward only; numpy twin :func:`dense_crf_reference`); most
  callers want :func:`attnscale.crf.dense_crf`.

The CPU kernels' large GEMMs run on oneDNN or the BLAS (:func:`cpu_gemm`, :func:`set_cpu_gemm`).

Each op needs the compiled extension ``attnscale._C`` (``pip install -e . --no-build-isolation``);
without it a call raises a RuntimeError that says how to build it.  The references in
:mod:`attnscale.ops.reference` need nothing but torch.
"""
from ._ext import cpu_gemm, has_cuda_kernels, has_extension, require_extension, set_cpu_gemm
from .bias_relu import bias_relu
from .dense_crf import dense_crf
from .dilated_conv import dilated_conv2d
from .interp import caffe_interp
from .pooling import caffe_max_pool2d
from .reference import bias_relu_reference, dense_crf_reference, dilated_conv2d_reference, scale_merge_reference
from .scale_merge import scale_merge
from .winograd_conv import winograd_applies, winograd_conv2d, winograd_weight

__all__ = [
    "scale_merge", "scale_merge_reference", "dilated_conv2d", "dilated_conv2d_reference",
    "winograd_conv2d", "winograd_weight", "winograd_applies", "caffe_max_pool2d", "caffe_interp", "bias_relu",
    "bias_relu_reference", "dense_crf", "dense_crf_reference",
    "has_extension", "has_cuda_kernels", "require_extension", "cpu_gemm", "set_cpu_gemm",
]
