"""Where training images come from: embedded digits, CIFAR, an ImageFolder tree, the study's task,
or synthetic data.

Nothing is downloaded (the machine is offline and users' data is theirs). `build_data` turns a
`--data` value into a `DataBundle` of train/val/test datasets with the paper's augmentation
(section 3.1, see transforms.py) on train and a deterministic single crop on val/test;
`eval_images` gives the same splits un-augmented, at native size, as uint8 pixels, for the test
protocols of section 3.2 (dense, multi-crop, multi-scale), which rescale the images themselves.

Forms of `data`:
- None or "digits": scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), upsampled
  bilinearly to 32x32 and replicated to RGB; a seeded stratified 70/10/20 train/val/test split
  (1,258 / 180 / 359 images; every class split in the same proportions).
- "synthetic": seeded class-dependent patterns plus noise, 10 classes (for tests and benchmarks).
- "study": the study's task (vggnet.studydata.build_splits), held in memory.
- a directory holding CIFAR-10 or CIFAR-100 in the python format (`cifar-10-batches-py/`,
  `cifar-100-python/`, or that folder itself): val is a seeded stratified 10% of the training
  batches, test is the test batch.
- a directory holding an ImageFolder tree: `train/CLASS/*`, optional `val/CLASS/*` (without it a
  seeded stratified 10% of train/ is held out), optional `test/CLASS/*` (the ImageNet layout).
  Crop size, training scale S and test scale Q follow the images' sizes unless given
  (`sizes_for_images`).

Images are decoded by `vggnet.images.open_image` alone (training, mean/std, eval, predict): every pixel format
PIL reads becomes the RGB picture it holds or is refused by name, and hostile headers (decompression
bombs, truncated or malformed files) are refused with one line naming the file. Small in-memory
data (digits, CIFAR, the study) is kept as one uint8 tensor, so an item costs one transform call;
every dataset pickles cheaply for DataLoader worker processes.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from .errors import UserError
from .images import ALPHA_BACKGROUND, IMAGE_EXTENSIONS, MAX_PIXELS, image_size_of, open_image, opened_image, refusal
from .model import MIN_INPUT_SIZE
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "ALPHA_BACKGROUND",
    "DIGITS_FRACTIONS",
    "HOLDOUT_FRACTION",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "DataBundle",
    "ImageFileDataset",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_data",
    "default_sizes",
    "eval_draft",
    "eval_images",
    "image_size_of",
    "open_image",
    "sizes_for_images",
]

log = logging.getLogger("vggnet")

DIGITS_FRACTIONS = (0.7, 0.1, 0.2)          # train / val / test, per class
CIFAR_VAL_FRACTION = 0.1                    # held out of the training batches, per class
HOLDOUT_FRACTION = 0.1                      # ImageFolder without val/: held out of train/, per class
STATS_SAMPLE = 500                          # ImageFolder images used to estimate mean/std
STATS_SIZE = 64                             # ... each resized to 64x64 first
SIZES_SAMPLE = 200                          # ImageFolder headers read to choose crop, S and Q
SPLITS = ("train", "val", "test")
_EXPECTED = ("a CIFAR-10/100 python-format directory (cifar-10-batches-py/ or cifar-100-python/) "
             "or an ImageFolder tree (DIR/train/CLASS/*.jpg, optional DIR/val/CLASS/*, DIR/test/CLASS/*)")
_WARN_LINES = 20                            # per-file warnings before only the total is logged
# Sources whose mirror image is another thing (a mirrored 2 is no 2): no random flips by default.
_NO_FLIP = ("digits", "study")


# ----------------------------------------------------------------------------- datasets

class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor N x 3 x H x W; items (transform(image), label).

    With transform=None an item is the uint8 image itself (what `eval_images` returns).
    """

    def __init__(self, *, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, torch.as_tensor(labels).long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class ImageFileDataset(Dataset):
    """Image files decoded by `open_image`; items (transform(PIL RGB image), label), label -1 if unknown.

    With transform=None an item is the uint8 tensor 3 x H x W. `draft`: the smallest side the
    transform needs (see `open_image`). Files that fail to decode here despite passing the
    indexing check are replaced by the next item and logged (counted in `failed`, per process),
    or raise UserError naming the file when strict.
    """

    def __init__(self, *, samples: list[tuple[str, int]], transform: Callable | None = None,
                 draft: int | None = None, strict: bool = False) -> None:
        self.samples, self.transform, self.draft, self.strict = list(samples), transform, draft, strict
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.failed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                img = open_image(path, draft=self.draft)
            except UserError as e:
                if self.strict:
                    raise UserError(f"{e}; run without --strict to skip such files") from None
                self.failed += 1
                log.warning("skipping unreadable image: %s", e)
                continue
            return (self.transform(img) if self.transform else F.pil_to_tensor(img)), label
        raise UserError(f"expected readable images, but none of the {len(self.samples)} files could be decoded")


class SyntheticDataset(Dataset):
    """Seeded random images that a net can learn: each class is a fixed 4x4 grid of colours,
    mirror-symmetric (so the paper's horizontal flip keeps the class), upsampled to image_size,
    plus per-image Gaussian noise. Item i of split `split` is a pure function of (seed, split, i);
    label = i % num_classes (balanced). Generated on the fly, so memory stays flat at any size.
    With transform=None an item is the uint8 image.
    """

    def __init__(self, *, size: int, image_size: int, num_classes: int = 10, seed: int = 0,
                 split: str = "train", noise: float = 0.15, transform: Callable | None = None) -> None:
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.split_code, self.noise, self.transform = seed, SPLITS.index(split), noise, transform
        g = torch.Generator().manual_seed(seed)
        half = torch.rand(num_classes, 3, 4, 2, generator=g)
        grid = torch.cat([half, half.flip(-1)], dim=-1)                     # C x 3 x 4 x 4, mirror-symmetric
        self.templates = torch.nn.functional.interpolate(grid, size=(image_size, image_size), mode="bilinear",
                                                         align_corners=False)
        self.labels = torch.arange(size) % num_classes

    def __len__(self) -> int:
        return self.size

    def _image(self, i: int) -> torch.Tensor:
        state = np.random.SeedSequence([self.seed, self.split_code, i]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        x = self.templates[i % self.num_classes] + self.noise * torch.randn(self.templates.shape[1:], generator=g)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        img = self._image(i)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# ----------------------------------------------------------------------------- the bundle

@dataclass
class DataBundle:
    """Everything training needs from the data: three datasets and the numbers that made them."""

    name: str                                   # "digits" | "cifar10" | "cifar100" | "imagefolder" | "synthetic" | "study"
    train: Dataset                              # augmented (section 3.1), normalised
    val: Dataset                                # deterministic single centre crop at Q
    test: Dataset | None                        # like val; None for an ImageFolder without test/
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]            # in [0, 1] pixel units
    std: tuple[float, float, float]
    image_size: int                             # the crop the net sees
    train_scale: tuple[int, int]                # (S_min, S_max); equal for fixed-scale training
    eval_scale: int                             # Q of val/test
    skipped: int = 0                            # corrupt or unreadable images left out while indexing
    data: str | None = None                     # the data source: None (digits), "synthetic", "study" or an absolute path
    seed: int = 0                               # the split seed
    synthetic_size: int | None = None
    hflip: bool = True                          # random horizontal flips in training (test-time flips follow it)
    sizes_reason: str = ""                      # one line for the log: the crop, S and Q, and why
    suggested_head: str | None = None           # "compact" when the crops are small; None: no opinion
    holdout: float | None = None                # fraction of train/ held out as val (ImageFolder without val/)
    input_range: float = 1.0                    # pixels are scaled to [0, input_range] before mean/std (Caffe: 255)

    @property
    def test_scale(self) -> int:
        """Q of val/test (the CLI's --test-scale)."""
        return self.eval_scale

    def meta(self) -> dict:
        """Plain data (JSON, YAML and weights_only safe) describing how to rebuild the same inputs."""
        out = {"name": self.name, "class_names": list(self.class_names), "num_classes": self.num_classes,
               "mean": list(self.mean), "std": list(self.std), "image_size": self.image_size,
               "train_scale": list(self.train_scale), "eval_scale": self.eval_scale,
               "data": self.data, "seed": self.seed, "hflip": self.hflip, "input_range": self.input_range}
        if self.synthetic_size is not None:
            out["synthetic_size"] = self.synthetic_size
        return out


def default_sizes(name: str, image_size: int | None = None) -> tuple[int, tuple[int, int], int]:
    """(image_size, train_scale, eval_scale) defaults for a source whose image size is known by name.

    Small images (digits, CIFAR, synthetic up to 64 px): crop = the native 32 px, S jittered in
    [crop, 1.5 crop], Q = crop (the whole image). Photos (ImageFolder, synthetic above 64 px): the
    paper's fixed S = Q = 256 for 224 crops, scaled in proportion for other crop sizes.
    """
    small = name in ("digits", "cifar10", "cifar100") or (name == "synthetic" and (image_size or 32) <= 64)
    if small:
        size = image_size or 32
        return size, (size, size * 3 // 2), size
    size = image_size or 224
    s = round(size * 256 / 224)
    return size, (s, s), s


def sizes_for_images(short_side: int) -> tuple[int, tuple[int, int], int, str]:
    """(crop, (S_min, S_max), Q, why) for images whose typical smaller side is `short_side` px.

    Photos (>= 224 px): the paper's 224 crops at fixed S = Q = 256 (section 3.1). Smaller images
    train at their own size: the crop is the largest multiple of 32 that fits (VGG's five 2x2
    max-pools then divide it exactly; 32 is the least the net accepts, smaller images are
    upsampled to it), S is jittered in [crop, max(1.5 crop, side)] as for CIFAR, and Q is the
    images' own side, so a typical test image is not resampled at all.
    """
    if short_side >= 224:
        return 224, (256, 256), 256, "photos: the paper's 224 px crops at S = Q = 256"
    crop = max(32, short_side // 32 * 32)
    s_max = max(crop * 3 // 2, short_side)
    q = max(crop, short_side)
    why = ("small images: crop = the largest multiple of 32 that fits, S jittered up to 1.5x, Q = their own size; "
           "train with the compact head (--head compact)")
    return crop, (crop, s_max), q, why


def build_data(data: str | None = None, *, image_size: int | None = None,
               train_scale: tuple[int, int] | None = None, eval_scale: int | None = None,
               test_scale: int | None = None, mean_std: str | Mapping[str, Any] = "dataset", lighting: float = 0.1,
               strict: bool = False, seed: int = 0, synthetic_size: int = 512,
               hflip: bool | None = None) -> DataBundle:
    """Open a data source and wrap its splits in the paper's train and test transforms.

    Sizes left as None follow the data (`default_sizes`, `sizes_for_images`; the reason is in
    `sizes_reason`). test_scale is eval_scale under the CLI's name (either may be given).
    mean_std: "dataset" (per-channel mean/std of the training split; ImageFolder: estimated on a
    seeded sample of up to 500 training images), "imagenet", or the preprocessing of the weights
    training starts from ({"mean", "std", "input_range"}: e.g. Caffe's 0-255 minus the mean). lighting: std of the PCA colour
    shift, 0 disables it. hflip: random horizontal flip; None means on, except for digits and the
    study's digits (a mirrored digit is not that digit). Bad input raises UserError.
    """
    q_given = _one_test_scale(eval_scale, test_scale)
    if not isinstance(mean_std, Mapping) and mean_std not in ("dataset", "imagenet"):
        raise UserError(f"--mean-std must be 'dataset', 'imagenet' or 'weights', got {mean_std!r}")
    if not np.isfinite(lighting) or lighting < 0:
        raise UserError(f"--lighting must be a finite number >= 0 (0 disables the colour shift), got {lighting}")
    if synthetic_size < 1:
        raise UserError(f"--synthetic-size must be >= 1, got {synthetic_size}")
    name, root = _detect(data, allow_eval_only=False)
    native = _resolve_sizes(name, None, image_size, train_scale, q_given)[2] if name == "synthetic" else 0
    src = _open(name, root, splits=SPLITS, seed=seed, strict=strict, synthetic_size=synthetic_size, native=native)
    size, scale, q, reason = _resolve_sizes(name, src, image_size, train_scale, q_given)
    if src.holdout:
        reason += (f"; no val/ folder: a seeded stratified {src.holdout:.0%} of train/ ({len(src.splits['val'])} "
                   f"images) is held out for validation")

    input_range = 1.0
    if isinstance(mean_std, Mapping):  # the preprocessing of the weights training starts from
        mean, std = tuple(map(float, mean_std["mean"])), tuple(map(float, mean_std["std"]))
        input_range = float(mean_std.get("input_range", 1.0))
    elif mean_std == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = _dataset_stats(src.splits["train"], seed)
    flip = name not in _NO_FLIP if hflip is None else hflip
    _set_transform(src.splits["train"], train_transform(image_size=size, train_scale=scale, mean=mean, std=std,
                                                        lighting=lighting, hflip=flip, input_range=input_range),
                   draft=max(scale[1], size))
    ev = eval_transform(image_size=size, eval_scale=q, mean=mean, std=std, input_range=input_range)
    for split in ("val", "test"):
        if src.splits.get(split) is not None:
            _set_transform(src.splits[split], ev, draft=eval_draft(size, q))
    return DataBundle(name=name, train=src.splits["train"], val=src.splits["val"], test=src.splits.get("test"),
                      num_classes=len(src.class_names), class_names=src.class_names, mean=tuple(mean),
                      std=tuple(std), image_size=size, train_scale=scale, eval_scale=q, skipped=src.skipped,
                      data=str(root) if root else (None if name == "digits" else name),
                      seed=seed, synthetic_size=synthetic_size if name == "synthetic" else None, hflip=flip,
                      sizes_reason=reason, suggested_head="compact" if size < 224 else None, holdout=src.holdout,
                      input_range=input_range)


def eval_draft(image_size: int, test_scale: int) -> int:
    """The smallest side a val/test image is decoded at: a JPEG is never decoded below what the
    test view rescales it to (Q) nor below the crop. `eval_images(draft=...)` takes the same."""
    return max(test_scale, image_size)


def eval_images(data: str | None, split: str = "test", *, seed: int = 0, strict: bool = False,
                image_size: int | None = None, synthetic_size: int = 512,
                draft: int | None = None) -> tuple[Dataset, list[str]]:
    """Un-augmented, un-normalised images at native size for the test protocols (section 3.2).

    Items: (uint8 3 x H x W RGB, label). Same splits as build_data with the same seed (an
    ImageFolder without val/ holds out the same 10% of train/). `draft`: the smallest side the
    caller will rescale to (the largest Q it tests at); files are decoded by `open_image` with it,
    so at training's own Q the pixels are exactly those of training's val/test (`eval_draft`).
    An ImageFolder without test/ falls back to val (the paper's "test" numbers are ImageNet val).
    Also accepts a directory of class folders (labelled by folder), or a plain directory of
    images or a single image file (label -1, no class names) for predict-style use.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name, root = _detect(data, allow_eval_only=True)
    if name in ("images", "classfolders"):
        samples, classes, _ = _index_loose(root, strict=strict, labelled=name == "classfolders")
        if not samples:
            raise UserError(f"expected images ({', '.join(IMAGE_EXTENSIONS)}) in {data}, found no readable ones")
        return ImageFileDataset(samples=samples, strict=strict, draft=draft), classes
    fallback = name == "imagefolder" and split == "test" and not (root / "test").is_dir()
    split = "val" if fallback else split
    native = _resolve_sizes(name, None, image_size, None, None)[2] if name == "synthetic" else 0
    src = _open(name, root, splits=(split,), seed=seed, strict=strict, synthetic_size=synthetic_size, native=native)
    if fallback:                                # said only once the data opened: an error stays one line
        log.warning("%s has no test/ folder; evaluating on val/", root)
    ds = src.splits[split]
    if isinstance(ds, ImageFileDataset):
        ds.draft = draft
    return ds, src.class_names


# ----------------------------------------------------------------------------- sources

@dataclass
class _Source:
    splits: dict[str, Dataset | None]
    class_names: list[str]
    skipped: int = 0
    holdout: float | None = None            # the fraction of train/ held out as val, if any


def _detect(data: str | os.PathLike | None, *, allow_eval_only: bool) -> tuple[str, Path | None]:
    """Name the kind of source `data` is, or raise UserError saying what was expected."""
    if data is None or str(data) == "digits":
        return "digits", None
    if str(data) in ("synthetic", "study"):
        return str(data), None
    root = Path(data).expanduser().resolve()
    if not root.exists():
        raise UserError(f"--data {data} does not exist; expected {_EXPECTED}, 'synthetic', 'study', "
                        f"or no --data for the digits")
    if root.is_file():
        if allow_eval_only and root.suffix.lower() in IMAGE_EXTENSIONS:
            return "images", root
        raise UserError(f"--data expects a data directory, got the file {data}")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UserError(f"--data {data} is an empty directory; expected {_EXPECTED}")
    cifar = _cifar_dir(root)
    if cifar:
        return cifar
    if (root / "train").is_dir() or (allow_eval_only and (root / "val").is_dir()):
        return "imagefolder", root
    if allow_eval_only:
        if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
            return "images", root
        if any(p.is_dir() for p in entries):
            return "classfolders", root
    raise UserError(f"--data {data} is neither CIFAR nor an ImageFolder tree; expected {_EXPECTED}")


def _one_test_scale(eval_scale, test_scale) -> int | None:
    if eval_scale is not None and test_scale is not None and int(eval_scale) != int(test_scale):
        raise UserError(f"the test scale is given twice with different values: {eval_scale} and {test_scale}")
    return test_scale if test_scale is not None else eval_scale


MAX_SCALE = 4096    # 8x the paper's largest scale (512); a 4096 px float image is already ~270 MB


def _int(value, flag: str) -> int:
    """An integer size from a flag or a recipe (YAML may give floats or strings), refused by flag name."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} expects an integer number of pixels, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise UserError(f"{flag} expects an integer number of pixels, got {value!r}")
    if not 1 <= f <= MAX_SCALE:
        raise UserError(f"{flag} must be between 1 and {MAX_SCALE} px, got {int(f)}")
    return int(f)


def _train_scale(value) -> tuple[int, int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (int, float, str)) else list(value)
    if len(items) not in (1, 2):
        raise UserError(f"--train-scale expects S or S_MIN S_MAX, got {' '.join(map(str, items)) or 'nothing'}")
    scale = tuple(_int(s, "--train-scale") for s in items)
    scale = (scale[0], scale[-1])
    if scale[0] > scale[1]:
        raise UserError(f"--train-scale S_MIN S_MAX needs S_MIN <= S_MAX, got {scale[0]} {scale[1]}")
    return scale


def _resolve_sizes(name: str, src: _Source | None, image_size, train_scale,
                   test_scale) -> tuple[int, tuple[int, int], int, str]:
    """(crop, (S_min, S_max), Q, the reason for the log): the user's values where given, else the data's."""
    size = _int(image_size, "--image-size") if image_size is not None else None
    scale = _train_scale(train_scale)
    q = _int(test_scale, "--test-scale") if test_scale is not None else None
    if size is not None and size < MIN_INPUT_SIZE:
        raise UserError(f"--image-size must be >= {MIN_INPUT_SIZE} (VGG's five 2x2 max-pools), got {size}")
    if name == "imagefolder":
        d_size, d_scale, d_q, what, why = _imagefolder_sizes(src, size)
    elif name == "study":
        canvas = int(src.splits["train"].images.shape[-1])
        s_fixed = canvas * 256 // 224  # the paper's S = 256 for 224 crops, in proportion
        d_size, d_scale, d_q = size or canvas, (s_fixed, s_fixed), s_fixed
        what, why = f"the study's images are {canvas}x{canvas} px", "the paper's S = Q = 256 for 224 crops, in proportion"
    else:
        d_size, d_scale, d_q = default_sizes(name, size)
        what = f"{name} images are {d_q}x{d_q} px" if d_q < 224 else f"{name} images"
        why = "the whole image, S jittered up to 1.5x" if d_q < 224 else "the paper's 224 px crops at S = Q = 256"
    size, scale, q = size or d_size, scale or d_scale, q or d_q
    _check_fit(size, scale, q, size_given=image_size is not None)
    given = [f for f, v in (("--image-size", image_size), ("--train-scale", train_scale), ("--test-scale", test_scale))
             if v is not None]
    s_text = f"S in [{scale[0]}, {scale[1]}]" if scale[0] != scale[1] else f"S = {scale[0]}"
    reason = f"{what}: crop {size}, {s_text}, Q {q} ({why}" + (f"; {', '.join(given)} as given)" if given else ")")
    return size, scale, q, reason


def _check_fit(size: int, scale: tuple[int, int], q: int, *, size_given: bool) -> None:
    crop = f"--image-size {size}" if size_given else f"the crop ({size} px, chosen for this data; set --image-size)"
    if size > scale[0]:
        raise UserError(f"{crop} must be <= the training scale S (--train-scale {scale[0]} {scale[1]}): "
                        f"the crop is cut from the image rescaled so its smaller side is S")
    if q < size:
        raise UserError(f"--test-scale {q} must be >= {crop}: the centre crop is cut from the image "
                        f"rescaled so its smaller side is Q")


def _imagefolder_sizes(src: _Source, size: int | None) -> tuple[int, tuple[int, int], int, str, str]:
    """Defaults from the headers of a seeded sample of training images (no decoding)."""
    samples = src.splits["train"].samples
    pick = np.random.default_rng(0).choice(len(samples), size=min(len(samples), SIZES_SAMPLE), replace=False)
    dims = []
    for i in sorted(pick):
        try:
            dims.append(image_size_of(samples[i][0]))
        except UserError:
            continue                                    # unreadable now: counts for nothing
    if not dims:
        raise UserError("expected readable training images to choose the crop size, found none")
    w, h = (int(np.median([d[k] for d in dims])) for k in (0, 1))
    short = int(np.median([min(d) for d in dims]))
    crop, scale, q, why = sizes_for_images(short)
    if size is not None and size != crop:                 # a given crop: S and Q in proportion (photos)
        crop, scale, q = (size, (round(size * 256 / 224),) * 2, round(size * 256 / 224)) if short >= 224 else \
            (size, (size, max(size * 3 // 2, short)), max(size, short))
    what = f"images are {w}x{h} px (median of {len(dims)} sampled; smaller side {short} px)"
    return crop, scale, q, what, why


def _open(name: str, root: Path | None, *, splits, seed: int, strict: bool, synthetic_size: int,
          native: int) -> _Source:
    if name == "digits":
        return _digits(seed)
    if name == "synthetic":
        n = {"train": synthetic_size, "val": max(10, synthetic_size // 4), "test": max(10, synthetic_size // 4)}
        return _Source({s: SyntheticDataset(size=n[s], image_size=native, seed=seed, split=s) for s in splits},
                       [f"class_{k}" for k in range(10)])
    if name == "study":
        return _study(seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, splits, seed)
    return _imagefolder(root, splits, strict, seed)


def _study(seed: int) -> _Source:
    """The study's task (vggnet.studydata.build_splits): uint8 N x 3 x H x W tensors per split."""
    try:
        from .studydata import build_splits
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.studydata":
            raise
        raise UserError("--data study needs vggnet.studydata (the study's task), which this install lacks") from None
    splits, class_names = build_splits(seed=seed)
    out = {s: TensorImageDataset(images=x, labels=y) for s, (x, y) in splits.items() if s in SPLITS}
    if "train" not in out or "val" not in out:
        raise ValueError(f"studydata.build_splits must give train and val splits, gave {sorted(splits)}")
    out.setdefault("test", None)
    return _Source(out, list(class_names))


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices so every class is divided in the given proportions; a pure function of seed.

    Each class is shuffled with numpy's PCG64 (stable across versions and processes) and cut at
    rounded cumulative fractions; the last part takes the remainder. Returns sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = [int(round(b * len(idx))) for b in bounds]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


@lru_cache(maxsize=1)
def _digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 N x 3 x 32 x 32 (bilinear upsampling of the 8x8 grids) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16).unsqueeze(1)                 # N x 1 x 8 x 8 in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target).long()


def _digits(seed: int) -> _Source:
    x, y = _digits_images()
    parts = _stratified_split(y.numpy(), DIGITS_FRACTIONS, seed)
    splits = {s: TensorImageDataset(images=x[torch.from_numpy(i)], labels=y[torch.from_numpy(i)])
              for s, i in zip(SPLITS, parts)}
    return _Source(splits, [str(k) for k in range(10)])


# --------------------------------------------------------------------------- CIFAR

_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
}


def _cifar_dir(root: Path) -> tuple[str, Path] | None:
    """Recognise CIFAR from its files: DIR is the batches folder itself, or holds it."""
    for name, (folder, train, test, meta) in _CIFAR_FILES.items():
        if (root / folder).is_dir():
            return name, root / folder
    for name, (folder, train, test, meta) in _CIFAR_FILES.items():
        if root.name == folder or any((root / f).is_file() for f in [*train, *test, meta]):
            return name, root
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's pickled dicts of numpy arrays that refuses every other global, so a
    crafted file cannot run code (plain pickle.load would call whatever the file names)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]       # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise UserError(f"expected a CIFAR python-format pickle, could not read {path}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"expected a CIFAR python-format pickle (a dict), got {type(d).__name__} in {path}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batches(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        if "data" not in d or label_key not in d:
            raise UserError(f"expected 'data' and '{label_key}' in the CIFAR batch {p}, got keys {sorted(d)}")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(d[label_key]):
            raise UserError(f"expected N x 3072 images and N labels in {p}, got {x.shape} and {len(d[label_key])}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar(name: str, root: Path, splits, seed: int) -> _Source:
    folder, train_files, test_files, meta_file = _CIFAR_FILES[name]
    missing = [f for f in [*train_files, *test_files, meta_file] if not (root / f).is_file()]
    if missing:
        raise UserError(f"CIFAR directory {root} is missing {', '.join(missing)}; expected "
                        f"{', '.join([*train_files, *test_files, meta_file])} (the python version)")
    label_key, names_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    meta = _unpickle(root / meta_file)
    if names_key not in meta:
        raise UserError(f"expected '{names_key}' in {root / meta_file}, got keys {sorted(meta)}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    out: dict[str, Dataset | None] = {}
    if "train" in splits or "val" in splits:
        x, y = _cifar_batches([root / f for f in train_files], label_key)
        tr, va = _stratified_split(y.numpy(), (1 - CIFAR_VAL_FRACTION, CIFAR_VAL_FRACTION), seed)
        out["train"] = TensorImageDataset(images=x[torch.from_numpy(tr)], labels=y[torch.from_numpy(tr)])
        out["val"] = TensorImageDataset(images=x[torch.from_numpy(va)], labels=y[torch.from_numpy(va)])
    if "test" in splits:
        x, y = _cifar_batches([root / f for f in test_files], label_key)
        out["test"] = TensorImageDataset(images=x, labels=y)
    return _Source(out, classes)


# --------------------------------------------------------------------------- ImageFolder

def _imagefolder(root: Path, splits, strict: bool, seed: int) -> _Source:
    """Index DIR/{train,val,test}/CLASS/*: classes sorted by folder name, taken from train/.

    Without val/, a seeded stratified HOLDOUT_FRACTION of train/ becomes val (`_holdout`).
    """
    class_dir = root / "train" if (root / "train").is_dir() else root / "val"
    classes = _class_folders(class_dir)
    out: dict[str, Dataset | None] = {}
    skipped = 0
    holdout = not (root / "val").is_dir()
    if holdout and ("train" in splits or "val" in splits):
        samples, skipped = _index_split(root / "train", classes, class_dir, strict)
        parts = _holdout(np.array([label for _, label in samples]), HOLDOUT_FRACTION, seed)
        if len(parts[1]) == 0:
            raise UserError(f"{root} has no val/ folder and too few images per class in train/ to hold one out "
                            f"(a class needs >= 2 images); add {root / 'val'}/CLASS/* next to train/")
        for split, idx in zip(("train", "val"), parts):
            out[split] = ImageFileDataset(samples=[samples[i] for i in idx], strict=strict)
    for split in splits:
        if split in out:
            continue
        d = root / split
        if not d.is_dir():
            if split == "test":
                out["test"] = None
                continue
            raise UserError(f"expected the ImageFolder split folder {d} (DIR/{split}/CLASS/*), it does not exist")
        samples, n_bad = _index_split(d, classes, class_dir, strict)
        out[split], skipped = ImageFileDataset(samples=samples, strict=strict), skipped + n_bad
    return _Source(out, classes, skipped, HOLDOUT_FRACTION if holdout else None)


def _index_split(d: Path, classes: list[str], class_dir: Path, strict: bool) -> tuple[list[tuple[str, int]], int]:
    found = _class_folders(d)
    if found != classes:
        extra, lacking = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise UserError(f"{d} must have the same class folders as {class_dir}: "
                        f"missing {lacking or 'none'}, unexpected {extra or 'none'}")
    return _index_classes(d, classes, strict)


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: per class round(fraction * n) images, at least one of a class
    with two or more (so every class is validated), none of a class with one. A pure function of
    seed (numpy's PCG64, as `_stratified_split`); sorted index arrays."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _class_folders(d: Path) -> list[str]:
    classes = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"expected class folders in {d} (DIR/{d.name}/CLASS/*.jpg), found none")
    return classes


def _image_files(d: Path) -> list[Path]:
    """Image files under d, recursively (like torchvision's ImageFolder), in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return out


def _index_classes(d: Path, classes: list[str], strict: bool) -> tuple[list[tuple[str, int]], int]:
    files: list[tuple[Path, int]] = []
    for label, c in enumerate(classes):
        found = _image_files(d / c)
        if not found:
            raise UserError(f"class folder {d / c} has no images; expected image files ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(p, label) for p in found]
    reasons = _verify([p for p, _ in files], strict)
    samples = [(str(p), label) for (p, label), why in zip(files, reasons) if why is None]
    for label, c in enumerate(classes):
        if not any(lab == label for _, lab in samples):
            first = next(why for (_, lab), why in zip(files, reasons) if lab == label)
            raise UserError(f"class folder {d / c} has no readable images; every file in it is unreadable ({first})")
    _log_skipped(reasons)
    return samples, len(files) - len(samples)


def _index_loose(root: Path, *, strict: bool, labelled: bool) -> tuple[list[tuple[str, int]], list[str], int]:
    """A single image, a plain folder of images (label -1), or a folder of class folders."""
    if labelled:
        classes = _class_folders(root)
        samples, skipped = _index_classes(root, classes, strict)
        return samples, classes, skipped
    files = [root] if root.is_file() else [p for p in sorted(root.iterdir())
                                          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    reasons = _verify(files, strict)
    _log_skipped(reasons)
    samples = [(str(p), -1) for p, why in zip(files, reasons) if why is None]
    return samples, [], len(files) - len(samples)


def _check_image(path: Path) -> str | None:
    """Why the file is not a usable image (a one-line message naming it), or None.

    Cheap for JPEG and PNG: the header (format, size limit), PIL's verify (PNG chunk CRCs up to
    IEND) and, for JPEG, an end-of-image marker at the end (a truncated JPEG has none; when it is
    absent a 1/8-scale decode decides, so files with trailing bytes still pass). Other formats
    (rare in photo collections) are decoded in full by `open_image`.
    """
    try:
        with opened_image(path) as im:
            fmt = im.format
            im.verify()
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 64))
                tail = f.read()
            if b"\xff\xd9" not in tail:
                open_image(path, draft=1)
        elif fmt != "PNG":
            open_image(path)
    except Exception as e:
        return str(refusal(path, e))
    return None


def _verify(paths: list[Path], strict: bool) -> list[str | None]:
    """Why each file is unusable, or None (threads: this is mostly I/O); raises for the first bad one when strict."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        reasons = list(pool.map(_check_image, paths, chunksize=64))
    bad = [r for r in reasons if r]
    if bad and strict:
        raise UserError(f"{bad[0]}; run without --strict to skip such files")
    return reasons


def _log_skipped(reasons: list[str | None]) -> None:
    bad = [r for r in reasons if r]
    for r in bad[:_WARN_LINES]:
        log.warning("skipping %s", r)
    if len(bad) > _WARN_LINES:
        log.warning("skipping %d more unreadable images", len(bad) - _WARN_LINES)


# --------------------------------------------------------------------------- statistics

def _set_transform(ds: Dataset, transform: Callable, *, draft: int) -> None:
    ds.transform = transform
    if isinstance(ds, ImageFileDataset):
        ds.draft = draft


def _dataset_stats(ds: Dataset, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of the training split, in [0, 1] units.

    In-memory data: exact, over all training images (float64 sums, in chunks). Files: estimated
    from a seeded sample of up to 500 training images, each resized to 64x64 (decoding a whole
    ImageNet to subtract a mean is not worth it; the estimate is within ~0.01).
    """
    if isinstance(ds, TensorImageDataset):
        chunks = (ds.images[i:i + 4096] for i in range(0, len(ds.images), 4096))
    else:
        k = min(len(ds), STATS_SAMPLE if isinstance(ds, ImageFileDataset) else 256)
        pick = np.sort(np.random.default_rng(seed).choice(len(ds), size=k, replace=False))
        chunks = (_stats_image(ds, int(i)) for i in pick)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x in chunks:                                            # uint8 (N x) 3 x H x W
        x = x.reshape(-1, 3, *x.shape[-2:]).to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise UserError("expected at least one training image to compute mean/std, found none")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _stats_image(ds: Dataset, i: int) -> torch.Tensor:
    if isinstance(ds, SyntheticDataset):
        return ds._image(i)
    path, _ = ds.samples[i]
    try:
        img = open_image(path, draft=STATS_SIZE).resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR)
    except UserError:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)      # unreadable: counts for nothing
    return F.pil_to_tensor(img)
