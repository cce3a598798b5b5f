"""attnscale's custom ops (``torch.ops.attnscale.*``) and their pure-PyTorch references.

- :func:`scale_merge` — fused on-the-fly Interp + softmax-over-scales weighted sum / average / max.
- :func:`dilated_conv2d` — stride-1 dilated convolution that skips taps landing on zero padding.

Each op needs the compiled extension ``attnscale._C`` (``pip install -e . --no-build-isolation``);
without it a call raises a RuntimeError that says how to build it.  The references in
:mod:`attnscale.ops.reference` need nothing but torch.
"""
from ._ext import has_cuda_kernels, has_extension, require_extension
from .dilated_conv import dilated_conv2d
from .reference import dilated_conv2d_reference, scale_merge_reference
from .scale_merge import scale_merge

__all__ = [
    "scale_merge", "scale_merge_reference", "dilated_conv2d", "dilated_conv2d_reference",
    "has_extension", "has_cuda_kernels", "require_extension",
]
