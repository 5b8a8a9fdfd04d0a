"""Where training images come from: embedded digits, CIFAR, an ImageFolder tree, or synthetic data.

Nothing is downloaded (the machine is offline and users' data is theirs). `build_data` turns a
`--data` value into a `DataBundle` of train/val/test datasets with the paper's augmentation
(section 3.1, see transforms.py) on train and a deterministic single crop on val/test;
`eval_images` gives the same splits un-augmented, at native size, for the test protocols of
section 3.2 (dense, multi-crop, multi-scale), which rescale the images themselves.

Forms of `data`:
- None or "digits": scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), upsampled
  bilinearly to 32x32 and replicated to RGB; a seeded stratified 70/10/20 train/val/test split
  (1,258 / 180 / 359 images; every class split in the same proportions).
- "synthetic": seeded class-dependent patterns plus noise, 10 classes (for tests and benchmarks).
- a directory holding CIFAR-10 or CIFAR-100 in the python format (`cifar-10-batches-py/`,
  `cifar-100-python/`, or that folder itself): val is a seeded stratified 10% of the training
  batches, test is the test batch.
- a directory holding an ImageFolder tree: `train/CLASS/*`, `val/CLASS/*`, optional `test/CLASS/*`
  (JPEG or PNG, any case of extension; the ImageNet layout).

Small in-memory data (digits, CIFAR) is kept as one uint8 tensor, so an item costs one transform
call; files are decoded with PIL, JPEGs at reduced DCT scale (`Image.draft`) when the target size
is at most half the stored size. Every dataset pickles cheaply for DataLoader worker processes.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from .errors import UserError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "DIGITS_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "DataBundle",
    "ImageFileDataset",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_data",
    "default_sizes",
    "eval_images",
]

log = logging.getLogger("vggnet")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DIGITS_FRACTIONS = (0.7, 0.1, 0.2)          # train / val / test, per class
CIFAR_VAL_FRACTION = 0.1                    # held out of the training batches, per class
STATS_SAMPLE = 500                          # ImageFolder images used to estimate mean/std
STATS_SIZE = 64                             # ... each resized to 64x64 first
SPLITS = ("train", "val", "test")
_EXPECTED = ("a CIFAR-10/100 python-format directory (cifar-10-batches-py/ or cifar-100-python/) "
             "or an ImageFolder tree (DIR/train/CLASS/*, DIR/val/CLASS/*, JPEG or PNG)")
_WARN_LINES = 20                            # per-file warnings before only the total is logged


# ----------------------------------------------------------------------------- datasets

class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor N x 3 x H x W; items (transform(image), label).

    With transform=None an item is the float32 image in [0, 1] (what `eval_images` returns).
    """

    def __init__(self, *, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, \
            f"images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}"
        assert len(images) == len(labels), f"{len(images)} images but {len(labels)} labels"
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        return (self.transform(img) if self.transform else img.float().div_(255)), int(self.labels[i])


class ImageFileDataset(Dataset):
    """Image files decoded with PIL to RGB; items (transform(PIL image), label), label -1 if unknown.

    `draft`: the smallest side the transform needs; JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    when that still leaves both sides >= draft (much faster on large photos). Files that fail to
    decode here despite passing the indexing check are replaced by the next item and logged
    (counted in `failed`, per process), or raise UserError naming the file when strict.
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
                img = _load_rgb(path, self.draft)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                if self.strict:
                    raise UserError(f"expected a readable JPEG or PNG image, got a corrupt file: {path} ({e})") from None
                self.failed += 1
                log.warning("skipping unreadable image %s (%s)", path, e)
                continue
            return (self.transform(img) if self.transform else _pil_to_float(img)), label
        raise UserError(f"expected readable images, but none of the {len(self.samples)} files could be decoded")


class SyntheticDataset(Dataset):
    """Seeded random images that a net can learn: each class is a fixed 4x4 grid of colours,
    mirror-symmetric (so the paper's horizontal flip keeps the class), upsampled to image_size,
    plus per-image Gaussian noise. Item i of split `split` is a pure function of (seed, split, i);
    label = i % num_classes (balanced). Generated on the fly, so memory stays flat at any size.
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
        return (self.transform(img) if self.transform else img.float().div_(255)), int(self.labels[i])


# ----------------------------------------------------------------------------- the bundle

@dataclass
class DataBundle:
    """Everything training needs from the data: three datasets and the numbers that made them."""

    name: str                                   # "digits" | "cifar10" | "cifar100" | "imagefolder" | "synthetic"
    train: Dataset                              # augmented (section 3.1), normalised
    val: Dataset                                # deterministic single centre crop at eval_scale
    test: Dataset | None                        # like val; None for an ImageFolder without test/
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]            # in [0, 1] pixel units
    std: tuple[float, float, float]
    image_size: int                             # the crop the net sees
    train_scale: tuple[int, int]                # (S_min, S_max); equal for fixed-scale training
    eval_scale: int                             # Q of val/test
    skipped: int = 0                            # corrupt or unreadable images left out while indexing
    data: str | None = None                     # the data source: None (digits), "synthetic" or an absolute path
    seed: int = 0                               # the split seed
    synthetic_size: int | None = None
    hflip: bool = True                          # random horizontal flips in training (test-time flips follow it)

    def meta(self) -> dict:
        """Plain data (JSON, YAML and weights_only safe) describing how to rebuild the same inputs."""
        out = {"name": self.name, "class_names": list(self.class_names), "num_classes": self.num_classes,
               "mean": list(self.mean), "std": list(self.std), "image_size": self.image_size,
               "train_scale": list(self.train_scale), "eval_scale": self.eval_scale,
               "data": self.data, "seed": self.seed, "hflip": self.hflip}
        if self.synthetic_size is not None:
            out["synthetic_size"] = self.synthetic_size
        return out


def default_sizes(name: str, image_size: int | None = None) -> tuple[int, tuple[int, int], int]:
    """(image_size, train_scale, eval_scale) defaults for a source.

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


def build_data(data: str | None = None, *, image_size: int | None = None,
               train_scale: tuple[int, int] | None = None, eval_scale: int | None = None,
               mean_std: str = "dataset", lighting: float = 0.1, strict: bool = False, seed: int = 0,
               synthetic_size: int = 512, hflip: bool | None = None) -> DataBundle:
    """Open a data source and wrap its splits in the paper's train and test transforms.

    mean_std: "dataset" (per-channel mean/std of the training split; ImageFolder: estimated on a
    seeded sample of up to 500 training images) or "imagenet". lighting: std of the PCA colour
    shift, 0 disables it. hflip: random horizontal flip; None means on, except for digits (a
    mirrored digit is not that digit). Bad input raises UserError.
    """
    if mean_std not in ("dataset", "imagenet"):
        raise UserError(f"mean_std must be 'dataset' or 'imagenet', got {mean_std!r}")
    if lighting < 0:
        raise UserError(f"lighting must be >= 0 (0 disables the colour shift), got {lighting}")
    if synthetic_size < 1:
        raise UserError(f"synthetic_size must be >= 1, got {synthetic_size}")
    name, root = _detect(data, allow_eval_only=False)
    size, scale, q = _resolve_sizes(name, image_size, train_scale, eval_scale)
    src = _open(name, root, splits=SPLITS, seed=seed, strict=strict, synthetic_size=synthetic_size, native=q)

    if mean_std == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = _dataset_stats(src.splits["train"], seed)
    flip = name != "digits" if hflip is None else hflip
    _set_transform(src.splits["train"], train_transform(image_size=size, train_scale=scale, mean=mean, std=std,
                                                        lighting=lighting, hflip=flip), draft=max(scale[1], size))
    ev = eval_transform(image_size=size, eval_scale=q, mean=mean, std=std)
    for split in ("val", "test"):
        if src.splits.get(split) is not None:
            _set_transform(src.splits[split], ev, draft=max(q, size))
    return DataBundle(name=name, train=src.splits["train"], val=src.splits["val"], test=src.splits.get("test"),
                      num_classes=len(src.class_names), class_names=src.class_names, mean=tuple(mean),
                      std=tuple(std), image_size=size, train_scale=scale, eval_scale=q, skipped=src.skipped,
                      data=str(root) if root else (None if name == "digits" else name),
                      seed=seed, synthetic_size=synthetic_size if name == "synthetic" else None, hflip=flip)


def eval_images(data: str | None, split: str = "test", *, seed: int = 0, strict: bool = False,
                image_size: int | None = None, synthetic_size: int = 512) -> tuple[Dataset, list[str]]:
    """Un-augmented, un-normalised images at native size for the test protocols (section 3.2).

    Items: (float32 3 x H x W in [0, 1], label). Same splits as build_data with the same seed.
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
            raise UserError(f"expected JPEG or PNG images in {data}, found no readable ones")
        return ImageFileDataset(samples=samples, strict=strict), classes
    if name == "imagefolder" and split == "test" and not (root / "test").is_dir():
        log.warning("%s has no test/ folder; evaluating on val/", root)
        split = "val"
    q = _resolve_sizes(name, image_size, None, None)[2]
    src = _open(name, root, splits=(split,), seed=seed, strict=strict, synthetic_size=synthetic_size, native=q)
    return src.splits[split], src.class_names


# ----------------------------------------------------------------------------- sources

@dataclass
class _Source:
    splits: dict[str, Dataset | None]
    class_names: list[str]
    skipped: int = 0


def _detect(data: str | os.PathLike | None, *, allow_eval_only: bool) -> tuple[str, Path | None]:
    """Name the kind of source `data` is, or raise UserError saying what was expected."""
    if data is None or str(data) == "digits":
        return "digits", None
    if str(data) == "synthetic":
        return "synthetic", None
    root = Path(data).expanduser().resolve()
    if not root.exists():
        raise UserError(f"data directory {data} does not exist; expected {_EXPECTED}, 'synthetic', or no --data for the digits")
    if root.is_file():
        if allow_eval_only and root.suffix.lower() in IMAGE_EXTENSIONS:
            return "images", root
        raise UserError(f"expected a data directory, got the file {data}")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UserError(f"data directory {data} is empty; expected {_EXPECTED}")
    cifar = _cifar_dir(root)
    if cifar:
        return cifar
    if (root / "train").is_dir() or (allow_eval_only and (root / "val").is_dir()):
        if not allow_eval_only and not (root / "val").is_dir():
            raise UserError(f"ImageFolder {data} has train/ but no val/; expected DIR/val/CLASS/* next to DIR/train/CLASS/*")
        return "imagefolder", root
    if allow_eval_only:
        if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
            return "images", root
        if any(p.is_dir() for p in entries):
            return "classfolders", root
    raise UserError(f"data directory {data} is neither CIFAR nor ImageFolder; expected {_EXPECTED}")


def _resolve_sizes(name: str, image_size, train_scale, eval_scale) -> tuple[int, tuple[int, int], int]:
    size, scale, q = default_sizes(name, image_size)
    scale = tuple(int(s) for s in train_scale) if train_scale is not None else scale
    q = int(eval_scale) if eval_scale is not None else q
    if size < 1 or len(scale) != 2 or not size <= scale[0] <= scale[1] or q < size:
        raise UserError(f"expected image_size <= S_min <= S_max and image_size <= eval_scale, got image_size={size}, "
                        f"train_scale={scale}, eval_scale={q}")
    return size, scale, q


def _open(name: str, root: Path | None, *, splits, seed: int, strict: bool, synthetic_size: int,
          native: int) -> _Source:
    if name == "digits":
        return _digits(seed)
    if name == "synthetic":
        n = {"train": synthetic_size, "val": max(10, synthetic_size // 4), "test": max(10, synthetic_size // 4)}
        return _Source({s: SyntheticDataset(size=n[s], image_size=native, seed=seed, split=s) for s in splits},
                       [f"class_{k}" for k in range(10)])
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, splits, seed)
    return _imagefolder(root, splits, strict)


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

def _imagefolder(root: Path, splits, strict: bool) -> _Source:
    """Index DIR/{train,val,test}/CLASS/*: classes sorted by folder name, taken from train/."""
    class_dir = root / "train" if (root / "train").is_dir() else root / "val"
    classes = _class_folders(class_dir)
    out: dict[str, Dataset | None] = {}
    skipped = 0
    for split in splits:
        d = root / split
        if not d.is_dir():
            if split == "test":
                out["test"] = None
                continue
            raise UserError(f"expected the ImageFolder split folder {d} (DIR/{split}/CLASS/*), it does not exist")
        found = _class_folders(d)
        if found != classes:
            extra, lacking = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise UserError(f"{d} must have the same class folders as {class_dir}: "
                            f"missing {lacking or 'none'}, unexpected {extra or 'none'}")
        samples, n_bad = _index_classes(d, classes, strict)
        out[split], skipped = ImageFileDataset(samples=samples, strict=strict), skipped + n_bad
    return _Source(out, classes, skipped)


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
            raise UserError(f"class folder {d / c} has no images; expected JPEG or PNG files ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(p, label) for p in found]
    good = _verify([p for p, _ in files], strict)
    samples = [(str(p), label) for (p, label), ok in zip(files, good) if ok]
    for label, c in enumerate(classes):
        if not any(lab == label for _, lab in samples):
            raise UserError(f"class folder {d / c} has no readable images; every file in it is corrupt")
    return samples, len(files) - len(samples)


def _index_loose(root: Path, *, strict: bool, labelled: bool) -> tuple[list[tuple[str, int]], list[str], int]:
    """A single image, a plain folder of images (label -1), or a folder of class folders."""
    if labelled:
        classes = _class_folders(root)
        samples, skipped = _index_classes(root, classes, strict)
        return samples, classes, skipped
    files = [root] if root.is_file() else [p for p in sorted(root.iterdir())
                                          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    good = _verify(files, strict)
    return [(str(p), -1) for p, ok in zip(files, good) if ok], [], len(files) - sum(good)


def _check_image(path: Path) -> str | None:
    """Why the file is not a usable image, or None. Cheap: header parse, PIL's verify (PNG chunk
    CRCs up to IEND) and, for JPEG, an end-of-image marker at the end (a truncated JPEG has none;
    when it is absent a reduced-scale decode decides, so files with trailing bytes still pass)."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 64))
                tail = f.read()
            if b"\xff\xd9" not in tail:
                with Image.open(path) as im:
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
        elif fmt not in ("PNG", "JPEG", "MPO"):
            return f"expected JPEG or PNG, got {fmt}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _verify(paths: list[Path], strict: bool) -> list[bool]:
    """Check every file (threads: this is mostly I/O); log or, when strict, raise for bad ones."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        reasons = list(pool.map(_check_image, paths, chunksize=64))
    bad = [(p, r) for p, r in zip(paths, reasons) if r]
    if bad and strict:
        p, r = bad[0]
        raise UserError(f"expected a readable JPEG or PNG image, got a corrupt file: {p} ({r}); "
                        f"run without --strict to skip such files")
    for p, r in bad[:_WARN_LINES]:
        log.warning("skipping corrupt image %s (%s)", p, r)
    if len(bad) > _WARN_LINES:
        log.warning("skipping %d more corrupt images", len(bad) - _WARN_LINES)
    return [r is None for r in reasons]


def _load_rgb(path: str, draft: int | None) -> Image.Image:
    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))     # DCT-domain downscale; both sides stay >= draft
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im.convert("RGB")


def _pil_to_float(img: Image.Image) -> torch.Tensor:
    return F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)


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
        img = _load_rgb(path, STATS_SIZE).resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR)
    except Exception:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)      # unreadable: counts for nothing
    return F.pil_to_tensor(img)
