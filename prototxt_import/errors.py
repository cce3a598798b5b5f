"""The one exception class every reader, builder and converter in :mod:`prototxt_import` raises."""
from __future__ import annotations


class CaffeImportError(ValueError):
    """A Caffe prototxt / caffemodel / HDF5 weight file could not be read, built or mapped.

    The message always names the file and, where one is involved, the layer (and for text files
    the line and column).  Subclass of :class:`ValueError`, so ``except ValueError`` also works.
    """
