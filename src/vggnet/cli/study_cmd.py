"""`vggnet study NAME [--seeds N] [--quick] [--jobs N] [--out DIR] [--epochs N] [--data D]`."""

from __future__ import annotations

import argparse

from ..study import GRIDS, run_study
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run the paper's experiments (Tables 3-6) as training runs and report what holds",
                       description="Train a named grid of nets (each an ordinary run directory under OUT/runs/), test "
                                   "them with the paper's protocols and write a report (OUT/report.md, results.json, "
                                   "study.png) with the paper's figures beside ours and a paired test per claim. "
                                   "Resumable: rerun the same command after a kill; finished runs are not repeated.")
    p.add_argument("name", choices=GRIDS, help="configs (Table 3), multiscale (Table 4), protocols (Table 5), "
                                               "ensemble (Table 6) or all")
    p.add_argument("--seeds", type=common.positive, default=1, help="repeat every cell with seeds 0..N-1 (default 1; "
                                                        "2 or more give confidence intervals)")
    p.add_argument("--quick", action="store_true", help="a small grid (A fixed and jittered, B jittered; 2 epochs)")
    p.add_argument("--jobs", type=common.positive, default=1, help="train this many runs at once, in subprocesses sharing the cores")
    p.add_argument("--epochs", type=common.positive, help="epochs per run (default 6; --quick: 2)")
    p.add_argument("--out", metavar="DIR", help="the study folder (default studies/NAME, studies/NAME-quick)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that holds other files")
    p.add_argument("--data", help="study (default: the embedded task of vggnet.studydata), a CIFAR directory or "
                                  "an ImageFolder tree")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    run_study(args.name, out=args.out, seeds=args.seeds, quick=args.quick, jobs=args.jobs, epochs=args.epochs,
              data=args.data, force=args.force)
    return 0
