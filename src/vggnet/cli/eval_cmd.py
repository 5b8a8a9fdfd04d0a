"""`vggnet eval --weights W [W ...] [--data D]`: the paper's test protocols as a Table-5-shaped table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..evaluate import METHODS, check_classes, evaluate, format_table, parse_methods, parse_scales
from ..nets import Net, load_net
from ..runtime import PRECISIONS, resolve_runtime


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device, --precision, --no-channels-last and --batch-size, shared by eval and predict."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 where the hardware multiplies bf16 natively (CUDA, AMX CPUs), else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW tensors (channels_last is faster for convolutions on most hardware)")
    p.add_argument("--batch-size", type=int, default=64, help="network inputs per forward pass (default 64)")


def add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="claim the checkpoint is this configuration (A ... E or a model name); "
                                    "a mismatch is reported key by key")
    p.add_argument("--classes", type=int, help="claim the checkpoint has this many classes (checked like --config)")
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--flip", dest="flip", action="store_true", default=None,
                      help="average over horizontal flips (default: as the net was trained: on, except for digits)")
    flip.add_argument("--no-flip", dest="flip", action="store_false")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test nets with the paper's protocols: centre crop, dense, multi-crop, multi-scale",
                       description="Evaluate checkpoints (or torchvision ImageNet .pth files) with the test protocols "
                                   "of section 3.2 and print a table shaped like the paper's Table 5.")
    p.add_argument("--weights", nargs="+", required=True, metavar="W",
                   help="checkpoint files or run directories; several = an ensemble (soft-max averaged)")
    p.add_argument("--data", help="digits (default when the checkpoint was trained on them), a CIFAR directory, "
                                  "an ImageFolder tree or a folder of class folders")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split (default test; an ImageFolder without test/ uses val/)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all four)")
    p.add_argument("--scales", action="append", metavar="Q[,Q...]",
                   help="test scales Q (smaller image side); several in one flag are averaged (multi-scale), "
                        "the flag repeated gives more rows; 'train' = the paper's set for the training scale "
                        "(default: the checkpoint's eval_scale)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--workers", type=int, default=0, help="image-loading processes (default 0)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    add_weights_args(p)
    add_runtime_args(p)
    p.set_defaults(run=run)


def _dataset(args: argparse.Namespace, nets: list[Net]):
    from ..data import eval_images

    meta = nets[0].meta
    data, where = args.data, args.data
    if data is None:
        if all(n.meta.get("name") == "digits" for n in nets):
            where = "digits"
        elif meta.get("data") and all(n.meta.get("data") == meta["data"] for n in nets):
            data = where = meta["data"]  # the data the checkpoint was trained on, as recorded in it
        else:
            raise UserError(f"--data is needed: {nets[0].name} was trained on {meta.get('name', 'unknown data')}, "
                            f"not the embedded digits (for ImageNet weights give an ImageFolder with val/CLASS/*)")
    kwargs = {"seed": int(meta.get("seed") or 0), "strict": args.strict}
    if meta.get("name") == "synthetic":
        kwargs.update(image_size=nets[0].image_size, synthetic_size=int(meta.get("synthetic_size") or 512))
    dataset, class_names = eval_images(data, args.split, **kwargs)
    if not class_names:
        raise UserError(f"{where} holds images without labels; eval needs class folders or a labelled dataset "
                        f"(use `vggnet predict` for unlabelled images)")
    return dataset, class_names, where


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError(f"--batch-size and --limit must be >= 1, got {args.batch_size} and {args.limit}")
    nets = [load_net(w, config=args.config, num_classes=args.classes, flip=args.flip) for w in args.weights]
    check_classes(nets)
    methods = parse_methods(args.methods)
    scales = [parse_scales(s, nets[0]) for s in (args.scales or [None])]
    if not all(scales):
        raise UserError(f"no usable test scale for {nets[0].name}: --scales train gives none >= its crop")
    dataset, class_names, where = _dataset(args, nets)
    check_classes(nets, class_names)
    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(f"vggnet eval: {n} images of {where} ({args.split}); {runtime}", file=sys.stderr)
    with tqdm(total=n, unit="img", desc="eval", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        rows = evaluate(nets, dataset, methods=methods, scales=scales, runtime=runtime, batch_size=args.batch_size,
                        workers=args.workers, limit=args.limit, progress=lambda done: bar.update(done - bar.n))
    print(format_table(rows))
    if args.json:
        out = {"data": where, "split": args.split, "images": rows[0].images, "runtime": str(runtime),
               "weights": [str(w) for w in args.weights], "rows": [r.as_dict() for r in rows]}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
    return 0
