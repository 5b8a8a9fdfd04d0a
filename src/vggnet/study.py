"""The paper's experiments (Tables 3-6) as grids of ordinary training runs, tested and reported.

    result = run_study("configs", out="studies/configs", seeds=3)   # train, test, write the report
    print(result["report"])

A grid is a set of cells, each one training run (configuration x training scale x seed) in
its own run directory, OUT/runs/<config>-<fixed|jitter>-s<seed>/, which `vggnet eval` reads like
any other. Then each net is tested with the protocols its table needs (section 3.2):

- `configs` (Table 3): A, A-LRN, B, C, D, E at a fixed S and with S jittered; single test scale
  (fixed S: Q = S; jittered: Q = the middle of [S_min, S_max], as the paper's 384 for [256, 512]);
- `multiscale` (Table 4): B, C, D, E, Q averaged over {S - S/8, S, S + S/8} (fixed; the paper's
  S +- 32 at 256) or {S_min, middle, S_max} (jittered; the paper's {256, 384, 512});
- `protocols` (Table 5): D and E jittered, dense, multi-crop and both, over the multi-scale Q;
- `ensemble` (Table 6): the soft-max of jittered D and E averaged;
- `all`: every table from the union of the cells.

Resumable: a cell whose summary.json exists is not trained again; one killed mid-run continues
from its last checkpoint; test results are kept in OUT/evals/ and not recomputed. The report
(OUT/report.md, OUT/results.json, OUT/study.png) gives mean and spread over seeds beside the paper's
figures, and for each of the paper's claims a paired comparison over seeds (t interval).

The nets are the compact-head, batch-norm variants at a quarter of the paper's width (16-128 conv
channels, FC-128 x 2 on the pooled map), trained with AdamW: see `cell_config` for why.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write
from .errors import UserError

__all__ = ["GRIDS", "PAPER", "Cell", "StudyPlan", "plan_study", "train_cells", "evaluate_cells", "paired_stats",
           "verdict", "build_report", "run_study", "run_plan"]

GRIDS = ("configs", "multiscale", "protocols", "ensemble", "all")
CONFIGS = ("A", "A-LRN", "B", "C", "D", "E")
_NEEDS = {"configs": CONFIGS, "multiscale": ("B", "C", "D", "E"), "protocols": ("D", "E"), "ensemble": ("D", "E")}
# --quick: two epochs of A (fixed and jittered S) and B (jittered): every table and protocol runs once.
_QUICK_CELLS = (("A", "fixed"), ("A", "jitter"), ("B", "jitter"))
CROP = 32                      # the study task's canvas (vggnet.studydata.CANVAS) and the nets' crop
FIXED_S = 36                   # the paper's S = 256 for 224 crops, in proportion (256 / 224 * 32)
JITTER_S = (36, 72)            # the paper's [256, 512], in the same proportion
PROTOCOL_LIMIT = 1000          # test images for multi-crop (25 crops per Q, x2 with flips): its cost dominates
STUDY_WIDTH = 0.25             # the nets' channel multiplier: 16-128 conv channels, FC-128 (see cell_config)
# Table 3-6 of the paper: (top-1, top-5) error in %, ILSVRC-2012 val; jittered = S in [256, 512].
PAPER: dict[str, dict[tuple[str, ...], tuple[float, float]]] = {
    "table3": {("A", "fixed"): (29.6, 10.4), ("A-LRN", "fixed"): (29.7, 10.5), ("B", "fixed"): (28.7, 9.9),
               ("C", "fixed"): (28.1, 9.4), ("C", "jitter"): (27.3, 8.8), ("D", "fixed"): (27.0, 8.8),
               ("D", "jitter"): (25.6, 8.1), ("E", "fixed"): (27.3, 9.0), ("E", "jitter"): (25.5, 8.0)},
    "table4": {("B", "fixed"): (28.2, 9.6), ("C", "fixed"): (27.7, 9.2), ("C", "jitter"): (26.3, 8.2),
               ("D", "fixed"): (26.6, 8.6), ("D", "jitter"): (24.8, 7.5), ("E", "fixed"): (26.9, 8.7),
               ("E", "jitter"): (24.8, 7.5)},
    "table5": {("D", "dense"): (24.8, 7.5), ("D", "multicrop"): (24.6, 7.5), ("D", "multicrop+dense"): (24.4, 7.2),
               ("E", "dense"): (24.8, 7.5), ("E", "multicrop"): (24.6, 7.4), ("E", "multicrop+dense"): (24.4, 7.1)},
    "table6": {("ensemble",): (23.7, 6.8)},
}


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One training run of a grid: a configuration of Table 1, a training-scale regime, a seed."""

    config: str
    scale: str  # "fixed" or "jitter"
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config}-{self.scale}-s{self.seed}"

    @property
    def train_scale(self) -> tuple[int, int]:
        return (FIXED_S, FIXED_S) if self.scale == "fixed" else JITTER_S

    @property
    def single_q(self) -> tuple[int]:
        """Section 4.1: Q = S for fixed S, Q = (S_min + S_max) / 2 for jittered S."""
        s_min, s_max = self.train_scale
        return ((s_min + s_max) // 2,)

    @property
    def multi_q(self) -> tuple[int, ...]:
        """Section 4.2: {S - 32, S, S + 32} at S = 256 (here S +- S/8), {S_min, middle, S_max} when jittered."""
        s_min, s_max = self.train_scale
        qs = (s_min - s_min // 8, s_min, s_min + s_min // 8) if s_min == s_max else (s_min, (s_min + s_max) // 2, s_max)
        return tuple(q for q in qs if q >= CROP)


@dataclass(kw_only=True)
class StudyPlan:
    """What a named grid trains and tests."""

    name: str
    tables: tuple[str, ...]          # of "configs", "multiscale", "protocols", "ensemble"
    cells: list[Cell]
    pair: tuple[str, str]            # the two deep nets of Tables 5 and 6 (D and E; quick: A and B)
    epochs: int
    data: str = "study"
    quick: bool = False
    test_limit: int | None = None    # test only the first N images (tests of the machinery)
    train_overrides: dict[str, Any] = field(default_factory=dict)


def plan_study(name: str, *, seeds: int = 1, quick: bool = False, epochs: int | None = None,
               data: str | None = None) -> StudyPlan:
    """The cells of grid `name` ("configs", ..., "all"); `quick` is a smaller grid with 2 epochs."""
    if name not in GRIDS:
        raise UserError(f"unknown study {name!r}; expected one of {', '.join(GRIDS)}")
    if seeds < 1 or (epochs is not None and epochs < 1):
        raise UserError(f"--seeds and --epochs must be >= 1, got {seeds} and {epochs}")
    tables = tuple(_NEEDS) if name == "all" else (name,)
    if quick:
        wanted = set(_QUICK_CELLS)
    else:
        wanted = {(c, s) for t in tables for c in _NEEDS[t]
                  for s in (("jitter",) if t in ("protocols", "ensemble") else ("fixed", "jitter"))}
    order = {c: i for i, c in enumerate(CONFIGS)}
    cells = [Cell(config=c, scale=s, seed=seed) for seed in range(seeds)
             for c, s in sorted(wanted, key=lambda cs: (order[cs[0]], cs[1]))]
    return StudyPlan(name=name, tables=tables, cells=cells, pair=("A", "B") if quick else ("D", "E"),
                     epochs=epochs or (2 if quick else 6), data=data or "study", quick=quick)


# ----------------------------------------------------------------------------- training

def cell_config(plan: StudyPlan, cell: Cell, run_dir: Path):
    """The TrainConfig of one cell: the configuration at a quarter of the paper's width, batch norm, 32 px.

    Why not the paper's SGD and widths (measured, STUDY.md): at full width one grid costs ~16x
    more than a 2-core CPU has in a session, and on this task SGD (lr 0.005-0.1, with or without
    warm-up) and any dropout in the head keep every net at chance for 8+ epochs, while AdamW
    without dropout leaves chance in 1-2 epochs. The depth, LRN, 1x1 and scale questions are
    about the configurations' structure, which a width multiplier keeps.
    """
    from .rundir import resolve_config

    # The paper's scale regimes in proportion to 32 px crops (any --data is seen at that size),
    # no flips on the study's digits (a mirrored 2 is no 2); other data keeps its default.
    settings = dict(config=cell.config, batch_norm=True, head="compact", width=STUDY_WIDTH, init="glorot",
                    dropout=0.0, data=plan.data, image_size=CROP, train_scale=cell.train_scale,
                    hflip=False if plan.data == "study" else None, lighting=0.1, epochs=plan.epochs,
                    optimizer="adamw", batch_size=64, lr=1e-3, weight_decay=0.05, lr_patience=1,
                    seed=cell.seed, workers=0, out=str(run_dir))
    return resolve_config(None, **{**settings, **plan.train_overrides})


def _train_one(plan: StudyPlan, cell: Cell, run_dir: Path, threads: int | None) -> dict[str, Any]:
    """Train one cell: continue a killed run from its checkpoint, start over one that has none."""
    import torch

    from .train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = cell_config(plan, cell, run_dir)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    return train(cfg, resume=resume)


def _summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_cells(plan: StudyPlan, out: Path, *, jobs: int = 1,
                on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None, log=print) -> dict[str, dict]:
    """Train every cell not yet finished (no summary.json); {cell name: summary}.

    `jobs` > 1 trains that many cells at once in subprocesses, each with cores / jobs torch threads.
    `on_cell_done(cell, summary)` runs after each cell finishes (in this process).
    """
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    summaries: dict[str, dict] = {}
    todo = []
    for cell in plan.cells:
        done = _summary(out / "runs" / cell.name)
        if done is not None:
            summaries[cell.name] = done
        else:
            todo.append(cell)
    log(f"study {plan.name}: {len(plan.cells)} cells, {len(plan.cells) - len(todo)} already trained, "
        f"{len(todo)} to train ({plan.epochs} epoch{'s' * (plan.epochs > 1)} each, {jobs} at a time)")
    if jobs == 1:
        for cell in todo:
            summaries[cell.name] = _finish_cell(cell, _train_one(plan, cell, out / "runs" / cell.name, None),
                                                on_cell_done, log)
        return summaries
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, plan, cell, out / "runs" / cell.name, threads): cell for cell in todo}
        for future, cell in futures.items():
            summaries[cell.name] = _finish_cell(cell, future.result(), on_cell_done, log)
    return summaries


def _finish_cell(cell: Cell, summary: dict, on_cell_done, log) -> dict:
    log(f"  {cell.name}: test top-1 {summary['test_top1']:.2f}%  ({summary['wall_seconds']:.0f} s)")
    if on_cell_done is not None:
        on_cell_done(cell, summary)
    return summary


# ----------------------------------------------------------------------------- testing

def _eval_cached(path: Path, compute: Callable[[], list[dict]]) -> list[dict]:
    """Rows stored at `path`, or computed and stored (atomically) there."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rows = compute()
        atomic_write(path, json.dumps(rows, indent=1) + "\n")
        return rows


def evaluate_cells(plan: StudyPlan, out: Path, *, runtime=None, log=print) -> list[dict[str, Any]]:
    """Test every trained cell as its tables need; one record per (net, method, scales, seed).

    Per cell: dense evaluation at the single Q and over the multi-scale Q (Tables 3 and 4), on
    the whole test split. Per seed: the two deep nets of the pair together, dense / multi-crop /
    both over the multi-scale Q and their ensemble (Tables 5 and 6); multi-crop runs 25 crops
    per Q and image, so it sees the first PROTOCOL_LIMIT test images.
    """
    from .data import eval_images
    from .evaluate import evaluate
    from .nets import load_net
    from .runtime import resolve_runtime

    runtime = runtime or resolve_runtime("cpu")
    records: list[dict[str, Any]] = []
    datasets: dict[int, Any] = {}

    def test_split(seed: int):
        if seed not in datasets:
            datasets[seed] = eval_images(plan.data, "test", seed=seed)[0]
        return datasets[seed]

    def rows_to_records(rows, cells: dict[str, Cell], table: str) -> list[dict]:
        out_rows = []
        for r in rows:
            d = r.as_dict() if hasattr(r, "as_dict") else dict(r)
            cell = cells.get(d["net"])
            d.update(table=table, config=cell.config if cell else "ensemble", scale=cell.scale if cell else "jitter",
                     seed=next(iter(cells.values())).seed, cell=cell.name if cell else None)
            out_rows.append(d)
        return out_rows

    for cell in plan.cells:
        run_dir = out / "runs" / cell.name

        def compute(cell=cell, run_dir=run_dir):
            net = load_net(run_dir)
            net.name = cell.name
            log(f"  testing {cell.name}: dense at Q {cell.single_q} and {cell.multi_q}")
            rows = evaluate([net], test_split(cell.seed), methods=["dense"], scales=[cell.single_q, cell.multi_q],
                            runtime=runtime, limit=plan.test_limit)
            return rows_to_records(rows, {cell.name: cell}, "single")

        records += _eval_cached(out / "evals" / f"{cell.name}.json", compute)
    if {"protocols", "ensemble"} & set(plan.tables):
        methods = ["dense", "multicrop", "multicrop+dense"] if "protocols" in plan.tables else ["dense"]
        for seed in sorted({c.seed for c in plan.cells}):
            pair = [Cell(config=c, scale="jitter", seed=seed) for c in plan.pair]

            def compute(pair=pair, seed=seed):
                nets = []
                for cell in pair:
                    nets.append(load_net(out / "runs" / cell.name))
                    nets[-1].name = cell.name
                log(f"  testing {' + '.join(c.name for c in pair)}: {', '.join(methods)} at Q {pair[0].multi_q}")
                limits = [n for n in (plan.test_limit, PROTOCOL_LIMIT if "multicrop" in methods else None) if n]
                rows = evaluate(nets, test_split(seed), methods=methods, scales=[pair[0].multi_q], runtime=runtime,
                                limit=min(limits) if limits else None)
                return rows_to_records(rows, {c.name: c for c in pair}, "pair")

            records += _eval_cached(out / "evals" / f"pair-{'-'.join(plan.pair)}-s{seed}.json", compute)
    return records


# ----------------------------------------------------------------------------- statistics

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _t_quantile(df: int, confidence: float) -> float:
    try:
        from scipy.stats import t
    except ImportError:  # no scipy: the 95% table, or the normal quantile for large df
        if confidence != 0.95:
            raise UserError("confidence levels other than 0.95 need scipy") from None
        return _T975.get(df, 1.96 + 2.4 / df)
    return float(t.ppf(0.5 + confidence / 2, df))


def paired_stats(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """Paired comparison of x and y over seeds (same seed = same data and initial weights' seed).

    d = x - y per seed; returns n, the mean difference, its standard deviation, the t interval
    of the mean at `confidence` (None with 1 seed) and the two-sided paired t-test p-value.
    """
    if len(x) != len(y):
        raise ValueError(f"paired values need equal counts, got {len(x)} and {len(y)}")
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    n = len(d)
    out: dict[str, Any] = {"n": n, "diff": float(d.mean()) if n else math.nan, "sd": None, "ci": None, "p": None}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = _t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    out.update(sd=sd, ci=(out["diff"] - half, out["diff"] + half))
    if sd == 0:
        out["p"] = 0.0 if out["diff"] != 0 else 1.0
    else:
        try:
            from scipy.stats import t
            out["p"] = float(2 * t.sf(abs(out["diff"]) / (sd / math.sqrt(n)), n - 1))
        except ImportError:
            pass
    return out


NO_EFFECT_MARGIN = 1.0  # top-1 error points: "does not help" holds only if the interval rules out a larger gain


def verdict(stats: dict[str, Any], expect: str) -> str:
    """Does the difference x - y (errors) show the paper's claim?

    expect "lower": x's error is lower; "not_lower": x does not beat y (LRN does not help);
    "not_higher": x is no worse than y (D <= E). With 2+ seeds the t interval decides: it lies
    wholly on the claim's side (reproduces), wholly on the other (contradicted), or covers 0
    (inconclusive). A claim of no effect reproduces only when the interval also rules out an
    effect larger than NO_EFFECT_MARGIN points: absence of significance alone is not evidence.
    """
    if stats["n"] == 0:
        return "not measured in this grid"
    diff, ci = stats["diff"], stats["ci"]
    if ci is None:
        if diff == 0 and expect == "lower":
            return "no difference (1 seed: no interval)"
        consistent = {"lower": diff < 0, "not_lower": diff >= 0, "not_higher": diff <= 0}[expect]
        return ("same direction as the paper" if consistent else "opposite direction") + " (1 seed: no interval)"
    low, high = ci
    if expect == "lower":
        return "reproduces" if high < 0 else "contradicted" if low > 0 else "inconclusive (interval includes 0)"
    margin = f"{NO_EFFECT_MARGIN:g} point{'s' * (NO_EFFECT_MARGIN != 1)}"
    if expect == "not_lower":
        if high < 0:
            return "contradicted (x is better)"
        if low >= -NO_EFFECT_MARGIN:
            return f"reproduces (no gain beyond {margin})"
        return f"inconclusive (no significant gain, but the interval allows one of up to {-low:.1f} points)"
    if low > 0:
        return "contradicted (x is worse)"
    if high <= NO_EFFECT_MARGIN:
        return f"reproduces (no loss beyond {margin})"
    return f"inconclusive (no significant loss, but the interval allows one of up to {high:.1f} points)"


# ----------------------------------------------------------------------------- the report

@dataclass(frozen=True, kw_only=True)
class _Claim:
    text: str
    x: tuple[str, str, str, str, str]   # (table, config, scale, method, "single" | "multi")
    y: tuple[str, str, str, str, str] | None  # None: the better of the pair's two members (ensemble claim)
    expect: str
    paper: float                        # the paper's own difference x - y, top-1 error in points


def _claims(plan: StudyPlan) -> list[_Claim]:
    """Section 4's claims as paired comparisons of top-1 error (x - y < 0: x is better)."""
    p, q = plan.pair
    both = "multicrop+dense" if "protocols" in plan.tables else "dense"
    single = lambda c, s="fixed": ("single", c, s, "dense", "single")
    jittered = ("A",) if plan.quick else ("D", "E")  # paper's figures: D and E, Table 3 vs 4
    return [
        _Claim(text="LRN does not help: A-LRN vs A", x=single("A-LRN"), y=single("A"), expect="not_lower", paper=0.1),
        _Claim(text="depth helps: B vs A", x=single("B"), y=single("A"), expect="lower", paper=-0.9),
        _Claim(text="depth helps: D vs B", x=single("D"), y=single("B"), expect="lower", paper=-1.7),
        _Claim(text="depth: E no worse than D", x=single("E"), y=single("D"), expect="not_higher", paper=0.3),
        _Claim(text="3x3 beats 1x1 at equal depth: D vs C", x=single("D"), y=single("C"), expect="lower", paper=-1.1),
        *[_Claim(text=f"scale jittering helps: {c} jittered vs fixed S", x=single(c, "jitter"), y=single(c),
                 expect="lower", paper={"D": -1.4, "E": -1.8}.get(c, math.nan)) for c in jittered],
        *[_Claim(text=f"multi-scale testing helps: {c} {s} S, 3 Q vs 1", x=("single", c, s, "dense", "multi"),
                 y=single(c, s), expect="lower", paper={"fixed": -0.4, "jitter": -0.8}[s])
          for c in jittered[:1] for s in ("fixed", "jitter")],
        _Claim(text=f"dense + multi-crop beats dense: {q} jittered", x=("pair", q, "jitter", "multicrop+dense", "multi"),
               y=("pair", q, "jitter", "dense", "multi"), expect="lower", paper=-0.4),
        _Claim(text=f"dense + multi-crop beats multi-crop: {q} jittered",
               x=("pair", q, "jitter", "multicrop+dense", "multi"), y=("pair", q, "jitter", "multicrop", "multi"),
               expect="lower", paper=-0.2),
        _Claim(text=f"an ensemble of {p} and {q} beats the better one ({both})",
               x=("pair", "ensemble", "jitter", both, "multi"), y=None, expect="lower", paper=-0.7),
    ]


def _index(records: Sequence[dict]) -> dict[tuple, dict[int, tuple[float, float]]]:
    """(table, config, scale, method, single|multi) -> {seed: (top-1, top-5 error)}."""
    idx: dict[tuple, dict[int, tuple[float, float]]] = {}
    for r in records:
        key = (r["table"], r["config"], r["scale"], r["method"], "single" if len(r["scales"]) == 1 else "multi")
        idx.setdefault(key, {})[int(r["seed"])] = (float(r["top1_error"]), float(r["top5_error"]))
    return idx


def _claim_values(claim: _Claim, idx, pair: tuple[str, str]) -> tuple[list[float], list[float]]:
    xs = idx.get(claim.x, {})
    if claim.y is None:  # the better member of the pair, per seed: a fair single-net baseline
        members = [idx.get(("pair", c, "jitter", claim.x[3], "multi"), {}) for c in pair]
        ys = {s: (min(m[s][0] for m in members),) for s in xs if all(s in m for m in members)}
    else:
        ys = idx.get(claim.y, {})
    seeds = sorted(set(xs) & set(ys))
    return [xs[s][0] for s in seeds], [ys[s][0] for s in seeds]


def _signed(x: float) -> str:
    return "not reported" if math.isnan(x) else f"{x:+.1f}"


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def _table(title: str, header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([f"### {title}", "", line(header), line(["-" * w for w in widths]), *map(line, body)])


def _paper(table: str, key: tuple[str, ...]) -> str:
    v = PAPER[table].get(key)
    return f"{v[0]:.1f} / {v[1]:.1f}" if v else "-"


def _table_rows(plan: StudyPlan, idx, records: Sequence[dict]) -> list[str]:
    """The Markdown tables 3-6, each row: errors mean ± sd over seeds, and the paper's figures."""
    head = ["net", "train S", "test Q", "top-1 err (%)", "top-5 err (%)", "seeds", "paper top-1 / top-5"]
    out = []
    for table, q_kind, pkey in (("configs", "single", "table3"), ("multiscale", "multi", "table4")):
        if table not in plan.tables:
            continue
        body = []
        for config in [c for c in CONFIGS if any(k[:2] == ("single", c) for k in idx)]:
            for scale in ("fixed", "jitter"):
                vals = idx.get(("single", config, scale, "dense", q_kind), {})
                if not vals:
                    continue
                cell = Cell(config=config, scale=scale, seed=0)
                s_text = f"{cell.train_scale[0]}" if scale == "fixed" else f"[{cell.train_scale[0]}, {cell.train_scale[1]}]"
                qs = cell.single_q if q_kind == "single" else cell.multi_q
                body.append([config, s_text, ",".join(map(str, qs)), _mean_sd([v[0] for v in vals.values()]),
                             _mean_sd([v[1] for v in vals.values()]), str(len(vals)), _paper(pkey, (config, scale))])
        title = ("Table 3: single test scale (dense)" if table == "configs" else "Table 4: multi-scale test (dense)")
        out.append(_table(title, head, body))
    if "protocols" in plan.tables or "ensemble" in plan.tables:
        body = []
        methods = ("dense", "multicrop", "multicrop+dense") if "protocols" in plan.tables else ("dense",)
        for config in (*plan.pair, "ensemble"):
            for m in methods:
                vals = idx.get(("pair", config, "jitter", m, "multi"), {})
                if vals:
                    key = ("ensemble",) if config == "ensemble" else (config, m)
                    paper = _paper("table6" if config == "ensemble" else "table5", key)
                    name = f"ensemble {' + '.join(plan.pair)}" if config == "ensemble" else config
                    body.append([name, f"[{JITTER_S[0]}, {JITTER_S[1]}]", m, _mean_sd([v[0] for v in vals.values()]),
                                 _mean_sd([v[1] for v in vals.values()]), str(len(vals)),
                                 paper if config == "ensemble" and m == "multicrop+dense" or config != "ensemble"
                                 else "-"])
        counts = sorted({int(r["images"]) for r in records if r["table"] == "pair"})
        limit = f"{'/'.join(map(str, counts))} test images"
        out.append(_table(f"Tables 5 and 6: protocols and ensemble, Q = {','.join(map(str, Cell(config='D', scale='jitter', seed=0).multi_q))} ({limit})",
                          ["net", "train S", "method", "top-1 err (%)", "top-5 err (%)", "seeds", "paper top-1 / top-5"],
                          body))
    return out


def build_report(plan: StudyPlan, records: Sequence[dict], *, header: str = "") -> tuple[str, list[dict]]:
    """(Markdown report, claim results): the tables and one verdict line per claim of the paper."""
    idx = _index(records)
    claims = []
    lines = []
    for claim in _claims(plan):
        xs, ys = _claim_values(claim, idx, plan.pair)
        stats = paired_stats(xs, ys)
        result = {"claim": claim.text, "expect": claim.expect, "paper_diff": claim.paper, **stats,
                  "verdict": verdict(stats, claim.expect)}
        claims.append(result)
        if stats["n"] == 0:
            lines.append(f"- {claim.text}: {result['verdict']}")
            continue
        ci = (f"95% CI [{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}], paired t p = {stats['p']:.3g}"
              if stats["ci"] is not None and stats["p"] is not None else
              f"95% CI [{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}]" if stats["ci"] is not None else "no interval")
        lines.append(f"- {claim.text}: top-1 error difference {stats['diff']:+.2f} points over {stats['n']} "
                     f"seed{'s' * (stats['n'] > 1)} ({ci}); paper {_signed(claim.paper)} -> **{result['verdict']}**")
    text = "\n\n".join([s for s in (header, *_table_rows(plan, idx, records)) if s] +
                       ["### The paper's claims (difference = first minus second, top-1 error points; "
                        "negative = the first is better)", "\n".join(lines)])
    return text + "\n", claims


def _plot(path: Path, plan: StudyPlan, records: Sequence[dict], claims: Sequence[dict]) -> None:
    """study.png: Table 3's top-1 error per net (mean ± sd over seeds) and each claim's difference with its CI."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    idx = _index(records)
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    configs = [c for c in CONFIGS if any(k[1] == c and k[0] == "single" for k in idx)]
    for i, scale in enumerate(("fixed", "jitter")):
        means, sds, xs = [], [], []
        for j, c in enumerate(configs):
            vals = [v[0] for v in idx.get(("single", c, scale, "dense", "single"), {}).values()]
            if vals:
                xs.append(j + (i - 0.5) * 0.38)
                means.append(np.mean(vals))
                sds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
        ax_t.bar(xs, means, width=0.36, yerr=sds, capsize=3, label=f"{scale} S")
    ax_t.set(xticks=range(len(configs)), xticklabels=configs, ylabel="top-1 error (%)",
             title="Table 3 here: single test scale, dense")
    ax_t.legend()
    shown = [c for c in claims if c["n"] > 0]
    for k, c in enumerate(shown):
        lo, hi = c["ci"] if c["ci"] is not None else (c["diff"], c["diff"])
        ax_c.errorbar(c["diff"], k, xerr=[[c["diff"] - lo], [hi - c["diff"]]], fmt="o", color="C0", capsize=3)
        ax_c.plot(c["paper_diff"], k, "x", color="C3")
    ax_c.axvline(0, color="grey", lw=0.8)
    ax_c.set(yticks=range(len(shown)), yticklabels=[c["claim"] for c in shown],
             xlabel="top-1 error difference (points): o here with 95% CI, x paper", title="the paper's claims")
    ax_c.invert_yaxis()
    for ax in (ax_t, ax_c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def run_study(name: str, *, out: str | os.PathLike | None = None, seeds: int = 1, quick: bool = False,
              jobs: int = 1, epochs: int | None = None, data: str | None = None, force: bool = False,
              on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None, log=print) -> dict[str, Any]:
    """Train the grid `name` (skipping finished cells), test it, write OUT/report.md, results.json, study.png.

    Returns {"report": Markdown text, "claims": [...], "records": [...], "out": path}.
    """
    plan = plan_study(name, seeds=seeds, quick=quick, epochs=epochs, data=data)
    out = Path(out or Path("studies") / (f"{name}-quick" if quick else name))
    return run_plan(plan, out, jobs=jobs, force=force, on_cell_done=on_cell_done, log=log)


def run_plan(plan: StudyPlan, out: Path, *, jobs: int = 1, force: bool = False,
             on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None, log=print) -> dict[str, Any]:
    """`run_study` for an explicit plan (a custom grid): train, test, report into `out`."""
    start = time.perf_counter()
    name, quick, seeds = plan.name, plan.quick, len({c.seed for c in plan.cells})
    _check_folder(plan, out, force=force)
    summaries = train_cells(plan, out, jobs=jobs, on_cell_done=on_cell_done, log=log)
    records = evaluate_cells(plan, out, log=log)
    wall = time.perf_counter() - start
    header = (f"## vggnet study {name}{' --quick' if quick else ''}: {len(plan.cells)} training runs "
              f"({seeds} seed{'s' * (seeds > 1)}, {plan.epochs} epoch{'s' * (plan.epochs > 1)} each), data {plan.data}\n\n"
              f"Errors in % on the test split (mean ± sd over seeds); the paper's are ILSVRC-2012 val at 224 px. "
              f"This invocation: {wall / 60:.1f} min (cells trained earlier are not counted).")
    report, claims = build_report(plan, records, header=header)
    results = {"study": name, "quick": quick, "seeds": seeds, "epochs": plan.epochs, "data": plan.data,
               "cells": [c.name for c in plan.cells], "wall_seconds_this_invocation": wall,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in summaries.items()},
               "records": list(records), "claims": claims, "paper": {t: {"/".join(k): v for k, v in d.items()}
                                                                        for t, d in PAPER.items()}}
    atomic_write(out / "report.md", report)
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=list) + "\n")
    _plot(out / "study.png", plan, records, claims)
    log(report)
    log(f"study folder: {out} (report.md, results.json, study.png, runs/, evals/)")
    return {"report": report, "claims": claims, "records": records, "out": out}


_STUDY_FILES = {"runs", "evals", "report.md", "results.json", "study.png"}


def _check_folder(plan: StudyPlan, out: Path, *, force: bool = False) -> None:
    """OUT is new, empty or a study folder (never a folder of someone's files, unless `force`), and a
    finished cell in it was trained for as many epochs as this plan asks."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out expects a folder, got the file {out}")
    if out.is_dir() and not force:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _STUDY_FILES and not p.name.startswith("."))
        if foreign:
            raise UserError(f"--out {out} holds files that are not a vggnet study ({', '.join(foreign[:3])}"
                            f"{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder, or pass --force")
    for cell in plan.cells:
        done = _summary(out / "runs" / cell.name)
        if done is None:
            continue
        cfg = done.get("config", {})
        if cfg.get("epochs") != plan.epochs:
            raise UserError(f"{out} already holds {cell.name} trained for {cfg.get('epochs')} epochs, this study "
                            f"asks {plan.epochs}; choose another --out or the same --epochs")
