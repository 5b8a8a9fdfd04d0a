"""`vggnet predict --weights W IMAGE ...`: top-5 classes per photo, and a Grad-CAM heat-map with --cam."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..evaluate import METHODS
from ..nets import load_net
from ..predict import format_predictions, image_cam, image_paths, overlay, predict, read_image
from ..runtime import resolve_runtime
from .eval_cmd import add_runtime_args, add_weights_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (dense evaluation) and draw Grad-CAM heat-maps",
                       description="Top-k classes with probabilities for each image, any size. Dense evaluation "
                                   "(section 3.2) on the image rescaled to the net's test scale by default.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    p.add_argument("--weights", required=True, metavar="W", help="a checkpoint, run directory or torchvision .pth")
    p.add_argument("--method", default="dense", choices=METHODS, help="test protocol (default dense)")
    p.add_argument("--scale", type=int, help="Q, the smaller image side after rescaling (default: the net's eval scale)")
    p.add_argument("--top", type=int, default=5, help="how many classes to list (default 5)")
    p.add_argument("--cam", metavar="OUT.png",
                   help="write the image with a Grad-CAM heat-map of its top class (several images: OUT-<name>.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_weights_args(p)
    add_runtime_args(p)
    p.set_defaults(run=run)


def _cam_paths(out: str, images: list[Path]) -> list[Path]:
    base = Path(out)
    if len(images) == 1:
        return [base]
    suffix = base.suffix or ".png"
    return [base.with_name(f"{base.stem}-{i:03d}-{p.stem}{suffix}") for i, p in enumerate(images)]


def run(args: argparse.Namespace) -> int:
    if args.top < 1 or args.batch_size < 1 or (args.scale is not None and args.scale < 1):
        raise UserError(f"--top, --batch-size and --scale must be >= 1, got {args.top}, {args.batch_size}, {args.scale}")
    net = load_net(args.weights, config=args.config, num_classes=args.classes, flip=args.flip)
    paths = image_paths(args.images)
    images = [read_image(p) for p in paths]
    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    preds = predict(net, images, names=[str(p) for p in paths], method=args.method, scale=args.scale,
                    top_k=args.top, runtime=runtime, batch_size=args.batch_size)
    cams: list[str | None] = [None] * len(paths)
    if args.cam:
        for i, (out, image, pred) in enumerate(zip(_cam_paths(args.cam, paths), images, preds)):
            heat = image_cam(net, image, pred.top[0][1], scale=args.scale, runtime=runtime)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                overlay(image, heat).save(out)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot write the heat-map {out}: {e}") from None
            cams[i] = str(out)
    if args.json:
        print(json.dumps([{**p.as_dict(), "cam": c} for p, c in zip(preds, cams)], indent=2))
    else:
        print(format_predictions(preds))
        for c, p in zip(cams, preds):
            if c:
                print(f"Grad-CAM of {p.top[0][0]!r} for {p.image}: {c}")
    return 0
