"""`vggnet features --weights W --data DIR --out FILE`: Appendix B descriptors of every image, to one file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from ..evaluate import parse_scales
from ..features import AGGREGATES, DEFAULT_LAYER, FORMATS, FeatureExtractor, extract_features
from ..nets import Net, load_net
from . import common


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """What a descriptor is (layer, scales, aggregation, flips) and how it is computed: shared with `probe`."""
    common.add_weights_args(p)
    p.add_argument("--data", help="a folder of images or class folders, an ImageFolder tree, a CIFAR directory "
                                  "(default: the digits when the net was trained on them)")
    p.add_argument("--layer", default=DEFAULT_LAYER,
                   help="the layer whose dense map is average-pooled: fc7 (default, Appendix B), fc6, or an "
                        "activation such as relu5_3 or stage5")
    p.add_argument("--test-scale", dest="test_scale", metavar="Q[,Q...]",
                   help="test scales Q (smaller image side), comma-separated (default: 256,384,512 for 224-px nets, "
                        "the net's own test scale for small-image nets)")
    p.add_argument("--scales", dest="test_scale", action=common.deprecated("--test-scale"), help=argparse.SUPPRESS)
    p.add_argument("--aggregate", default="average", choices=AGGREGATES,
                   help="over scales: average (D columns, the paper's VOC protocol) or stack "
                        "(D x scales columns, its Caltech protocol)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="do not average with the mirrored image's descriptor (Appendix B does; on by default)")
    p.add_argument("--chunk-size", type=common.positive, default=1024,
                   help="images per chunk written to OUT.parts/ (memory bound and resume granularity; default 1024)")
    p.add_argument("--workers", type=common.non_negative, default=0, help="image-loading processes (default 0)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    common.add_force_arg(p, "an existing output, or an unfinished extraction with other arguments")
    common.add_runtime_args(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="the paper's Appendix B image descriptors (dense, multi-scale, L2) to a file",
                       description="Describe every image of a folder with a frozen net: dense pass at each test "
                                   "scale, layer map average-pooled, averaged with the mirror image, scales averaged "
                                   "or stacked, L2-normalised. Written in chunks, resumable, atomically.")
    add_extraction_args(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split of an ImageFolder tree, CIFAR or the digits (default test)")
    p.add_argument("--out", required=True, metavar="FILE", help=f"the features file ({' or '.join(FORMATS)})")
    p.set_defaults(run=run)


def load(args: argparse.Namespace) -> tuple[Net, FeatureExtractor]:
    """The net and the extractor the flags describe."""
    net = load_net(args.weights, config=args.config, num_classes=args.classes)
    scales = parse_scales(args.test_scale, net) if args.test_scale else None
    runtime = common.runtime_from(args)
    extractor = FeatureExtractor(net=net, layer=args.layer, scales=scales, aggregate=args.aggregate, flip=args.flip,
                                 runtime=runtime, batch_size=args.batch_size)
    return net, extractor


def open_split(args: argparse.Namespace, net: Net, split: str, draft: int) -> tuple[Any, list[str], str]:
    """(dataset, class names, a name for messages) of `split` of --data (default: the net's own data)."""
    dataset, class_names, where = common.open_test_data(args.data, [net], split, strict=args.strict, draft=draft)
    return dataset, class_names, f"{where} ({split})"


def extract(args: argparse.Namespace, extractor: FeatureExtractor, dataset: Any, class_names: list[str],
            out: Path, where: str) -> Path:
    """Run the extraction with a progress bar on stderr."""
    common.attach_engines([extractor.net], extractor.runtime, args, images=len(dataset))
    print(f"vggnet: describing {len(dataset)} images of {where}: layer {extractor.layer}, Q "
          f"{','.join(map(str, extractor.scales))}, {extractor.aggregate}, {extractor.dim} columns; "
          f"{extractor.runtime}", file=sys.stderr)
    with tqdm(total=len(dataset), unit="img", desc="features", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        return extract_features(extractor, dataset, out, class_names=class_names, chunk_size=args.chunk_size,
                                workers=args.workers, force=args.force, progress=lambda done: bar.update(done - bar.n))


def run(args: argparse.Namespace) -> int:
    out = common.check_writable(args.out, flag="--out")
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out must end in {' or '.join(FORMATS)}, got {out.name}")
    net, extractor = load(args)
    dataset, class_names, where = open_split(args, net, args.split, draft=max(extractor.scales))
    extract(args, extractor, dataset, class_names, out, where)
    print(f"{out}: {len(dataset)} x {extractor.dim}")
    return 0
