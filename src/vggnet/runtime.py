"""Where and how fast to run: device, precision and memory format, chosen once and logged.

Choices depend on the hardware class (`hardware_class`): "cuda", "cpu-bf16" (a CPU with bf16
matrix units: AMX or AVX-512 BF16) or "cpu" (without: AVX2 machines such as AMD EPYC Zen 3).

`--precision auto` means: bf16 autocast where the hardware multiplies bf16 matrices natively
(CUDA with bf16 support; a CPU with AMX or AVX-512 BF16), fp16 autocast on older CUDA cards,
fp32 everywhere else. On a CPU without bf16 units (AVX2 only) bf16 matmuls are emulated and
run hundreds of times slower than fp32, so auto must not pick them there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .errors import UserError

__all__ = ["PRECISIONS", "INFERENCE_PRECISIONS", "ENGINES", "HARDWARE_CLASSES", "Runtime", "cpu_has_bf16_units",
           "hardware_class", "choose_channels_last", "resolve_device", "resolve_precision", "resolve_runtime"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Testing a net may also run it quantised (vggnet.engines); training may not.
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")
# How a loaded net's forward passes run at test time (vggnet.engines); "auto" picks the fastest correct one.
ENGINES = ("auto", "eager", "compile", "onnxruntime")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HARDWARE_CLASSES = ("cpu-bf16", "cpu", "cuda")


def cpu_has_bf16_units() -> bool:
    """True on CPUs with native bf16 matrix instructions (Intel AMX, AVX-512 BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def hardware_class(device: torch.device | str = "cpu") -> str:
    """"cuda", "cpu-bf16" (CPU with bf16 matrix units) or "cpu" (without): what targets and defaults key on."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return "cpu-bf16" if cpu_has_bf16_units() else "cpu"


# Training image sizes from which a CPU's backward convolutions decide the memory format (below it,
# measured: the formats tie within 3%, so the inference default stands).
_LARGE_TRAIN_PX = 64


def choose_channels_last(device: torch.device | str, precision: str, *, training: bool,
                         image_size: int | None = None) -> tuple[bool, str]:
    """Whether to run channels_last (NHWC) rather than NCHW here, and why (measured; BENCHMARKS.md).

    `image_size`: the training crop (None: treated as large). Inference: channels_last everywhere
    (oneDNN's NHWC convolutions, 1.2-1.4x NCHW on both CPUs measured; cuDNN's tensor cores want
    NHWC). Training on a CPU without bf16 units: oneDNN's AVX2 backward convolutions are slower in
    channels_last, so NCHW at 224 px (1.3x); at 32 px the two tie. Training on AMX: bf16 convolutions
    forward and backward are NHWC kernels, so channels_last; fp32 as on AVX-512 inference.
    """
    cls = hardware_class(device)
    if not training:
        return True, f"channels_last is faster for inference on {cls}"
    if cls == "cuda":
        return True, "cuDNN tensor-core kernels want channels_last"
    large = image_size is None or image_size >= _LARGE_TRAIN_PX
    px = "large images" if image_size is None else f"{image_size} px"
    if cls == "cpu":
        if large:
            return False, f"NCHW trains faster at {px} on a CPU without bf16 units (AVX2 backward convolutions)"
        return True, f"channels_last and NCHW tie for training at {px} on a CPU without bf16 units"
    if precision == "bf16":
        return True, f"bf16 training on AMX runs NHWC kernels: channels_last is faster at {px}"
    return False, f"fp32 training on AVX-512 is as fast or faster in NCHW at {px} (measured at 32 and 224 px)"


def resolve_device(device: str | None = None) -> torch.device:
    """"auto"/None: the CUDA device when there is one (the local rank's under torchrun), else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into the fastest correct choice for `device`; refuse what the device cannot do."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "auto":
        return "bf16" if cpu_has_bf16_units() else "fp32"
    if precision == "fp16":
        raise UserError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return precision


@dataclass(frozen=True)
class Runtime:
    """The resolved execution choices; `str()` is the line the commands log."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    reason: str = field(default="", compare=False)  # why this memory format (logged)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.precision, torch.float32)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move `model` to the device and memory format (weights stay fp32: autocast casts per op)."""
        return model.to(device=self.device, memory_format=self.memory_format)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, memory_format=self.memory_format, non_blocking=True)

    def __str__(self) -> str:
        fmt = "channels_last" if self.channels_last else "NCHW"
        why = ""
        if self.device.type == "cpu":
            why = " (CPU has bf16 matrix units)" if cpu_has_bf16_units() else " (CPU lacks bf16 matrix units)"
        because = f" ({self.reason})" if self.reason else ""
        return f"device {self.device}, precision {self.precision}{why}, memory format {fmt}{because}"


def resolve_runtime(device: str | None = "auto", precision: str = "auto", channels_last: bool | None = None, *,
                    training: bool = False, image_size: int | None = None) -> Runtime:
    """Resolve `--device`, `--precision` and `--channels-last/--no-channels-last` into a `Runtime`.

    `channels_last` None picks the faster memory format for the hardware class, the precision and,
    when `training`, the crop size `image_size` (`choose_channels_last`); True/False is the user's word.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if channels_last is None:
        channels_last, reason = choose_channels_last(dev, prec, training=training, image_size=image_size)
    else:
        reason = "as asked"
    return Runtime(dev, prec, bool(channels_last), reason)
