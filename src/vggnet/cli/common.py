"""Flag groups shared by the verbs, defined once, so a flag means the same thing everywhere.

The grammar (README, "One CLI grammar"):

- `--weights W`: any weights file vggnet reads, or a run directory;
- `--train-scale S | S_MIN S_MAX`: training scale S (section 3.1); `--test-scale Q[,Q...]`: test
  scale(s) Q, the smaller image side before the net sees it (section 3.2);
- `--json [FILE]`: JSON output; alone (or `-`) on stdout, with FILE written atomically;
- `--channels-last / --no-channels-last`: memory format (default: the faster one for the hardware);
- `--device`, `--precision`, `--batch-size`, `--workers`: where and how fast;
- `--out`: where results go; `--force`: replace what is there.

Old spellings (`--scale`, `--scales`, `--eval-scale`) still work for one release and print a
one-line deprecation note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write
from ..errors import UserError
from ..runtime import ENGINES, INFERENCE_PRECISIONS, PRECISIONS

__all__ = ["add_weights_args", "add_flip_args", "add_runtime_args", "add_test_scale_arg", "add_json_arg",
           "add_force_arg", "deprecated", "runtime_from", "attach_engines", "open_test_data", "emit_json", "check_writable", "positive"]


def _int_at_least(minimum: int, words: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    return parse


positive = _int_at_least(1, "a positive integer")      # argparse type: an integer >= 1
non_negative = _int_at_least(0, "an integer >= 0")     # argparse type: an integer >= 0


def deprecated(new: str) -> type[argparse.Action]:
    """An argparse action for an old spelling: stores into the new flag's dest and says so once."""

    class _Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"vggnet: {option_string} is deprecated and will be removed in the next release; "
                  f"use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return _Deprecated


def add_weights_args(p: argparse.ArgumentParser, *, several: bool = False, claims: bool = True) -> None:
    """--weights (one, or several for an ensemble) and the --config / --classes claims about them."""
    p.add_argument("--weights", required=True, nargs="+" if several else None, metavar="W",
                   help="a checkpoint, run directory, torchvision .pth, safetensors, Keras .h5 or Caffe .caffemodel"
                        + ("; several = an ensemble (soft-max averaged)" if several else ""))
    if claims:
        p.add_argument("--config", help="claim the weights are this configuration (A ... E or a model name); "
                                        "a mismatch is reported key by key")
        p.add_argument("--classes", type=positive, help="claim the weights have this many classes (checked like --config)")


def add_flip_args(p: argparse.ArgumentParser) -> None:
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--flip", dest="flip", action="store_true", default=None,
                      help="average over horizontal flips (default: as the net was trained: on, except for digits)")
    flip.add_argument("--no-flip", dest="flip", action="store_false")


def add_runtime_args(p: argparse.ArgumentParser, *, inference: bool = True, batch_size: int | None = 64) -> None:
    """--device, --precision, --channels-last/--no-channels-last, --batch-size (and --engine for inference)."""
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", default=None, choices=INFERENCE_PRECISIONS if inference else PRECISIONS,
                   help="auto: bf16 where the hardware multiplies bf16 natively (CUDA, AMX CPUs), else fp32"
                        + ("; int8: quantised inference" if inference else ""))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: whichever is faster on this hardware)")
    if inference:
        p.add_argument("--engine", default="auto", choices=ENGINES,
                       help="how forward passes run: auto picks the fastest correct engine here; eager is plain PyTorch")
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive, default=batch_size,
                       help=f"network inputs per forward pass (default {batch_size})")


def add_test_scale_arg(p: argparse.ArgumentParser, *, several: bool = True, old: tuple[str, ...] = ()) -> None:
    """--test-scale Q[,Q...]: the test scale(s) Q (section 3.2); `old` spellings still work, with a note."""
    help_text = ("test scale Q, the smaller image side after rescaling; several comma-separated are averaged "
                 "(multi-scale), the flag repeated gives more rows; 'train' = the paper's set for the "
                 "training scale (default: the net's own test scale)") if several else \
        "test scale Q, the smaller image side after rescaling (default: the net's own test scale)"
    action = "append" if several else "store"
    p.add_argument("--test-scale", dest="test_scale", action=action, metavar="Q[,Q...]" if several else "Q",
                   help=help_text)
    for spelling in old:
        p.add_argument(spelling, dest="test_scale", action=_deprecated_append("--test-scale") if several
                       else deprecated("--test-scale"), help=argparse.SUPPRESS)


def _deprecated_append(new: str) -> type[argparse.Action]:
    class _DeprecatedAppend(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"vggnet: {option_string} is deprecated and will be removed in the next release; "
                  f"use {new}", file=sys.stderr)
            items = list(getattr(namespace, self.dest, None) or [])
            setattr(namespace, self.dest, items + [values])

    return _DeprecatedAppend


def runtime_from(args: argparse.Namespace):
    """The Runtime that --device, --precision and --channels-last ask for (None: the automatic choice).

    int8 is an engine's precision: the runtime around it (inputs, pre- and post-processing) is fp32.
    """
    from ..runtime import resolve_runtime

    precision = args.precision or "auto"
    return resolve_runtime(args.device or "auto", "fp32" if precision == "int8" else precision, args.channels_last)


def attach_engines(nets, runtime, args: argparse.Namespace, *, images: int | None = None) -> None:
    """Give each net the engine --engine and --precision ask for (vggnet.engines), and say which and why."""
    from ..engines import attach_engine

    for net in nets:
        line = attach_engine(net, runtime, engine=getattr(args, "engine", "auto"),
                             precision="int8" if args.precision == "int8" else None, images=images)
        print(f"vggnet {args.verb}: {net.name}: {line}", file=sys.stderr)


def open_test_data(data: str | None, nets, split: str, *, strict: bool, draft: int):
    """(dataset, class names, a name for messages) of `split` of `data`, or of the nets' own data.

    Without --data: the embedded digits for digits nets, else the folder the checkpoints record.
    Images are decoded at least at `draft` px (the largest Q), and never below the nets' crop, as
    training's val/test decoded them, so centre-crop figures agree with the run's own.
    """
    from ..data import eval_images

    meta = nets[0].meta
    where = data
    if data is None:
        if all(n.meta.get("name") == "digits" for n in nets):
            where = "digits"
        elif meta.get("data") and all(n.meta.get("data") == meta["data"] for n in nets):
            data = where = meta["data"]  # the data the checkpoint was trained on, as recorded in it
        else:
            raise UserError(f"--data is needed: {nets[0].name} was trained on {meta.get('name', 'unknown data')}, "
                            f"not the embedded digits (for ImageNet weights give an ImageFolder with val/CLASS/*)")
    kwargs = {"seed": int(meta.get("seed") or 0), "strict": strict, "draft": max(draft, nets[0].image_size)}
    if meta.get("name") == "synthetic":
        kwargs.update(image_size=nets[0].image_size, synthetic_size=int(meta.get("synthetic_size") or 512))
    dataset, class_names = eval_images(data, split, **kwargs)
    if len(dataset) == 0:
        raise UserError(f"expected images in {where} ({split}), found none")
    return dataset, class_names, str(where)


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="JSON output: alone or '-' on stdout, with FILE written to that file")


def add_force_arg(p: argparse.ArgumentParser, what: str = "existing output files") -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def check_writable(path: str | Path, *, flag: str) -> Path:
    """Fail before any work if `path` cannot be written (a directory, a missing parent we cannot make)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} expects a file path, got the directory {path}")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag}: cannot write {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise UserError(f"{flag}: cannot write {path}: no write permission in {probe}")
    return path


def emit_json(target: str | None, obj: Any) -> None:
    """Print `obj` as JSON (target '-') or write it atomically to the file `target`."""
    if target is None:
        return
    text = json.dumps(obj, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        atomic_write(target, text)
    except OSError as e:
        raise UserError(f"--json: cannot write {target}: {e.strerror or e}") from None
