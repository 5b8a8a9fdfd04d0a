"""The paper's Table 1 as data: every network vggnet builds comes from `CONFIGS`.

Each configuration is the column of Table 1 written in the paper's own notation:
``"conv3-64"`` is a 3x3 convolution with 64 output channels, ``"conv1-256"`` a 1x1 one,
``"LRN"`` AlexNet's local response normalisation and ``"M"`` a 2x2 max-pool of stride 2.
Every stage ends with ``"M"``; there are five stages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIGS", "MODELS", "Layer", "parse_config", "config_of", "weight_layers"]

_S1 = ("conv3-64", "M")
_S2 = ("conv3-128", "M")

CONFIGS: dict[str, tuple[str, ...]] = {
    "A": (*_S1, *_S2,
          "conv3-256", "conv3-256", "M",
          "conv3-512", "conv3-512", "M",
          "conv3-512", "conv3-512", "M"),
    "A-LRN": ("conv3-64", "LRN", "M", *_S2,
              "conv3-256", "conv3-256", "M",
              "conv3-512", "conv3-512", "M",
              "conv3-512", "conv3-512", "M"),
    "B": ("conv3-64", "conv3-64", "M",
          "conv3-128", "conv3-128", "M",
          "conv3-256", "conv3-256", "M",
          "conv3-512", "conv3-512", "M",
          "conv3-512", "conv3-512", "M"),
    "C": ("conv3-64", "conv3-64", "M",
          "conv3-128", "conv3-128", "M",
          "conv3-256", "conv3-256", "conv1-256", "M",
          "conv3-512", "conv3-512", "conv1-512", "M",
          "conv3-512", "conv3-512", "conv1-512", "M"),
    "D": ("conv3-64", "conv3-64", "M",
          "conv3-128", "conv3-128", "M",
          "conv3-256", "conv3-256", "conv3-256", "M",
          "conv3-512", "conv3-512", "conv3-512", "M",
          "conv3-512", "conv3-512", "conv3-512", "M"),
    "E": ("conv3-64", "conv3-64", "M",
          "conv3-128", "conv3-128", "M",
          "conv3-256", "conv3-256", "conv3-256", "conv3-256", "M",
          "conv3-512", "conv3-512", "conv3-512", "conv3-512", "M",
          "conv3-512", "conv3-512", "conv3-512", "conv3-512", "M"),
}

# Registered model names -> (configuration, batch_norm). A, B, D, E carry torchvision's names
# (vgg11/13/16/19, counted by weight layers); A-LRN and C, which torchvision lacks, get a suffix.
MODELS: dict[str, tuple[str, bool]] = {}
for _name, _config in (("vgg11", "A"), ("vgg11_lrn", "A-LRN"), ("vgg13", "B"),
                       ("vgg16c", "C"), ("vgg16", "D"), ("vgg19", "E")):
    MODELS[_name] = (_config, False)
    MODELS[_name + "_bn"] = (_config, True)


@dataclass(frozen=True)
class Layer:
    """One entry of Table 1: ``kind`` is "conv", "lrn" or "pool"."""

    kind: str
    kernel: int = 0
    channels: int = 0
    name: str = ""  # conv1_1 ... conv5_4, lrn1, pool1 ... pool5 (Caffe's names, as in the paper's code)


def parse_config(config: str) -> list[Layer]:
    """Table 1's column `config` as a list of `Layer`, each with its Caffe-style name."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; expected one of {', '.join(CONFIGS)}")
    layers, stage, index = [], 1, 0
    for spec in CONFIGS[config]:
        if spec == "M":
            layers.append(Layer("pool", 2, name=f"pool{stage}"))
            stage, index = stage + 1, 0
        elif spec == "LRN":
            layers.append(Layer("lrn", name=f"lrn{stage}"))
        else:
            kernel, channels = spec.removeprefix("conv").split("-")
            index += 1
            layers.append(Layer("conv", int(kernel), int(channels), name=f"conv{stage}_{index}"))
    return layers


def config_of(name_or_config: str) -> tuple[str, bool]:
    """Resolve a configuration letter ("D") or a model name ("vgg16_bn") to (config, batch_norm)."""
    if name_or_config in CONFIGS:
        return name_or_config, False
    if name_or_config in MODELS:
        return MODELS[name_or_config]
    known = ", ".join([*CONFIGS, *MODELS])
    raise ValueError(f"unknown configuration or model {name_or_config!r}; expected one of {known}")


def weight_layers(config: str) -> int:
    """Weight layers as the paper counts them: convolutions plus the three FC layers."""
    return sum(layer.kind == "conv" for layer in parse_config(config)) + 3
