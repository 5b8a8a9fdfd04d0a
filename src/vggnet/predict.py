"""Classify photographs of any size, and show where the net looked (Grad-CAM).

Prediction uses the paper's dense evaluation by default (section 3.2): the image is rescaled so its
smaller side is the net's test scale Q, the fully-convolutional net scores every position of the
whole image, and the posteriors of the image and its mirror image are averaged. No crop throws part
of the photo away. Only a net whose dense form needs more than Q pixels (the paper's 7x7-conv head
on a small-image net) falls back to a centre crop.

Grad-CAM (Selvaraju et al., 2017) weights the maps of the last convolutional stage (the last ReLU,
14x14 at 224 px) by the spatial mean of the class score's gradient with respect to them, keeps the
positive part of the weighted sum, and upsamples it to the photo: bright where evidence for the
class lies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as F

from .images import IMAGE_EXTENSIONS, open_image
from .errors import UserError
from .evaluate import METHODS, posteriors
from .transforms import rescale, to_float
from .nets import Net
from .model import VGG, VGGFullyConv
from .runtime import Runtime, resolve_runtime

__all__ = ["MAX_UPSCALE", "Prediction", "read_image", "image_paths", "check_image_size",
           "predict", "grad_cam", "image_cam", "overlay", "format_predictions"]

# Rescaling to Q enlarges small photos; beyond 8x there is no detail left for a net to see.
MAX_UPSCALE = 8


@dataclass(kw_only=True)
class Prediction:
    """The top classes of one image: [(class name, class index, probability), ...], best first."""

    image: str
    size: tuple[int, int]  # (height, width) of the photo as given
    method: str            # dense, center or multicrop; what actually ran
    scale: int             # Q: the smaller side after rescaling
    top: list[tuple[str, int, float]]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["top"] = [{"class": name, "index": index, "probability": p} for name, index, p in self.top]
        return d


def read_image(path: str | os.PathLike) -> Tensor:
    """Decode an image file (vggnet.data.open_image: any pixel format, EXIF orientation) to uint8 3 x H x W."""
    return F.pil_to_tensor(open_image(path))


def image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, sorted)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"no images in directory {p}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"image not found: {p}")
    if not paths:
        raise UserError("no images given")
    return paths


def check_image_size(net: Net, image: Tensor, name: str = "image") -> None:
    """Refuse images so small that rescaling them for the net would invent nearly all their pixels."""
    need = math.ceil(net.image_size / MAX_UPSCALE)
    h, w = image.shape[-2:]
    if min(h, w) < need:
        raise UserError(f"{name} is {w}x{h} px, too small for {net.name}: a net that sees {net.image_size} px "
                        f"crops needs images of at least {need} px a side")


def _method_for(net: Net, method: str, q: int) -> str:
    # Dense is the default; the paper's head needs a 224 px image for its 7x7-conv FC1.
    if method == "dense" and q < net.dense_min_size:
        return "center"
    return method


def predict(net: Net, images: Sequence[Tensor], *, names: Sequence[str] | None = None, method: str = "dense",
            scale: int | None = None, top_k: int = 5, runtime: Runtime | None = None,
            batch_size: int = 32) -> list[Prediction]:
    """Top-k classes with probabilities for each image (float 3 x H x W in [0, 1], any size)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    for image, name in zip(images, names):
        check_image_size(net, image, name)
    q = scale or net.eval_scale
    runtime = runtime or resolve_runtime()
    used = _method_for(net, method, q)
    parts = ("multicrop", "dense") if used == "multicrop+dense" else (used,)
    if "dense" in parts:
        net.dense()
    net.to(runtime)
    probs = torch.stack([posteriors(net, images, part, q, runtime=runtime, batch_size=batch_size)
                         for part in parts]).mean(0)
    k = min(top_k, net.num_classes)
    values, indices = probs.topk(k, dim=1)
    return [Prediction(image=name, size=tuple(img.shape[-2:]), method=used, scale=q,
                       top=[(net.class_names[i], int(i), float(p)) for p, i in zip(vals.tolist(), idx.tolist())])
            for name, img, vals, idx in zip(names, images, values, indices)]


def _last_relu(model: VGG | VGGFullyConv) -> int:
    return max(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU))


def grad_cam(model: VGG | VGGFullyConv, x: Tensor, class_index: int) -> Tensor:
    """Grad-CAM of `class_index` for one normalised input x (1, 3, H, W): a (h, w) map at the last ReLU.

    weights_k = mean over space of d score / d A_k (A: the last ReLU's maps); CAM = ReLU(sum_k
    weights_k A_k), scaled to max 1 (all zeros when no position speaks for the class). For the
    dense form the score is the spatially averaged class-score map, as in dense evaluation.
    """
    model.eval()
    cut = _last_relu(model)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float()
        a = model.features[: cut + 1](x).detach().requires_grad_(True)  # (1, 512, h, w)
        rest = model.features[cut + 1:](a)
        if isinstance(model, VGGFullyConv):
            scores = model.classifier(rest).mean(dim=(2, 3))
        else:
            scores = model.forward_head(rest)
        (grad,) = torch.autograd.grad(scores[0, class_index], a)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * a.detach()).sum(dim=1))[0]
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def image_cam(net: Net, image: Tensor, class_index: int, *, scale: int | None = None,
              runtime: Runtime | None = None) -> Tensor:
    """Grad-CAM of `class_index` over a whole photo (3 x H x W, uint8 or [0, 1]) -> (H, W) map in [0, 1].

    The photo is rescaled to Q as for prediction; the dense form is used when the image is large
    enough for it, else the net itself (its adaptive pooling takes any size >= 32 px).
    """
    runtime = runtime or resolve_runtime(precision="fp32")
    q = scale or net.eval_scale
    x = net.normalise(rescale(to_float(image[None]), q)).to(runtime.device)
    model = net.dense() if q >= net.dense_min_size else net.model
    model = model.to(runtime.device)
    cam = grad_cam(model, x, class_index)
    cam = nnf.interpolate(cam[None, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    cam = cam.clamp_min(0).cpu()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def overlay(image: Tensor, cam: Tensor, *, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """The photo with the heat-map blended over it (matplotlib colour map), as a PIL image."""
    from matplotlib import colormaps

    heat = colormaps[colormap](cam.numpy())[..., :3]               # (H, W, 3) in [0, 1]
    photo = to_float(image).permute(1, 2, 0).clamp(0, 1).numpy()
    blend = (1 - alpha) * photo + alpha * heat
    return Image.fromarray(np.round(blend * 255).astype(np.uint8))


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One block per image: its name, size and method, then rank, probability and class."""
    lines = []
    for p in predictions:
        lines.append(f"{p.image}  ({p.size[1]}x{p.size[0]} px, {p.method} at Q={p.scale})")
        for rank, (name, index, prob) in enumerate(p.top, 1):
            lines.append(f"  {rank}. {prob:7.2%}  {name} [{index}]")
    return "\n".join(lines)
