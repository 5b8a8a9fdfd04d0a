"""The study's task: handwritten digits at varying scale and position, on photographs, with clutter.

Why a task of its own: the paper's claims (Tables 3-6) are orderings between nets and test
protocols. On the embedded 8x8 digits at 32 px every net reaches ~100%, so nothing can be ranked;
ImageNet is neither on hand nor trainable on a CPU. This task is built offline from real images
that ship with the installed libraries, and it asks what the paper's ideas are about: recognising
an object whose scale and position vary, against a textured background.

How one image is made (`CANVAS` x `CANVAS` RGB, uint8), all draws from numpy's PCG64 seeded by
(seed, split), so a split is a pure function of the seed:

1. background: a random `CANVAS`-px window of one of scikit-image's photographs (`skimage.data`:
   astronaut, coffee, bricks, gravel, text, ...; each first rescaled so its smaller side is
   `PHOTO_SIDE` px), randomly mirrored, its contrast scaled by 0.4-1.0;
2. the object: one of scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), its grey
   levels used as opacity, bilinearly upsampled to a side drawn uniformly from `DIGIT_SIDES`
   (a 2.3x range of scales, the paper's jittering is 2x), placed at a uniform position on the
   canvas, painted in a random colour pushed away from the background's mean brightness;
3. clutter: `FRAGMENTS` piece(s) of other digits (a random 4x4 window of an 8x8 digit, upsampled to
   6-14 px, 50-100% opaque) at random places, so strokes alone do not give the class away;
4. Gaussian pixel noise (std `NOISE`).

The label is the digit's class. The digit instances are divided between the splits (a seeded
stratified split of the 1,797, 60/15/25%), so test images show handwriting the nets never saw;
backgrounds come from the same photographs in every split (different windows).

Horizontal flips are not label-preserving here (a mirrored 2 is no 2): train and test without them.
Generation takes about 10 s; results are cached per seed in memory.

How hard, measured (STUDY.md): the first version (digits 10-28 px, two fragments, 2,400 training
images) was learnt by no net within 8 epochs (a small CNN with AdamW reached 20% test top-1 while
fitting its training images: too few of them). 10,000 training images, one fragment and digits of
12-28 px put net A at about 60% test top-1 after 5 epochs, deeper nets lower: far from saturation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CANVAS", "SPLIT_SIZES", "DIGIT_SIDES", "build_splits"]

CANVAS = 32                         # canvas side in px (the nets' crop; see STUDY.md for why not 64)
SPLIT_SIZES = {"train": 10000, "val": 1000, "test": 2000}
DIGIT_FRACTIONS = (0.60, 0.15, 0.25)  # the digit instances each split draws from
DIGIT_SIDES = (12, 28)              # the object's side in px, uniform (inclusive)
FRAGMENTS = 1                       # clutter pieces per image
NOISE = 0.05                        # std of the Gaussian pixel noise, pixels in [0, 1]
PHOTO_SIDE = 96                     # photographs are rescaled so their smaller side is this
_PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "clock", "grass", "gravel",
           "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text", "retina", "cell")
_SPLITS = ("train", "val", "test")


def build_splits(seed: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """{"train"|"val"|"test": (uint8 N x 3 x CANVAS x CANVAS, int64 labels)} and the 10 class names.

    A pure function of `seed` (cached): the same seed gives the same pixels in every process.
    """
    splits = _build(int(seed))
    return {k: (x.clone(), y.clone()) for k, (x, y) in splits.items()}, [str(d) for d in range(10)]


@lru_cache(maxsize=4)
def _build(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    digits, labels = _digits()
    photos = _photos()
    pools = _stratified(labels, DIGIT_FRACTIONS, seed)
    out = {}
    for code, split in enumerate(_SPLITS):
        rng = np.random.Generator(np.random.PCG64([seed, code, 0x5715]))
        out[split] = _render_split(rng, SPLIT_SIZES[split], pools[code], digits, labels, photos)
    return out


def _render_split(rng: np.random.Generator, n: int, pool: np.ndarray, digits: np.ndarray, labels: np.ndarray,
                  photos: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """n canvases, each showing one digit drawn from `pool`, cycling through it in shuffled passes."""
    order = np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])[:n]
    images = np.empty((n, 3, CANVAS, CANVAS), dtype=np.uint8)
    for i, d in enumerate(order):
        canvas = _background(rng, photos)
        for _ in range(FRAGMENTS):
            piece = digits[rng.integers(len(digits))]
            r, c = rng.integers(0, 5, size=2)
            _paint(rng, canvas, piece[r:r + 4, c:c + 4], side=int(rng.integers(6, 15)),
                   opacity=float(rng.uniform(0.5, 1.0)))
        _paint(rng, canvas, digits[d], side=int(rng.integers(DIGIT_SIDES[0], DIGIT_SIDES[1] + 1)),
               opacity=float(rng.uniform(0.8, 1.0)))
        canvas += NOISE * rng.standard_normal(canvas.shape, dtype=np.float32)
        images[i] = np.rint(np.clip(canvas, 0, 1) * 255)
    return torch.from_numpy(images), torch.from_numpy(labels[order].astype(np.int64))


def _background(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """A random CANVAS-px window of a random photograph, maybe mirrored, contrast scaled by 0.4-1.0."""
    photo = photos[rng.integers(len(photos))]
    top = int(rng.integers(photo.shape[1] - CANVAS + 1))
    left = int(rng.integers(photo.shape[2] - CANVAS + 1))
    window = photo[:, top:top + CANVAS, left:left + CANVAS]
    if rng.random() < 0.5:
        window = window[:, :, ::-1]
    mean = window.mean()
    return mean + (window - mean) * np.float32(rng.uniform(0.4, 1.0))


def _paint(rng: np.random.Generator, canvas: np.ndarray, glyph: np.ndarray, *, side: int, opacity: float) -> None:
    """Composite `glyph` (grey levels in [0, 1] = opacity) at a random place, in a colour that stands out."""
    alpha = _resize_matrix(side, glyph.shape[0]) @ glyph @ _resize_matrix(side, glyph.shape[1]).T
    alpha = np.clip(alpha, 0, 1) * np.float32(opacity)
    top, left = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
    region = canvas[:, top:top + side, left:left + side]
    colour = rng.uniform(0, 1, size=3).astype(np.float32)
    if abs(float(colour.mean() - region.mean())) < 0.3:  # too close to the background: flip its brightness
        colour = 1 - colour
    region *= 1 - alpha
    region += alpha * colour[:, None, None]


@lru_cache(maxsize=64)
def _resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of bilinear upsampling (half-pixel centres, edges clamped): out = M @ x."""
    centres = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    w = (centres - lo).astype(np.float32)
    m = np.zeros((out_size, in_size), dtype=np.float32)
    m[np.arange(out_size), lo] += 1 - w
    m[np.arange(out_size), hi] += w
    return m


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    """The photographs as float RGB 3 x H x W in [0, 1], smaller side PHOTO_SIDE (antialiased)."""
    import skimage.data

    out = []
    for name in _PHOTOS:
        img = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0)
        img = img[..., None].expand(*img.shape, 3) if img.ndim == 2 else img[..., :3]
        img = img.permute(2, 0, 1)[None]
        scale = PHOTO_SIDE / min(img.shape[-2:])
        size = [max(PHOTO_SIDE, round(s * scale)) for s in img.shape[-2:]]
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)
        out.append(np.ascontiguousarray(img.numpy()))
    return out


def _stratified(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Indices of each class shuffled (seeded) and cut in the given proportions: one array per split."""
    rng = np.random.Generator(np.random.PCG64([seed, 0xD161]))
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cuts = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in enumerate(np.split(idx, np.round(cuts * len(idx)).astype(int))):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
