"""`vggnet probe --features TRAIN --test TEST` (or `--weights W --data DIR`): a linear SVM on descriptors."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from ..features import load_features
from ..probe import DEFAULT_CS, check_compatible, plot_confusion, run_probe
from . import common
from .features_cmd import add_extraction_args, extract, load, open_split


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="a linear SVM on descriptors: top-1, mean class recall, mAP, confusion matrix",
                       description="Fit the paper's linear SVM (Appendix B) on training descriptors, C chosen on a "
                                   "held-out stratified 20%, and score it on test descriptors. Either give two files "
                                   "from `vggnet features`, or --weights and --data to describe DIR's train and "
                                   "test (or val) splits first.")
    p.add_argument("--features", metavar="TRAIN", help="training descriptors (a file from `vggnet features`)")
    p.add_argument("--test", metavar="TEST", help="test descriptors of the same net, layer and scales")
    p.add_argument("--C", dest="Cs", default=",".join(map(str, DEFAULT_CS)), metavar="C[,C...]",
                   help="SVM regularisation values to choose from on the held-out 20%% (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the SVM (default 0)")
    p.add_argument("--cache", metavar="DIR", help="with --weights: keep the descriptors in DIR/train.npz and "
                                                  "DIR/test.npz (resumable) instead of a temporary folder")
    p.add_argument("--confusion", metavar="FILE", help="write the confusion matrix as a PNG")
    common.add_json_arg(p)
    add_extraction_args(p)
    for action in p._actions:  # --weights is needed only for the one-step form
        if action.dest == "weights":
            action.required = False
    p.set_defaults(run=run)


def _parse_cs(text: str) -> list[float]:
    try:
        cs = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--C expects comma-separated positive numbers, got {text!r}") from None
    if not cs or any(c <= 0 for c in cs):
        raise UserError(f"--C expects comma-separated positive numbers, got {text!r}")
    return cs


def _describe_splits(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    net, extractor = load(args)
    files = []
    for split in ("train", "test"):
        dataset, class_names, where = open_split(args, net, split, draft=max(extractor.scales))
        if not class_names:
            raise UserError(f"{where} holds images without labels; the probe needs class folders")
        files.append(extract(args, extractor, dataset, class_names, folder / f"{split}.npz", where))
    return files[0], files[1]


def run(args: argparse.Namespace) -> int:
    cs = _parse_cs(args.Cs)
    for flag, path in (("--json", args.json), ("--confusion", args.confusion)):
        if path not in (None, "-"):
            common.check_writable(path, flag=flag)
    if args.weights is not None:
        if args.features or args.test:
            raise UserError("give either --features TRAIN --test TEST or --weights W --data DIR, not both")
        with tempfile.TemporaryDirectory(prefix="vggnet-probe-") as tmp:
            train_path, test_path = _describe_splits(args, Path(args.cache or tmp))
            train, test = load_features(train_path), load_features(test_path)
    elif args.features and args.test:
        train_path, test_path = Path(args.features), Path(args.test)
        train, test = load_features(train_path), load_features(test_path)
    else:
        raise UserError("expected --features TRAIN --test TEST (files from `vggnet features`) or --weights W --data DIR")
    check_compatible(train, test, train_name=str(train_path), test_name=str(test_path))
    print(f"vggnet probe: {len(train.paths)} training and {len(test.paths)} test descriptors of "
          f"{train.meta.get('net')} {train.meta.get('layer')}", file=sys.stderr)
    result = run_probe(train, test, Cs=cs, seed=args.seed, train_name=str(train_path), test_name=str(test_path))
    if args.json != "-":
        print(f"C {result.C:g} (held-out accuracy {', '.join(f'{c:g}: {a:.3f}' for c, a in result.validation.items()) or 'not chosen'})")
        print(f"top-1 accuracy     {result.top1:6.2f} %")
        print(f"mean class recall  {result.mean_class_recall:6.2f} %")
        print(f"mAP                {result.mAP:6.2f}")
    if args.confusion:
        plot_confusion(result, args.confusion)
    common.emit_json(args.json, {"train": str(train_path), "test": str(test_path), "features": train.meta,
                                 **result.as_dict()})
    return 0
