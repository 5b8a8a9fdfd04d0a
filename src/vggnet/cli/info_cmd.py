"""`vggnet info [CONFIG ...] [--layers] [--json]`: Table 2 and the receptive-field walk of section 2.3."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from ..analysis import layer_table, summary
from ..configs import config_of
from ..errors import UserError
from ..model import vgg
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, multiply-accumulates and receptive fields of every configuration",
                       description="Reproduce the paper's Table 2 (parameters) with cost and receptive field; "
                                   "--layers walks one net layer by layer.")
    p.add_argument("configs", nargs="*", metavar="CONFIG", help="A, A-LRN, B, C, D, E or a model name (default: all)")
    p.add_argument("--batch-norm", action="store_true", help="with --layers: the BN variant")
    p.add_argument("--layers", action="store_true", help="list each layer: output shape, receptive field, jump, parameters")
    p.add_argument("--size", type=common.positive, default=224,
                   help="input size for shapes and multiply-accumulates (default 224)")
    p.add_argument("--classes", type=common.positive, default=1000, help="number of classes (default 1000, as Table 2)")
    common.add_json_arg(p)
    p.set_defaults(run=run)


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def run(args: argparse.Namespace) -> int:
    if args.json not in (None, "-"):
        common.check_writable(args.json, flag="--json")
    if args.size < 32:
        raise UserError(f"--size must be at least 32 px, got {args.size}")
    try:
        resolved = [config_of(c) for c in args.configs]
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.layers:
        out = []
        for config, bn in resolved or [("D", False)]:
            bn = bn or args.batch_norm
            with torch.device("meta"):  # shapes only: nothing needs computing
                model = vgg(config, batch_norm=bn, num_classes=args.classes)
            rows = layer_table(model, size=args.size)
            out.append({"config": config, "batch_norm": bn, "layers": [asdict(r) for r in rows]})
            if args.json == "-":
                continue
            print(f"configuration {config}{' (BN)' if bn else ''} at {args.size}x{args.size}")
            print(_table(["layer", "type", "output", "receptive field", "jump", "params"],
                         [[r.name, r.layer, "x".join(map(str, r.output_shape)), r.receptive_field, r.jump,
                           f"{r.params:,}"] for r in rows]))
        common.emit_json(args.json, out)
        return 0
    configs = list(dict.fromkeys(c for c, _ in resolved)) or None
    bn = None if not args.batch_norm else True
    rows = summary(configs, batch_norm=bn, num_classes=args.classes, size=args.size)
    common.emit_json(args.json, [r.as_dict() for r in rows])
    if args.json == "-":
        return 0
    print(_table(["config", "BN", "weight layers", "params", "params (M)", f"MACs @{args.size} (G)", "receptive field"],
                 [[r.config, "yes" if r.batch_norm else "no", r.weight_layers, f"{r.params:,}", f"{r.params_millions:.1f}",
                   f"{r.gmacs:.3f}", r.receptive_field] for r in rows]))
    return 0
