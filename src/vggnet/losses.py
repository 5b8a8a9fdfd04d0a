"""Perceptual (LPIPS-style) and style (Gram-matrix) losses on a frozen VGG's named activations.

Both take images in [0, 1] (or [-1, 1] with `input_range=(-1, 1)`) and apply the preprocessing of
the loaded weights (`Net.normalise`: torchvision's mean/std, or the authors' BGR-trained 0-255
Caffe mean, whichever the weights came with). The net is frozen (`requires_grad=False`) and kept
in eval mode, so gradients reach the inputs only. One forward pass per call: x and y go through
the net as one batch, which stops at the deepest requested layer (`VGG.activations`).

There is no default net: a randomly initialised VGG gives a meaningless loss, and nothing is
downloaded. Pass a loaded `Net`, a `VGG` (its meta is then ImageNet's), or a weights path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import UserError
from .model import VGG
from .nets import Net, load_net, net_from_model

__all__ = ["LPIPS_LAYERS", "STYLE_LAYERS", "PerceptualLoss", "StyleLoss", "gram"]

LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")  # LPIPS's VGG taps
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")  # Gatys et al.'s style layers
_EPS = 1e-10  # LPIPS's epsilon in the channel normalisation


def gram(f: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, C) Gram matrices / (H W), in fp32 whatever autocast says.

    Under fp16 autocast the sum over H W products overflows 65504 for ordinary activations; under
    bf16 its 8-bit mantissa loses the small differences a style loss is made of. So the product
    runs outside autocast, on fp32 copies.
    """
    n, c, h, w = f.shape
    with torch.autocast(f.device.type, enabled=False):
        flat = f.float().reshape(n, c, h * w)
        return torch.bmm(flat, flat.transpose(1, 2)) / (h * w)


class _FrozenFeatures(nn.Module):
    """The net, frozen and in eval mode for good, with its preprocessing and the layers to return."""

    def __init__(self, net: Net | VGG | str | os.PathLike, layers: Sequence[str],
                 weights: Sequence[float] | None, input_range: tuple[float, float]) -> None:
        super().__init__()
        if isinstance(net, (str, os.PathLike)):
            net = load_net(net)
        elif isinstance(net, VGG):
            net = net_from_model(net)
        elif not isinstance(net, Net):
            raise UserError(f"net must be a vggnet Net, a VGG or a weights path, got {type(net).__name__}")
        layers = list(layers)
        valid = net.model.activation_names
        unknown = [name for name in layers if name not in valid]
        if unknown or not layers:
            raise UserError(f"unknown layer(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(valid)}")
        if weights is not None and len(weights) != len(layers):
            raise UserError(f"expected one weight per layer ({len(layers)}), got {len(weights)}")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise UserError(f"input_range must be (low, high) with high > low, got {input_range}")
        self.net, self.layers, self.range = net, layers, (lo, hi)
        self.model = net.model.eval().requires_grad_(False)  # a submodule, so .to() moves it
        self.register_buffer("layer_weights", torch.tensor(list(weights) if weights is not None else [1.0] * len(layers)))

    def train(self, mode: bool = True) -> _FrozenFeatures:
        super().train(mode)
        self.model.eval()  # BN statistics and dropout stay as trained
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        lo, hi = self.range
        x = (x - lo) / (hi - lo)
        acts = self.model.activations(self.net.normalise(x), self.layers)
        return [acts[name] for name in self.layers]


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: per layer, channel-unit-normalised features, squared difference summed
    over channels, averaged over space; the layers' terms weighted and summed.

    `loss(x, y)` -> scalar (batch mean), or (N,) with `reduction="none"`. x and y: (N, 3, H, W).
    `normalize=False` compares the raw activations (a plain feature-reconstruction loss).
    """

    def __init__(self, *, net: Net | VGG | str | os.PathLike, layers: Sequence[str] = LPIPS_LAYERS,
                 weights: Sequence[float] | None = None, normalize: bool = True,
                 input_range: tuple[float, float] = (0.0, 1.0), reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.features = _FrozenFeatures(net, layers, weights, input_range)
        self.normalize, self.reduction = normalize, reduction

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise UserError(f"expected x and y of the same shape, got {list(x.shape)} and {list(y.shape)}")
        both = self.features(torch.cat([x, y]))  # one pass for both images
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for w, f in zip(self.features.layer_weights, both):
            fx, fy = f.float().chunk(2)
            if self.normalize:
                fx = fx / (fx.norm(dim=1, keepdim=True) + _EPS)
                fy = fy / (fy.norm(dim=1, keepdim=True) + _EPS)
            total = total + w * (fx - fy).square().sum(dim=1).mean(dim=(1, 2))
        return _reduce(total, self.reduction)


class StyleLoss(nn.Module):
    """Gatys-style loss: squared Frobenius distance of Gram matrices (fp32), averaged over entries, per layer.

    `loss(x, style)`: style is (N, 3, H', W') or (1, 3, H', W') (one style for every x); its size
    may differ from x's, since Gram matrices are C x C whatever the image size.
    """

    def __init__(self, *, net: Net | VGG | str | os.PathLike, layers: Sequence[str] = STYLE_LAYERS,
                 weights: Sequence[float] | None = None, input_range: tuple[float, float] = (0.0, 1.0),
                 reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.features = _FrozenFeatures(net, layers, weights, input_range)
        self.reduction = reduction

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        if x.shape[-2:] == style.shape[-2:] and style.shape[0] in (1, x.shape[0]):
            both = self.features(torch.cat([x, style]))  # one pass when the sizes allow one batch
            fxs, fss = zip(*[(f[: len(x)], f[len(x):]) for f in both])
        else:
            fxs, fss = self.features(x), self.features(style)
        total = torch.zeros(x.shape[0], device=x.device)
        for w, fx, fs in zip(self.features.layer_weights, fxs, fss):
            total = total + w * (gram(fx) - gram(fs)).square().mean(dim=(1, 2))
        return _reduce(total, self.reduction)


def _reduce(per_image: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_image
    return per_image.mean() if reduction == "mean" else per_image.sum()
