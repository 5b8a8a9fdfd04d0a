"""Read the weights people have: recognise a file by its bytes and convert it to vggnet's layout.

Formats, recognised from content, never from the extension:

- "torch": a vggnet checkpoint or a torchvision state dict (zip or legacy `torch.save`), read by
  vggnet.checkpoint with weights-only unpickling;
- "safetensors": vggnet's own (with its meta), torchvision's or timm's key layout (safetensors.py);
- "keras": Keras applications' VGG16/VGG19 .h5 (keras.py);
- "caffe": the authors' VGG_ILSVRC_16/19_layers.caffemodel, old and new formats (caffe.py).

`read_weights` returns what `vggnet.checkpoint.load_checkpoint` returns ({"format", "version",
"model_args", "state_dict", "meta"}), so every verb can take any of these files. Nothing here
unpickles: a pickle under any name is refused before a byte of it is interpreted.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_finite, check_state_dict, load_checkpoint, save_checkpoint
from ..errors import UserError
from ..model import vgg
from .caffe import looks_like_caffe, read_caffe
from .keras import read_keras
from .safetensors import read_safetensors, write_safetensors

__all__ = ["sniff", "read_weights", "write_safetensors", "convert", "FORMATS", "EXPECTED"]

FORMATS = ("torch", "safetensors", "keras", "caffe")
EXPECTED = "a weights file (vggnet checkpoint, torchvision .pth, safetensors, Keras .h5, Caffe .caffemodel)"

# torch.save's legacy (non-zip) format starts with its magic number pickled at protocol 2.
_TORCH_LEGACY = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HDF5 = b"\x89HDF\r\n\x1a\n"
_IMAGES = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF87a": "a GIF image",
           b"GIF89a": "a GIF image", b"BM": "a BMP image", b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image"}


def _hdf5_at(path: Path, size: int) -> bool:
    """HDF5's signature sits at byte 0, or at 512, 1024, 2048, ... after a user block."""
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            if f.read(8) == _HDF5:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _safetensors_header(head: bytes, size: int) -> str | None:
    """"ok" if the first 8 bytes are a little-endian header length followed by a JSON object, "truncated"
    if that header runs past the end of the file."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    return "ok" if 8 + n <= size else "truncated"


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _is_torch_zip(path: Path) -> bool:
    names = _zip_names(path)
    if names is None:
        return True  # a torn torch zip: let vggnet.checkpoint say it is incomplete
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def _looks_like(head: bytes, size: int, path: Path) -> str:
    """Words for what an unrecognised file seems to be."""
    if size == 0:
        return "an empty file"
    for magic, words in _IMAGES.items():
        if head.startswith(magic):
            return words
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"PK\x03\x04"):
        if "model.weights.h5" in (_zip_names(path) or []):
            return "a Keras 3 .keras archive (not read: save the model as a Keras 2 / tf.keras .h5)"
        return "a zip archive that is not a torch checkpoint"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data (decompress it first)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle that is not a torch checkpoint (not unpickled: unpickling can run code)"
    if _safetensors_header(head, size) == "truncated":
        return "a truncated safetensors file"
    if looks_like_caffe(path) == "truncated":
        return "a truncated Caffe model"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised binary data (first bytes {head[:8].hex(' ')})"
    if "layer" in text and "{" in text:
        return "a Caffe prototxt (the net's description; the weights are in the .caffemodel)"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"text starting {first!r}"


def sniff(path: str | os.PathLike) -> str:
    """The format of a weights file from its bytes: "torch", "safetensors", "keras" or "caffe".

    Raises UserError naming the file and what it looks like (an image, text, an empty file, a
    pickle, a truncated file, ...) when it is none of them.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") and _is_torch_zip(path):
        return "torch"
    if head.startswith(_TORCH_LEGACY):
        return "torch"
    if _safetensors_header(head, size) == "ok":
        return "safetensors"
    if _hdf5_at(path, size):
        return "keras"
    if looks_like_caffe(path) == "caffe":
        return "caffe"
    raise UserError(f"expected {EXPECTED}, got {_looks_like(head, size, path)} in {path}")


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Read any weights file vggnet understands into load_checkpoint's shape.

    {"format", "version": 1, "model_args": VGG constructor arguments, "state_dict": torchvision keys,
    "meta": preprocessing ("mean", "std" in units of "input_range", "source_format") and, where the
    file has them, class names}. Torch files and run directories go to vggnet.checkpoint.
    """
    path = Path(path)
    fmt = "torch" if path.is_dir() else sniff(path)
    if fmt == "torch":
        if path.suffix == ".safetensors":  # torch.load would hand it to safetensors by its name
            raise UserError(f"{path} is a torch file (zip or pickle), not safetensors, despite its name; "
                            "rename it (e.g. to .pt) to read it with weights-only unpickling")
        return load_checkpoint(path)
    reader = {"safetensors": read_safetensors, "keras": read_keras, "caffe": read_caffe}[fmt]
    ckpt = reader(path)
    check_finite(ckpt["state_dict"], source=str(path))  # NaN/inf weights would predict nothing
    return ckpt


def _numbers(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _preprocessing(meta: dict[str, Any]) -> str:
    """E.g. "RGB in [0, 255] minus mean [123.68, 116.779, 103.939] over std [1, 1, 1]"."""
    if "mean" not in meta:
        return "preprocessing not recorded (ImageNet mean/std assumed)"
    scale = float(meta.get("input_range", 1.0))
    return f"RGB in [0, {scale:g}] minus mean {_numbers(meta['mean'])} over std {_numbers(meta.get('std', [1, 1, 1]))}"


def convert(source: str | Path, dest: str | Path, *, force: bool = False) -> str:
    """Write `source` (any format `read_weights` reads) as a vggnet checkpoint, or safetensors if `dest` ends
    in .safetensors, with its preprocessing in the meta. Refuses to overwrite `dest` unless `force`.
    Returns the one-line summary `vggnet convert` prints."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to overwrite it")
    ckpt = read_weights(source)
    args = dict(ckpt["model_args"])
    with torch.device("meta"):  # the file's tensors replace the parameters: skip initialising 138M weights
        model = vgg(args.pop("config"), **args)
    check_state_dict(model, ckpt["state_dict"], source=str(source))
    model.load_state_dict(ckpt["state_dict"], strict=True, assign=True)
    meta = dict(ckpt.get("meta", {}))
    if dest.suffix == ".safetensors":
        write_safetensors(dest, model.state_dict(), meta, model_args=model.constructor_args)
        kind = "safetensors"
    else:
        save_checkpoint(dest, model, meta=meta)
        kind = "vggnet checkpoint"
    a = model.constructor_args
    what = f"{meta.get('source_format', ckpt['format'])}, configuration {a['config']}" \
           f"{' with batch norm' if a['batch_norm'] else ''}, {a['head']} head, {a['num_classes']} classes"
    return f"read {source} ({what}; {_preprocessing(meta)}); wrote {dest} ({kind})"
