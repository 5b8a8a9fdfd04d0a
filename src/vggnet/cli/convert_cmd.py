"""`vggnet convert IN OUT [--force]`: any weights file vggnet reads -> a vggnet checkpoint (or .safetensors)."""

from __future__ import annotations

import argparse

from ..weights import convert
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert torchvision, safetensors, timm, Keras or Caffe weights to vggnet's",
                       description="Read a weights file (format recognised from its content) and write it as a vggnet "
                                   "checkpoint with its preprocessing recorded, or as .safetensors if OUT ends so. "
                                   "Caffe and Keras nets are converted to take RGB input.")
    p.add_argument("input", metavar="IN", help="vggnet checkpoint, run directory, torchvision .pth, .safetensors, "
                                               "Keras .h5 or Caffe .caffemodel")
    p.add_argument("output", metavar="OUT", help="file to write (.safetensors: safetensors; anything else: checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_writable(args.output, flag="OUT")
    print(convert(args.input, args.output, force=args.force))
    return 0
