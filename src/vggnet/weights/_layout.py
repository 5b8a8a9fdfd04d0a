"""Named layers of a foreign file (Caffe, Keras) -> a vggnet/torchvision state dict.

Caffe and Keras name VGG's layers by stage and position (conv3_2 / block3_conv2), and their
classifiers are three fully connected layers in order. This module places those tensors at
torchvision's indices (features.{i}, classifier.{0,3,6}), reverses the first conv's input
channels when the file was trained on BGR input, and checks the result is one of Table 1's nets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..checkpoint import infer_model_args
from ..errors import UserError

__all__ = ["ConvLayer", "vgg_state_dict", "CAFFE_MEAN_RGB", "caffe_preprocessing"]

# The authors' mean pixel (BGR order in Caffe: 103.939, 116.779, 123.68), given here in RGB order
# because converted nets always take RGB input (section 2.1: "subtracting the mean RGB value").
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)


def caffe_preprocessing(source_format: str) -> dict[str, Any]:
    """Meta for weights trained the Caffe way: pixels in [0, 255], minus the mean pixel, no std."""
    return {"source_format": source_format, "input_range": 255.0, "mean": list(CAFFE_MEAN_RGB),
            "std": [1.0, 1.0, 1.0], "channel_order": "RGB (first conv reversed from the file's BGR)"}


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer of the file: stage (1-5) and position in the stage (1-based), in PyTorch's layout."""

    name: str
    stage: int
    index: int
    weight: Tensor  # (out, in, kh, kw)
    bias: Tensor    # (out,)


def _stage_summary(convs: list[ConvLayer]) -> str:
    stages = {}
    for c in convs:
        stages.setdefault(c.stage, []).append(c)
    return ", ".join(f"stage {s}: {len(cs)} convs of {cs[-1].weight.shape[0]}" for s, cs in sorted(stages.items()))


def _check_convs(convs: list[ConvLayer], where: str) -> None:
    """Stages 1-5 present, convs numbered 1..n within each, and each conv's input is the previous output."""
    stages = sorted({c.stage for c in convs})
    if stages != [1, 2, 3, 4, 5]:
        raise UserError(f"{where} does not hold a VGG: expected conv layers in stages 1-5, found stages {stages}")
    for stage in stages:
        numbers = [c.index for c in convs if c.stage == stage]
        if numbers != list(range(1, len(numbers) + 1)):
            raise UserError(f"{where} does not hold a VGG: stage {stage}'s convs are numbered {numbers}")
    for prev, conv in zip(convs, convs[1:]):
        if conv.weight.shape[1] != prev.weight.shape[0]:
            raise UserError(f"{where} does not hold a VGG: {conv.name} takes {conv.weight.shape[1]} channels "
                            f"but {prev.name} gives {prev.weight.shape[0]}")


def vgg_state_dict(convs: list[ConvLayer], fcs: list[tuple[str, Tensor, Tensor]], *, path: str | Path,
                   source: str, bgr: bool, lrn: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Place `convs` and the three FC layers `fcs` ((name, (out, in) weight, bias), in order) at torchvision's keys.

    `bgr`: the file was trained on BGR input, so the first conv's input channels are reversed and the
    converted net takes RGB. `lrn`: configuration A-LRN's LRN layer follows the first conv (Table 1),
    taking one slot of `features`. Returns (state dict, VGG constructor arguments).
    """
    where = f"{source} file {path}"
    convs = sorted(convs, key=lambda c: (c.stage, c.index))
    if not convs:
        raise UserError(f"{where} does not hold a VGG: it has no conv layers")
    _check_convs(convs, where)
    if len(fcs) == 0:
        raise UserError(f"{where} holds no classifier (no fully connected layers: saved without the top, "
                        f"include_top=False); vggnet reads whole nets only ({_stage_summary(convs)})")
    if len(fcs) != 3:
        raise UserError(f"{where} does not hold a VGG: expected 3 fully connected layers, found {len(fcs)} "
                        f"({', '.join(name for name, _, _ in fcs)})")
    state: dict[str, Tensor] = {}
    i = 0
    for k, conv in enumerate(convs):
        weight = conv.weight.flip(1) if bgr and k == 0 else conv.weight  # BGR -> RGB on the first conv only
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = weight.contiguous(), conv.bias.contiguous()
        i += 2  # conv, ReLU
        if k == len(convs) - 1 or convs[k + 1].stage != conv.stage:
            i += 1 + (1 if lrn and conv.stage == 1 else 0)  # (LRN), max-pool
    for slot, (_, weight, bias) in zip((0, 3, 6), fcs):
        state[f"classifier.{slot}.weight"], state[f"classifier.{slot}.bias"] = weight.contiguous(), bias.contiguous()
    try:
        args = infer_model_args(state)
    except UserError as e:
        fc_shapes = ", ".join(f"{name} {tuple(w.shape)}" for name, w, _ in fcs)
        raise UserError(f"{where} does not fit any VGG configuration ({_stage_summary(convs)}; {fc_shapes}): {e}") \
            from None
    return state, args

