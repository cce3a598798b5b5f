"""Data: DeepLab list files, Caffe-faithful transforms, loaders, the SBD converter and a
built-in synthetic scale data set.  See :mod:`attnscale.data.lists` for the list-file form."""
from .dataset import (FileSource, ResumableSampler, SegDataset, make_loader, read_image,
                      read_label)
from .lists import (DATASETS, IGNORE_LABEL, DatasetSpec, find_voc_root, get_spec, read_list,
                    write_list)
from .synthetic import SYNTHETIC_CLASSES, SyntheticSource, make_sample
from .transforms import (MEAN_BGR, TransformConfig, crop_pair, finish_image, network_input, transform_test,
                         transform_train)

__all__ = ["FileSource", "ResumableSampler", "SegDataset", "make_loader", "read_image",
           "read_label", "DATASETS", "IGNORE_LABEL", "DatasetSpec", "find_voc_root", "get_spec",
           "read_list", "write_list", "SYNTHETIC_CLASSES", "SyntheticSource", "make_sample",
           "MEAN_BGR", "TransformConfig", "crop_pair", "finish_image", "network_input", "transform_test",
           "transform_train"]
