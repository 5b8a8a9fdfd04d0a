"""`vggnet predict --weights W IMAGE ...`: top-5 classes per photo, and a Grad-CAM heat-map with --cam."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from ..checkpoint import atomic_write
from ..errors import UserError
from ..evaluate import METHODS, scale_values
from ..nets import load_net
from ..predict import check_image_size, format_predictions, image_cam, image_paths, overlay, predict, read_image
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (dense evaluation) and draw Grad-CAM heat-maps",
                       description="Top-k classes with probabilities for each image, any size. Dense evaluation "
                                   "(section 3.2) on the image rescaled to the net's test scale by default.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    common.add_weights_args(p)
    p.add_argument("--method", default="dense", choices=METHODS, help="test protocol (default dense)")
    common.add_test_scale_arg(p, several=False, old=("--scale",))
    p.add_argument("--top", type=common.positive, default=5, help="how many classes to list (default 5)")
    p.add_argument("--cam", metavar="OUT.png",
                   help="write the image with a Grad-CAM heat-map of its top class (several images: OUT-<n>-<name>.png)")
    common.add_force_arg(p, "existing heat-map files whose names vggnet derived from --cam")
    common.add_json_arg(p)
    common.add_flip_args(p)
    common.add_runtime_args(p, batch_size=32)
    p.set_defaults(run=run)


def _cam_paths(out: str, images: list[Path], force: bool) -> list[Path]:
    """Where the heat-maps go: OUT itself for one image (the user named it), else derived names,
    which replace existing files only with --force. Checked before any work is done."""
    base = common.check_writable(out, flag="--cam")
    if len(images) == 1:
        return [base]
    suffix = base.suffix or ".png"
    paths = [base.with_name(f"{base.stem}-{i:03d}-{p.stem}{suffix}") for i, p in enumerate(images)]
    taken = [p for p in paths if p.exists()]
    if taken and not force:
        raise UserError(f"--cam would replace {len(taken)} existing file(s) such as {taken[0]}; "
                        "pass --force to replace them or choose another --cam name")
    return paths


def _test_scale(text: str | None) -> int | None:
    if text is None:
        return None
    qs = scale_values(text)
    if len(qs) != 1:
        raise UserError(f"--test-scale expects one test scale for predict, got {text!r}")
    return qs[0]


def run(args: argparse.Namespace) -> int:
    scale = _test_scale(args.test_scale)
    if args.json not in (None, "-"):
        common.check_writable(args.json, flag="--json")
    net = load_net(args.weights, config=args.config, num_classes=args.classes, flip=args.flip)
    paths = image_paths(args.images)
    cam_paths = _cam_paths(args.cam, paths, args.force) if args.cam else []
    images = [read_image(p) for p in paths]
    for path, image in zip(paths, images):
        check_image_size(net, image, str(path))  # refused before any engine is prepared
    runtime = common.runtime_from(args)
    common.attach_engines([net], runtime, args, images=len(images))
    preds = predict(net, images, names=[str(p) for p in paths], method=args.method, scale=scale,
                    top_k=args.top, runtime=runtime, batch_size=args.batch_size)
    cams: list[str | None] = [None] * len(paths)
    for i, (out, image, pred) in enumerate(zip(cam_paths, images, preds)):
        heat = image_cam(net, image, pred.top[0][1], scale=scale, runtime=runtime)
        buffer = io.BytesIO()
        overlay(image, heat).save(buffer, format="PNG" if out.suffix.lower() not in (".jpg", ".jpeg") else "JPEG")
        try:
            atomic_write(out, buffer.getvalue())
        except OSError as e:
            raise UserError(f"cannot write the heat-map {out}: {e.strerror or e}") from None
        cams[i] = str(out)
    if args.json != "-":
        print(format_predictions(preds))
        for c, p in zip(cams, preds):
            if c:
                print(f"Grad-CAM of {p.top[0][0]!r} for {p.image}: {c}")
    common.emit_json(args.json, [{**p.as_dict(), "cam": c} for p, c in zip(preds, cams)])
    return 0
