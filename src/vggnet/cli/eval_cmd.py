"""`vggnet eval --weights W [W ...] [--data D]`: the paper's test protocols as a Table-5-shaped table."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ..errors import UserError
from ..evaluate import METHODS, check_classes, evaluate, format_table, parse_methods, parse_scales
from ..nets import Net, load_net
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test nets with the paper's protocols: centre crop, dense, multi-crop, multi-scale",
                       description="Evaluate weights (vggnet runs, torchvision, safetensors, Keras, Caffe files) with "
                                   "the test protocols of section 3.2 and print a table shaped like the paper's Table 5.")
    common.add_weights_args(p, several=True)
    p.add_argument("--data", help="digits (default when the checkpoint was trained on them), a CIFAR directory, "
                                  "an ImageFolder tree or a folder of class folders")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split (default test; an ImageFolder without test/ uses val/)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all four)")
    common.add_test_scale_arg(p, several=True, old=("--scales",))
    p.add_argument("--limit", type=common.positive, help="evaluate only the first N images")
    p.add_argument("--workers", type=common.non_negative, default=0, help="image-loading processes (default 0)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    common.add_json_arg(p)
    common.add_flip_args(p)
    common.add_runtime_args(p)
    p.set_defaults(run=run)


def _dataset(args: argparse.Namespace, nets: list[Net], *, draft: int):
    dataset, class_names, where = common.open_test_data(args.data, nets, args.split, strict=args.strict, draft=draft)
    if not class_names:
        raise UserError(f"{where} holds images without labels; eval needs class folders or a labelled dataset "
                        f"(use `vggnet predict` for unlabelled images)")
    return dataset, class_names, where


def run(args: argparse.Namespace) -> int:
    if args.json not in (None, "-"):
        common.check_writable(args.json, flag="--json")
    nets = [load_net(w, config=args.config, num_classes=args.classes, flip=args.flip) for w in args.weights]
    check_classes(nets)
    methods = parse_methods(args.methods)
    scales = [parse_scales(s, nets[0]) for s in (args.test_scale or [None])]
    if not all(scales):
        raise UserError(f"no usable test scale for {nets[0].name}: --test-scale train gives none >= its crop")
    dataset, class_names, where = _dataset(args, nets, draft=max(max(s) for s in scales))
    check_classes(nets, class_names)
    runtime = common.runtime_from(args)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(f"vggnet eval: {n} images of {where} ({args.split}); {runtime}", file=sys.stderr)
    common.attach_engines(nets, runtime, args, images=n)
    with tqdm(total=n, unit="img", desc="eval", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        rows = evaluate(nets, dataset, methods=methods, scales=scales, runtime=runtime, batch_size=args.batch_size,
                        workers=args.workers, limit=args.limit, progress=lambda done: bar.update(done - bar.n))
    if args.json != "-":
        print(format_table(rows))
    common.emit_json(args.json, {"data": where, "split": args.split, "images": rows[0].images, "runtime": str(runtime),
                                 "weights": [str(w) for w in args.weights], "rows": [r.as_dict() for r in rows]})
    return 0
