"""The paper's training augmentation and its deterministic test-time counterpart (sections 3.1, 3.2).

Training (section 3.1): rescale each image isotropically so that its smaller side is S (fixed, or
jittered per image in [S_min, S_max]), take one random crop of the net's input size, flip it
horizontally at random, shift its colour along the principal components of ImageNet's RGB pixels
(AlexNet's "PCA lighting") and subtract the mean (dividing by the std, as torchvision does).
Test (section 3.2): rescale so the smaller side is Q, centre-crop, normalise.

Both pipelines are torchvision.transforms.v2 compositions, so one pipeline serves PIL images
(ImageFolder) and uint8 or float tensors (digits, CIFAR, synthetic data held in memory). The
geometric steps run on the input's own type (PIL resizes with SIMD, uint8 tensors take
torchvision's vectorised uint8 path); pixels become float32 in [0, 1] only after cropping, so the
expensive steps touch as few pixels as possible. Every random draw comes from torch's global RNG,
which the DataLoader seeds per worker, so a seeded run augments identically when repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PCALighting",
    "RandomIsotropicRescale",
    "TestView",
    "eval_transform",
    "normalize",
    "rescale",
    "to_float",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Principal components of ImageNet's RGB pixel values in [0, 1] (AlexNet, section 4.1; the values
# used by fb.resnet.torch and most reimplementations). Columns are the eigenvectors.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class RandomIsotropicRescale(torch.nn.Module):
    """Resize so that the smaller side is S, S drawn uniformly from the integers [s_min, s_max].

    Isotropic: the aspect ratio is kept (the larger side becomes int(S * long / short)), as in
    section 3.1. s_min == s_max gives the paper's fixed-scale training; s_min < s_max its scale
    jittering (S in [256, 512] on ImageNet). Works on PIL images and on tensors (..., H, W).
    """

    def __init__(self, s_min: int, s_max: int | None = None) -> None:
        super().__init__()
        s_max = s_min if s_max is None else s_max
        if not 1 <= s_min <= s_max:
            raise ValueError(f"need 1 <= s_min <= s_max, got s_min={s_min}, s_max={s_max}")
        self.s_min, self.s_max = int(s_min), int(s_max)

    def draw(self) -> int:
        """One scale S, uniform over the integers [s_min, s_max]."""
        return self.s_min if self.s_min == self.s_max else int(torch.randint(self.s_min, self.s_max + 1, ()).item())

    def forward(self, img):
        # A one-element size means "smaller edge to S" in torchvision; antialias only matters
        # when shrinking, where it avoids aliasing (PIL always antialiases).
        return F.resize(img, [self.draw()], antialias=True)

    def extra_repr(self) -> str:
        return f"s_min={self.s_min}, s_max={self.s_max}"


class _RescaleCrop(torch.nn.Module):
    """RandomIsotropicRescale then v2.RandomCrop(size, pad_if_needed=True), the same random draws
    in the same order; on PIL images fused into one resize of just the crop's source box.

    Resizing a whole 500x375 photo to S = 256 and then keeping a 224 crop wastes about half the
    resize; PIL's `resize(box=...)` samples exactly the pixels of the crop, at the same centres
    and with the same filter support (outputs agree with the two-step path to +-1 grey level),
    in roughly 60% of the time. Tensors take the two-step path.
    """

    def __init__(self, s_min: int, s_max: int, size: int) -> None:
        super().__init__()
        self.rescale = RandomIsotropicRescale(s_min, s_max)
        self.crop = v2.RandomCrop(size, pad_if_needed=True)
        self.size = size

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return self.crop(self.rescale(img))
        s, (w, h) = self.rescale.draw(), img.size
        # The resized size exactly as torchvision computes it for size=[s].
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if min(nw, nh) < self.size:                        # needs padding: rare, take the plain path
            return self.crop(F.resize(img, [s], antialias=True))
        top = int(torch.randint(0, nh - self.size + 1, size=(1,)))
        left = int(torch.randint(0, nw - self.size + 1, size=(1,)))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return img.resize((self.size, self.size), Image.BILINEAR, box=box)


class PCALighting(torch.nn.Module):
    """AlexNet's colour shift: add sum_i alpha_i * lambda_i * v_i to every pixel, alpha_i ~ N(0, std).

    (lambda_i, v_i) are the eigenvalues and eigenvectors of the RGB covariance of ImageNet's pixels
    in [0, 1]; one alpha is drawn per image, so the whole image moves by one RGB offset: this
    changes the intensity and colour of the illumination but not the object (section 3.1 follows
    AlexNet). Input: float tensor 3 x H x W in [0, 1], before mean subtraction. std=0 is identity.
    """

    def __init__(self, std: float = 0.1, *, eigval: Sequence[float] = IMAGENET_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"lighting std must be >= 0, got {std}")
        self.std = float(std)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def offset(self) -> torch.Tensor:
        """One random RGB offset (3,): eigvec @ (alpha * eigval)."""
        alpha = torch.randn(3) * self.std
        return self.eigvec @ (alpha * self.eigval)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return img
        if not (isinstance(img, torch.Tensor) and img.is_floating_point() and img.shape[-3] == 3):
            raise TypeError(f"PCALighting expects a float RGB tensor (..., 3, H, W), got {type(img).__name__} "
                            f"{getattr(img, 'dtype', '')} {tuple(getattr(img, 'shape', ()))}")
        return img + self.offset().to(img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"std={self.std}"


def _to_float() -> list:
    # PIL or uint8/float tensor -> float32 tensor in [0, 1] (ToDtype leaves floats unscaled).
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _check_sizes(image_size: int, scales: Sequence[int]) -> None:
    if image_size < 1 or any(s < 1 for s in scales):
        raise ValueError(f"sizes must be positive, got image_size={image_size}, scales={tuple(scales)}")


def train_transform(*, image_size: int, train_scale: tuple[int, int], mean: Sequence[float],
                    std: Sequence[float], lighting: float = 0.1, hflip: bool = True,
                    input_range: float = 1.0) -> v2.Compose:
    """Section 3.1 augmentation: isotropic rescale to S in train_scale, random image_size crop
    (zero-padded if S < image_size), random horizontal flip, PCA lighting, normalisation.

    Returns a float32 tensor 3 x image_size x image_size. hflip=False drops the flip, for data
    whose mirror image is another thing (handwritten digits).
    """
    s_min, s_max = train_scale
    _check_sizes(image_size, (s_min, s_max))
    steps = [_RescaleCrop(s_min, s_max, image_size)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += _to_float()
    if lighting > 0:
        steps.append(PCALighting(lighting))
    steps += [_Normalize(mean, std, input_range), v2.ToPureTensor()]
    return v2.Compose(steps)


class _Normalize(torch.nn.Module):
    """`normalize` as a transform step (the same arithmetic as every test view)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_range: float) -> None:
        super().__init__()
        self.mean, self.std, self.input_range = tuple(mean), tuple(std), float(input_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std, self.input_range)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; float input is taken to be in [0, 1] already."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def rescale(x: torch.Tensor, q: int) -> torch.Tensor:
    """Isotropic rescale of (..., H, W) so the smaller side is Q (sections 3.1, 3.2), antialiased bilinear.

    The one rescaling of the test path: training's val/test views and every protocol of
    vggnet.evaluate call it, on float pixels in [0, 1].
    """
    if min(x.shape[-2:]) == q:
        return x
    return F.resize(x, [q], antialias=True)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], input_range: float = 1.0) -> torch.Tensor:
    """[0, 1] RGB pixels (..., 3, H, W) -> the net's input: x * input_range, minus the mean, over the std.

    The one normalisation of the project (section 2.1: subtract the training set's mean RGB);
    mean and std are in the units of `input_range` (1.0 for torchvision-style weights, 255.0 for
    the authors' Caffe weights).
    """
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(shape)
    std_t = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(shape)
    if input_range != 1.0:
        x = x * input_range
    return (x - mean_t) / std_t


class TestView(torch.nn.Module):
    """Section 3.2's single centre view, exactly as `vggnet eval --methods center` computes it:
    pixels to float, rescale so the smaller side is Q, centre crop, normalise.

    Training's val/test splits use it, so a run's summary.json and `vggnet eval` agree to the image.
    Takes a PIL image or a uint8/float tensor 3 x H x W; returns float32 3 x size x size.
    """

    def __init__(self, *, image_size: int, test_scale: int, mean: Sequence[float], std: Sequence[float],
                 input_range: float = 1.0) -> None:
        super().__init__()
        _check_sizes(image_size, (test_scale,))
        self.image_size, self.test_scale = image_size, test_scale
        self.mean, self.std, self.input_range = tuple(mean), tuple(std), float(input_range)

    def forward(self, img) -> torch.Tensor:
        x = F.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        x = rescale(to_float(x)[None], self.test_scale)
        x = F.center_crop(x, [self.image_size, self.image_size])
        return normalize(x, self.mean, self.std, self.input_range)[0]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, test_scale={self.test_scale}"


def eval_transform(*, image_size: int, eval_scale: int, mean: Sequence[float], std: Sequence[float],
                   input_range: float = 1.0) -> TestView:
    """Section 3.2 single-crop test: smaller side to Q = eval_scale, centre image_size crop, normalise.

    Deterministic; returns a float32 tensor 3 x image_size x image_size (see `TestView`).
    """
    return TestView(image_size=image_size, test_scale=eval_scale, mean=mean, std=std, input_range=input_range)
