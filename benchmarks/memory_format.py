"""NCHW against channels_last for VGG training and inference on this machine, per precision.

`vggnet bench` gives two rounds per setting; this script gives one question more rounds, so the
memory-format choice of `runtime.choose_channels_last` rests on more than noise:

    python benchmarks/memory_format.py                      # D: 32 px b128 (compact, BN), 224 px b4; fp32
    python benchmarks/memory_format.py --precision fp32,bf16 --reps 3 --json out.json

Each case interleaves the two formats round by round after one warm-up step and reports the
median seconds per step (or per forward pass) and channels_last / NCHW in images/s.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics

import torch

from vggnet.bench import machine_info, time_interleaved
from vggnet.checkpoint import atomic_write
from vggnet.model import vgg
from vggnet.runtime import Runtime, choose_channels_last
from vggnet.train import train_step

CASES = [  # (what, size, batch, model kwargs)
    ("train", 32, 128, dict(head="compact", batch_norm=True, num_classes=10)),
    ("train", 224, 4, dict(head="paper", batch_norm=False, num_classes=1000)),
    ("infer", 224, 4, dict(head="paper", batch_norm=False, num_classes=1000)),
]


def _step(what: str, model: torch.nn.Module, rt: Runtime, size: int, batch: int, classes: int):
    x = rt.inputs(torch.randn(batch, 3, size, size))
    if what == "infer":  # the caller runs it under inference_mode
        model.eval()
        return lambda: model(x)
    y = torch.randint(0, classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return functools.partial(train_step, model.train(), x, y, opt, rt, check_finite=False)


def measure(config: str, reps: int, precision: str = "fp32", cases: list | None = None) -> list[dict]:
    rows = []
    for what, size, batch, kw in cases or CASES:
        base = vgg(config, init="kaiming", **kw)
        fns = {}
        for cl in (False, True):
            rt = Runtime(torch.device("cpu"), precision, cl)
            model = rt.prepare(copy.deepcopy(base))
            fns["channels_last" if cl else "NCHW"] = _step(what, model, rt, size, batch, kw["num_classes"])
        with torch.inference_mode(what == "infer"):
            times = time_interleaved(fns, budget_s=0, max_reps=reps, min_reps=reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        chosen = choose_channels_last("cpu", precision, training=what == "train", image_size=size)
        rows.append({"what": what, "config": config, "precision": precision, "size": size, "batch": batch, **kw,
                     "reps": reps, "chosen": "channels_last" if chosen[0] else "NCHW", "why": chosen[1],
                     "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
                     "median_s": med, "channels_last_over_nchw": med["NCHW"] / med["channels_last"]})
        print(f"{what} {precision} {config} {size} px batch {batch} ({kw['head']} head{', BN' if kw['batch_norm'] else ''}): "
              f"NCHW {med['NCHW']:.2f} s, channels_last {med['channels_last']:.2f} s, "
              f"channels_last / NCHW {rows[-1]['channels_last_over_nchw']:.2f}x", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="D")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else None
    rows = [r for prec in args.precision.split(",") for r in measure(args.config, args.reps, prec, cases)]
    result = {"machine": machine_info(torch.device("cpu")), "rows": rows}
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
