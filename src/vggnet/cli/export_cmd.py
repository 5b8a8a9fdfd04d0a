"""`vggnet export --weights W --format onnx|torchscript|safetensors --out FILE [--dense] [--precision int8]`."""

from __future__ import annotations

import argparse

from ..export import FORMATS, export
from ..nets import load_net
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the net as ONNX, TorchScript or safetensors (optionally its dense form)",
                       description="Export weights for serving. ONNX has a dynamic batch dimension; with --dense "
                                   "the fully-convolutional form takes any image size (dynamic height and width). "
                                   "The file is then run once and compared with PyTorch. --precision int8 writes a "
                                   "statically quantised ONNX file. The file is written atomically: a failed export "
                                   "leaves an existing file as it was.")
    common.add_weights_args(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (replaced if it exists)")
    p.add_argument("--dense", action="store_true",
                   help="export the dense form: N x 3 x H x W in, (scores, score map) out")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                   help="fp32, or int8 (ONNX only): post-training static quantisation calibrated on training images")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip running the exported file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_writable(args.out, flag="--out")
    net = load_net(args.weights, config=args.config, num_classes=args.classes)
    print(export(net, args.out, format=args.format, dense=args.dense, check=args.check, precision=args.precision))
    return 0
