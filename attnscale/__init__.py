"""attnscale: a Caffe-faithful PyTorch reproduction of *Attention to Scale* (Chen et al., CVPR 2016)."""
__version__ = "0.1.0"
