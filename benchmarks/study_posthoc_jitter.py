"""STUDY.md, post hoc and exploratory: S jittered in [32, 40] (the crop keeps most of the digit) vs fixed S = 36.

Usage: python benchmarks/study_posthoc_jitter.py A D   (3 seeds each, into /work/studies/jitter-narrow)
"""
import dataclasses, json, sys
from pathlib import Path
from vggnet.study import Cell, plan_study, cell_config
from vggnet.train import train
from vggnet.data import eval_images
from vggnet.evaluate import evaluate
from vggnet.nets import load_net
from vggnet.runtime import resolve_runtime
out = Path("/work/studies/jitter-narrow")
plan = plan_study("configs", seeds=3)
rows = []
for config in sys.argv[1:]:
    for seed in range(3):
        run = out / f"{config}-jit32-40-s{seed}"
        cfg = dataclasses.replace(cell_config(plan, Cell(config=config, scale="jitter", seed=seed), run),
                                  train_scale=(32, 40))
        if not (run / "summary.json").exists():
            train(cfg, resume=(run / "checkpoints" / "last.pt").exists())
        net = load_net(run); net.name = run.name
        test = eval_images("study", "test", seed=seed)[0]
        for r in evaluate([net], test, methods=["dense"], scales=[(36,), (32, 36, 40)], runtime=resolve_runtime("cpu")):
            d = r.as_dict() if hasattr(r, "as_dict") else dict(r)
            d.update(config=config, seed=seed); rows.append(d)
            print(config, seed, d["scales"], d["top1_error"], flush=True)
(out / "results.json").write_text(json.dumps(rows, indent=1))
