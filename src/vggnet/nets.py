"""A loaded net: the model, the preprocessing its weights expect, and its class names.

Every verb that runs a trained net (`eval`, `predict`, `features`, `probe`, `export`, `bench`) and
training's own val/test evaluation work on a `Net`, so the preprocessing a set of weights was
trained with travels with them:

- `mean` and `std` per input channel, in the units of `input_range` (1.0: pixels in [0, 1], as
  torchvision's weights; 255.0: pixels in [0, 255], as the authors' Caffe and Keras weights);
- the input channel order is always RGB: weights trained on BGR input have their first conv's
  input channels reversed when they are read (see vggnet.weights), so no caller needs to care.

`load_net` reads any weights file the project understands (vggnet checkpoints, torchvision state
dicts, and the formats of vggnet.weights); `net_from_model` wraps an in-memory model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .checkpoint import model_from
from .configs import MODELS, config_of
from .errors import UserError
from .imagenet import complete_meta
from .model import VGG, VGGFullyConv
from .runtime import Runtime
from .transforms import normalize
from .weights import read_weights

__all__ = ["Net", "load_net", "net_from_model"]


@dataclass(kw_only=True)
class Net:
    """A net ready for testing: the model, its completed meta (classes, preprocessing, sizes) and a name.

    `engine`, when set (see vggnet.engines), runs the forward passes of the test protocols instead
    of eager PyTorch: `engine(key, module, x)` with key "crop", "dense" or "dense:<layer>".
    """

    model: VGG
    meta: dict[str, Any]
    name: str
    flip: bool = True  # test-time horizontal flips (section 3.2); off for data whose mirror is another thing
    engine: Callable[[str, nn.Module, Tensor], Tensor] | None = field(default=None, repr=False)
    _dense: VGGFullyConv | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def image_size(self) -> int:
        """The crop size the net was trained on (224 for ImageNet, 32 for digits/CIFAR)."""
        return int(self.meta["image_size"])

    @property
    def eval_scale(self) -> int:
        return int(self.meta["eval_scale"])

    @property
    def train_scale(self) -> tuple[int, int]:
        return tuple(self.meta["train_scale"])  # type: ignore[return-value]

    @property
    def input_range(self) -> float:
        return float(self.meta.get("input_range", 1.0))

    @property
    def dense_min_size(self) -> int:
        """Smallest image side the dense form takes: 224 for the paper's 7x7-conv FC1, 32 for the compact head."""
        return self.dense().min_size

    @property
    def layer_names(self) -> list[str]:
        """Layers whose dense outputs `evaluate.dense_pooled` can return: relu1_1 ... stage5, fc6, fc7."""
        return self.dense().output_names

    def dense(self) -> VGGFullyConv:
        """The fully-convolutional form (built once; it shares the model's parameters)."""
        if self._dense is None:
            self._dense = self.model.to_fully_conv().eval()
        return self._dense

    def to(self, runtime: Runtime) -> Net:
        """Move the model (and so its dense form, which shares its tensors) to the runtime, in place."""
        runtime.prepare(self.model)
        return self

    def normalise(self, x: Tensor) -> Tensor:
        """[0, 1] RGB pixels -> the net's input, as its weights were trained (section 2.1: minus the mean RGB)."""
        return normalize(x, self.meta["mean"], self.meta["std"], self.input_range)


def _default_flip(meta: Mapping[str, Any]) -> bool:
    """Flip at test time iff the net was trained with flips: the trainer's setting, else on except for
    handwritten digits, which train without them (a mirrored 2 is no 2)."""
    hflip = meta.get("hflip", (meta.get("train_config") or {}).get("hflip"))
    return meta.get("name") != "digits" if hflip is None else bool(hflip)


def net_from_model(model: VGG, meta: Mapping[str, Any] | None = None, *, name: str = "model",
                   flip: bool | None = None) -> Net:
    """Wrap an in-memory model (with its DataBundle.meta(), if any) for testing."""
    full = complete_meta(meta or {}, model.constructor_args)
    return Net(model=model.eval(), meta=full, name=name, flip=_default_flip(full) if flip is None else flip)


def load_net(path: str | os.PathLike, *, config: str | None = None, num_classes: int | None = None,
             flip: bool | None = None, map_location: str = "cpu") -> Net:
    """Load any weights file vggnet reads (checkpoint, run directory, torchvision, safetensors, Caffe, Keras).

    `config` ("D" or "vgg16_bn") and `num_classes` are claims about the file: if they do not fit its
    tensors, the UserError names the keys or shapes that differ.
    """
    overrides: dict[str, Any] = {}
    if config is not None:
        try:
            overrides["config"], batch_norm = config_of(config)
        except ValueError as e:
            raise UserError(str(e)) from None
        if config in MODELS:  # a model name says whether it has BN; a bare letter does not
            overrides["batch_norm"] = batch_norm
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    ckpt = read_weights(path)  # any format: torch files go on to vggnet.checkpoint
    model = model_from(ckpt, os.fspath(path), **overrides).to(map_location)
    full = complete_meta(dict(ckpt.get("meta") or {}), model.constructor_args)
    return Net(model=model, meta=full, name=_short_name(path), flip=_default_flip(full) if flip is None else flip)


def _short_name(path: str | os.PathLike) -> str:
    path = os.fspath(path).rstrip("/")
    base = os.path.basename(path)
    if base in ("best.pt", "last.pt"):  # run_dir/checkpoints/best.pt -> run_dir/best.pt
        parent = os.path.dirname(os.path.dirname(path)) if os.path.basename(os.path.dirname(path)) == "checkpoints" \
            else os.path.dirname(path)
        return f"{os.path.basename(parent) or parent}/{base}"
    return base
