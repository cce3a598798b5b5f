"""Test helpers: DeepLab-LargeFOV / attention-to-scale prototxts with reduced channel counts (same
layer names, types, bottoms/tops and parameters as /work/shared/prototxt), and weight files
written with the protobuf library (current and V1 form, packed/unpacked floats, double_data,
legacy num/channels/height/width shapes) or h5py."""
from __future__ import annotations

import struct

import h5py
import numpy as np

from prototxt_import.schema import message_class

TRUNK = [("conv1_1", 64, 1, 1), ("conv1_2", 64, 1, 1), ("pool1", "MAX", 2),
         ("conv2_1", 128, 1, 1), ("conv2_2", 128, 1, 1), ("pool2", "MAX", 2),
         ("conv3_1", 256, 1, 1), ("conv3_2", 256, 1, 1), ("conv3_3", 256, 1, 1), ("pool3", "MAX", 2),
         ("conv4_1", 512, 1, 1), ("conv4_2", 512, 1, 1), ("conv4_3", 512, 1, 1), ("pool4", "MAX", 1),
         ("conv5_1", 512, 2, 2), ("conv5_2", 512, 2, 2), ("conv5_3", 512, 2, 2), ("pool5", "MAX", 1),
         ("pool5a", "AVE", 1)]
SUFFIX = {0.75: "_res075", 0.5: "_res05"}
SHRINK = {0.75: "shrink_factor: 4 zoom_factor: 3", 0.5: "shrink_factor: 2"}
GROW = {0.75: "zoom_factor: 4 shrink_factor: 3", 0.5: "zoom_factor: 2"}


def ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _conv(name, bottom, top, n, k, pad=0, dil=1, share=None):
    params = ""
    if share:
        params = (f' param {{ name: "{share}_w" lr_mult: 1 decay_mult: 1 }}'
                  f' param {{ name: "{share}_b" lr_mult: 2 decay_mult: 0 }}')
    extra = (f" pad: {pad}" if pad else "") + (f" dilation: {dil}" if dil > 1 else "")
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}"{params}\n'
            f"  convolution_param {{ num_output: {n} kernel_size: {k}{extra} }} }}\n")


def _simple(name, type_, bottom, top, extra=""):
    return f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{top}"{extra} }}\n'


def _trunk(sfx, bottom, width, classes, share, dropout=True, clf="fc8_voc12"):
    out = []
    x = bottom
    for spec in TRUNK:
        name = spec[0] + sfx
        if spec[0].startswith("conv"):
            out.append(_conv(name, x, name, ch(spec[1], width), 3, spec[2], spec[3], spec[0] if share else None))
            out.append(_simple("relu" + spec[0][4:] + sfx, "ReLU", name, name))
        else:
            out.append(f'layer {{ name: "{name}" type: "Pooling" bottom: "{x}" top: "{name}"\n'
                       f"  pooling_param {{ pool: {spec[1]} kernel_size: 3 stride: {spec[2]} pad: 1 }} }}\n")
        x = name
    for fc, n, k, pad, dil in (("fc6", 1024, 3, 12, 12), ("fc7", 1024, 1, 0, 1)):
        name = fc + sfx
        out.append(_conv(name, x, name, ch(n, width), k, pad, dil, fc if share else None))
        out.append(_simple("relu" + fc[2:] + sfx, "ReLU", name, name))
        if dropout:
            out.append(_simple("drop" + fc[2:] + sfx, "Dropout", name, name,
                               " dropout_param { dropout_ratio: 0.5 }"))
        x = name
    out.append(_conv(clf + sfx, x, clf + sfx, classes, 1, share=clf if share else None))
    return out


def deeplab_prototxt(scales=(1.0,), merge=None, width=1.0, classes=21, size=513, v1=False,
                     order=None, listing=None) -> str:
    """The shared prototxts' structure (``deeplab_largefov_deploy``, ``attention3_deploy``, ...)
    with every channel count multiplied by ``width`` (rounded like attnscale's model).  ``order``: the
    scales in the merge's (Concat / Slice / Eltwise) order; ``listing``: the order in which the
    coarser branches are written (both default to ``scales``)."""
    multi = len(scales) > 1
    name = "DeepLab-LargeFOV" if not multi else f"DeepLab-LargeFOV-MSc-{merge}"
    head = f'name: "{name}"\ninput: "data"\n'
    head += ("input_dim: 1\ninput_dim: 3\ninput_dim: {0}\ninput_dim: {0}\n".format(size) if v1
             else f"input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}\n")
    body = _trunk("", "data", width, classes, multi)
    for s in (listing or scales[1:]):
        sfx = SUFFIX[s]
        body.append(_simple(f"shrink{sfx}", "Interp", "data", f"data{sfx}", f" interp_param {{ {SHRINK[s]} }}"))
        body += _trunk(sfx, f"data{sfx}", width, classes, True)
        for blob in (f"fc8_voc12{sfx}", f"fc7{sfx}"):
            body.append(_simple(f"{blob}_interp", "Interp", blob, f"{blob}_interp", f" interp_param {{ {GROW[s]} }}"))
    order = order or scales
    scores = [f"fc8_voc12{SUFFIX[s]}_interp" if s != 1 else "fc8_voc12" for s in order]
    S = len(scales)
    if merge == "attention":
        feats = [f"fc7{SUFFIX[s]}_interp" if s != 1 else "fc7" for s in order]
        body.append('layer { name: "fc7_concat" type: "Concat" ' + " ".join(f'bottom: "{f}"' for f in feats)
                    + ' top: "fc7_concat" }\n')
        body.append(_conv("att_conv1", "fc7_concat", "att_conv1", ch(512, width), 3, 1))
        body.append(_simple("att_relu1", "ReLU", "att_conv1", "att_conv1"))
        body.append(_simple("att_drop1", "Dropout", "att_conv1", "att_conv1", " dropout_param { dropout_ratio: 0.5 }"))
        body.append(_conv("att_conv2", "att_conv1", "att_conv2", S, 1))
        body.append(_simple("attention", "Softmax", "att_conv2", "attention"))
        body.append('layer { name: "att_slice" type: "Slice" bottom: "attention" '
                    + " ".join(f'top: "attention{i + 1}"' for i in range(S)) + " slice_param { axis: 1 } }\n")
        for i, sc in enumerate(scores):
            body.append(f'layer {{ name: "{sc}_weighted" type: "SpatialProduct" bottom: "{sc}" '
                        f'bottom: "attention{i + 1}" top: "{sc}_weighted" }}\n')
        body.append('layer { name: "fc8_attention" type: "Eltwise" ' + " ".join(f'bottom: "{sc}_weighted"' for sc in scores)
                    + ' top: "fc8_attention" eltwise_param { operation: SUM } }\n')
    elif merge == "max":
        body.append('layer { name: "fc8_max" type: "Eltwise" ' + " ".join(f'bottom: "{sc}"' for sc in scores)
                    + ' top: "fc8_max" eltwise_param { operation: MAX } }\n')
    elif merge == "avg":
        body.append('layer { name: "fc8_avg" type: "Eltwise" ' + " ".join(f'bottom: "{sc}"' for sc in scores)
                    + ' top: "fc8_avg" eltwise_param { operation: SUM ' + " ".join(f"coeff: {1 / S!r}" for _ in scores)
                    + " } }\n")
    text = head + "".join(body)
    if v1:
        text = to_v1_text(text)
    return text


def to_v1_text(text: str) -> str:
    """Rewrite current-form layers as legacy ``layers { type: ENUM }`` (no params, as the
    shared V1 file)."""
    import re
    names = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Pooling": "POOLING", "Dropout": "DROPOUT",
             "Softmax": "SOFTMAX", "Slice": "SLICE", "Eltwise": "ELTWISE", "Concat": "CONCAT"}
    text = re.sub(r' param \{[^}]*\}', "", text)
    text = re.sub(r'^layer \{', "layers {", text, flags=re.M)
    return re.sub(r'type: "(\w+)"', lambda m: f"type: {names[m.group(1)]}", text)


# ------------------------------------------------------------------------------- weight files
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def blob_bytes(arr: np.ndarray, packed=True, double=False, legacy=False) -> bytes:
    """A serialized BlobProto.  ``packed=False`` writes ``data`` unpacked (one tag per value, as
    old protobuf writers did), which every conforming parser must accept."""
    BlobProto = message_class("BlobProto")
    b = BlobProto()
    if legacy:
        dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
        b.num, b.channels, b.height, b.width = dims
    else:
        b.shape.dim.extend(arr.shape)
    flat = arr.reshape(-1)
    if double:
        b.double_data.extend(flat.astype(np.float64).tolist())
    elif packed:
        b.data.extend(flat.astype(np.float32).tolist())
    raw = b.SerializeToString()
    if not double and not packed:
        raw += b"".join(b"\x2d" + struct.pack("<f", float(v)) for v in flat.astype(np.float32))
    return raw


def caffemodel_bytes(layers, v1=False, packed=True, double=False, legacy=False) -> bytes:
    """Serialized NetParameter with one layer per ``(name, type, [arrays])``."""
    Net = message_class("NetParameter")
    net = Net(name="weights")
    raw = b""
    field_blobs = 6 if v1 else 7
    for name, type_, arrays in layers:
        if v1:
            lp = message_class("V1LayerParameter")(name=name)
            from prototxt_import.readers import V1_TYPE_NAMES
            enum_name = {v: k for k, v in V1_TYPE_NAMES.items()}[type_]
            lp.type = lp.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_name[enum_name].number
        else:
            lp = message_class("LayerParameter")(name=name, type=type_)
        lraw = lp.SerializeToString()
        for a in arrays:
            bb = blob_bytes(np.asarray(a, dtype=np.float32), packed, double, legacy)
            lraw += _varint(field_blobs << 3 | 2) + _varint(len(bb)) + bb
        field_layer = 2 if v1 else 100
        raw += _varint(field_layer << 3 | 2) + _varint(len(lraw)) + lraw
    return net.SerializeToString() + raw


def net_weights(net):
    """``(name, type, [arrays])`` for every layer of a CaffeNet that has blobs."""
    out = []
    for rec in net.records:
        if rec.key is None:
            continue
        mod = net.layers[rec.key]
        if hasattr(mod, "blobs"):
            out.append((rec.name, rec.type, [p.detach().numpy().copy() for p in mod.blobs()]))
    return out


def write_h5(path, layers, owned_only=None, **dataset_kw) -> None:
    """HDF5 weights as ``Net::ToHDF5`` lays them out.  ``owned_only``: a CaffeNet whose shared
    parameters' copies get an empty group (Caffe writes a dataset only for the owner, the first layer
    declaring a ``param { name }``)."""
    seen: set[str] = set()
    shared = {}
    for rec in (owned_only.records if owned_only is not None else []):
        shared[rec.name] = [bool(n) and n in seen for n in rec.param_names]
        seen.update(n for n in rec.param_names if n)
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        for name, _type, arrays in layers:
            lg = g.create_group(name)
            for i, a in enumerate(arrays):
                if i < len(shared.get(name, [])) and shared[name][i]:
                    continue
                lg.create_dataset(str(i), data=np.asarray(a, dtype=np.float32), **dataset_kw)


def randomize(net, seed=0):
    """Random weights with a stable scale (He-style) and small random biases."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
