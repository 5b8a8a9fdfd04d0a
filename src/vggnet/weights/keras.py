"""Keras applications' VGG16/VGG19 weights (.h5), read with h5py.

Keras (2.x and tf.keras) writes a model's weights as HDF5: a group per layer, listed in order by the
`layer_names` attribute (of the file root for `save_weights`, of `model_weights/` for `model.save`);
each layer group lists its tensors in order in `weight_names` (kernel, then bias). Keras's VGG
ports the authors' Caffe weights, so it keeps their preprocessing: BGR, [0, 255], minus the mean pixel.

Layouts differ from PyTorch's in three ways, each undone here:
- conv kernels are (kh, kw, in, out), PyTorch's are (out, in, kh, kw);
- dense kernels are (in, out), PyTorch's Linear weight is (out, in);
- fc1 follows a channels-last Flatten, so its input rows run over (H, W, C), PyTorch's over (C, H, W).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ._layout import ConvLayer, caffe_preprocessing, vgg_state_dict

__all__ = ["read_keras", "channels_last_to_first"]


def channels_last_to_first(weight: Tensor, channels: int) -> Tensor:
    """(out, H*W*C) Linear weight over a channels-last flattened map -> (out, C*H*W) over PyTorch's flatten."""
    out, features = weight.shape
    side = int(round((features / channels) ** 0.5))
    if side * side * channels != features:
        raise ValueError(f"expected in_features = C * s * s with C={channels}, got {features}")
    return weight.reshape(out, side, side, channels).permute(0, 3, 1, 2).reshape(out, features)


def _str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _names(attrs: Any, key: str) -> list[str]:
    """A list-of-names attribute; Keras splits one over 64 KB into key0, key1, ... (HDF5's header limit)."""
    if key in attrs:
        return [_str(n) for n in attrs[key]]
    names, i = [], 0
    while f"{key}{i}" in attrs:
        names += [_str(n) for n in attrs[f"{key}{i}"]]
        i += 1
    return names


def _layer_weights(path: Path) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, [arrays in weight_names order]) for every layer of the file, in the model's order."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            layer_names = _names(root.attrs, "layer_names")
            if not layer_names:
                raise UserError(f"Keras file {path} has no layer_names attribute: an HDF5 file, but not Keras 2 / "
                                "tf.keras weights (from save_weights or model.save; Keras 3 .weights.h5 is not read)")
            layers = []
            for layer in layer_names:
                group = root[layer]
                weights = _names(group.attrs, "weight_names")
                layers.append((layer, [np.asarray(group[n], dtype=np.float32) for n in weights]))
            return layers
    except (OSError, KeyError) as e:
        raise UserError(f"cannot read Keras file {path}: a truncated or damaged HDF5 file ({e})") from None


def read_keras(path: str | Path) -> dict[str, Any]:
    """Read a Keras VGG16/VGG19 .h5 into vggnet's checkpoint shape (model_args, state_dict, meta)."""
    path = Path(path)
    convs, fcs = [], []
    for name, arrays in _layer_weights(path):
        if not arrays:
            continue  # input, pooling, flatten, dropout
        kernels = [a for a in arrays if a.ndim >= 2]
        biases = [a for a in arrays if a.ndim == 1]
        if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
            raise UserError(f"Keras file {path} does not hold a VGG: layer {name!r} has weights of shapes "
                            f"{[a.shape for a in arrays]}, expected a kernel and a bias")
        kernel, bias = torch.from_numpy(kernels[0]), torch.from_numpy(biases[0])
        if kernel.dim() == 4:
            match = re.fullmatch(r"block(\d)_conv(\d)", name)
            if match is None or kernel.shape[0] != kernel.shape[1]:
                raise UserError(f"Keras file {path} does not hold a VGG: conv layer {name!r} with kernel "
                                f"{tuple(kernel.shape)} is not a block<stage>_conv<n> of Keras's VGG16/VGG19 "
                                "in (kh, kw, in, out) layout")
            convs.append(ConvLayer(name, int(match[1]), int(match[2]), kernel.permute(3, 2, 0, 1), bias))
        elif kernel.dim() == 2:
            weight = kernel.t()
            if not fcs:  # fc1 reads the channels-last Flatten of block5_pool
                try:
                    weight = channels_last_to_first(weight, convs[-1].weight.shape[0] if convs else 512)
                except ValueError as e:
                    raise UserError(f"Keras file {path} does not hold a VGG: {name} does not read block5_pool ({e})") \
                        from None
            fcs.append((name, weight, bias))
        else:
            raise UserError(f"Keras file {path} does not hold a VGG: layer {name!r} has a {kernel.dim()}-D kernel")
    state, args = vgg_state_dict(convs, fcs, path=path, source="Keras", bgr=True)
    meta = caffe_preprocessing("keras")
    meta["name"] = path.stem
    return {"format": "keras", "version": 1, "model_args": args, "state_dict": state, "meta": meta}
