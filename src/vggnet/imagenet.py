"""What a checkpoint needs besides its weights: class names and preprocessing, for every kind of weights.

The project's checkpoints carry a `meta` dict (DataBundle.meta(): name, class_names, mean, std,
image_size, train_scale, eval_scale, ...). torchvision's ImageNet files (vgg16-397923af.pth) are
bare state dicts with no meta at all; for them this module supplies what torchvision's own
weights metadata says, offline: the 1,000 ImageNet class names shipped inside torchvision, the
ImageNet mean/std, and its test protocol (shorter side 256, centre crop 224).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_class_names", "imagenet_meta", "complete_meta"]



def imagenet_class_names() -> list[str]:
    """The 1,000 ILSVRC-2012 class names in torchvision's index order (shipped with torchvision, no download)."""
    from torchvision.models import VGG16_Weights

    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_meta() -> dict[str, Any]:
    """Meta for torchvision's ImageNet VGG weights: its transforms() are resize 256, centre crop 224.

    torchvision trained with random-resized crops, not the paper's fixed S; 256 is the scale its
    own evaluation uses, so it is both the default test scale Q and the nominal training scale.
    """
    return dict(name="imagenet", class_names=imagenet_class_names(), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                image_size=224, train_scale=(256, 256), eval_scale=256, data=None, seed=None)


def complete_meta(meta: Mapping[str, Any], model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in what a checkpoint's meta lacks, so every net can be evaluated the same way.

    1,000 classes without class names, from a file that names no data, are ImageNet weights (torchvision's, or the authors' Caffe
    files, Keras's, timm's): ImageNet's class names and test protocol, with whatever preprocessing
    the file recorded (ImageNet mean/std when it recorded none). Otherwise missing fields fall back to: class names "0".."N-1", ImageNet mean/std, the head's natural input size
    (224 for the paper's head, 32 for the compact one), Q = input * 256/224 (torchvision's ratio),
    and a fixed training scale S = Q.
    """
    num_classes = int(model_args["num_classes"])
    out = dict(meta)
    if num_classes == 1000 and not out.get("class_names") and not out.get("name"):
        # ImageNet weights from elsewhere (torchvision, Caffe, Keras, timm): ImageNet's names and test
        # protocol, keeping whatever preprocessing the file recorded.
        out = {**imagenet_meta(), **{k: v for k, v in out.items() if v is not None}}
    out.setdefault("name", "unknown")
    if not out.get("class_names"):
        out["class_names"] = [str(i) for i in range(num_classes)]
    out["class_names"] = [str(c) for c in out["class_names"]]
    out["mean"] = tuple(float(v) for v in out.get("mean") or IMAGENET_MEAN)
    out["std"] = tuple(float(v) for v in out.get("std") or IMAGENET_STD)
    out["input_range"] = float(out.get("input_range") or 1.0)
    image_size = int(out.get("image_size") or (224 if model_args.get("head", "paper") == "paper" else 32))
    out["image_size"] = image_size
    out["eval_scale"] = int(out.get("eval_scale") or out.get("test_scale") or round(image_size * 256 / 224))
    train_scale = out.get("train_scale") or (out["eval_scale"], out["eval_scale"])
    out["train_scale"] = (int(train_scale[0]), int(train_scale[-1]))
    return out
