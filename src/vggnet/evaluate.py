"""The paper's test protocols (section 3.2, Tables 3-6): centre crop, dense, multi-crop, multi-scale, ensembles.

Every protocol starts from the same thing: the image rescaled isotropically so that its smaller side
is Q, the test scale. Then

- `center`: one centre crop of the net's input size (torchvision's protocol, for comparison);
- `dense`: the fully-convolutional net (FC layers as convolutions) on the whole rescaled image; the
  class-score map is averaged over space, and the soft-max of the image and of its horizontal flip
  are averaged (section 3.2);
- `multicrop`: a 5x5 regular grid of crops x 2 flips = 50 crops per scale, soft-max averaged
  (crops that coincide, when the rescaled image is barely larger than the crop, are run once);
- `multicrop+dense`: the two averaged; the paper finds them complementary (Table 5).

Multi-scale evaluation averages the posteriors over several Q; an ensemble averages them over
several nets (section 4.3). One pass over the data computes every (net, protocol, Q) posterior once,
times each, and combines them into the rows of a Table-5-shaped table with measured images/s.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .errors import UserError
from .metrics import correct_topk
from .nets import Net
from .runtime import Runtime, resolve_runtime
from .transforms import rescale, to_float

__all__ = ["METHODS", "DEFAULT_METHODS", "GRID", "Row", "dense_pooled", "parse_methods",
           "parse_scales", "scale_values", "same_size_batches", "max_test_scale", "default_scales", "training_scales", "rescale", "posteriors", "evaluate",
           "format_table", "check_classes"]

METHODS = ("center", "dense", "multicrop", "multicrop+dense")
DEFAULT_METHODS = METHODS
# Which single-protocol posteriors each method averages.
_PARTS = {"center": ("center",), "dense": ("dense",), "multicrop": ("multicrop",),
          "multicrop+dense": ("multicrop", "dense")}
GRID = 5  # section 3.2: a 5x5 regular grid of crops per scale


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """"center,dense" -> ["center", "dense"]; None -> the default four."""
    if text is None:
        return list(DEFAULT_METHODS)
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [m.strip() for m in items if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def default_scales(net: Net) -> tuple[int, ...]:
    """The single test scale Q a net is evaluated at by default: its meta's eval_scale."""
    return (net.eval_scale,)


def training_scales(net: Net) -> tuple[int, ...]:
    """The paper's multi-scale test set for a net's training scale (section 4.2).

    Fixed S: Q in {S-32, S, S+32}; for small-image nets (S < 256) the step is S/8, which is 32 at
    S = 256. Jittered S in [S_min, S_max]: Q in {S_min, (S_min+S_max)/2, S_max}. Scales smaller
    than the net's crop are dropped.
    """
    s_min, s_max = net.train_scale
    if s_min == s_max:
        step = 32 if s_min >= 256 else max(1, s_min // 8)
        qs = (s_min - step, s_min, s_min + step)
    else:
        qs = (s_min, (s_min + s_max) // 2, s_max)
    return tuple(q for q in qs if q >= net.image_size)


def max_test_scale() -> int:
    """The largest Q this machine's memory allows: one 4:3 image's first-stage activations
    (64 channels, fp32, at Q x 4Q/3) must fit in a quarter of physical memory (about 4,200 px at 24 GiB)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return int(math.sqrt(memory / 4 / (64 * 4 * 4 / 3)))


def parse_scales(text: str | None, net: Net) -> tuple[int, ...]:
    """"256,384,512" -> (256, 384, 512); "train" -> `training_scales(net)`; None -> `default_scales(net)`."""
    if text is None or text.strip() in ("", "default"):
        return default_scales(net)
    if text.strip() == "train":
        return training_scales(net)
    return scale_values(text)


def scale_values(text: str) -> tuple[int, ...]:
    """"256,384,512" -> (256, 384, 512): positive integers no larger than memory allows (`max_test_scale`)."""
    try:
        qs = tuple(int(q) for q in text.split(",") if q.strip())
    except ValueError:
        raise UserError(f"--test-scale expects comma-separated integers (e.g. 256,384,512) or 'train', "
                        f"got {text!r}") from None
    if not qs or any(q < 1 for q in qs):
        raise UserError(f"--test-scale expects positive integers, got {text!r}")
    limit = max_test_scale()
    if max(qs) > limit:
        raise UserError(f"--test-scale {max(qs)} is more than this machine's memory allows for one image "
                        f"(at most {limit} px)")
    return tuple(dict.fromkeys(qs))


def _grid(length: int, size: int, n: int = GRID) -> list[tuple[int, int]]:
    """Offsets of n evenly spaced `size` windows along `length` (first at 0, last flush with the end),
    as (offset, how many of the n windows start there): when the image is barely larger than the
    crop several windows coincide, and each distinct crop is then evaluated once and weighted."""
    offsets = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return sorted(Counter(offsets).items())


def _forward(net: Net, key: str, module: torch.nn.Module, x: Tensor, runtime: Runtime, batch_size: int) -> Tensor:
    """Run `module` (the net, its dense form, or the dense form cut at a layer) on `x` in chunks; fp32 out.

    `key` names the module for the net's engine ("crop", "dense", "dense:fc7"); without an engine
    the pass is eager PyTorch in the runtime's precision and memory format.
    """
    outs = []
    for chunk in x.split(batch_size):
        chunk = runtime.inputs(chunk)
        if net.engine is not None:
            outs.append(net.engine(key, module, chunk).float())
            continue
        with runtime.autocast():
            outs.append(module(chunk).float())
    return torch.cat(outs)


def _center(net: Net, x: Tensor, runtime: Runtime, batch_size: int) -> Tensor:
    crop = F.center_crop(x, [net.image_size, net.image_size])
    return nnf.softmax(_forward(net, "crop", net.model, net.normalise(crop), runtime, batch_size), dim=1)


class _DenseTo(torch.nn.Module):
    """The dense form stopped at one layer, as a module an engine can export."""

    def __init__(self, dense: torch.nn.Module, layer: str) -> None:
        super().__init__()
        self.dense, self.layer = dense, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.dense.forward_to(x, self.layer)


def dense_pooled(net: Net, x: Tensor, *, runtime: Runtime, batch_size: int = 64,
                 layer: str | None = None) -> Tensor:
    """Section 3.2's dense application: (N, 3, H, W) pixels in [0, 1], already rescaled to Q ->
    (N, V, D) spatial averages of the dense net's `layer` map, V = 2 (the image and its mirror)
    when the net tests with flips, else 1.

    `layer` None gives the class-score map (D = classes; dense evaluation soft-maxes it); "fc7"
    gives Appendix B's descriptor (D = 4096 for the paper's head); any activation name
    (relu5_3, stage5, ...) works too (see `Net.layer_names`).
    """
    if layer is not None and layer not in net.layer_names:
        raise UserError(f"unknown layer {layer!r}; expected one of {', '.join(net.layer_names)}")
    module = net.dense() if layer is None else _DenseTo(net.dense(), layer)
    key = "dense" if layer is None else f"dense:{layer}"
    x = net.normalise(x)
    views = torch.stack([x, x.flip(-1)], dim=1) if net.flip else x.unsqueeze(1)  # (N, V, 3, H, W)
    n, v = views.shape[:2]
    pooled = []
    for chunk in views.split(max(1, batch_size // v)):
        out = _forward(net, key, module, chunk.flatten(0, 1), runtime, batch_size)  # (n*V, D, h, w)
        pooled.append(out.mean(dim=(2, 3)))  # the map averaged over space (sum-pooling, section 3.2)
    return torch.cat(pooled).view(n, v, -1)


def _dense(net: Net, x: Tensor, runtime: Runtime, batch_size: int) -> Tensor:
    scores = dense_pooled(net, x, runtime=runtime, batch_size=batch_size)
    return nnf.softmax(scores, dim=2).mean(dim=1)  # soft-max of the image and of its flip averaged


def _multicrop(net: Net, x: Tensor, runtime: Runtime, batch_size: int) -> Tensor:
    size = net.image_size
    windows = [(t, l, ct * cl / GRID ** 2) for t, ct in _grid(x.shape[-2], size) for l, cl in _grid(x.shape[-1], size)]
    weights = torch.tensor([w for _, _, w in windows] * (2 if net.flip else 1))
    weights = (weights / weights.sum()).view(1, -1, 1)  # each flip gets half the weight
    per_image = weights.numel()
    out = []
    for chunk in x.split(max(1, batch_size // per_image)):
        crops = torch.stack([chunk[..., t:t + size, l:l + size] for t, l, _ in windows], dim=1)
        if net.flip:
            crops = torch.cat([crops, crops.flip(-1)], dim=1)
        n = crops.shape[0]
        logits = _forward(net, "crop", net.model, net.normalise(crops.flatten(0, 1)), runtime, batch_size)
        probs = nnf.softmax(logits, dim=1).view(n, per_image, -1)
        out.append((probs * weights.to(probs.device)).sum(dim=1))
    return torch.cat(out)


_PROTOCOLS = {"center": _center, "dense": _dense, "multicrop": _multicrop}


def _check_scale(net: Net, protocol: str, q: int) -> None:
    if protocol == "dense" and q < net.dense_min_size:
        raise UserError(f"dense evaluation of {net.name} needs Q >= {net.dense_min_size} px "
                        f"({net.model.head} head), got Q={q}; choose larger --scales or --methods center,multicrop")
    if protocol != "dense" and q < net.image_size:
        raise UserError(f"{protocol} evaluation of {net.name} needs Q >= its {net.image_size} px crop, got Q={q}")


@torch.inference_mode()
def posteriors(net: Net, images: Sequence[Tensor], protocol: str, q: int, *, runtime: Runtime,
               batch_size: int = 64) -> Tensor:
    """Soft-max posteriors (N, classes), fp32 on the CPU, of one protocol at test scale Q.

    `images`: tensors 3 x H x W, uint8 or float in [0, 1], any sizes; images of one size are batched together.
    `protocol`: "center", "dense" or "multicrop". The net must already be on the runtime's device.
    """
    _check_scale(net, protocol, q)
    out = torch.empty(len(images), net.num_classes)
    for idx, x in same_size_batches(images, runtime.device):
        out[idx] = _PROTOCOLS[protocol](net, rescale(x, q), runtime, batch_size).cpu()
    return out


def same_size_batches(images: Sequence[Tensor], device: torch.device) -> Iterator[tuple[list[int], Tensor]]:
    """Images of any sizes as (indices, float batch in [0, 1] on `device`), one batch per size.

    UserError for anything that is not an RGB image 3 x H x W.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for shape, idx in groups.items():
        if len(shape) != 3 or shape[0] != 3:
            raise UserError(f"expected RGB images of shape 3 x H x W, got {list(shape)}")
        yield idx, to_float(torch.stack([images[i] for i in idx])).to(device)


@dataclass(kw_only=True)
class Row:
    """One line of the table: a net (or the ensemble), a method, its test scales, errors and speed."""

    net: str
    method: str
    scales: tuple[int, ...]
    top1_error: float  # %
    top5_error: float  # %, top-k with k = min(5, classes)
    top_k: int
    images: int
    images_per_s: float
    views_per_image: int  # network evaluations per image: crops, or whole images for dense

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d.update(top1_error=round(self.top1_error, 4), top5_error=round(self.top5_error, 4),
                 images_per_s=float(f"{self.images_per_s:.4g}"))
        return d


def check_classes(nets: Sequence[Net], class_names: Sequence[str] | None = None) -> None:
    """Ensemble members must agree on their classes, and the data's classes must be the nets'."""
    first = nets[0]
    for other in nets[1:]:
        if other.num_classes != first.num_classes:
            raise UserError(f"ensemble members disagree in classes: {first.name} has {first.num_classes}, "
                            f"{other.name} has {other.num_classes}")
        if other.class_names != first.class_names:
            i = next(i for i, (a, b) in enumerate(zip(first.class_names, other.class_names)) if a != b)
            raise UserError(f"ensemble members disagree in class names: class {i} is {first.class_names[i]!r} "
                            f"in {first.name}, {other.class_names[i]!r} in {other.name}")
    if class_names is None:
        return
    if len(class_names) != first.num_classes:
        raise UserError(f"the data has {len(class_names)} classes, {first.name} was trained on {first.num_classes}")
    # ImageNet folders are named by WordNet id, the nets' classes by word: only their count can match.
    numbered = first.class_names == [str(i) for i in range(first.num_classes)]
    if first.meta.get("name") != "imagenet" and not numbered and list(class_names) != first.class_names:
        i = next(i for i, (a, b) in enumerate(zip(class_names, first.class_names)) if a != b)
        raise UserError(f"the data's classes differ from {first.name}'s: class {i} is {class_names[i]!r} in the data, "
                        f"{first.class_names[i]!r} in the checkpoint")


def _batches(dataset: Any, batch_size: int, workers: int, limit: int | None) -> Iterable[list[tuple[Tensor, int]]]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(n)
    if workers > 0:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                             num_workers=workers, collate_fn=list)
        yield from loader
        return
    for start in range(0, n, batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, n))]


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def evaluate(nets: Sequence[Net], dataset: Any, *, methods: Sequence[str] | None = None,
             scales: Sequence[Sequence[int]] | None = None, runtime: Runtime | None = None,
             batch_size: int = 64, workers: int = 0, limit: int | None = None, warmup: bool = True,
             progress: Callable[[int], None] | None = None) -> list[Row]:
    """Test `nets` on `dataset` (items: float 3 x H x W in [0, 1], int label) with the paper's protocols.

    `scales` is a list of scale sets, e.g. [(384,), (256, 384, 512)]: each gives one row per method
    (posteriors averaged over its Q). Several nets give one row per member and one for the ensemble
    (posteriors averaged over the nets, section 4.3). images/s counts only the nets' work (rescaling,
    cropping and forward passes) for the posteriors that row averages, not the loading of images.
    `progress(images done)` is called after every batch.
    """
    if not nets:
        raise UserError("no weights given")
    check_classes(nets)
    methods = parse_methods(methods)
    scale_sets = [tuple(s) for s in (scales or [default_scales(nets[0])])]
    runtime = runtime or resolve_runtime()
    needed = {(n, part, q) for n in range(len(nets)) for m in methods for part in _PARTS[m]
              for s in scale_sets for q in s}
    for n, part, q in sorted(needed):
        _check_scale(nets[n], part, q)
    for net in nets:
        if any(part == "dense" for _, part, _ in needed):
            net.dense()
        net.to(runtime)
    k = min(5, nets[0].num_classes)
    who = list(range(len(nets))) + (["ensemble"] if len(nets) > 1 else [])
    correct = {(w, m, s): [0, 0] for w in who for m in methods for s in scale_sets}
    seconds = dict.fromkeys(needed, 0.0)
    count = 0
    for b, batch in enumerate(_batches(dataset, batch_size, workers, limit)):
        images = [img for img, _ in batch]
        labels = torch.tensor([int(label) for _, label in batch])
        if (labels < 0).any():
            raise UserError("the images have no labels (a plain folder of images); eval needs class sub-folders "
                            "or a labelled dataset; use `vggnet predict` for unlabelled images")
        if (labels >= nets[0].num_classes).any():
            raise UserError(f"label {int(labels.max())} is out of range for {nets[0].num_classes} classes")
        probs: dict[tuple[int, str, int], Tensor] = {}
        for key in sorted(needed):
            net, part, q = nets[key[0]], key[1], key[2]
            if warmup and b == 0:  # first calls allocate and autotune: keep them out of the timing
                posteriors(net, images[:1], part, q, runtime=runtime, batch_size=batch_size)
            _sync(runtime)
            start = time.perf_counter()
            probs[key] = posteriors(net, images, part, q, runtime=runtime, batch_size=batch_size)
            _sync(runtime)
            seconds[key] += time.perf_counter() - start
        for m in methods:
            for s in scale_sets:
                member = [torch.stack([probs[(n, part, q)] for part in _PARTS[m] for q in s]).mean(0)
                          for n in range(len(nets))]
                combined = dict(enumerate(member))
                if len(nets) > 1:
                    combined["ensemble"] = torch.stack(member).mean(0)
                for w, p in combined.items():
                    c1, ck = correct_topk(p, labels, (1, k))
                    correct[(w, m, s)][0] += int(c1)
                    correct[(w, m, s)][1] += int(ck)
        count += len(batch)
        if progress is not None:
            progress(count)
    if count == 0:
        raise UserError("the dataset holds no images")
    rows = []
    for s in scale_sets:
        for m in methods:
            for w in who:
                members = range(len(nets)) if w == "ensemble" else [w]
                spent = sum(seconds[(n, part, q)] for n in members for part in _PARTS[m] for q in s)
                top1, topk = correct[(w, m, s)]
                name = "ensemble (" + " + ".join(net.name for net in nets) + ")" if w == "ensemble" else nets[w].name
                views = sum(_views(nets[n], part) for n in members for part in _PARTS[m]) * len(s)
                rows.append(Row(net=name, method=m, scales=s, top1_error=100.0 * (1 - top1 / count),
                                top5_error=100.0 * (1 - topk / count), top_k=k, images=count,
                                images_per_s=count / spent if spent > 0 else math.inf, views_per_image=views))
    return rows


def _views(net: Net, part: str) -> int:
    flips = 2 if net.flip else 1
    return {"center": 1, "dense": flips, "multicrop": GRID * GRID * flips}[part]


def _speed(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else f"{v:#.3g}"  # three significant figures for slow methods


def format_table(rows: Sequence[Row]) -> str:
    """The rows as Table 5 of the paper: net, method, test scales Q, top-1 and top-5 error, speed."""
    k = rows[0].top_k if rows else 5
    headers = ["net", "method", "scales Q", "views", "top-1 err (%)", f"top-{k} err (%)", "images/s"]
    body = [[r.net, r.method, ",".join(map(str, r.scales)), str(r.views_per_image), f"{r.top1_error:.2f}",
             f"{r.top5_error:.2f}", _speed(r.images_per_s)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])
