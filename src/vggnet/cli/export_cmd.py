"""`vggnet export --weights W --format onnx|torchscript --out FILE [--dense]`."""

from __future__ import annotations

import argparse

from ..nets import load_net
from ..export import FORMATS, export


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the net as ONNX or TorchScript (optionally its dense form)",
                       description="Export a checkpoint for serving. ONNX has a dynamic batch dimension; with --dense "
                                   "the fully-convolutional form takes any image size (dynamic height and width). "
                                   "The file is then run once and compared with PyTorch.")
    p.add_argument("--weights", required=True, metavar="W", help="a checkpoint, run directory or torchvision .pth")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--dense", action="store_true",
                   help="export the dense form: N x 3 x H x W in, (scores, score map) out")
    p.add_argument("--config", help="claim the checkpoint is this configuration (checked key by key)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip running the exported file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    net = load_net(args.weights, config=args.config)
    print(export(net, args.out, format=args.format, dense=args.dense, check=args.check))
    return 0
