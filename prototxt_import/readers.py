"""Readers for Caffe's NetParameter / SolverParameter (text and binary) and for trained weights
(.caffemodel binary protobuf, .caffemodel.h5 HDF5).

Caffe facts followed here:

- Text nets/solvers are protobuf text format (``ReadProtoFromTextFile``); binary nets and
  .caffemodel files are the serialized ``NetParameter`` (``ReadProtoFromBinaryFile``).
- Legacy nets use ``layers { type: CONVOLUTION ... }`` (``V1LayerParameter``); Caffe upgrades them
  with ``UpgradeV1Net`` (enum type -> string type, ``param: "name"`` -> ``ParamSpec``,
  ``blobs_lr`` -> ``lr_mult``, ``weight_decay`` -> ``decay_mult``).  :func:`upgrade_v1_layer` does the same
  (:func:`upgraded_layers` for a whole net).
- ``input_dim`` comes in groups of four per ``input`` (``UpgradeNetInput``).
- A blob's shape is the legacy ``(num, channels, height, width)`` when any of the four is set, else
  ``shape.dim`` (no axes at all: a scalar); its values are ``double_data`` when non-empty, else ``data``
  (``Blob::FromProto``), and their count must equal the shape's product.  A legacy shape matches a
  parameter shape padded on the left with 1s to four axes (``Blob::ShapeEquals``).
- HDF5 weights (``Net::ToHDF5``) hold ``/data/<layer name>/<i>`` datasets, ``i`` = blob index; a layer
  whose parameters are shared copies of another layer's (``param { name }``, not the owner) has an
  empty group, or lacks the shared indices.  Caffe reads the layers in name order, float or integer
  datasets, and (DeepLab-v2's ``hdf5_load_nd_dataset``) reshapes the blob to the dataset's shape.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format

from .errors import CaffeImportError
from .schema import message_class

#: the largest text file read (a prototxt is a few hundred KiB at most)
MAX_TEXT_BYTES = 64 << 20
#: the largest binary file read (protobuf's own 2 GiB message limit)
MAX_BINARY_BYTES = (2 << 30) - 1
#: zlib's best case: a deflate stream unpacks to at most about 1032 bytes per byte stored
DEFLATE_MAX_RATIO = 1032
#: more blobs than any Caffe layer has: HDF5 datasets named by a larger index are never read
MAX_LAYER_BLOBS = 64

V1_TYPE_NAMES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
    # DeepLab-v1 (deeplab-public)
    "IMAGE_SEG_DATA": "ImageSegData", "INTERP": "Interp", "SEG_ACCURACY": "SegAccuracy", "PADDING": "Padding",
    "MAT_READ": "MatRead", "MAT_WRITE": "MatWrite", "DENSE_CRF": "DenseCRF", "DOMINANT_CHANNEL": "DominantChannel",
    "BIAS_CHANNEL": "BiasChannel", "UNIQUE_LABEL": "UniqueLabel", "CENSOR_LABEL": "CensorLabel",
    "ADAPTIVE_BIAS_CHANNEL": "AdaptiveBiasChannel", "CHANNEL_AGGREGATOR": "ChannelAggregator",
    "IGNORE_OVERLAY": "IgnoreOverlay", "HISTOGRAM": "Histogram", "RELATIVE_ERROR": "RelativeError",
    "GAIN_CHANNEL": "GainChannel", "ONEHOT": "OneHot",
}


# ----------------------------------------------------------------------------- file access
def _read_bytes(path: str | os.PathLike, limit: int, what: str) -> bytes:
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if size > limit:
        raise CaffeImportError(f"{path}: {what} is {size} bytes, more than the {limit} bytes allowed")
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise CaffeImportError(f"{path}: {what} is larger than the {limit} bytes allowed")
    return data


def _enclosing_layer(text: str, line: int) -> str | None:
    """Name of the ``layer {`` / ``layers {`` block that contains 1-based ``line`` (best effort)."""
    lines = text.splitlines(keepends=True)
    upto = "".join(lines[:max(line, 1)])
    starts = [m.start() for m in re.finditer(r"(?m)(?:^|[\s{}])layers?\s*\{", upto)]
    if not starts:
        return None
    m = re.compile(r'\bname\s*:\s*"([^"]*)"').search(text, starts[-1])
    return m.group(1) if m else None


def parse_text(text: str, message_name: str = "NetParameter", source: str = "<string>"):
    """Parse protobuf text into ``caffe.<message_name>``; errors name ``source``, line, column
    and (for nets) the enclosing layer."""
    msg = message_class(message_name)()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        where = f"{source}:{line}:{col}" if line is not None else source
        layer = _enclosing_layer(text, line) if line is not None else None
        in_layer = f" (in layer {layer!r})" if layer else ""
        raise CaffeImportError(f"{where}: {detail}{in_layer}") from None
    except RecursionError:
        raise CaffeImportError(f"{source}: nesting too deep to parse") from None
    except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
        raise CaffeImportError(f"{source}: cannot parse as {message_name}: {exc}") from None
    return msg


def _decode_text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CaffeImportError(f"{source}:{line}: not UTF-8 text (byte {exc.start})") from None


def parse_binary(data: bytes, message_name: str = "NetParameter", source: str = "<bytes>"):
    """Parse serialized ``caffe.<message_name>``; unknown fields are skipped (protobuf rule),
    truncated or corrupt input raises :class:`CaffeImportError` naming ``source``."""
    msg = message_class(message_name)()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as exc:  # DecodeError, RuntimeError from upb: all mean "corrupt"
        raise CaffeImportError(f"{source}: not a valid binary {message_name} "
                               f"(truncated or corrupt file): {exc}") from None
    return msg


def _is_binary_path(path: str) -> bool:
    p = path.lower()
    return p.endswith((".caffemodel", ".binaryproto", ".pb", ".protobin"))


def read_net(path_or_text: str | os.PathLike, binary: bool | None = None):
    """Read a ``NetParameter`` from a .prototxt (text) or binary file (``.caffemodel`` etc.; or
    ``binary=True``), or from prototxt text itself (a string containing a newline or ``{``).
    The result is *not* upgraded; see :func:`load_net_param`."""
    if isinstance(path_or_text, str) and not os.path.exists(path_or_text) and (
            "\n" in path_or_text or "{" in path_or_text):
        return parse_text(path_or_text, "NetParameter", "<string>")
    path = os.fspath(path_or_text)
    if binary is None:
        binary = _is_binary_path(path)
    if binary:
        net = parse_binary(_read_bytes(path, MAX_BINARY_BYTES, "binary net"), "NetParameter", path)
        for v1 in net.layers:
            cp = v1.convolution_param
            if cp.HasField("force_nd_im2col") or len(cp.dilation):
                raise CaffeImportError(
                    f"{path}: legacy layer {v1.name!r}: convolution fields 17-19 of a binary legacy net are "
                    "deeplab-public's hole / hole_h / hole_w or BVLC's force_nd_im2col / dilation, and the file "
                    "cannot tell which: read the net from its prototxt text")
        return net
    text = _decode_text(_read_bytes(path, MAX_TEXT_BYTES, "prototxt"), path)
    return parse_text(text, "NetParameter", path)


def read_solver(path_or_text: str | os.PathLike, binary: bool = False):
    """Read a ``SolverParameter`` (solver.prototxt) from a file or from text (a string holding a newline, a
    ``{`` or a ``field: value``; ``dir/a:b.prototxt`` is a path)."""
    if isinstance(path_or_text, str) and not os.path.exists(path_or_text) and (
            "\n" in path_or_text or "{" in path_or_text or re.search(r":\s", path_or_text)):
        return parse_text(path_or_text, "SolverParameter", "<string>")
    path = os.fspath(path_or_text)
    if binary:
        return parse_binary(_read_bytes(path, MAX_BINARY_BYTES, "binary solver"), "SolverParameter", path)
    return parse_text(_decode_text(_read_bytes(path, MAX_TEXT_BYTES, "solver prototxt"), path),
                      "SolverParameter", path)


# ----------------------------------------------------------------------------- upgrade
def v1_type_name(v1) -> str:
    """A legacy layer's type as the current form names it ("" for a number no Caffe we read defines).  39 is
    BVLC's DECONVOLUTION and deeplab-public's IMAGE_SEG_DATA in binary files: a layer 39 with an
    ``image_data_param`` and no ``convolution_param`` is the data layer."""
    if not v1.HasField("type"):       # an unknown number: protobuf keeps it aside and reads the default
        return ""
    name = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[v1.type].name
    if name == "DECONVOLUTION" and v1.HasField("image_data_param") and not v1.HasField("convolution_param"):
        name = "IMAGE_SEG_DATA"
    return V1_TYPE_NAMES.get(name, name)


def upgrade_v1_layer(v1, source: str = "<net>"):
    """Caffe's ``UpgradeV1LayerParameter``: one ``V1LayerParameter`` -> ``LayerParameter``."""
    LayerParameter = message_class("LayerParameter")
    layer = LayerParameter()
    if not v1.HasField("name") and not v1.HasField("type"):
        raise CaffeImportError(f"{source}: a legacy 'layers' entry has neither name nor type "
                               "(V0 nets with nested 'layer' blocks are not supported)")
    layer.name = v1.name
    layer.type = v1_type_name(v1)
    if not layer.type or layer.type == "NONE":
        raise CaffeImportError(f"{source}: legacy layer {v1.name!r} has no known type")
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.loss_weight.extend(v1.loss_weight)
    layer.blobs.extend(v1.blobs)
    n_param = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay), len(v1.blob_share_mode))
    for i in range(n_param):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.name in layer.DESCRIPTOR.fields_by_name:
            getattr(layer, fd.name).CopyFrom(value)
    if v1.HasField("strict_dim"):
        layer.strict_dim = v1.strict_dim
    if v1.HasField("softmaxloss_param"):      # DeepLab-v1's SoftmaxWithLoss options
        sp = v1.softmaxloss_param
        if sp.weight_source:
            raise CaffeImportError(f"{source}: layer {v1.name!r}: softmaxloss_param.weight_source (DeepLab-v1's "
                                   "class-weighted loss) is not supported")
        if len(sp.ignore_label) > 1:
            raise CaffeImportError(f"{source}: layer {v1.name!r}: {len(sp.ignore_label)} ignore labels; the "
                                   "current LossParameter holds one")
        if sp.ignore_label:
            layer.loss_param.ignore_label = sp.ignore_label[0]
    return layer


def hole_to_dilation(layer, source: str = "<net>") -> None:
    """DeepLab-v1's atrous convolution fields, ``hole`` (or ``hole_h`` + ``hole_w``), as the ``dilation`` that
    replaced them (the same kernel spacing: ``pad 12 hole 12`` is ``pad 12 dilation 12``)."""
    cp = layer.convolution_param
    fields = [f for f in ("hole", "hole_h", "hole_w") if cp.HasField(f)]
    if not fields:
        return
    if len(cp.dilation):
        raise CaffeImportError(f"{source}: layer {layer.name!r}: both {fields[0]} (DeepLab-v1) and dilation")
    if cp.HasField("hole_h") != cp.HasField("hole_w") or len(fields) == 3:   # deeplab-public's ConvolutionLayer
        raise CaffeImportError(f"{source}: layer {layer.name!r}: give hole, or hole_h and hole_w together "
                               f"(got {', '.join(fields)})")
    hw = (cp.hole_h, cp.hole_w) if cp.HasField("hole_h") else (cp.hole, cp.hole)
    if min(hw) < 1:
        raise CaffeImportError(f"{source}: layer {layer.name!r}: hole must be >= 1, got {hw}")
    for f in fields:
        cp.ClearField(f)
    cp.dilation.extend(hw if hw[0] != hw[1] else hw[:1])


@dataclass
class NetInputs:
    """Net-level inputs (``input`` + ``input_shape`` / ``input_dim``), in declaration order."""
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...] | None] = field(default_factory=list)


def net_inputs(net, source: str = "<net>") -> NetInputs:
    """Caffe's ``UpgradeNetInput`` rules: one ``input_shape`` per ``input``, or four
    ``input_dim`` values per ``input``."""
    names = list(net.input)
    if net.input_shape and net.input_dim:
        raise CaffeImportError(f"{source}: both input_shape and input_dim are given")
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise CaffeImportError(f"{source}: {len(names)} input(s) but {len(net.input_shape)} "
                                   "input_shape(s); Caffe requires one input_shape per input")
        shapes = [tuple(int(d) for d in s.dim) for s in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(names):
            raise CaffeImportError(f"{source}: {len(names)} input(s) need {4 * len(names)} "
                                   f"input_dim values, got {len(net.input_dim)}")
        dims = [int(d) for d in net.input_dim]
        shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(names))]
    else:
        shapes = [None] * len(names)
    for n, s in zip(names, shapes):
        if s is not None and any(d < 0 for d in s):
            raise CaffeImportError(f"{source}: input {n!r} has a negative dimension {s}")
    return NetInputs(names, shapes)


def upgraded_layers(net, source: str = "<net>") -> list:
    """The net's layers as current-form ``LayerParameter`` messages (V1 ``layers`` upgraded, DeepLab-v1's
    ``hole`` as ``dilation``)."""
    if len(net.layer) and len(net.layers):
        raise CaffeImportError(f"{source}: the net mixes 'layer' and legacy 'layers' entries")
    layers = [upgrade_v1_layer(v1, source) for v1 in net.layers] if len(net.layers) else list(net.layer)
    for i, lp in enumerate(layers):
        if any(lp.convolution_param.HasField(f) for f in ("hole", "hole_h", "hole_w")):
            if not len(net.layers):       # a copy: the caller's net stays as it was
                layers[i] = lp = type(lp).FromString(lp.SerializeToString())
            hole_to_dilation(lp, source)
    return layers


# ----------------------------------------------------------------------------- blobs / weights
@dataclass
class CaffeBlob:
    """One learned blob: float32 values in their Caffe shape.  ``legacy`` is True when the shape
    came from num/channels/height/width (Caffe then compares shapes padded to 4 axes)."""
    data: np.ndarray
    legacy: bool = False
    #: from HDF5: DeepLab-v2's ``hdf5_load_nd_dataset`` reshapes the target blob to the dataset, so any
    #: shape with the parameter's element count runs the same
    reshape: bool = False

    def fits(self, shape, strict: bool = True) -> bool:
        """Caffe ``Blob::ShapeEquals`` against a parameter of shape ``shape`` (HDF5, or a DeepLab-v1 layer with
        ``strict_dim: false`` (``strict=False``): the same count)."""
        shape = tuple(int(d) for d in shape)
        if self.reshape or not strict:
            return self.data.size == math.prod(shape)
        if self.legacy:
            return len(shape) <= 4 and (1,) * (4 - len(shape)) + shape == tuple(self.data.shape)
        return tuple(self.data.shape) == shape


def blob_shape(blob) -> tuple[tuple[int, ...], bool]:
    """Caffe ``Blob::FromProto``: the legacy 4-axis shape whenever any legacy field is set."""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (int(blob.num), int(blob.channels), int(blob.height), int(blob.width)), True
    return tuple(int(d) for d in blob.shape.dim), False


def blob_to_array(blob, where: str) -> CaffeBlob:
    """Caffe's ``Blob::FromProto`` (shape, then double_data or data), with size checks."""
    shape, legacy = blob_shape(blob)
    if any(d < 0 for d in shape):
        raise CaffeImportError(f"{where}: negative dimension in blob shape {shape}")
    count = math.prod(shape) if shape else 1
    values = blob.double_data if len(blob.double_data) else blob.data
    if len(values) != count:
        kind = "double_data" if len(blob.double_data) else "data"
        raise CaffeImportError(f"{where}: blob shape {shape} holds {count} values but its "
                               f"{kind} has {len(values)}")
    dtype = np.float64 if len(blob.double_data) else np.float32
    arr = np.asarray(values, dtype=dtype).astype(np.float32, copy=False).reshape(shape)
    return CaffeBlob(arr, legacy)


@dataclass
class WeightFile:
    """Trained blobs by layer, in the order Caffe copies them: a .caffemodel's layer order, an HDF5
    file's name order (a name may repeat in a .caffemodel; later wins).  In an HDF5 file a blob index
    may be missing (``None``): ``Net::ToHDF5`` writes only the parameters a layer owns; and Caffe's
    blob-count check counts a group's links (``hdf5_links``), whatever their names."""
    path: str
    layers: list[tuple[str, str, list[CaffeBlob | None]]] = field(default_factory=list)
    hdf5: bool = False
    hdf5_links: dict[str, int] = field(default_factory=dict)

    def by_name(self) -> dict[str, list[CaffeBlob | None]]:
        out: dict[str, list[CaffeBlob | None]] = {}
        for name, _type, blobs in self.layers:
            out[name] = blobs
        return out

    def types(self) -> dict[str, str]:
        return {name: t for name, t, _ in self.layers}


def read_caffemodel(path: str | os.PathLike) -> WeightFile:
    """Read a binary ``.caffemodel`` (current or V1 form) into a :class:`WeightFile`."""
    path = os.fspath(path)
    net = parse_binary(_read_bytes(path, MAX_BINARY_BYTES, "caffemodel"), "NetParameter", path)
    out = WeightFile(path)
    if len(net.layer) and len(net.layers):
        raise CaffeImportError(f"{path}: the net mixes 'layer' and legacy 'layers' entries")
    for layer in net.layer:
        blobs = [blob_to_array(b, f"{path}: layer {layer.name!r} blob {i}") for i, b in enumerate(layer.blobs)]
        out.layers.append((layer.name, layer.type, blobs))
    for v1 in net.layers:  # no full upgrade needed: only name, type and blobs are used
        if not v1.HasField("name") and not v1.HasField("type"):
            raise CaffeImportError(f"{path}: a legacy 'layers' entry has neither name nor type (a V0 "
                                   "caffemodel with nested 'layer' blocks: upgrade it with Caffe's "
                                   "upgrade_net_proto_binary first)")
        blobs = [blob_to_array(b, f"{path}: layer {v1.name!r} blob {i}") for i, b in enumerate(v1.blobs)]
        out.layers.append((v1.name, v1_type_name(v1), blobs))
    if not any(blobs for _, _, blobs in out.layers):
        raise CaffeImportError(f"{path}: no layer holds any weights (not a trained .caffemodel: a deploy "
                               "net or a mean .binaryproto?)")
    return out


def _hdf5_numbers(ds, where: str, size: int, total: int, dtype=np.float32) -> tuple[np.ndarray, int]:
    """A numeric HDF5 dataset as ``dtype`` (float32; an integer type takes integer datasets only), and the
    running total of bytes read, checked against what the file (``size`` bytes) stores of it before anything
    is read."""
    import h5py
    kinds = "iu" if np.dtype(dtype).kind in "iu" else "fiu"             # H5T_INTEGER / + H5T_FLOAT
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in kinds:
        raise CaffeImportError(f"{where}: not {'an integer' if kinds == 'iu' else 'a numeric'} dataset")
    nbytes = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize if ds.shape else ds.dtype.itemsize
    if ds.external:
        raise CaffeImportError(f"{where}: the dataset's values lie in external file(s) "
                               f"{[e[0] for e in ds.external]}, not in this file")
    # What the file stores of it: a dataset whose storage was never written reads as fill values (a few KB
    # could claim GBs).  Caffe writes uncompressed, contiguous datasets; a compressed (chunked) one may
    # unpack to at most deflate's best ratio.
    stored = ds.id.get_storage_size()
    unpacks = stored * (DEFLATE_MAX_RATIO if ds.compression else 1)
    total += nbytes
    if stored > size or nbytes > unpacks or total > MAX_BINARY_BYTES * 8:
        raise CaffeImportError(f"{where}: dataset claims {nbytes} bytes but the file stores {stored} of them "
                               f"({ds.compression or 'uncompressed'}; file {size} bytes)")
    return np.asarray(ds[()], dtype=dtype).reshape(ds.shape), total


@dataclass
class SolverSnapshot:
    """A Caffe ``SolverState`` (``Solver::Snapshot``): the iteration, the weights file it names, multistep's
    step and one momentum ``history`` array per learnable blob, in ``Net::learnable_params`` order."""
    path: str
    iter: int
    learned_net: str
    current_step: int
    history: list[np.ndarray]


def read_solverstate(path: str | os.PathLike) -> SolverSnapshot:
    """A ``.solverstate`` (binary ``SolverState``) or ``.solverstate.h5`` (``SnapshotSolverStateToHDF5``:
    ``iter``, ``learned_net``, ``current_step``, ``history/<i>``), every value checked as weights are."""
    path = os.fspath(path)
    if not path.endswith(".h5"):
        st = parse_binary(_read_bytes(path, MAX_BINARY_BYTES, "solverstate"), "SolverState", path)
        if not st.HasField("iter") or st.iter < 0:
            raise CaffeImportError(f"{path}: not a Caffe solverstate (no iteration count)")
        return SolverSnapshot(path, st.iter, st.learned_net, st.current_step,
                              [blob_to_array(b, f"{path}: history blob {i}").data for i, b in enumerate(st.history)])
    import h5py
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot read the solverstate: {exc.strerror or exc}") from None
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("iter", "learned_net", "history") if k not in f]
            if missing or not isinstance(f["history"], h5py.Group):
                raise CaffeImportError(f"{path}: not a Caffe HDF5 solverstate (lacks {missing or ['a history group']})")
            ints, total = {}, 0
            for k in ("iter", "current_step"):
                if k in f:
                    arr, total = _hdf5_numbers(f[k], f"{path}: {k}", size, total, np.int64)
                    if arr.size != 1:
                        raise CaffeImportError(f"{path}: {k} is not one integer")
                    ints[k] = int(arr.reshape(-1)[0])
            net = f["learned_net"]
            if not isinstance(net, h5py.Dataset) or net.dtype.kind not in "SOU" or net.shape not in ((), (1,)):
                raise CaffeImportError(f"{path}: learned_net is not a string")
            raw = net[()] if net.shape == () else net[0]
            learned_net = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            names = list(f["history"].keys())
            if sorted(names, key=lambda n: int(n) if n.isdigit() else -1) != [str(i) for i in range(len(names))]:
                raise CaffeImportError(f"{path}: history datasets must be named 0 ... {len(names) - 1}")
            history = []
            for i in range(len(names)):
                arr, total = _hdf5_numbers(f["history"][str(i)], f"{path}: history blob {i}", size, total)
                history.append(arr)
    except CaffeImportError:
        raise
    except Exception as exc:  # OSError from HDF5 (truncated / not HDF5), ...
        raise CaffeImportError(f"{path}: cannot read the HDF5 solverstate: {exc}") from None
    if ints["iter"] < 0:
        raise CaffeImportError(f"{path}: iter {ints['iter']} < 0")
    return SolverSnapshot(path, ints["iter"], learned_net, ints.get("current_step", 0), history)


def read_hdf5_weights(path: str | os.PathLike) -> WeightFile:
    """Read Caffe's HDF5 weights (``/data/<layer>/<i>``) into a :class:`WeightFile`."""
    import h5py

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot read HDF5 weights: {exc.strerror or exc}") from None
    if size > MAX_BINARY_BYTES * 8:
        raise CaffeImportError(f"{path}: HDF5 weights file is {size} bytes, too large")
    out = WeightFile(path, hdf5=True)
    total = 0  # bytes of all datasets read so far
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise CaffeImportError(f"{path}: no /data group (Caffe's HDF5 weight layout is "
                                       "/data/<layer>/<blob index>)")
            # CopyTrainedLayersFromHDF5 visits /data by name (H5_INDEX_NAME): byte order, whatever the
            # file's creation order; with shared blobs, the last layer written wins
            for lname in sorted(f["data"].keys(), key=lambda n: n.encode("utf-8", "surrogateescape")):
                group = f["data"][lname]
                if not isinstance(group, h5py.Group):
                    raise CaffeImportError(f"{path}: /data/{lname} is not a group")
                keys = list(group.keys())
                # Caffe counts every link (CHECK_LE against the layer's blob count), then opens datasets
                # "0", "1", ... below that count: other names are counted, never read
                out.hdf5_links[lname] = len(keys)
                keys = [k for k in keys if k.isdigit() and str(int(k)) == k and int(k) < MAX_LAYER_BLOBS]
                blobs: list[CaffeBlob | None] = [None] * (max((int(k) for k in keys), default=-1) + 1)
                for k in keys:
                    arr, total = _hdf5_numbers(group[k], f"{path}: layer {lname!r} blob {k}", size, total)
                    blobs[int(k)] = CaffeBlob(arr, reshape=True)
                out.layers.append((lname, "", blobs))
    except CaffeImportError:
        raise
    except Exception as exc:  # OSError from HDF5 (truncated / not HDF5), KeyError, ...
        raise CaffeImportError(f"{path}: cannot read HDF5 weights: {exc}") from None
    return out


def read_weights(path: str | os.PathLike) -> WeightFile:
    """Read .caffemodel (binary protobuf) or .h5 / .caffemodel.h5 (HDF5) weights by extension,
    falling back to sniffing the HDF5 signature."""
    path = os.fspath(path)
    if path.lower().endswith((".h5", ".hdf5")):
        return read_hdf5_weights(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CaffeImportError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    if head == b"\x89HDF\r\n\x1a\n":
        return read_hdf5_weights(path)
    return read_caffemodel(path)
