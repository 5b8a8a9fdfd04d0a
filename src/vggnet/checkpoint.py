"""Checkpoints that survive faults and never run pickled code.

A vggnet checkpoint is one `torch.save` file holding only tensors, numbers, strings, lists and
dicts, so it loads with `weights_only=True`:

    {"format": "vggnet", "version": 1,
     "model_args": {...VGG constructor arguments...},   # rebuilds the exact net (nanoGPT's habit)
     "state_dict": {...}, "meta": {...},                  # meta: classes, mean/std, image size, ...
     "optimizer": ..., "scheduler": ..., "train_state": ...}   # only in training checkpoints

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the directory):
a kill or a full disk leaves the previous file intact. torchvision's ImageNet files (a bare
state dict such as vgg16-397923af.pth) load too; their configuration is recognised from their keys.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from .configs import CONFIGS
from .errors import UserError
from .model import HEADS, VGG, vgg

__all__ = ["atomic_write", "atomic_save", "load_checkpoint", "save_checkpoint", "load_model", "infer_model_args",
           "check_state_dict", "check_finite", "model_from", "FORMAT"]

FORMAT = "vggnet"


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write `path` so that readers only ever see the old file or the complete new one.

    The one writer for every file vggnet produces (checkpoints, run files, exports, pictures,
    JSON reports, feature files). `data` is bytes, text (UTF-8) or a function that writes to the
    open binary file. The bytes go to a temporary file in the same directory, are fsynced, then
    renamed over `path`, and the directory is fsynced so the rename itself is durable. On any
    failure (a full disk, a kill, an exception in `data`) the previous file is left intact and the
    temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | os.PathLike, model: VGG, *, meta: Mapping[str, Any] | None = None,
                    **extra: Any) -> Path:
    """Atomically write `model` (constructor arguments + weights), `meta` and `extra` entries."""
    module = getattr(model, "module", model)  # DistributedDataParallel / compiled wrappers
    module = getattr(module, "_orig_mod", module)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload = {"format": FORMAT, "version": 1, "model_args": dict(module.constructor_args),
               "state_dict": state, "meta": dict(meta or {}), **extra}
    return atomic_save(payload, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with weights-only unpickling; pickled code is refused, never executed."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise UserError(f"no checkpoint in directory {path} (expected checkpoints/best.pt or checkpoints/last.pt)")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"cannot read checkpoint {path}: it is an empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice on refusal (weights_only=False) is not for users
            with open(path, "rb") as f:  # a file object: torch.load must not pick a reader from the name
                obj = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing {path}: it holds pickled objects other than tensors and plain data "
                        f"({_refused_global(e)}); vggnet never executes code from a weights file") from None
    except MemoryError:
        raise UserError(f"cannot read checkpoint {path}: it does not fit in memory") from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, ValueError, zipfile errors, ... on torn files
        raise UserError(f"cannot read checkpoint {path}: not a complete torch file "
                        f"({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return _checked_checkpoint(dict(obj), path)
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        # A bare state dict, e.g. torchvision's vgg16-397923af.pth.
        return {"format": "state_dict", "version": 1, "model_args": infer_model_args(obj, source=str(path)),
                "state_dict": dict(obj), "meta": {}}
    raise UserError(f"{path} is neither a vggnet checkpoint nor a VGG state dict "
                    f"(it holds {type(obj).__name__}{' without a format field' if isinstance(obj, Mapping) else ''})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _refused_global(e: pickle.UnpicklingError) -> str:
    """The global torch's weights-only unpickler refused, without its advice to disable the check."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")[:160]
    return "unsupported pickle content"


_MODEL_ARG_TYPES = {"config": str, "batch_norm": bool, "num_classes": int, "in_channels": int, "head": str,
                    "dropout": (int, float), "init": str}


def _checked_checkpoint(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """A vggnet-format dict whose fields are all there and of the right kind, with finite weights."""
    args, state, meta = ckpt.get("model_args"), ckpt.get("state_dict"), ckpt.get("meta", {})
    if not isinstance(args, Mapping):
        raise UserError(f"{path} is a vggnet checkpoint without model_args (the net's constructor arguments)")
    for key, kind in _MODEL_ARG_TYPES.items():
        if key in args and (not isinstance(args[key], kind) or (kind is int and isinstance(args[key], bool))):
            raise UserError(f"{path}: model_args.{key} should be {getattr(kind, '__name__', 'a number')}, "
                            f"got {args[key]!r}")
    if "config" not in args or "num_classes" not in args:
        raise UserError(f"{path}: model_args lacks {'config' if 'config' not in args else 'num_classes'}")
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"{path} is a vggnet checkpoint without a state_dict of named tensors")
    if not isinstance(meta, Mapping):
        raise UserError(f"{path}: meta should be a mapping, got {type(meta).__name__}")
    check_finite(state, source=str(path))
    return ckpt


def check_finite(state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): they would predict nothing."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{source} holds non-finite weights (NaN or infinity) in {key}; "
                            "it comes from a diverged run and cannot be used")


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def infer_model_args(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Any]:
    """Recognise which VGG a bare state dict belongs to (config, BN, head, classes, input channels, width)."""
    last = [k for k in state_dict if k.startswith("classifier.") and k.endswith(".weight")]
    first = state_dict.get("features.0.weight")
    if not last or first is None:
        raise UserError(f"{source} has no features.0.weight / classifier.*.weight: not a VGG checkpoint")
    last_key = max(last, key=lambda k: int(k.split(".")[1]))
    num_classes, in_channels = state_dict[last_key].shape[0], first.shape[1]
    width = {"width": first.shape[0] / 64} if first.shape[0] != 64 else {}  # conv1_1 has 64 channels at width 1
    wanted = _shapes(state_dict)
    for config in CONFIGS:
        for batch_norm in (False, True):
            for head in HEADS:
                args = dict(config=config, batch_norm=batch_norm, num_classes=num_classes,
                            in_channels=in_channels, head=head, **width)
                with torch.device("meta"):
                    try:
                        candidate = vgg(**args)
                    except ValueError:  # a width the nets cannot have
                        raise UserError(f"{source} matches no VGG configuration (its first conv has "
                                        f"{first.shape[0]} channels)") from None
                if _shapes(candidate.state_dict()) == wanted:
                    return dict(candidate.constructor_args)
    raise UserError(f"{source} matches no VGG configuration ({len(wanted)} tensors, {num_classes} classes)")


def check_state_dict(model: VGG, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise UserError naming the keys or shapes that differ between `model` and `state_dict`."""
    have, want = _shapes(state_dict), _shapes(model.state_dict())
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    differ = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    if differ:
        problems.append(f"shapes differ (checkpoint vs model): {'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}")
    if problems:
        args = model.constructor_args
        raise UserError(f"{source} does not fit configuration {args['config']} "
                        f"(batch_norm={args['batch_norm']}, {args['num_classes']} classes): " + "; ".join(problems))


def model_from(ckpt: Mapping[str, Any], source: str = "checkpoint", **overrides: Any) -> VGG:
    """Rebuild the net a loaded checkpoint describes and load its weights (eval mode).

    `overrides` (e.g. config="D") are claims about the file, checked against its tensors: a mismatch
    is a UserError naming the differing keys or shapes.
    """
    args = {**ckpt["model_args"], **overrides}
    try:
        with torch.device("meta"):  # no point initialising ~138M weights that are about to be replaced
            model = vgg(args.pop("config"), **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: its model_args do not describe a VGG net ({e})") from None
    check_state_dict(model, ckpt["state_dict"], source=source)
    model.load_state_dict(ckpt["state_dict"], assign=True)
    return model.eval()


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               **overrides: Any) -> tuple[VGG, dict[str, Any]]:
    """A vggnet checkpoint or torch state dict -> (model in eval mode, meta); see `model_from`.

    For every other weights format, `vggnet.weights.read_weights` then `model_from`.
    """
    ckpt = load_checkpoint(path, map_location)
    return model_from(ckpt, str(path), **overrides), dict(ckpt.get("meta", {}))
