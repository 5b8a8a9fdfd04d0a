"""`vggnet train [--recipe NAME] [flags]`: section 3.1's training protocol into a run directory.

With no arguments: configuration A on the embedded digits (recipes/digits.yaml). Flags override
the recipe; `--resume RUN_DIR` continues a run; under `torchrun -m vggnet train` it trains with
DistributedDataParallel. The work lives in vggnet.train; this module only parses and wires.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from ..errors import UserError
from ..model import HEADS, INITS
from ..rundir import describe_recipes, resolve_config, resume_config
from ..runtime import PRECISIONS
from ..train import TrainingDiverged, train

# flag dest -> TrainConfig field, where the names differ
_FIELDS = {"scale": "train_scale", "patience": "lr_patience"}
_SETTINGS = ("config", "batch_norm", "data", "epochs", "batch_size", "lr", "seed", "out", "precision", "init_from",
             "workers", "compile", "device", "strict", "head", "init", "dropout", "image_size", "scale", "eval_scale",
             "patience", "warmup_epochs", "synthetic_size", "lighting")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VGG net (section 3.1) into a run directory",
                       description="Train a VGG net with the paper's protocol. Settings come from a recipe "
                                   "(default: digits, configuration A on the embedded handwritten digits); "
                                   "flags override it. Writes config.yaml, metrics.jsonl, curves.png, TensorBoard "
                                   "events, checkpoints/{last,best}.pt and summary.json into the run directory.")
    a = p.add_argument
    a("--recipe", metavar="NAME|FILE", help="recipe name (see --list-recipes) or a YAML file (default: digits)")
    a("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    a("--config", help="configuration A, A-LRN, B, C, D, E or a model name such as vgg16_bn")
    a("--batch-norm", action=argparse.BooleanOptionalAction, default=None, help="batch norm after every conv")
    a("--head", choices=HEADS, help="paper: FC-4096 x2 on a 7x7 map; compact: FC-512 x2 on 1x1 (small images)")
    a("--init", choices=INITS, help="weight initialisation: paper N(0, 0.01), glorot, kaiming")
    a("--dropout", type=float, metavar="P", help="dropout of the first two FC layers (paper: 0.5)")
    a("--init-from", metavar="CHECKPOINT", help="warm start from a trained net A (section 3.1), or fine-tune a "
                                                "checkpoint of the same configuration; 'none' disables a recipe's")
    a("--data", metavar="DIR", help="omit for the digits; 'synthetic'; a CIFAR-10/100 python-format or ImageFolder directory")
    a("--image-size", type=int, metavar="PX", help="crop size the net sees (default: 32 small images, 224 photos)")
    a("--scale", type=int, nargs="+", metavar="S", help="training scale S, or S_MIN S_MAX for scale jittering")
    a("--eval-scale", type=int, metavar="Q", help="validation/test scale Q (shorter side before the centre crop)")
    a("--lighting", type=float, metavar="STD", help="std of AlexNet's PCA colour shift (0 disables)")
    a("--synthetic-size", type=int, metavar="N", help="training images of --data synthetic")
    a("--strict", action="store_const", const=True, help="stop at the first corrupt image instead of skipping it")
    a("--epochs", type=int, metavar="N", help="epoch budget")
    a("--batch-size", type=int, metavar="N", help="images per step (per process under torchrun)")
    a("--lr", type=float, help="initial learning rate (paper: 0.01)")
    a("--patience", type=int, metavar="N", help="stalled epochs tolerated: lr / 10 after N+1 epochs without a better val top-1")
    a("--warmup-epochs", type=float, metavar="EPOCHS", help="linear learning-rate warm-up (0: none, as in the paper)")
    a("--seed", type=int, metavar="N", help="seed of data split, init, shuffling, augmentation and dropout")
    a("--workers", type=int, metavar="N", help="DataLoader worker processes")
    a("--precision", choices=PRECISIONS, help="auto: bf16 where the hardware has bf16 units, else fp32")
    a("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    a("--out", metavar="RUN_DIR", help="run directory (default runs/<time>-<config>-<data>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe setting (YAML value)")
    p.set_defaults(run=run)


def _overrides(args: argparse.Namespace) -> dict:
    out = {_FIELDS.get(k, k): getattr(args, k) for k in _SETTINGS}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        for name, description in describe_recipes().items():
            print(f"{name:<20} {description}")
        return 0
    overrides = _overrides(args)
    if args.resume:
        if args.recipe or args.out:
            raise UserError("--resume RUN_DIR continues the run recorded there; drop --recipe and --out")
        cfg = resume_config(args.resume, **overrides)
    else:
        cfg = resolve_config(args.recipe, **overrides)
    try:
        train(cfg, resume=bool(args.resume))
    except TrainingDiverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"vggnet train: error: {e}", file=sys.stderr)
        return 1
    return 0
