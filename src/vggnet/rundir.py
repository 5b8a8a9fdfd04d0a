"""What a training run is: its configuration (a recipe plus flags) and its directory.

Recipes are YAML files in vggnet/recipes (`recipes/` at the top of the repository links there):
flat mappings of TrainConfig fields, where `base: NAME` inherits another recipe and the value
`required` marks a setting the user must give (`--data DIR`, `--init-from A_CHECKPOINT`).

    RUN_DIR/
      config.yaml            the resolved configuration (recipe + flags); `--resume` reads it back
      metrics.jsonl          one JSON object per epoch (lr, train/val loss, top-1, top-5, images/s, seconds)
      curves.png             loss and top-1 / top-5 error per epoch, train and val
      tensorboard/           TensorBoard event files (`tensorboard --logdir RUN_DIR`)
      checkpoints/last.pt    model + optimiser + scheduler + epoch + RNG states: what `--resume` needs
      checkpoints/best.pt    the epoch with the best validation top-1 (model only)
      summary.json           test top-1 / top-5, epochs, wall seconds, images/s, precision, config

Every file is rewritten whole (temporary file + rename), so a run killed at any instant leaves
each file either as it was or complete. `metrics.jsonl` is regenerated from the epoch history kept
inside `checkpoints/last.pt`, so after `--resume` it never holds an epoch the checkpoint has not seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .configs import config_of
from .errors import UserError
from .model import HEADS, INITS
from .runtime import PRECISIONS

__all__ = ["TrainConfig", "RunDir", "RECIPES_DIR", "DEFAULT_RECIPE", "REQUIRED", "RESUME_OVERRIDES",
           "default_run_dir", "describe_recipes", "list_recipes", "load_recipe", "resolve_config", "resume_config"]

RECIPES_DIR = Path(__file__).with_name("recipes")
DEFAULT_RECIPE = "digits"
REQUIRED = "required"  # a recipe value the user must supply (--data DIR, --init-from A_CHECKPOINT)
# What `--resume` may change: how the run executes, not what it computes (--epochs extends the budget).
RESUME_OVERRIDES = ("epochs", "workers", "device", "precision", "compile")


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet values (section 3.1); recipes override them."""

    # the net (Table 1)
    config: str = "A"
    batch_norm: bool = False
    head: str = "paper"                       # "paper": FC-4096 x2 on 7x7; "compact": FC-512 x2 on 1x1
    init: str = "paper"                       # "paper" N(0, 0.01), "glorot", "kaiming"
    dropout: float = 0.5
    init_from: str | None = None              # net A checkpoint (warm start) or same-config one (fine-tune)
    # the data (section 3.1 augmentation; see data.py)
    data: str | None = None                   # None: the digits; "synthetic"; a CIFAR or ImageFolder directory
    image_size: int | None = None             # None: the data's default (32 small images, 224 photos)
    train_scale: tuple[int, int] | None = None  # (S_min, S_max)
    eval_scale: int | None = None             # Q
    mean_std: str = "dataset"
    lighting: float = 0.1
    hflip: bool | None = None                 # None: on, except for digits
    synthetic_size: int = 512
    strict: bool = False
    # the optimisation (section 3.1)
    epochs: int = 74
    batch_size: int = 256
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_factor: float = 0.1
    lr_patience: int = 5                      # lr drops after lr_patience + 1 epochs without a better val top-1
    max_lr_drops: int = 3
    warmup_epochs: float = 0.0                # linear warm-up from 0 to lr (not in the paper; off there)
    # the run
    seed: int = 0
    workers: int = 4
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    channels_last: bool = True
    out: str | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["train_scale"] is not None:
            d["train_scale"] = list(d["train_scale"])
        return d


# ----------------------------------------------------------------------------- recipes and config

def list_recipes() -> list[str]:
    """Names of the recipes shipped in vggnet/recipes (digits, cifar10, imagenet-D, ...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def describe_recipes() -> dict[str, str]:
    """{name: the recipe's one-line `description`} for every shipped recipe."""
    out = {}
    for name in list_recipes():
        try:
            values = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            values = {}
        out[name] = str(values.get("description", "")).strip() if isinstance(values, dict) else ""
    return out


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's settings: a shipped name ("imagenet-D") or a YAML file; `base: NAME` inherits."""
    return _load_recipe(str(name_or_path), seen=())


def _load_recipe(name_or_path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name_or_path!r}; expected a YAML file or one of {', '.join(list_recipes())}")
    if str(path.resolve()) in seen:
        raise UserError(f"recipe {path} inherits from itself (base: chain {' -> '.join(seen)})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} should be a mapping of settings, got {type(values).__name__}")
    base = values.pop("base", None)
    values.pop("description", None)
    _check_keys(values, f"recipe {path}")
    if base:
        values = {**_load_recipe(str(base), seen + (str(path.resolve()),)), **values}
    return values


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown setting {', '.join(unknown)}; expected some of {', '.join(known)}")


def resolve_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """The recipe (default "digits") with every override that is not None applied, checked."""
    name = recipe or DEFAULT_RECIPE
    values = load_recipe(name)
    _check_keys(overrides, "override")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["recipe"] = name
    return _checked(values, source=f"recipe {name}")


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The configuration a run directory was started with; only RESUME_OVERRIDES may change."""
    run = RunDir(run_dir)
    run.require_checkpoint()
    values = run.read_config()
    _check_keys(values, str(run.config))
    changed = sorted(k for k, v in overrides.items() if v is not None and k not in RESUME_OVERRIDES)
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        allowed = ", ".join("--" + k for k in RESUME_OVERRIDES)
        raise UserError(f"--resume continues the run as recorded in {run.config}; {flags} cannot change "
                        f"(allowed with --resume: {allowed})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["out"] = str(run.path)
    return _checked(values, source=str(run.config))


def _checked(values: dict[str, Any], source: str) -> TrainConfig:
    """Validate and normalise settings into a TrainConfig; errors say which setting and what was expected."""
    try:
        config, bn = config_of(str(values.get("config", "A")))
    except ValueError as e:
        raise UserError(str(e)) from None
    values["config"] = config
    values["batch_norm"] = bool(values.get("batch_norm", False)) or bn
    if values.get("data") == REQUIRED:
        raise UserError(f"{source} needs --data DIR (a CIFAR python-format or ImageFolder directory)")
    if values.get("init_from") == REQUIRED:
        raise UserError(f"{source} warm-starts from a trained net A (section 3.1): pass --init-from "
                        "A_CHECKPOINT, or --init-from none to train from a random initialisation")
    if str(values.get("init_from")).lower() == "none":
        values["init_from"] = None
    if values.get("train_scale") is not None:
        scale = values["train_scale"]
        scale = [scale] if isinstance(scale, int) else list(scale)
        if len(scale) not in (1, 2) or not all(isinstance(s, int) and s > 0 for s in scale):
            raise UserError(f"train_scale must be S or [S_min, S_max] (positive integers), got {values['train_scale']!r}")
        values["train_scale"] = (scale[0], scale[-1])
    _coerce_numbers(values, source)
    checks = [("head", values.get("head", "paper") in HEADS, f"one of {', '.join(HEADS)}"),
              ("init", values.get("init", "paper") in INITS, f"one of {', '.join(INITS)}"),
              ("precision", values.get("precision", "auto") in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
              ("epochs", _number(values.get("epochs", 1), int) > 0, "a positive integer"),
              ("batch_size", _number(values.get("batch_size", 1), int) > 0, "a positive integer"),
              ("lr", _number(values.get("lr", 1.0), float) > 0, "a positive number"),
              ("workers", _number(values.get("workers", 0), int) >= 0, "an integer >= 0"),
              ("dropout", 0 <= _number(values.get("dropout", 0.5), float) < 1, "a number in [0, 1)")]
    for key, ok, expected in checks:
        if not ok:
            raise UserError(f"{source}: {key} must be {expected}, got {values.get(key)!r}")
    return TrainConfig(**values)


def _coerce_numbers(values: dict[str, Any], source: str) -> None:
    """Numeric settings must be numbers; YAML 1.1 reads "5e-4" (no dot) as a string, so parse those."""
    for f in dataclasses.fields(TrainConfig):
        kind = {"float": float, "int": int, "int | None": int}.get(str(f.type))
        value = values.get(f.name)
        if kind is None or value is None:
            continue
        if isinstance(value, str):
            try:
                value = values[f.name] = kind(value)
            except ValueError:
                pass
        if _number(value, kind) != _number(value, kind):  # NaN: not a number of that kind
            raise UserError(f"{source}: {f.name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")


def _number(x: Any, kind: type) -> float:
    """x if it is a number of `kind` (ints count as floats), else NaN, which fails every comparison."""
    ok = isinstance(x, (int, float) if kind is float else int) and not isinstance(x, bool)
    return x if ok else float("nan")


# ----------------------------------------------------------------------------- the directory

def default_run_dir(config: str, data: str | None, *, root: str | os.PathLike = "runs") -> Path:
    """runs/<YYYYmmdd-HHMMSS>-<config>-<data> under the current directory (data: digits, synthetic or the folder's name)."""
    if data is None:
        data_name = "digits"
    else:
        data_name = Path(str(data).rstrip("/\\")).name or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config}-{data_name}"


def _write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically (readers see the old or the new file, never half of one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """Paths and writers of one run directory (only rank 0 of a torchrun job writes)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.curves = self.path / "curves.png"
        self.summary = self.path / "summary.json"
        self.tensorboard = self.path / "tensorboard"
        self.last = self.path / "checkpoints" / "last.pt"
        self.best = self.path / "checkpoints" / "best.pt"

    def create(self) -> RunDir:
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.path}: {e.strerror}") from None
        return self

    def require_checkpoint(self) -> Path:
        """The checkpoint `--resume` continues from; a clear error when the directory has none."""
        if not self.path.is_dir():
            raise UserError(f"--resume expects a run directory, got {self.path} (no such directory)")
        if not self.config.is_file():
            raise UserError(f"--resume: {self.path} is not a run directory (no config.yaml)")
        if not self.last.is_file():
            raise UserError(f"--resume: no checkpoint in {self.path} (expected {self.last.relative_to(self.path)}; "
                            "a run stopped before its first epoch ended has none: start it again)")
        return self.last

    def write_config(self, config: Mapping[str, Any]) -> None:
        header = "# Resolved configuration of this run (recipe + flags); `vggnet train --resume DIR` reads it.\n"
        _write_text(self.config, header + yaml.safe_dump(dict(config), sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        try:
            loaded = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {self.config}: {e}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{self.config} should hold a mapping of settings, got {type(loaded).__name__}")
        return loaded

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        _write_text(self.metrics, "".join(json.dumps(dict(row)) + "\n" for row in history))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _write_text(self.summary, json.dumps(dict(summary), indent=2) + "\n")

    def plot_curves(self, history: Sequence[Mapping[str, Any]]) -> None:
        """curves.png: loss (left) and top-1 / top-5 error in % (right) per epoch, train and val."""
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in history]
        fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
        for split, style in (("train", "--"), ("val", "-")):
            ax_loss.plot(epochs, [_finite(row[f"{split}_loss"]) for row in history], style, marker=".", label=split)
            for k, color in (("top1", "C0"), ("top5", "C1")):
                ax_err.plot(epochs, [100.0 - row[f"{split}_{k}"] for row in history], style, color=color,
                            marker=".", label=f"{split} {k.replace('top', 'top-')} error")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
        ax_err.set(xlabel="epoch", ylabel="error (%)", title="top-1 / top-5 error")
        for ax in (ax_loss, ax_err):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        tmp = self.curves.with_name(".curves.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.curves)

    def tensorboard_writer(self, purge_step: int | None = None):
        """A SummaryWriter into RUN_DIR/tensorboard; `purge_step` drops events a resumed run will redo."""
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.tensorboard), purge_step=purge_step)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
