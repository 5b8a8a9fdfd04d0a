"""`vggnet train [--recipe NAME] [flags]`: section 3.1's training protocol into a run directory.

With no arguments: configuration A on the embedded digits (recipes/digits.yaml). `--data DIR`
trains on any ImageFolder tree with sizes chosen for its images. Flags override the recipe and
are named after the settings they set (`--lr-patience` sets lr_patience; `--set KEY=VALUE` sets
any). `--resume RUN_DIR` continues a run (the original command line with `--resume` added is
accepted); under `torchrun -m vggnet train` it trains with DistributedDataParallel. The work
lives in vggnet.train; this module only parses and wires.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from ..errors import UserError
from ..model import HEADS, INITS
from ..rundir import FINETUNE, MEAN_STD, OPTIMIZERS, describe_recipes, resolve_config, resume_config
from ..train import TrainingFailed, train
from .common import add_force_arg, add_json_arg, add_runtime_args, check_writable, deprecated, emit_json

# Flags whose dest is a TrainConfig field of the same name (numbers are parsed, and refused by name, there).
_SETTINGS = ("config", "batch_norm", "head", "width", "init", "dropout", "init_from", "finetune", "features_lr_mult", "data",
             "image_size", "train_scale", "test_scale", "mean_std", "lighting", "hflip", "synthetic_size", "strict",
             "optimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_factor", "lr_patience", "max_lr_drops",
             "warmup_epochs", "seed", "workers", "precision", "device", "compile", "channels_last", "out")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VGG net (section 3.1) into a run directory",
                       description="Train a VGG net with the paper's protocol. Settings come from a recipe "
                                   "(default: digits, configuration A on the embedded handwritten digits); "
                                   "flags override it. Writes config.yaml, metrics.jsonl, curves.png, TensorBoard "
                                   "events, checkpoints/{last,best}.pt and summary.json into the run directory.")
    a = p.add_argument
    a("--recipe", metavar="NAME|FILE", help="recipe name (see --list-recipes) or a YAML file (default: digits)")
    a("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    _add_net_args(p)
    _add_data_args(p)
    _add_optimiser_args(p)
    a("--seed", metavar="N", help="seed of data split, init, shuffling, augmentation and dropout")
    a("--workers", metavar="N", help="DataLoader worker processes")
    add_runtime_args(p, inference=False, batch_size=None)
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    a("--out", metavar="RUN_DIR", help="run directory (default runs/<time>-<config>-<data>); a new or empty "
                                       "directory, or any with --force")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt (the original "
                                          "flags may be repeated; only --epochs, --workers, --device, --precision, "
                                          "--compile, --channels-last may change)")
    add_force_arg(p, "the contents of --out (another run, or files that are not a vggnet run)")
    add_json_arg(p)
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe setting (YAML value)")
    p.set_defaults(run=run)


def _add_net_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", help="configuration A, A-LRN, B, C, D, E or a model name such as vgg16_bn "
                       "(default with --init-from: the weights')")
    a("--batch-norm", action=argparse.BooleanOptionalAction, default=None, help="batch norm after every conv")
    a("--head", choices=HEADS, help="paper: FC-4096 x2 on a 7x7 map; compact: FC-512 x2 on 1x1 (small images)")
    a("--width", metavar="W", help="multiply every layer's channel count by W (default 1: the paper's nets; "
                                   "0.25: 16-128 conv channels, ~16x cheaper)")
    a("--init", choices=INITS, help="weight initialisation: paper N(0, 0.01), glorot, kaiming")
    a("--dropout", metavar="P", help="dropout of the first two FC layers (paper: 0.5)")
    a("--init-from", metavar="WEIGHTS", help="start from a weights file (any format vggnet reads): net A warm-starts "
                                             "a deeper net (section 3.1); other classes re-initialise the last FC "
                                             "layer (fine-tuning); 'none' disables a recipe's")
    a("--finetune", choices=FINETUNE, help="with --init-from: all layers train (default), or head: the FC layers "
                                           "only, on frozen features")
    a("--features-lr-mult", metavar="X", help="learning rate of the conv layers as a fraction of --lr (default 1)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--data", metavar="DIR", help="omit for the digits; 'synthetic'; a CIFAR-10/100 python-format or ImageFolder "
                                    "directory (sizes then follow its images)")
    a("--image-size", metavar="PX", help="crop size the net sees (default: chosen for the data)")
    a("--train-scale", nargs="+", metavar="S", help="training scale S, or S_MIN S_MAX for scale jittering (section 3.1)")
    a("--scale", dest="train_scale", nargs="+", action=deprecated("--train-scale"), help=argparse.SUPPRESS)
    a("--test-scale", metavar="Q", help="validation/test scale Q: the smaller side before the centre crop (section 3.2)")
    a("--eval-scale", dest="test_scale", action=deprecated("--test-scale"), help=argparse.SUPPRESS)
    a("--mean-std", choices=MEAN_STD, help="input normalisation: the --init-from weights' own (default when they "
                                           "record one), measured on the data (dataset), or ImageNet's")
    a("--lighting", metavar="STD", help="std of AlexNet's PCA colour shift (0 disables)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips (default: on, "
                                                                           "except for digits)")
    a("--synthetic-size", metavar="N", help="training images of --data synthetic")
    a("--strict", action="store_const", const=True, help="stop at the first corrupt image instead of skipping it")


def _add_optimiser_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--optimizer", choices=OPTIMIZERS, help="sgd: the paper's SGD with momentum (default); adamw: AdamW, "
                                              "--momentum is its beta1")
    a("--epochs", metavar="N", help="epoch budget")
    a("--batch-size", metavar="N", help="images per step (per process under torchrun)")
    a("--lr", metavar="LR", help="initial learning rate (paper: 0.01)")
    a("--momentum", metavar="M", help="SGD momentum, or AdamW's beta1 (paper: 0.9)")
    a("--weight-decay", metavar="W", help="L2 weight decay (paper: 5e-4)")
    a("--lr-factor", metavar="F", help="learning-rate decrease factor on a plateau (paper: 0.1)")
    a("--lr-patience", metavar="N", help="stalled epochs tolerated: lr x --lr-factor after N+1 epochs without a "
                                         "better val top-1")
    a("--patience", dest="lr_patience", action=deprecated("--lr-patience"), help=argparse.SUPPRESS)
    a("--max-lr-drops", metavar="N", help="learning-rate decreases before a further plateau ends training (paper: 3)")
    a("--warmup-epochs", metavar="EPOCHS", help="linear learning-rate warm-up (0: none, as in the paper)")


def _overrides(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in _SETTINGS}
    if out["train_scale"] is not None:
        out["train_scale"] = [_int(s, "--train-scale") for s in out["train_scale"]]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. --set momentum=0.9), got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item}: the value is not valid YAML (a number, true/false, a word or [a, b])") from None
    return out


def _int(text: str, flag: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} expects integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        for name, description in describe_recipes().items():
            print(f"{name:<20} {description}")
        return 0
    if args.json not in (None, "-"):
        check_writable(args.json, flag="--json")
    overrides = _overrides(args)
    if args.resume:
        cfg = resume_config(args.resume, recipe=args.recipe, **overrides)
    else:
        cfg = resolve_config(args.recipe, **overrides)
    # With JSON on stdout, the log goes to stderr so stdout stays one JSON document.
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json == "-" else print
    try:
        summary = train(cfg, resume=bool(args.resume), force=args.force, log=log)
    except TrainingFailed as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"vggnet train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        emit_json(args.json, summary)
    return 0
