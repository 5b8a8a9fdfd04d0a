"""What a training run is: its configuration (a recipe plus flags) and its directory.

Recipes are YAML files in vggnet/recipes (`recipes/` at the top of the repository links there):
flat mappings of TrainConfig fields, where `base: NAME` inherits another recipe and the value
`required` marks a setting the user must give (`--data DIR`, `--init-from A_CHECKPOINT`).
Every TrainConfig field has the flag of the same name (`lr_patience` is `--lr-patience`), and
errors name that flag, so a message says what to type.

    RUN_DIR/
      config.yaml            the resolved configuration (recipe + flags); `--resume` reads it back
      metrics.jsonl          one JSON object per epoch (lr, train/val loss, top-1, top-5, images/s, seconds)
      curves.png             loss and top-1 / top-5 error per epoch, train and val
      tensorboard/           TensorBoard event files (`tensorboard --logdir RUN_DIR`)
      checkpoints/last.pt    model + optimiser + scheduler + epoch + RNG states: what `--resume` needs
      checkpoints/best.pt    the epoch with the best validation top-1 (model only)
      summary.json           test top-1 / top-5, epochs, wall seconds, images/s, precision, config

Every file goes through vggnet.checkpoint.atomic_write, so a run killed at any instant (or a full
disk) leaves each file either as it was or complete. `metrics.jsonl` is regenerated from the
epoch history kept inside `checkpoints/last.pt`, so after `--resume` it never holds an epoch the
checkpoint has not seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .configs import config_of
from .data import MAX_SCALE  # no image side beyond this (the paper trains and tests at 224-512)
from .errors import UserError
from .model import HEADS, INITS, WIDTH_EXPECTED, WIDTHS
from .runtime import PRECISIONS

__all__ = ["TrainConfig", "RunDir", "RECIPES_DIR", "DEFAULT_RECIPE", "REQUIRED", "RESUME_OVERRIDES", "FINETUNE",
           "MEAN_STD", "MAX_SCALE", "flag_of", "default_run_dir", "describe_recipes", "list_recipes", "load_recipe",
           "resolve_config", "resume_config"]

RECIPES_DIR = Path(__file__).with_name("recipes")
DEFAULT_RECIPE = "digits"
REQUIRED = "required"  # a recipe value the user must supply (--data DIR, --init-from A_CHECKPOINT)
# What `--resume` may change: how the run executes, not what it computes (--epochs extends the budget).
RESUME_OVERRIDES = ("epochs", "workers", "device", "precision", "compile", "channels_last")
FINETUNE = ("all", "head")
# None: the --init-from weights' own preprocessing when they record one, else "dataset"
MEAN_STD = ("dataset", "imagenet", "weights")
# Old setting names still read from config.yaml files and recipes written before the rename.
_RENAMED = {"eval_scale": "test_scale", "patience": "lr_patience", "scale": "train_scale"}
# Settings describing the default recipe's digits, not the optimisation: dropped for other --data.
_DATA_SIZES = ("image_size", "train_scale", "test_scale", "lighting", "hflip")
# The net's shape: with --init-from these come from the weights unless a flag (or a recipe) says.
_NET_FIELDS = ("config", "batch_norm", "head", "width")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the paper's ImageNet values (section 3.1); recipes override them."""

    # the net (Table 1); config / batch_norm / head None: as the --init-from weights are
    config: str | None = "A"
    batch_norm: bool | None = False
    head: str | None = "paper"                # "paper": FC-4096 x2 on 7x7; "compact": FC-512 x2 on 1x1
    width: float | None = 1.0                 # multiplier of every layer's channels (1: the paper's; 0.25: 16-128)
    init: str = "paper"                       # "paper" N(0, 0.01), "glorot", "kaiming"
    dropout: float = 0.5
    init_from: str | None = None              # net A (warm start), the same net (section 3.1), or any weights (fine-tune)
    finetune: str = "all"                     # "all": every layer trains; "head": the FC layers on frozen features
    features_lr_mult: float = 1.0             # the conv layers' learning rate, as a fraction of lr
    # the data (section 3.1 augmentation; see data.py); sizes None: chosen by the data
    data: str | None = None                   # None: the digits; "synthetic"; a CIFAR or ImageFolder directory
    image_size: int | None = None             # the crop the net sees
    train_scale: tuple[int, int] | None = None  # (S_min, S_max)
    test_scale: int | None = None             # Q of val/test
    mean_std: str | None = None               # "dataset", "imagenet", "weights"; None: weights' if any, else dataset
    lighting: float = 0.1
    hflip: bool | None = None                 # None: on, except for digits
    synthetic_size: int = 512
    strict: bool = False
    # the optimisation (section 3.1)
    optimizer: str = "sgd"                    # "sgd" (the paper's, with momentum); "adamw" (momentum is its beta1)
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
    channels_last: bool | None = None         # None: the faster memory format for the hardware
    out: str | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["train_scale"] is not None:
            d["train_scale"] = list(d["train_scale"])
        return d


def flag_of(field: str) -> str:
    """The command-line flag that sets TrainConfig `field` (lr_patience -> --lr-patience)."""
    return "--" + field.replace("_", "-")


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
    values = _read_yaml(path, f"recipe {path}")
    base = values.pop("base", None)
    values.pop("description", None)
    values = _renamed(values, f"recipe {path}")
    if base:
        values = {**_load_recipe(str(base), seen + (str(path.resolve()),)), **values}
    return values


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from `path`; any problem is one line naming the file (never a parser dump)."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{what} is not valid YAML{where} ({problem}); expected KEY: VALUE lines") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{what} should be a mapping of settings (KEY: VALUE lines), got {type(values).__name__}")
    return values


def _renamed(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map old setting names onto today's; refuse unknown names, naming the closest flags."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = _RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        out[key] = value
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(out) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown setting {', '.join(unknown)}; expected some of {', '.join(known)}")
    return out


def resolve_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """The recipe (default "digits") with every override that is not None applied, checked.

    Without a recipe, the default recipe's sizes (digits' 32 px crops) apply only to the digits:
    for any other --data the sizes follow the data unless a flag sets them. With --init-from and
    no --config / --batch-norm / --head, the net's shape comes from the weights (a named recipe
    keeps its configuration: the paper's warm start from net A, section 3.1).
    """
    name = recipe or DEFAULT_RECIPE
    values = load_recipe(name)
    given = {k: v for k, v in _renamed(overrides, "--set").items() if v is not None}
    if recipe is None and given.get("data", values.get("data")) not in (None, "digits"):
        for key in _DATA_SIZES:
            values.pop(key, None)
    init_from = given.get("init_from", values.get("init_from"))
    if init_from not in (None, REQUIRED) and str(init_from).lower() != "none":
        for key in _NET_FIELDS:
            if key not in given and not (key == "config" and recipe is not None):
                values[key] = None
    values.update(given)
    values["recipe"] = name
    return _checked(values, source=f"recipe {name}")


def resume_config(run_dir: str | os.PathLike, *, recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """The configuration a run directory was started with, checked against the flags given again.

    The original command line with `--resume RUN_DIR` added is accepted: a flag whose value equals
    the recorded one is fine; only RESUME_OVERRIDES may differ; any other difference is refused,
    naming the flag, the recorded value and the given one.
    """
    run = RunDir(run_dir)
    run.require_checkpoint()
    recorded = _checked(_renamed(run.read_config(), str(run.config)), source=str(run.config))
    given = {k: v for k, v in _renamed(overrides, "--set").items() if v is not None}
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run.path.resolve():
        raise UserError(f"--out {out} differs from --resume {run.path}: drop --out, or give the same directory")
    if recipe is not None and recipe != recorded.recipe:
        raise UserError(f"--recipe {recipe} differs from the recorded recipe {recorded.recipe} in {run.config}")
    if not given:
        return dataclasses.replace(recorded, out=str(run.path))
    candidate = _checked({**recorded.to_dict(), **given}, source="flags")
    for f in dataclasses.fields(TrainConfig):
        old, new = getattr(recorded, f.name), getattr(candidate, f.name)
        if f.name not in RESUME_OVERRIDES and f.name != "out" and old != new:
            raise UserError(f"{flag_of(f.name)} {_show(new)} differs from the recorded {_show(old)} in {run.config}; "
                            f"--resume continues the run as recorded (only {', '.join(map(flag_of, RESUME_OVERRIDES))} "
                            "may change)")
    return dataclasses.replace(candidate, out=str(run.path))


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


_INF = math.inf
# field -> (kind, accepts(value), expected); kind: "int", "float", "bool", "str" (None allowed where the default is None)
_RULES: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "dropout": ("float", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "width": ("float", lambda v: WIDTHS[0] <= v <= WIDTHS[1], WIDTH_EXPECTED),
    "features_lr_mult": ("float", lambda v: 0 <= v < _INF, "a finite number >= 0"),
    "image_size": ("int", lambda v: 1 <= v <= MAX_SCALE, f"an integer in [1, {MAX_SCALE}]"),
    "test_scale": ("int", lambda v: 1 <= v <= MAX_SCALE, f"an integer in [1, {MAX_SCALE}]"),
    "lighting": ("float", lambda v: 0 <= v < _INF, "a finite number >= 0 (0 disables the colour shift)"),
    "synthetic_size": ("int", lambda v: 1 <= v <= 10_000_000, "an integer >= 1"),
    "epochs": ("int", lambda v: 1 <= v <= 1_000_000, "an integer >= 1"),
    "batch_size": ("int", lambda v: 1 <= v <= 1_000_000, "an integer >= 1"),
    "lr": ("float", lambda v: 0 < v < _INF, "a finite number > 0"),
    "momentum": ("float", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": ("float", lambda v: 0 <= v < _INF, "a finite number >= 0"),
    "lr_factor": ("float", lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr_patience": ("int", lambda v: 0 <= v <= 1_000_000, "an integer >= 0"),
    "max_lr_drops": ("int", lambda v: 0 <= v <= 1000, "an integer >= 0"),
    "warmup_epochs": ("float", lambda v: 0 <= v < 1_000_000, "a finite number >= 0"),
    "seed": ("int", lambda v: 0 <= v < 2**63, "an integer >= 0"),
    "workers": ("int", lambda v: 0 <= v <= 1024, "an integer >= 0"),
    "batch_norm": ("bool", lambda v: True, "true or false"),
    "hflip": ("bool", lambda v: True, "true or false"),
    "strict": ("bool", lambda v: True, "true or false"),
    "compile": ("bool", lambda v: True, "true or false"),
    "channels_last": ("bool", lambda v: True, "true or false"),
    "head": ("str", lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    "init": ("str", lambda v: v in INITS, f"one of {', '.join(INITS)}"),
    "finetune": ("str", lambda v: v in FINETUNE, f"one of {', '.join(FINETUNE)}"),
    "optimizer": ("str", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "mean_std": ("str", lambda v: v in MEAN_STD, f"one of {', '.join(MEAN_STD)}"),
    "precision": ("str", lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "config": ("str", lambda v: True, "a configuration name"),
    "data": ("str", lambda v: True, "a directory"),
    "init_from": ("str", lambda v: True, "a weights file"),
    "device": ("str", lambda v: True, "auto, cpu, cuda or cuda:N"),
    "out": ("str", lambda v: True, "a directory"),
    "recipe": ("str", lambda v: True, "a recipe name"),
}


def _checked(values: dict[str, Any], source: str) -> TrainConfig:
    """Validate and normalise settings into a TrainConfig; errors name the flag, what was expected and what was given."""
    values = dict(values)
    for key, what in (("data", "--data DIR (a CIFAR python-format or ImageFolder directory)"),
                      ("init_from", "--init-from A_CHECKPOINT (section 3.1 warm-starts from a trained net A), or "
                                    "--init-from none to train from a random initialisation")):
        if values.get(key) == REQUIRED:
            raise UserError(f"{source} needs {what}")
    if str(values.get("init_from")).lower() == "none":
        values["init_from"] = None
    if values.get("train_scale") is not None:
        values["train_scale"] = _train_scale(values["train_scale"])
    for key, (kind, accepts, expected) in _RULES.items():
        if key in values:
            values[key] = _typed(key, values[key], kind, accepts, expected)
    if values.get("config") is not None:
        try:
            values["config"], bn = config_of(values["config"])
        except ValueError as e:
            raise UserError(f"--config: {e}") from None
        values["batch_norm"] = True if bn else values.get("batch_norm", False)
    elif not values.get("init_from"):
        raise UserError("--config is needed: there are no --init-from weights to take the configuration from")
    if values.get("finetune") == "head" and not values.get("init_from"):
        raise UserError("--finetune head trains the FC layers on frozen features, which need --init-from WEIGHTS; "
                        "without weights use --finetune all")
    _check_sizes(values)
    return TrainConfig(**values)


def _train_scale(value: Any) -> tuple[int, int]:
    scale = [value] if not isinstance(value, (list, tuple)) else list(value)
    ok = len(scale) in (1, 2) and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SCALE
                                      for s in scale) and scale[0] <= scale[-1]
    if not ok:
        raise UserError(f"--train-scale expects S or S_MIN S_MAX (integers in [1, {MAX_SCALE}], S_MIN <= S_MAX), "
                        f"got {_show(value)}")
    return scale[0], scale[-1]


def _typed(key: str, value: Any, kind: str, accepts: Callable[[Any], bool], expected: str) -> Any:
    """`value` as a `kind`, or a UserError naming the flag. YAML 1.1 reads "5e-4" as a string: parse those."""
    if value is None and (TrainConfig.__dataclass_fields__[key].default is None or key in _NET_FIELDS):
        return None
    if isinstance(value, str) and kind in ("int", "float"):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            pass
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    types = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
    if not ok or not accepts(value):
        raise UserError(f"{flag_of(key)} must be {expected}, got {_show(value)}")
    return value


def _check_sizes(values: Mapping[str, Any]) -> None:
    """The crop fits the scales it is cut from (section 3.1: 224 crops of S >= 224 images)."""
    size, scale, q = values.get("image_size"), values.get("train_scale"), values.get("test_scale")
    if size is not None and scale is not None and size > scale[0]:
        raise UserError(f"--image-size {size} must be at most the training scale (--train-scale {_show(scale)}): "
                        "crops are cut from the rescaled image")
    if size is not None and q is not None and size > q:
        raise UserError(f"--image-size {size} must be at most the test scale (--test-scale {q}): "
                        "the centre crop is cut from the rescaled image")
    batch = values.get("batch_size") or 1
    biggest = max([s for s in (q, *(scale or ())) if s] or [0])
    need = batch * biggest * biggest * 4 / 3 * 3 * 4  # decoded float images of one 4:3 batch, in bytes
    if need > _physical_memory():
        raise UserError(f"--batch-size {batch} at scale {biggest} needs about {need / 2**30:.0f} GiB for one batch "
                        f"of rescaled images, more than this machine's {_physical_memory() / 2**30:.0f} GiB: "
                        "lower --test-scale / --train-scale or --batch-size")


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


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
    checkpoint.atomic_write(path, text)


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
            raise UserError(f"--out: cannot create run directory {self.path}: {e.strerror or e}") from None
        if not os.access(self.path / "checkpoints", os.W_OK):
            raise UserError(f"--out: cannot write in run directory {self.path} (no write permission)")
        return self

    def check_new(self, *, force: bool = False) -> None:
        """Refuse to start a run where it would replace something: the user's files, a trained model,
        or an unfinished run (which `--resume` continues). An empty or missing directory is fine."""
        if force or not self.path.exists():
            return
        if not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory; choose another --out")
        if not any(self.path.iterdir()):
            return
        if self.summary.is_file():
            raise UserError(f"--out {self.path} holds a finished run (summary.json): its trained model is kept; "
                            "choose another --out, or add --force to replace it")
        if self.config.is_file() and not (self.last.is_file() or self.best.is_file()):
            return  # a run that stopped before its first checkpoint: nothing in it to lose
        if self.last.is_file() and self.config.is_file():
            raise UserError(f"--out {self.path} already holds an unfinished run (checkpoints/last.pt): continue it "
                            f"with --resume {self.path}, choose another --out, or add --force to start over")
        raise UserError(f"--out {self.path} is a non-empty directory that is not a vggnet run; choose another "
                        "--out (a new or empty directory), or add --force to write into it")

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
        return _read_yaml(self.config, str(self.config))

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
        try:
            checkpoint.atomic_write(self.curves, lambda f: fig.savefig(f, format="png", dpi=100))
        finally:
            plt.close(fig)

    def tensorboard_writer(self, purge_step: int | None = None):
        """A SummaryWriter into RUN_DIR/tensorboard; `purge_step` drops events a resumed run will redo."""
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.tensorboard), purge_step=purge_step)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
