"""The paper's Appendix B: a frozen VGG as a generic image descriptor.

For each image: rescale so the smaller side is Q, apply the net densely (FC layers as
convolutions), global-average-pool the map of one layer (fc7, the penultimate FC layer, by
default), average with the descriptor of the mirrored image; over several Q either average the
descriptors (the paper's VOC protocol) or stack them (Caltech: D x number-of-scales columns);
finally L2-normalise. The dense pass *is* `vggnet eval`'s: `evaluate.rescale` and
`evaluate.dense_pooled`, so descriptors run at the dense-evaluation rate.

`FeatureExtractor` gives descriptors for tensors; `extract_features` writes them for a whole
dataset to one file, in chunks (bounded memory), resumable after a kill, the final file written
atomically. The file is an `.npz` (default) or a `.csv`:

    z = np.load("train.npz"); z["features"] (N, D) float32, z["paths"], z["labels"], z["class_names"],
        json.loads(str(z["meta"]))  # net identity, layer, scales, aggregate, flip
    pd.read_csv("train.csv", skiprows=1)   # path, label, f0 ... f{D-1}; line 1 is "# vggnet-features {meta}"

`.npz` is compact and exact (float32); `.csv` is what pandas reads with no extra package (it has no
`.npz` reader and Parquet needs pyarrow), at about three times the size.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .checkpoint import atomic_write
from .errors import UserError
from .evaluate import dense_pooled, rescale, same_size_batches
from .model import MIN_INPUT_SIZE
from .nets import Net
from .runtime import Runtime, resolve_runtime

__all__ = ["AGGREGATES", "DEFAULT_LAYER", "PAPER_SCALES", "FORMATS", "FeatureExtractor", "Features",
           "default_feature_scales", "extract_features", "load_features", "net_identity"]

AGGREGATES = ("average", "stack")
DEFAULT_LAYER = "fc7"             # Appendix B: the penultimate FC layer's ReLU output
PAPER_SCALES = (256, 384, 512)    # Appendix B: Q for VOC (averaged) and Caltech (stacked)
FORMATS = (".npz", ".csv")
_MAGIC = "vggnet-features"
_VERSION = 1
_FC_LAYERS = ("fc6", "fc7")


def default_feature_scales(net: Net) -> tuple[int, ...]:
    """Appendix B's Q in {256, 384, 512} for 224-px nets; a small-image net's own test scale otherwise."""
    return PAPER_SCALES if net.image_size >= 224 else (net.eval_scale,)


def net_identity(net: Net) -> str:
    """SHA-256 of the net's tensors (state dict, in key order) and its preprocessing.

    The same weights read from different files (a run directory, a copy, safetensors) get the same
    identity; descriptors from different nets can then never be mixed by `probe`.
    """
    h = hashlib.sha256()
    for key, t in net.model.state_dict().items():
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([list(net.meta["mean"]), list(net.meta["std"]), net.input_range]).encode())
    return h.hexdigest()


def _layer_dim(net: Net, layer: str) -> int:
    """Channels of `layer`'s map: the FC width for fc6/fc7, the conv's output channels otherwise."""
    if layer in _FC_LAYERS:
        return net.model.classifier[_FC_LAYERS.index(layer) * 3].out_features
    channels = net.model.in_channels
    for module in net.model.features[: net.model.activation_index[layer] + 1]:
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
    return channels


class FeatureExtractor:
    """Appendix B descriptors of images: dense pass per scale, pooled, flip-averaged, aggregated, L2-normalised.

    `extractor(images)`: a tensor (N, 3, H, W) or a list of 3 x H x W tensors (any sizes), float in
    [0, 1] or uint8 -> (N, dim) float32 on the CPU, rows of unit L2 norm. `dim` is the layer's
    width D for `aggregate="average"` and D x len(scales) for `"stack"` (scale-major: the first D
    columns are the first Q's descriptor).
    """

    def __init__(self, *, net: Net, layer: str = DEFAULT_LAYER, scales: Sequence[int] | None = None,
                 aggregate: str = "average", flip: bool = True, runtime: Runtime | None = None,
                 batch_size: int = 64) -> None:
        if layer not in net.layer_names:
            raise UserError(f"unknown layer {layer!r}; expected one of {', '.join(net.layer_names)}")
        if aggregate not in AGGREGATES:
            raise UserError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.scales = tuple(int(q) for q in (scales or default_feature_scales(net)))
        # The FC layers as convolutions need the head's whole window (224 px for the paper's 7x7 FC1);
        # conv activations need the five pools' 32 px.
        least = net.dense_min_size if layer in _FC_LAYERS else MIN_INPUT_SIZE
        small = [q for q in self.scales if q < least]
        if small:
            raise UserError(f"layer {layer} of {net.name} needs test scales Q >= {least} px, got "
                            f"{','.join(map(str, small))}; choose larger --test-scale values")
        self.layer, self.aggregate, self.flip, self.batch_size = layer, aggregate, bool(flip), batch_size
        self.runtime = runtime or resolve_runtime()
        self.identity = net_identity(net)
        # A view of the net with this extractor's flip setting; it shares the model and its dense form.
        self.net = dataclasses.replace(net, flip=self.flip)
        self.net.dense()
        self.net.to(self.runtime)
        self.dim = _layer_dim(net, layer) * (len(self.scales) if aggregate == "stack" else 1)

    def spec(self) -> dict[str, Any]:
        """What makes two descriptor sets comparable: recorded in every features file."""
        return {"format": _MAGIC, "version": _VERSION, "net": self.net.name, "net_id": self.identity,
                "layer": self.layer, "scales": list(self.scales), "aggregate": self.aggregate,
                "flip": self.flip, "dim": self.dim, "precision": self.runtime.precision}

    @torch.inference_mode()
    def __call__(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        batch = list(images)
        out = torch.empty(len(batch), self.dim)
        for idx, x in same_size_batches(batch, self.runtime.device):
            out[idx] = self._describe(x).cpu()
        return out

    def _describe(self, x: Tensor) -> Tensor:
        per_scale = []
        for q in self.scales:
            pooled = dense_pooled(self.net, rescale(x, q), runtime=self.runtime, batch_size=self.batch_size,
                                  layer=self.layer)            # (N, V, D): V = 2 with the mirror image
            per_scale.append(pooled.mean(dim=1))
        d = torch.stack(per_scale).mean(0) if self.aggregate == "average" else torch.cat(per_scale, dim=1)
        return nnf.normalize(d, dim=1)                        # Appendix B: L2-normalised


# ----------------------------------------------------------------------------- files

@dataclass(kw_only=True)
class Features:
    """A features file read back: (N, D) descriptors, the images' paths, labels (or None) and the meta."""

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"features file must end in {' or '.join(FORMATS)}, got {path.name}")
    return suffix


def _item_ids(dataset: Any, prefix: str) -> list[str]:
    """Image paths when the dataset has files, else stable names prefix#index (digits, CIFAR)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [str(p) for p, _ in samples]
    return [f"{prefix}#{i}" for i in range(len(dataset))]


def _digest(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    names = {"net_id": "weights", "items": "images", "count": "image count"}
    return "; ".join(f"{names.get(k, k)}: {_short(old.get(k))} then, {_short(new[k])} now" for k in keys)


def _short(v: Any) -> str:
    return v[:12] if isinstance(v, str) and len(v) == 64 else str(v)


def _batches(dataset: Any, lo: int, hi: int, batch_size: int, workers: int) -> Iterable[list[tuple[Any, int]]]:
    if workers > 0:
        subset = torch.utils.data.Subset(dataset, range(lo, hi))
        yield from torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=list)
        return
    for start in range(lo, hi, batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, hi))]


def extract_features(extractor: FeatureExtractor, dataset: Any, out: str | os.PathLike, *,
                     class_names: Sequence[str] = (), ids: Sequence[str] | None = None, chunk_size: int = 1024,
                     workers: int = 0, force: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Descriptors of every item (image, label) of `dataset`, written to `out` (.npz or .csv).

    Chunks of `chunk_size` images go to `OUT.parts/` as they finish (each written atomically), so
    memory stays bounded and a rerun with the same arguments skips what is done; the final file is
    assembled from them atomically and the parts removed. A rerun with other arguments (net, layer,
    scales, aggregate, flip, images) is refused unless `force`, which starts over. An existing
    output from the same job is kept as is. `progress(images done)` after every batch.
    """
    out = Path(out)
    fmt = _format_of(out)
    n = len(dataset)
    if n == 0:
        raise UserError("expected images to describe, the dataset holds none")
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = list(ids) if ids is not None else _item_ids(dataset, "image")
    job = {**extractor.spec(), "count": n, "items": _digest(ids), "chunk_size": chunk_size}
    if out.exists() and not force:
        old = _read_meta(out)
        wanted = {k: v for k, v in job.items() if k != "chunk_size"}  # chunking does not change the result
        if all(old.get(k) == v for k, v in wanted.items()):
            return out
        raise UserError(f"{out} holds other descriptors ({_differences(old, wanted)}); use --force to replace it")
    parts = out.with_name(out.name + ".parts")
    state = parts / "job.json"
    if parts.exists():
        old = json.loads(state.read_text()) if state.is_file() else {}
        if old != job:
            if not force:
                raise UserError(f"{parts} holds an unfinished extraction with other arguments ({_differences(old, job)}); "
                                f"rerun with the same arguments to resume it, or --force to start over")
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write(state, json.dumps(job, indent=1))
    chunks = [parts / f"chunk-{c:06d}.npz" for c in range(math.ceil(n / chunk_size))]
    done = 0
    for c, path in enumerate(chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        if not path.is_file():
            feats, labels = [], []
            for batch in _batches(dataset, lo, hi, extractor.batch_size, workers):
                feats.append(extractor([img for img, _ in batch]))
                labels += [int(label) for _, label in batch]
                if progress is not None:
                    progress(done + sum(len(f) for f in feats))
            arrays = {"features": torch.cat(feats).numpy(), "labels": np.asarray(labels, dtype=np.int64)}
            atomic_write(path, lambda f: np.savez(f, **arrays))
        done = hi
        if progress is not None:
            progress(done)
    meta = {**job, "class_names": list(class_names)}
    writer = _write_npz if fmt == ".npz" else _write_csv
    atomic_write(out, lambda f: writer(f, meta, ids, chunks))
    shutil.rmtree(parts)
    return out


def _chunk_arrays(chunks: Sequence[Path]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    for path in chunks:
        with np.load(path) as z:
            yield z["features"], z["labels"]


def _write_npz(f: Any, meta: dict[str, Any], ids: list[str], chunks: Sequence[Path]) -> None:
    """An .npz whose `features` member is streamed chunk by chunk (memory: one chunk)."""
    labelled = bool(meta["class_names"])
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        small = {"meta": np.asarray(json.dumps(meta)), "paths": np.asarray(ids, dtype=str),
                 "class_names": np.asarray(meta["class_names"], dtype=str)}
        if labelled:
            small["labels"] = np.concatenate([labels for _, labels in _chunk_arrays(chunks)])
        for name, array in small.items():
            with zf.open(f"{name}.npy", "w") as g:
                np.lib.format.write_array(g, array, allow_pickle=False)
        with zf.open("features.npy", "w", force_zip64=True) as g:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                      "shape": (meta["count"], meta["dim"])}
            np.lib.format.write_array_header_2_0(g, header)
            for features, _ in _chunk_arrays(chunks):
                g.write(np.ascontiguousarray(features, dtype="<f4").tobytes())


def _write_csv(f: Any, meta: dict[str, Any], ids: list[str], chunks: Sequence[Path]) -> None:
    """Line 1 "# vggnet-features {meta}", then the header path[,label],f0..., then one row per image."""
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    labelled = bool(meta["class_names"])
    text.write(f"# {_MAGIC} {json.dumps(meta)}\n")
    rows = csv.writer(text)
    rows.writerow(["path"] + (["label"] if labelled else []) + [f"f{j}" for j in range(meta["dim"])])
    i = 0
    for features, labels in _chunk_arrays(chunks):
        for row, label in zip(features, labels):
            rows.writerow([ids[i]] + ([int(label)] if labelled else []) + [f"{v:.8g}" for v in row])
            i += 1
    text.flush()
    text.detach()  # leave the binary file open for atomic_write to fsync


def _read_meta(path: Path) -> dict[str, Any]:
    """The meta recorded in a features file, or UserError when the file is not one."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            if not first.startswith(f"# {_MAGIC} "):
                raise ValueError("no '# vggnet-features' first line")
            meta = json.loads(first[len(_MAGIC) + 3:])
        else:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
    except Exception as e:  # np.load raises EOFError, ValueError, BadZipFile, ... on files that are not ours
        raise UserError(f"expected a features file written by `vggnet features`, cannot read {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if not isinstance(meta, dict) or meta.get("format") != _MAGIC:
        raise UserError(f"expected a features file written by `vggnet features`, {path} is something else")
    return meta


def load_features(path: str | os.PathLike) -> Features:
    """Read a file written by `extract_features` (.npz or .csv)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file not found: {path}")
    meta = _read_meta(path)
    try:
        return _read_rows(path, meta)
    except Exception as e:  # a file whose header is ours but whose rows are torn or edited
        raise UserError(f"cannot read the features in {path}: {type(e).__name__}: {e}") from None


def _read_rows(path: Path, meta: dict[str, Any]) -> Features:
    labelled = bool(meta["class_names"])
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            feats, paths = z["features"], [str(p) for p in z["paths"]]
            labels = z["labels"] if labelled else None
    else:
        with open(path, encoding="utf-8", newline="") as f:
            f.readline()
            reader = csv.reader(f)
            next(reader)
            rows = list(reader)
        start = 2 if labelled else 1
        paths = [r[0] for r in rows]
        labels = np.asarray([int(r[1]) for r in rows], dtype=np.int64) if labelled else None
        feats = np.asarray([r[start:] for r in rows], dtype=np.float32).reshape(len(rows), meta["dim"])
    return Features(features=feats, paths=paths, labels=labels, class_names=list(meta["class_names"]), meta=meta)
