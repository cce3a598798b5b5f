"""attnscale: a Caffe-faithful PyTorch reproduction of *Attention to Scale* (Chen et al., CVPR 2016)."""
__version__ = "0.1.0"

from .model import AttentionToScale, ModelOutput  # noqa: E402

__all__ = ["AttentionToScale", "ModelOutput", "__version__"]
