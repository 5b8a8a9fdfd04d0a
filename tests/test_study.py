"""vggnet study: the grids, resuming after a kill, and the report's statistics on known inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vggnet.train
from vggnet.cli import build_parser
from vggnet.errors import UserError
from vggnet.study import (CONFIGS, Cell, StudyPlan, build_report, paired_stats, plan_study, run_plan, train_cells,
                          verdict)
from vggnet.studydata import CANVAS, SPLIT_SIZES, build_splits


# ----------------------------------------------------------------------------- the grids

def test_grids_hold_the_papers_cells():
    plan = plan_study("all", seeds=2)
    assert len(plan.cells) == 2 * 2 * len(CONFIGS)  # every configuration, fixed and jittered S, per seed
    assert {c.config for c in plan.cells} == set(CONFIGS)
    assert {c.name for c in plan_study("protocols").cells} == {"D-jitter-s0", "E-jitter-s0"}
    assert len(plan_study("all", quick=True).cells) == 3
    assert plan_study("configs", quick=True).epochs == 2


def test_scales_follow_the_paper_in_proportion():
    fixed, jitter = Cell(config="D", scale="fixed", seed=0), Cell(config="D", scale="jitter", seed=0)
    assert fixed.single_q == (36,) and fixed.multi_q == (32, 36, 40)      # Q = S, {S - S/8, S, S + S/8}
    assert jitter.single_q == (54,) and jitter.multi_q == (36, 54, 72)    # middle; {S_min, middle, S_max}


def test_bad_names_and_counts_are_user_errors():
    with pytest.raises(UserError, match="unknown study 'table9'"):
        plan_study("table9")
    with pytest.raises(UserError, match="--seeds and --epochs must be >= 1"):
        plan_study("configs", seeds=0)


def test_cli_parses_the_verb():
    args = build_parser().parse_args(["study", "configs", "--seeds", "3", "--jobs", "2", "--quick", "--out", "x"])
    assert (args.name, args.seeds, args.jobs, args.quick, args.out) == ("configs", 3, 2, True, "x")


# ----------------------------------------------------------------------------- the task

def test_study_task_is_seeded_and_shaped():
    splits, names = build_splits(0)
    x, y = splits["train"]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (SPLIT_SIZES["train"], 3, CANVAS, CANVAS)
    assert names == [str(d) for d in range(10)] and set(y.tolist()) == set(range(10))
    again, _ = build_splits(0)
    assert all(bool((again[k][0] == splits[k][0]).all()) for k in splits)
    other, _ = build_splits(1)
    assert not bool((other["test"][0] == splits["test"][0]).all())


# ----------------------------------------------------------------------------- statistics

def test_paired_stats_match_the_t_interval_by_hand():
    stats = paired_stats([10.0, 12.0, 14.0], [11.0, 14.0, 15.0])   # d = -1, -2, -1
    sd = math.sqrt(1 / 3)                                          # sample sd of d
    half = 4.302653 * sd / math.sqrt(3)                            # t(0.975, df 2) = 4.302653
    assert stats["n"] == 3 and stats["diff"] == pytest.approx(-4 / 3) and stats["sd"] == pytest.approx(sd)
    assert stats["ci"] == pytest.approx((-4 / 3 - half, -4 / 3 + half), abs=1e-5)
    assert stats["p"] == pytest.approx(0.05719, abs=1e-4)         # t = 4 on 2 df, two-sided
    one = paired_stats([3.0], [5.0])
    assert one["diff"] == -2.0 and one["ci"] is None and one["p"] is None
    with pytest.raises(ValueError):
        paired_stats([1.0, 2.0], [1.0])


@pytest.mark.parametrize("ci, expect, says", [
    ((-3.0, -1.0), "lower", "reproduces"),
    ((1.0, 3.0), "lower", "contradicted"),
    ((-1.0, 2.0), "lower", "inconclusive (interval includes 0)"),
    ((-3.0, -1.0), "not_lower", "contradicted (x is better)"),
    ((-1.0, 2.0), "not_lower", "reproduces (no gain beyond 1 point)"),
    ((-3.0, 2.0), "not_lower", "inconclusive (no significant gain, but the interval allows one of up to 3.0 points)"),
    ((-2.0, 0.5), "not_higher", "reproduces (no loss beyond 1 point)"),
    ((-2.0, 4.0), "not_higher", "inconclusive (no significant loss, but the interval allows one of up to 4.0 points)"),
    ((0.5, 2.0), "not_higher", "contradicted (x is worse)"),
])
def test_verdicts(ci, expect, says):
    assert verdict({"n": 3, "diff": sum(ci) / 2, "ci": ci}, expect) == says


def test_verdicts_without_interval():
    assert verdict({"n": 0, "diff": math.nan, "ci": None}, "lower") == "not measured in this grid"
    assert verdict({"n": 1, "diff": -1.0, "ci": None}, "lower") == "same direction as the paper (1 seed: no interval)"
    assert verdict({"n": 1, "diff": 1.0, "ci": None}, "lower") == "opposite direction (1 seed: no interval)"


def _record(config: str, scale: str, seed: int, top1: float, scales=(36,)) -> dict:
    return {"table": "single", "config": config, "scale": scale, "seed": seed, "method": "dense",
            "scales": list(scales), "top1_error": top1, "top5_error": top1 / 4, "images": 100, "net": config}


def test_report_tables_and_claim_lines_from_known_records():
    plan = StudyPlan(name="configs", tables=("configs",), pair=("D", "E"), epochs=1,
                     cells=[Cell(config=c, scale="fixed", seed=s) for c in ("A", "A-LRN") for s in range(3)])
    records = [_record("A", "fixed", s, e) for s, e in enumerate((30.0, 32.0, 34.0))]
    records += [_record("A-LRN", "fixed", s, e) for s, e in enumerate((31.0, 34.0, 35.0))]
    text, claims = build_report(plan, records)
    lrn = next(c for c in claims if c["claim"].startswith("LRN"))
    assert lrn["n"] == 3 and lrn["diff"] == pytest.approx(4 / 3)
    assert lrn["verdict"] == "reproduces (no gain beyond 1 point)"     # d = (1, 2, 1): 95% CI [-0.10, +2.77]
    assert lrn["ci"] == pytest.approx((4 / 3 - 4.303 * (1 / 3) ** 0.5 / 3 ** 0.5, 4 / 3 + 4.303 * (1 / 3) ** 0.5 / 3 ** 0.5), abs=1e-3)
    row = next(line for line in text.splitlines() if line.startswith("| A "))
    assert [c.strip() for c in row.split("|")[1:-1]] == ["A", "36", "36", "32.00 ± 2.00", "8.00 ± 0.50", "3",
                                                          "29.6 / 10.4"]        # mean ± sample sd over seeds
    assert "29.7 / 10.5" in text                                               # the paper's Table 3 beside ours
    assert "LRN does not help: A-LRN vs A: top-1 error difference +1.33 points over 3 seeds" in text
    assert "depth helps: B vs A: not measured in this grid" in text


# ----------------------------------------------------------------------------- resuming

class _Killed(Exception):
    pass


def test_study_runs_and_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    plan = StudyPlan(name="configs", tables=("configs",), pair=("D", "E"), epochs=1, data="synthetic", test_limit=4,
                     cells=[Cell(config="A", scale="fixed", seed=0), Cell(config="A", scale="jitter", seed=0)],
                     train_overrides={"synthetic_size": 16, "batch_size": 8})

    def kill_after_first(cell, summary):
        raise _Killed(cell.name)

    with pytest.raises(_Killed, match="A-fixed-s0"):
        run_plan(plan, tmp_path, on_cell_done=kill_after_first, log=lambda *a: None)
    first = tmp_path / "runs" / "A-fixed-s0" / "summary.json"
    assert first.is_file() and not (tmp_path / "runs" / "A-jitter-s0" / "summary.json").exists()
    stamp = first.stat().st_mtime_ns

    trained = []
    real_train = vggnet.train.train
    monkeypatch.setattr(vggnet.train, "train", lambda cfg, **kw: trained.append(cfg.out) or real_train(cfg, **kw))
    result = run_plan(plan, tmp_path, log=lambda *a: None)
    assert [p.split("/")[-1] for p in trained] == ["A-jitter-s0"]           # only the unfinished cell trained
    assert first.stat().st_mtime_ns == stamp
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["runs"]) == {"A-fixed-s0", "A-jitter-s0"}
    assert {(r["cell"], tuple(r["scales"])) for r in saved["records"]} == {
        ("A-fixed-s0", (36,)), ("A-fixed-s0", (32, 36, 40)), ("A-jitter-s0", (54,)), ("A-jitter-s0", (36, 54, 72))}
    assert (tmp_path / "study.png").stat().st_size > 0 and "Table 3" in result["report"]

    trained.clear()                                                           # a third run: nothing to train
    evals = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "evals").iterdir()}
    run_plan(plan, tmp_path, log=lambda *a: None)
    assert trained == [] and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "evals").iterdir()} == evals


def test_unfinished_run_is_resumed_from_its_checkpoint(tmp_path, monkeypatch):
    plan = StudyPlan(name="configs", tables=("configs",), pair=("D", "E"), epochs=1, data="study",
                     cells=[Cell(config="A", scale=s, seed=0) for s in ("fixed", "jitter")] +
                           [Cell(config="B", scale="fixed", seed=0)])
    (tmp_path / "runs" / "A-jitter-s0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "A-jitter-s0" / "checkpoints" / "last.pt").write_bytes(b"")   # killed after an epoch
    (tmp_path / "runs" / "B-fixed-s0").mkdir(parents=True)
    (tmp_path / "runs" / "B-fixed-s0" / "summary.json").write_text(json.dumps({"test_top1": 50.0, "config": {}}))
    calls = []

    def fake_train(cfg, *, resume=False):
        calls.append((cfg.out.split("/")[-1], resume, cfg.config, tuple(cfg.train_scale), cfg.image_size, cfg.hflip))
        return {"test_top1": 10.0, "wall_seconds": 1.0}

    monkeypatch.setattr(vggnet.train, "train", fake_train)
    summaries = train_cells(plan, tmp_path, log=lambda *a: None)
    assert calls == [("A-fixed-s0", False, "A", (36, 36), 32, False),   # no flips on digits
                     ("A-jitter-s0", True, "A", (36, 72), 32, False)]
    assert summaries["B-fixed-s0"]["test_top1"] == 50.0                     # found, not trained again
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        train_cells(plan, tmp_path, jobs=0)
