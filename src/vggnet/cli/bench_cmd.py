"""`vggnet bench [--quick] [--all] [--device D] [--json FILE] [--agreement CKPT]`: a thin entry over vggnet.bench."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from ..bench import FULL, QUICK, SECTIONS, format_markdown, run_benchmark
from ..configs import config_of
from ..errors import UserError
from ..nets import load_net
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory against torchvision and this machine's matmul ceilings",
                       description="Time inference, training, the input pipeline and dense vs multi-crop "
                                   "evaluation in one process (contenders interleaved, medians reported); "
                                   "print a Markdown table and check the targets of this machine's hardware class "
                                   "(cpu, cpu-bf16 or cuda).")
    p.add_argument("--config", action="append", metavar="CONFIG",
                   help="configuration to measure, repeatable (default D; A, B, D, E have torchvision twins)")
    p.add_argument("--all", action="store_true", help="configurations A, D and E")
    p.add_argument("--quick", action="store_true",
                   help="smaller batches and budgets (inference batch 1 and 4, ...): a few minutes on 2 cores")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="also time the default inference path under torch.compile")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for the pipeline (default: train's)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget of each interleaved group after warm-up (default 15, --quick 1.5)")
    p.add_argument("--sections", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; agreement only with --agreement)")
    p.add_argument("--agreement", metavar="CHECKPOINT", default=None,
                   help="also measure the top-1 agreement of bf16 and int8 with fp32 of this checkpoint or run "
                        "directory on its test split")
    p.add_argument("--agreement-limit", type=int, default=None, metavar="N", help="only the first N test images")
    common.add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configs = ["A", "D", "E"] if args.all else []
    for c in args.config or []:
        try:
            configs.append(config_of(c)[0])
        except ValueError as e:
            raise UserError(str(e)) from None
    configs = list(dict.fromkeys(configs or ["D"]))
    if args.sections is None:
        sections = [s for s in SECTIONS if s != "agreement" or args.agreement]
    else:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if "agreement" in sections and not args.agreement:
        raise UserError("section agreement needs --agreement CHECKPOINT (a digits checkpoint or run directory)")
    if args.agreement and not Path(args.agreement).exists():
        raise UserError(f"--agreement expects a checkpoint file or run directory, got {args.agreement!r} (not found)")
    if args.agreement:
        load_net(args.agreement)  # a file that is not weights is refused now, not after minutes of timing
    if args.json not in (None, "-"):
        common.check_writable(args.json, flag="--json")
    plan = QUICK if args.quick else FULL
    if args.budget is not None:
        if args.budget < 0:
            raise UserError(f"--budget must be >= 0 seconds, got {args.budget}")
        plan = dataclasses.replace(plan, budget_s=args.budget)
    command = "vggnet " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else \
        "vggnet bench"

    def write(result: dict) -> None:
        if args.json not in (None, "-"):  # after every section: a run cut short keeps what it measured
            common.emit_json(args.json, result)

    result = run_benchmark(configs=configs, plan=plan, device=args.device, sections=sections, compile=args.compile,
                           workers=args.workers, agreement=args.agreement, agreement_limit=args.agreement_limit,
                           command=command, on_section=write,  # a run cut short keeps its finished sections
                           progress=lambda s: print(f"vggnet bench: {s} ...", file=sys.stderr, flush=True))
    if args.json == "-":
        common.emit_json("-", result)
    else:
        print(format_markdown(result))
        write(result)
    return 0
