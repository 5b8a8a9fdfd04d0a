"""The VGG networks of Table 1, one builder for all of them.

`vgg("D")` is torchvision's `vgg16()` layer for layer (same attribute names, same
`state_dict` keys and shapes), so ImageNet weights published for torchvision load unchanged.
What torchvision lacks, vggnet adds: configurations A-LRN and C, the paper's initialisation,
the warm start of deep nets from net A, the dense (fully-convolutional) form used at test time,
and named intermediate activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as nnf
from torch import Tensor, nn

from .configs import MODELS, Layer, config_of, parse_config

__all__ = [
    "VGG", "VGGFullyConv", "WarmStartReport", "vgg", "get_model", "list_models", "warm_start",
    "vgg11", "vgg11_bn", "vgg11_lrn", "vgg11_lrn_bn", "vgg13", "vgg13_bn", "vgg16c", "vgg16c_bn",
    "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "HEADS", "INITS", "MIN_INPUT_SIZE", "WIDTHS",
]

HEADS = ("paper", "compact")
INITS = ("paper", "glorot", "kaiming")
# Five 2x2 max-pools halve the map five times: 32 px is the smallest input with a 1x1 final map.
MIN_INPUT_SIZE = 32
WIDTHS = (1 / 64, 4)  # the width multipliers a net can have (1: the paper's channel counts)
WIDTH_EXPECTED = "a number in [1/64, 4] (1: the paper's channel counts)"
_FC_WIDTH = {"paper": 4096, "compact": 512}
_POOL_SIZE = {"paper": 7, "compact": 1}


def _check_input(x: Tensor, in_channels: int, min_size: int) -> Tensor:
    """Reject what the net cannot take, with a message that says what was expected."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {x.shape[1]} (input shape {list(x.shape)})")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"expected height and width of at least {min_size} px, got {x.shape[2]}x{x.shape[3]}")
    return x


# FX (create_feature_extractor) records the check as one call instead of tracing its branches.
torch.fx.wrap("_check_input")


def _local_response_norm() -> nn.LocalResponseNorm:
    """AlexNet's LRN: b_c = a_c / (k + alpha * sum_{n=5 neighbours} a^2)^beta, alpha=1e-4, beta=0.75, k=2.

    torch.nn.LocalResponseNorm divides alpha by the window size n inside its formula,
    so AlexNet's alpha = 1e-4 is passed as n * 1e-4.
    """
    n = 5
    return nn.LocalResponseNorm(size=n, alpha=n * 1e-4, beta=0.75, k=2.0)


def _scaled(channels: int, width: float) -> int:
    """A layer's width under the width multiplier (1.0: the paper's)."""
    return max(1, round(channels * width))


def _make_features(layers: list[Layer], in_channels: int, batch_norm: bool,
                   width: float = 1.0) -> tuple[nn.Sequential, dict[str, int]]:
    """Build `features` and name the output of each ReLU, LRN and stage (relu1_1 ... stage5)."""
    modules: list[nn.Module] = []
    names: dict[str, int] = {}
    channels = in_channels
    for layer in layers:
        if layer.kind == "pool":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            names[layer.name.replace("pool", "stage")] = len(modules) - 1
        elif layer.kind == "lrn":
            modules.append(_local_response_norm())
            names[layer.name] = len(modules) - 1
        else:
            # padding = kernel // 2 keeps the resolution for 3x3 *and* 1x1 convs (the seed's
            # padding=1 grew C's maps by 2 px at every 1x1 conv).
            out = _scaled(layer.channels, width)
            modules.append(nn.Conv2d(channels, out, layer.kernel, padding=layer.kernel // 2))
            if batch_norm:
                modules.append(nn.BatchNorm2d(out))
            modules.append(nn.ReLU(inplace=True))
            names[layer.name.replace("conv", "relu")] = len(modules) - 1
            channels = out
    return nn.Sequential(*modules), names


def _make_classifier(head: str, num_classes: int, dropout: float, width: float = 1.0) -> nn.Sequential:
    """FC-4096, FC-4096, FC-classes with ReLU and dropout after the hidden two (paper), or 512 wide (compact)."""
    hidden, channels = _scaled(_FC_WIDTH[head], width), _scaled(512, width)
    return nn.Sequential(
        nn.Linear(channels * _POOL_SIZE[head] ** 2, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv and linear layers.

    "paper" (section 3.1): weights from N(0, 10^-2) and zero biases. The text says "10^-2
    variance"; like Caffe's original prototxt and most reimplementations we read the 10^-2 as
    the standard deviation (a variance of 10^-2, std 0.1, blows activations up by ~25x per layer).
    "glorot": Glorot & Bengio (2010), which the paper's later note says trains deep nets with
    no warm start. "kaiming": torchvision's scheme (He normal, fan-out, for convs; N(0, 0.01) for FC).
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "paper":
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_args(*, head: str, init: str, num_classes: int, in_channels: int, dropout: float,
                width: float = 1.0) -> None:
    """ValueError (not assert, which `python -O` removes) for constructor arguments the net cannot have."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and WIDTHS[0] <= width <= WIDTHS[1]):
        raise ValueError(f"width must be {WIDTH_EXPECTED}, got {width!r}")


class VGG(nn.Module):
    """A VGG network of Table 1. Build it with `vgg()` or a named builder (`vgg16_bn()`, ...)."""

    __jit_unused_properties__ = ["activation_names"]

    def __init__(self, *, config: str, batch_norm: bool = False, num_classes: int = 1000, in_channels: int = 3,
                 head: str = "paper", dropout: float = 0.5, init: str = "paper", width: float = 1.0) -> None:
        super().__init__()
        config, _ = config_of(config)
        _check_args(head=head, init=init, num_classes=num_classes, in_channels=in_channels, dropout=dropout,
                    width=width)
        # Everything needed to rebuild this exact net: checkpoints store it (see checkpoint.py).
        # `width` (a multiplier of every layer's channels, 1: the paper's) is stored only when it is not 1,
        # so the paper's nets keep the arguments they always had.
        self.constructor_args = dict(config=config, batch_norm=batch_norm, num_classes=num_classes,
                                     in_channels=in_channels, head=head, dropout=dropout, init=init)
        if width != 1:
            self.constructor_args["width"] = float(width)
        self.width = float(width)
        self.config, self.batch_norm, self.head = config, batch_norm, head
        self.in_channels, self.num_classes, self.min_size = in_channels, num_classes, MIN_INPUT_SIZE
        self.layers = parse_config(config)
        self.features, self.activation_index = _make_features(self.layers, in_channels, batch_norm, width)
        self.avgpool = nn.AdaptiveAvgPool2d((_POOL_SIZE[head], _POOL_SIZE[head]))
        self.classifier = _make_classifier(head, num_classes, dropout, width)
        # One entry per stage (timm's feature_info): channels and stride of the stage's output.
        self.feature_info = [
            dict(num_chs=_scaled(512 if stage >= 4 else 64 * 2 ** (stage - 1), width), reduction=2 ** stage,
                 module=f"features.{self.activation_index[f'stage{stage}']}", name=f"stage{stage}")
            for stage in range(1, 6)
        ]
        _init_weights(self, init)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) image -> (N, 512, H/32, W/32) map of the last stage."""
        x = _check_input(x, self.in_channels, self.min_size)
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, 512, h, w) map -> (N, classes) logits; `pre_logits` stops before the last Linear."""
        x = torch.flatten(self.avgpool(x), 1)
        last = len(self.classifier) - 1
        for i, layer in enumerate(self.classifier):
            if not (pre_logits and i == last):
                x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def activation_names(self) -> list[str]:
        """Names `activations()` can return, in network order: relu1_1, ..., stage1, ..., relu5_4, stage5."""
        return list(self.activation_index)

    def return_nodes(self) -> dict[str, str]:
        """{module path: activation name}, ready for torchvision's `create_feature_extractor`."""
        return {f"features.{i}": name for name, i in self.activation_index.items()}

    @torch.jit.unused
    def activations(self, x: Tensor, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Named intermediate activations from one pass, for perceptual losses and feature extraction.

        Stops as soon as the last requested activation is computed.
        """
        wanted = self.activation_names if names is None else list(names)
        unknown = [n for n in wanted if n not in self.activation_index]
        if unknown:
            raise ValueError(f"unknown activation names {unknown}; expected some of {self.activation_names}")
        by_index = {self.activation_index[n]: n for n in wanted}
        out: dict[str, Tensor] = {}
        x = _check_input(x, self.in_channels, self.min_size)
        for i, module in enumerate(self.features[: max(by_index) + 1]):
            x = module(x)
            if i in by_index:
                out[by_index[i]] = x
        return {n: out[n] for n in wanted}

    def reset_classifier(self, num_classes: int) -> nn.Linear:
        """Replace the last FC layer by a freshly initialised one with `num_classes` outputs (timm's name).

        Fine-tuning to new classes: every other tensor is kept. Returns the new layer.
        """
        _check_args(head=self.head, init=self.constructor_args["init"], num_classes=num_classes,
                    in_channels=self.in_channels, dropout=self.constructor_args["dropout"], width=self.width)
        old = self.classifier[-1]
        new = nn.Linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        _init_weights(new, self.constructor_args["init"])
        self.classifier[-1] = new
        self.num_classes = num_classes
        self.constructor_args["num_classes"] = num_classes
        return new

    def to_fully_conv(self) -> VGGFullyConv:
        """The dense form of section 3.2: FC1 as a 7x7 conv, FC2 and FC3 as 1x1 convs, sharing this net's tensors."""
        return VGGFullyConv(self)


class _LinearAsConv(nn.Module):
    """A Linear over a flattened (C, k, k) map, applied as a k x k convolution with the very same tensors.

    The weight is viewed, not copied: the dense form costs no memory and follows every change
    (training, loading, `.to()`) of the net it came from.
    """

    def __init__(self, linear: nn.Linear, kernel: int) -> None:
        super().__init__()
        self.linear, self.kernel = linear, kernel
        self.in_channels = linear.in_features // kernel ** 2

    def forward(self, x: Tensor) -> Tensor:
        w = self.linear.weight.view(self.linear.out_features, self.in_channels, self.kernel, self.kernel)
        return nnf.conv2d(x, w, self.linear.bias)


class VGGFullyConv(nn.Module):
    """A VGG whose FC layers are convolutions: any image -> (N, classes, h, w) class-score map.

    (TorchScript compiles `forward` only; `output_names` and `forward_to` are Python-side.)

    The paper's head needs a final map of at least 7x7, so images of at least 224 px a side.
    Average the map over space for an image's scores (the paper's dense evaluation). Shares its
    parameters with the VGG it was made from.
    """

    __jit_unused_properties__ = ["output_names"]

    def __init__(self, model: VGG) -> None:
        super().__init__()
        self.constructor_args = dict(model.constructor_args)
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.min_size = 32 * _POOL_SIZE[model.head]
        self.features = model.features
        self.activation_index = dict(model.activation_index)
        kernel = _POOL_SIZE[model.head]
        layers: list[nn.Module] = []
        for m in model.classifier:
            if isinstance(m, nn.Linear):
                layers.append(_LinearAsConv(m, kernel))
                kernel = 1
            else:
                layers.append(m)
        self.classifier = nn.Sequential(*layers)

    @property
    def output_names(self) -> list[str]:
        """What `forward_to` can stop at: relu1_1 ... stage5, then fc6 and fc7 (the paper's penultimate layer)."""
        return [*self.activation_index, *_FC_OUTPUTS]

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.in_channels, self.min_size)
        return self.classifier(self.features(x))

    @torch.jit.unused
    def forward_to(self, x: Tensor, layer: str | None = None) -> Tensor:
        """The dense map of `layer` (an activation name, "fc6" or "fc7"); None: the class-score map."""
        if layer is None:
            return self.forward(x)
        if layer in self.activation_index:
            return self.features[: self.activation_index[layer] + 1](_check_input(x, self.in_channels, 32))
        if layer not in _FC_OUTPUTS:
            raise ValueError(f"unknown layer {layer!r}; expected one of {', '.join(self.output_names)}")
        x = self.features(_check_input(x, self.in_channels, self.min_size))
        return self.classifier[: _FC_OUTPUTS[layer] + 1](x)


# The FC layers' ReLU outputs by their Caffe names: fc6 (after FC1), fc7 (after FC2, Appendix B's descriptor).
_FC_OUTPUTS = {"fc6": 1, "fc7": 4}


def vgg(config: str, *, batch_norm: bool = False, num_classes: int = 1000, in_channels: int = 3,
        head: str = "paper", dropout: float = 0.5, init: str = "paper", width: float = 1.0) -> VGG:
    """Build configuration `config` ("A", "A-LRN", "B", "C", "D", "E") of Table 1.

    `width` multiplies every layer's channel count (0.25: 16-128 conv channels); 1 is the paper's net.
    """
    return VGG(config=config, batch_norm=batch_norm, num_classes=num_classes, in_channels=in_channels,
               head=head, dropout=dropout, init=init, width=width)


def list_models() -> list[str]:
    """Registered model names: vgg11, vgg11_bn, vgg11_lrn, ..., vgg19_bn (12 in all)."""
    return list(MODELS)


def get_model(name: str, **kwargs) -> VGG:
    """Build a registered model by name, e.g. `get_model("vgg16_bn", num_classes=10)`."""
    config, batch_norm = config_of(name)
    kwargs.setdefault("batch_norm", batch_norm)
    return vgg(config, **kwargs)


def vgg11(**kwargs) -> VGG:
    """Configuration A (torchvision's vgg11)."""
    return vgg("A", **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    """Configuration A with batch norm (torchvision's vgg11_bn)."""
    return vgg("A", batch_norm=True, **kwargs)


def vgg11_lrn(**kwargs) -> VGG:
    """Configuration A-LRN (in no other major library)."""
    return vgg("A-LRN", **kwargs)


def vgg11_lrn_bn(**kwargs) -> VGG:
    """Configuration A-LRN with batch norm (in no other major library)."""
    return vgg("A-LRN", batch_norm=True, **kwargs)


def vgg13(**kwargs) -> VGG:
    """Configuration B (torchvision's vgg13)."""
    return vgg("B", **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    """Configuration B with batch norm (torchvision's vgg13_bn)."""
    return vgg("B", batch_norm=True, **kwargs)


def vgg16c(**kwargs) -> VGG:
    """Configuration C (in no other major library)."""
    return vgg("C", **kwargs)


def vgg16c_bn(**kwargs) -> VGG:
    """Configuration C with batch norm (in no other major library)."""
    return vgg("C", batch_norm=True, **kwargs)


def vgg16(**kwargs) -> VGG:
    """Configuration D (torchvision's vgg16)."""
    return vgg("D", **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    """Configuration D with batch norm (torchvision's vgg16_bn)."""
    return vgg("D", batch_norm=True, **kwargs)


def vgg19(**kwargs) -> VGG:
    """Configuration E (torchvision's vgg19)."""
    return vgg("E", **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    """Configuration E with batch norm (torchvision's vgg19_bn)."""
    return vgg("E", batch_norm=True, **kwargs)


# The layers the paper copies from a trained net A (section 3.1). Caffe, which the authors used,
# copies weights between nets by layer name, so A's first four convs go to the deep net's
# layers of the same names; unlike "the i-th conv", that reading fits every shape.
_WARM_CONVS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2")
_WARM_FCS = ("classifier.0", "classifier.3", "classifier.6")


@dataclass
class WarmStartReport:
    """What `warm_start` copied (target key <- source key) and what it left freshly initialised."""

    copied: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        layers = sorted({k.rsplit(".", 1)[0] for k in self.copied})
        return f"warm start: copied {len(self.copied)} tensors ({', '.join(layers)}); {len(self.fresh)} left fresh"


def _module_prefixes(model: VGG) -> dict[str, list[str]]:
    """Layer name (conv1_1 / classifier.0) -> module paths holding its parameters (conv, then BN)."""
    prefixes: dict[str, list[str]] = {}
    for name, relu in model.activation_index.items():
        if name.startswith("relu"):
            conv = relu - (2 if model.batch_norm else 1)
            paths = [f"features.{conv}"] + ([f"features.{conv + 1}"] if model.batch_norm else [])
            prefixes[name.replace("relu", "conv")] = paths
    for fc in _WARM_FCS:
        prefixes[fc] = [fc]
    return prefixes


def warm_start(model: VGG, net_a_state_dict: Mapping[str, Tensor]) -> WarmStartReport:
    """Copy the first four conv layers and the three FC layers of a trained net A into `model`.

    Section 3.1: deep nets (B-E) start from A's conv1_1, conv2_1, conv3_1, conv3_2 and its FC
    layers; everything else keeps its fresh initialisation and no layer gets a lower learning
    rate. Raises ValueError naming the tensor when a key is missing or a shape differs.
    """
    source = vgg("A", batch_norm=model.batch_norm, num_classes=model.num_classes,
                 in_channels=model.in_channels, head=model.head)
    src_prefixes, dst_prefixes = _module_prefixes(source), _module_prefixes(model)
    expected = source.state_dict()
    target = model.state_dict()
    report = WarmStartReport()
    updates: dict[str, Tensor] = {}
    for layer in (*_WARM_CONVS, *_WARM_FCS):
        for src, dst in zip(src_prefixes[layer], dst_prefixes[layer]):
            for key in expected:
                if not key.startswith(src + "."):
                    continue
                suffix = key[len(src):]
                if key not in net_a_state_dict:
                    raise ValueError(f"warm start: net A's state dict has no {key!r} ({layer}); "
                                     f"expected a configuration-A {'BN ' if model.batch_norm else ''}checkpoint")
                value = net_a_state_dict[key]
                if value.shape != target[dst + suffix].shape:
                    raise ValueError(f"warm start: {layer} shape mismatch for {key!r}: net A has {tuple(value.shape)}, "
                                     f"this net expects {tuple(target[dst + suffix].shape)}")
                updates[dst + suffix] = value
                report.copied[dst + suffix] = key
    model.load_state_dict(updates, strict=False)
    report.fresh = [k for k in target if k not in report.copied]
    return report
