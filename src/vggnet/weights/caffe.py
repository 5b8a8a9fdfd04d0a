"""The authors' original Caffe models (VGG_ILSVRC_16_layers.caffemodel, ..._19_layers), without Caffe.

A .caffemodel is one protobuf `caffe.NetParameter` message. We build the few message types we
need from caffe.proto at run time (no Caffe install, no protoc, no generated code), with caffe.proto's
own field numbers, and read both layouts Caffe has written:

- the old V1 format (`repeated V1LayerParameter layers = 2`, layer type an enum), in which the
  authors released VGG-16/19 in 2014;
- the newer format (`repeated LayerParameter layer = 100`, layer type a string).

Caffe is NCHW, so conv weights are already (out, in, kh, kw) and fc6's (4096, 25088) rows are in
(C, H, W) order, as PyTorch flattens. The authors trained on BGR images in [0, 255] minus the mean
pixel; the first conv's input channels are reversed here so the converted net takes RGB.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..errors import UserError
from ._layout import ConvLayer, caffe_preprocessing, vgg_state_dict

__all__ = ["read_caffe", "looks_like_caffe", "net_parameter_class"]

_F = descriptor_pb2.FieldDescriptorProto
# caffe.proto's V1LayerParameter.LayerType values for the layers a VGG holds (others read as NONE).
_V1_TYPES = {"NONE": 0, "CONVOLUTION": 4, "DATA": 5, "DROPOUT": 6, "INNER_PRODUCT": 14, "LRN": 15,
             "POOLING": 17, "RELU": 18, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "ACCURACY": 1}
# message -> [(field name, number, type, label, message type name, packed)], numbers as in caffe.proto.
_MESSAGES = {
    "BlobShape": [("dim", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, None, True)],
    "BlobProto": [("num", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
                  ("channels", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
                  ("height", 3, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
                  ("width", 4, _F.TYPE_INT32, _F.LABEL_OPTIONAL, None, False),
                  ("data", 5, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True),
                  ("shape", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "BlobShape", False),
                  ("double_data", 8, _F.TYPE_DOUBLE, _F.LABEL_REPEATED, None, True)],
    "LayerParameter": [("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
                       ("type", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
                       ("blobs", 7, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "BlobProto", False)],
    "V1LayerParameter": [("name", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
                         ("type", 5, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, "V1LayerParameter.LayerType", False),
                         ("blobs", 6, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "BlobProto", False)],
    "NetParameter": [("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
                     ("layers", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "V1LayerParameter", False),
                     ("layer", 100, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "LayerParameter", False)],
}
# NetParameter's top-level fields (all of caffe.proto's, not only those read) -> allowed wire types.
_NET_WIRE = {1: {2}, 2: {2}, 3: {2}, 4: {0, 2}, 5: {0}, 6: {2}, 7: {0}, 8: {2}, 100: {2}}


@functools.cache
def _classes() -> dict[str, Any]:
    """The message classes of our caffe.proto subset, built from descriptors in a private pool."""
    file = descriptor_pb2.FileDescriptorProto(name="vggnet_caffe_subset.proto", package="caffe", syntax="proto2")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        if name == "V1LayerParameter":
            enum = message.enum_type.add(name="LayerType")
            for value_name, number in _V1_TYPES.items():
                enum.value.add(name=value_name, number=number)
        for field_name, number, kind, label, type_name, packed in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".caffe.{type_name}"
            if packed:
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}")) for name in _MESSAGES}


def net_parameter_class() -> type:
    """The `caffe.NetParameter` message class (our subset of it): parse with `.FromString(data)`."""
    return _classes()["NetParameter"]


def _varint(f: BinaryIO) -> int | None:
    result, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            return None


def looks_like_caffe(path: str | Path) -> str | None:
    """"caffe" if the file parses as a NetParameter with layers, "truncated" if it starts as one but
    ends early, else None.

    Walks the top-level fields (tag, then skip the length) so a 500 MB model is checked without
    reading its weights, then parses the first layer with the message classes.
    """
    size = Path(path).stat().st_size
    layers_seen, first_layer = 0, None
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _varint(f)
            if tag is None:
                return "truncated" if layers_seen else None
            number, wire = tag >> 3, tag & 7
            if wire not in _NET_WIRE.get(number, ()):
                return None
            if wire == 0:
                if _varint(f) is None:
                    return "truncated" if layers_seen else None
                continue
            length = _varint(f)
            if length is None or f.tell() + length > size:
                return "truncated" if layers_seen else None
            if number in (2, 100) and first_layer is None:
                first_layer = (number, f.read(length))
            else:
                f.seek(length, 1)
            layers_seen += number in (2, 100)
    if first_layer is None:
        return None
    cls = _classes()["V1LayerParameter" if first_layer[0] == 2 else "LayerParameter"]
    try:
        layer = cls.FromString(first_layer[1])
    except DecodeError:
        return None
    return "caffe" if layer.name else None


def _blob(blob: Any, name: str, path: Path) -> tuple[torch.Tensor, list[int]]:
    """(flat float32 tensor, dims) of a BlobProto: `shape.dim` in new files, num/channels/height/width in old."""
    values = np.asarray(blob.data, dtype=np.float32) if len(blob.data) else np.asarray(blob.double_data, np.float32)
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    if int(np.prod(dims)) != values.size:
        raise UserError(f"Caffe file {path}: layer {name} has a blob of shape {dims} but {values.size} values "
                        "(a truncated or damaged file)")
    return torch.from_numpy(values if values.flags.writeable else values.copy()), dims


def _layers(net: Any) -> list[tuple[str, str, list[Any]]]:
    """(name, type in the new format's spelling, blobs) for every layer, whichever format the file uses."""
    v1 = {4: "Convolution", 14: "InnerProduct", 15: "LRN"}
    if len(net.layer):
        return [(layer.name, layer.type, list(layer.blobs)) for layer in net.layer]
    return [(layer.name, v1.get(layer.type, "other"), list(layer.blobs)) for layer in net.layers]


def read_caffe(path: str | Path) -> dict[str, Any]:
    """Read a VGG .caffemodel into vggnet's checkpoint shape (model_args, state_dict, meta)."""
    path = Path(path)
    try:
        net = net_parameter_class().FromString(path.read_bytes())
    except DecodeError as e:
        raise UserError(f"cannot read Caffe file {path}: not a complete NetParameter message ({e})") from None
    convs, fcs, lrn = [], [], False
    for name, kind, blobs in _layers(net):
        if kind == "LRN":
            lrn = lrn or bool(convs and convs[-1].stage == 1)  # A-LRN: LRN inside stage 1
        if kind not in ("Convolution", "InnerProduct"):
            continue
        if len(blobs) != 2:
            raise UserError(f"Caffe file {path}: layer {name} ({kind}) has {len(blobs)} blobs, "
                            "expected weight and bias")
        (weight, dims), (bias, _) = _blob(blobs[0], name, path), _blob(blobs[1], name, path)
        if kind == "Convolution":
            match = re.fullmatch(r"conv(\d)_(\d)", name)
            if match is None or len(dims) != 4:
                raise UserError(f"Caffe file {path} does not hold a VGG: conv layer {name!r} is not named "
                                "conv<stage>_<n> as in VGG_ILSVRC_16/19_layers")
            convs.append(ConvLayer(name, int(match[1]), int(match[2]), weight.view(*dims), bias))
        else:
            out = dims[-2] if len(dims) == 4 and dims[0] == dims[1] == 1 else dims[0]
            fcs.append((name, weight.view(out, -1), bias))
    state, args = vgg_state_dict(convs, fcs, path=path, source="Caffe", bgr=True, lrn=lrn)
    meta = caffe_preprocessing("caffe")
    meta["name"] = net.name or path.stem
    return {"format": "caffe", "version": 1, "model_args": args, "state_dict": state, "meta": meta}
