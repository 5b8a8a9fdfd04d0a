"""Counting what the paper counts: parameters (Table 2), multiply-accumulates, receptive fields.

`summary()` gives one row per configuration (what `vggnet info` prints); `layer_table()` walks one
net layer by layer, showing how two stacked 3x3 convs see 5x5 and three see 7x7 (section 2.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .configs import CONFIGS, weight_layers
from .model import VGG, vgg

__all__ = ["ModelSummary", "LayerRow", "count_params", "count_macs", "receptive_field", "summary", "layer_table"]


def count_params(model: nn.Module) -> int:
    """Learnable parameters (weights and biases; BN's scale and shift, not its running statistics)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 224, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at `size` x `size`, measured by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with counter, torch.no_grad():
        model(torch.zeros(1, in_channels, size, size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-accumulate


@dataclass
class LayerRow:
    """One layer of `layer_table`: its output at the probed size and what one output unit sees."""

    name: str
    layer: str
    output_shape: tuple[int, ...]
    receptive_field: int
    jump: int
    params: int


def layer_table(model: VGG, size: int = 224) -> list[LayerRow]:
    """Conv, LRN, pool and FC layers of `model` with output shape, receptive field, jump and parameters.

    Receptive field r and jump j (the input-pixel distance between neighbouring outputs) follow
    r_out = r_in + (k - 1) * j_in and j_out = j_in * stride; BN and ReLU change neither and are
    folded into the conv before them.
    """
    rows: list[LayerRow] = []
    names = {i: n for n, i in model.activation_index.items()}
    rf, jump = 1, 1
    x = torch.zeros(1, model.in_channels, size, size, device=next(model.parameters()).device)
    pending: LayerRow | None = None
    with torch.no_grad():
        for i, module in enumerate(model.features):
            x = module(x)
            if isinstance(module, nn.Conv2d):
                rf += (module.kernel_size[0] - 1) * jump
                k = module.kernel_size[0]
                pending = LayerRow("", f"conv{k}-{module.out_channels}", (), rf, jump, count_params(module))
            elif isinstance(module, nn.BatchNorm2d) and pending is not None:
                pending.params += count_params(module)
            elif isinstance(module, nn.ReLU) and pending is not None:
                pending.name, pending.output_shape = names[i].replace("relu", "conv"), tuple(x.shape[1:])
                rows.append(pending)
                pending = None
            elif isinstance(module, nn.LocalResponseNorm):
                rows.append(LayerRow(names[i], f"LRN n={module.size}", tuple(x.shape[1:]), rf, jump, 0))
            elif isinstance(module, nn.MaxPool2d):
                rf += (module.kernel_size - 1) * jump
                jump *= module.stride
                rows.append(LayerRow(names[i].replace("stage", "pool"), "maxpool 2x2/2",
                                     tuple(x.shape[1:]), rf, jump, 0))
        x = torch.flatten(model.avgpool(x), 1)
        fc = 0
        for module in model.classifier:
            x = module(x)
            if isinstance(module, nn.Linear):
                fc += 1
                rows.append(LayerRow(f"fc{fc + 5}", f"FC-{module.out_features}", tuple(x.shape[1:]),
                                     rf, jump, count_params(module)))
    return rows


def receptive_field(model: VGG) -> int:
    """Receptive field, in input pixels, of one unit of the last conv layer."""
    return [r for r in layer_table(model, size=32) if r.layer.startswith("conv")][-1].receptive_field


@dataclass
class ModelSummary:
    """One row of `vggnet info`: Table 2 plus cost and receptive field."""

    config: str
    batch_norm: bool
    weight_layers: int
    params: int
    params_millions: float
    macs: int
    gmacs: float
    receptive_field: int

    def as_dict(self) -> dict:
        return asdict(self)


def summary(configs: list[str] | None = None, *, batch_norm: bool | None = None,
            num_classes: int = 1000, size: int = 224) -> list[ModelSummary]:
    """Summaries for `configs` (default: all six), without and with BN unless `batch_norm` picks one."""
    rows = []
    for config in configs or list(CONFIGS):
        for bn in ([False, True] if batch_norm is None else [batch_norm]):
            # On the meta device nothing is computed: shapes are all the counts need.
            with torch.device("meta"):
                model = vgg(config, batch_norm=bn, num_classes=num_classes)
            params, macs = count_params(model), count_macs(model, size)
            rows.append(ModelSummary(config, bn, weight_layers(config), params, round(params / 1e6, 3),
                                     macs, round(macs / 1e9, 3), receptive_field(model)))
    return rows
