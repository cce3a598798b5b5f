"""Read Caffe/DeepLab prototxts and .caffemodel(.h5) weights without Caffe.

- :func:`load_net` builds a ``torch.nn.Module`` executing a Caffe net (DeepLab layers included);
- :func:`to_attnscale` maps a DeepLab-LargeFOV / attention-to-scale net and its weights onto
  :class:`attnscale.AttentionToScale`;
- :func:`train_config` turns a Caffe solver and its training net into a ``TrainConfig`` (solver settings,
  data layer, every layer's ``lr_mult`` / ``decay_mult``: :func:`param_mults`); :func:`resume_caffe_snapshot`
  a Caffe run's ``.solverstate`` into a checkpoint to go on from;
- :func:`read_net`, :func:`read_solver`, :func:`read_weights` are the raw readers;
- every failure is a :class:`CaffeImportError` (a ``ValueError``) naming the file/layer/line.

CLI: ``python -m prototxt_import inspect NET.prototxt [WEIGHTS]`` and
``python -m prototxt_import convert NET.prototxt WEIGHTS -o model.pt``,
``python -m prototxt_import config SOLVER.prototxt -o config.json``.
"""
from .errors import CaffeImportError
from .net import CaffeNet, WeightLoadReport, load_net
from .readers import (CaffeBlob, SolverSnapshot, WeightFile, parse_binary, parse_text, read_caffemodel,
                      read_hdf5_weights, read_net, read_solver, read_solverstate, read_weights)
from .schema import message_class


def to_attnscale(*args, **kwargs):
    """See :func:`prototxt_import.convert.to_attnscale`."""
    from .convert import to_attnscale as _impl
    return _impl(*args, **kwargs)


def param_mults(*args, **kwargs):
    """See :func:`prototxt_import.convert.param_mults`."""
    from .convert import param_mults as _impl
    return _impl(*args, **kwargs)


def train_config(*args, **kwargs):
    """See :func:`prototxt_import.solver.train_config`."""
    from .solver import train_config as _impl
    return _impl(*args, **kwargs)


def resume_caffe_snapshot(*args, **kwargs):
    """See :func:`prototxt_import.solver.resume_caffe_snapshot`."""
    from .solver import resume_caffe_snapshot as _impl
    return _impl(*args, **kwargs)


__all__ = [
    "CaffeImportError", "CaffeNet", "WeightLoadReport", "load_net", "to_attnscale", "param_mults", "train_config",
    "resume_caffe_snapshot",
    "CaffeBlob", "WeightFile", "parse_binary", "parse_text", "read_caffemodel",
    "read_hdf5_weights", "read_net", "read_solver", "read_solverstate", "read_weights", "message_class",
    "SolverSnapshot",
]
