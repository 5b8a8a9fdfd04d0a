"""The `vggnet` command: each verb lives in its own module here and only parses and wires.

A verb module defines `add_parser(subparsers)` and `run(args) -> int`; the work itself lives in
importable functions elsewhere in the package, which the tests call directly.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ..errors import UserError

__all__ = ["main", "build_parser", "VERBS"]

# verb -> module under vggnet.cli; a module that is not there yet is simply not offered.
VERBS = ("info", "train", "eval", "predict", "features", "probe", "export", "convert", "study", "bench")


def _verb_modules():
    for verb in VERBS:
        try:
            yield verb, importlib.import_module(f"{__name__}.{verb}_cmd")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{verb}_cmd":
                raise


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (no usage dump) and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vggnet", description="The VGG networks of Simonyan & Zisserman (2014).")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)
    for _, module in _verb_modules():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a command-line mistake (2), already reported
        return int(e.code or 0)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        # People get one line and status 2, never a traceback, for their own mistakes.
        print(f"vggnet {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vggnet {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Anything else is vggnet's fault, not the user's: show where, and say so.
        traceback.print_exc()
        print(f"vggnet {args.verb}: internal error (a bug in vggnet, not in your input); "
              "please report it with the traceback above", file=sys.stderr)
        return 1
