"""STUDY.md, post hoc and exploratory: S jittered in [32, 40] (the crop keeps most of the digit) vs fixed S = 36.

Usage: python benchmarks/study_posthoc_jitter.py A D   (3 seeds each, into /work/studies/jitter-narrow)

Each net is trained exactly as its study run (`vggnet.study.cell_config`) except for the training
scale, then tested dense at Q = 36 and {32, 36, 40} on its seed's test split. Finished runs are kept.
"""

import dataclasses
import json
import sys
from pathlib import Path

from vggnet.checkpoint import atomic_write
from vggnet.data import eval_images
from vggnet.evaluate import evaluate
from vggnet.nets import load_net
from vggnet.runtime import resolve_runtime
from vggnet.study import Cell, cell_config, plan_study
from vggnet.train import train

OUT = Path("/work/studies/jitter-narrow")
SEEDS = 3


def main(configs: list[str]) -> None:
    plan = plan_study("configs", seeds=SEEDS)
    rows = []
    for config in configs:
        for seed in range(SEEDS):
            run = OUT / f"{config}-jit32-40-s{seed}"
            cfg = cell_config(plan, Cell(config=config, scale="jitter", seed=seed), run)
            if not (run / "summary.json").exists():
                train(dataclasses.replace(cfg, train_scale=(32, 40)), resume=(run / "checkpoints" / "last.pt").exists())
            net = load_net(run)
            net.name = run.name
            test = eval_images("study", "test", seed=seed)[0]
            for r in evaluate([net], test, methods=["dense"], scales=[(36,), (32, 36, 40)],
                              runtime=resolve_runtime("cpu")):
                rows.append({**r.as_dict(), "config": config, "seed": seed})
                print(config, seed, rows[-1]["scales"], rows[-1]["top1_error"], flush=True)
    atomic_write(OUT / "results.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
