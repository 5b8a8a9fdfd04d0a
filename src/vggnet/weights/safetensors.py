"""safetensors files, read and written: vggnet's own, torchvision-layout and timm-layout VGGs.

safetensors holds raw tensors and a header of strings, nothing executable. vggnet writes its
constructor arguments and meta (preprocessing, class names, sizes) as JSON strings in that header,
so a vggnet .safetensors file rebuilds the same net with the same preprocessing.

timm's VGG (timm/models/vgg.py) keeps `features.*` as torchvision does but runs the first two FC
layers as convolutions (`pre_logits.fc1`: Conv2d 512 -> 4096, kernel 7; `pre_logits.fc2`: Conv2d
1x1) and calls the last one `head.fc`. A conv over the whole (C, 7, 7) map is a Linear over the
(C, H, W) flatten, so the conv weights reshape onto classifier.0 and classifier.3 unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import atomic_write, infer_model_args
from ..errors import UserError
from ..imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["read_safetensors", "write_safetensors", "from_timm"]

# timm key prefix -> torchvision/vggnet key prefix.
_TIMM = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}


def from_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's VGG keys (pre_logits.fc1/fc2 convs, head.fc) -> torchvision's (classifier.0/3/6 Linears)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for old, new in _TIMM.items():
            if key.startswith(old):
                key = new + key[len(old):]
                if key.endswith(".weight") and value.dim() == 4:  # (out, C, k, k) conv -> (out, C*k*k) Linear
                    value = value.reshape(value.shape[0], -1)
                break
        out[key] = value
    return out


def write_safetensors(path: str | Path, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None,
                      *, model_args: Mapping[str, Any] | None = None) -> Path:
    """Atomically write `state_dict` as safetensors, with model_args and meta as JSON in the header.

    `model_args` defaults to what `infer_model_args` recognises in the state dict.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}  # no shared storage
    args = dict(model_args) if model_args is not None else infer_model_args(tensors)
    header = {"format": "vggnet", "version": "1", "model_args": json.dumps(args),
              "meta": json.dumps(dict(meta or {}), default=_jsonable)}
    return atomic_write(path, save(tensors, metadata=header))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value of type {type(value).__name__} cannot be stored in safetensors")


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """Read a vggnet, torchvision-layout or timm-layout VGG .safetensors into vggnet's checkpoint shape."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read safetensors file {path}: {str(e).splitlines()[0]}") from None
    timm = any(k.startswith(tuple(_TIMM)) for k in tensors)
    state = from_timm(tensors) if timm else tensors
    if header.get("format") == "vggnet":
        try:
            args, meta = json.loads(header["model_args"]), json.loads(header.get("meta", "{}"))
        except (KeyError, ValueError) as e:
            raise UserError(f"safetensors file {path} has a damaged vggnet header ({e})") from None
    else:
        try:
            args = infer_model_args(state)
        except UserError as e:
            raise UserError(f"safetensors file {path} does not hold a VGG: {e}") from None
        # torchvision's and timm's VGG weights take [0, 1] RGB normalised with the ImageNet mean/std.
        meta = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_range": 1.0}
    meta.setdefault("source_format", "timm safetensors" if timm else "safetensors")  # a round trip keeps the origin
    return {"format": "safetensors", "version": 1, "model_args": args, "state_dict": state, "meta": meta}
