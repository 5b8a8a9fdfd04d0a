"""The benchmark machinery on tiny sizes: timing protocol, JSON shape, and ratios that follow from the rows.

The figures themselves depend on the machine; what must hold everywhere is that every summary
ratio is the quotient of the measured rows it names, and that each target's status follows from
its value (tests never assert a speed).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from vggnet.analysis import count_macs
from vggnet.bench import (COMMON_TARGETS, QUICK, SECTIONS, TARGETS, format_markdown, matmul_ceiling,
                          precision_agreement, run_benchmark, time_interleaved)
from vggnet.bench import sections as bench_sections
from vggnet.checkpoint import save_checkpoint
from vggnet.cli import main
from vggnet.data import build_data
from vggnet.model import vgg
from vggnet.runtime import cpu_has_bf16_units, hardware_class, resolve_runtime

# 32 px everywhere, one round per group: seconds, not minutes, on two cores.
# 32 px everywhere, one round per group, no ONNX export of a 130M-parameter net: seconds on two cores.
TINY = dataclasses.replace(QUICK, name="tiny", image_size=32, infer_batches=(1, 2), small_batch=4, large_batch=2,
                           large_head="compact", multicrop_crop=32, eval_scale=40, engines=(),
                           pipeline_images=6, jpeg_size=(48, 36), budget_s=0.0, max_reps=1,
                           ceiling_sizes=(64,), bf16_emulated_size=32)
SUMMARY_NAMES = ("hardware_class", "inference_speedup_vs_torchvision", "inference_fraction_of_bf16_ceiling",
                 "fp32_ratio_vs_torchvision", "every_path_ratio_min", "int8_speedup_vs_torchvision",
                 "train_speedup_vs_fp32", "pipeline_to_train_ratio")


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # the default path's engine is eager, whatever the class says
        mp.setattr(bench_sections, "default_path", lambda device: (resolve_runtime(str(device)), "eager"))
        return run_benchmark(configs=("A",), plan=TINY, device="cpu", workers=0, command="pytest")


def _row(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row matching {match}, found {len(found)}"
    return found[0]


def _geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs))


def test_time_interleaved_warms_up_then_alternates():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(fns, budget_s=0.0, max_reps=3, warmup=2, min_reps=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_matmul_ceiling_reports_the_size_it_measured():
    out = matmul_ceiling(torch.float32, torch.device("cpu"), sizes=(32, 64), budget_s=0.0, max_reps=1)
    assert out["size"] in (32, 64) and out["gflops"] > 0


def test_result_is_json_with_every_section(result):
    assert json.loads(json.dumps(result)) == result
    for section in ("machine", "ceilings", "inference", "training", "pipeline", "multicrop", "profile", "memory",
                    "summary"):
        assert section in result
    assert result["plan"]["name"] == "tiny" and result["command"] == "pytest"
    assert set(SUMMARY_NAMES) <= set(result["summary"])
    assert result["memory"]["rss_peak_mb"] > 0
    assert result["machine"]["cpu_bf16_units"] == cpu_has_bf16_units()
    assert result["summary"]["hardware_class"] == result["machine"]["hardware_class"] == hardware_class("cpu")


def test_inference_rows_pair_vggnet_with_torchvision(result):
    rows = result["inference"]
    default = resolve_runtime("cpu")
    with torch.device("meta"):
        macs = count_macs(vgg("A"), 32)
    for b in TINY.infer_batches:
        for fmt in ("NCHW", "channels_last"):
            for model in ("vggnet", "torchvision"):
                r = _row(rows, model=model, batch=b, head="paper", precision="fp32", memory_format=fmt)
                assert r["engine"] == "eager"
                assert r["images_per_s"] == pytest.approx(b / (r["ms_per_batch"] / 1e3))
                assert r["gflops"] == pytest.approx(2 * macs * r["images_per_s"] / 1e9)
        d = _row(rows, model="vggnet", batch=b, head="paper", default=True)
        assert (d["precision"], d["memory_format"] == "channels_last") == (default.precision, default.channels_last)
    bf16 = [r for r in rows if r["precision"] == "bf16"]
    if not cpu_has_bf16_units():  # emulated: one batch size, one pass, marked
        assert bf16 and all(r["batch"] == 1 and r["reps"] == 1 and "emulated" in r["note"] for r in bf16)
    else:
        assert {r["model"] for r in bf16} == {"vggnet", "torchvision"}


def test_summary_ratios_come_from_the_rows(result):
    s, inf, train = result["summary"], result["inference"], result["training"]
    speedups, fp32 = [], {"NCHW": [], "channels_last": []}
    for b in TINY.infer_batches:
        tv = _row(inf, model="torchvision", batch=b, head="paper", precision="fp32", memory_format="NCHW")
        speedups.append(_row(inf, model="vggnet", batch=b, head="paper", default=True)["images_per_s"] / tv["images_per_s"])
        for fmt in fp32:
            pair = [_row(inf, model=m, batch=b, head="paper", precision="fp32", memory_format=fmt)["images_per_s"]
                    for m in ("vggnet", "torchvision")]
            fp32[fmt].append(pair[0] / pair[1])
    assert s["inference_speedup_vs_torchvision"] == pytest.approx(_geomean(speedups))
    for fmt, ratios in fp32.items():
        assert s["ratio_by_path"][f"eager fp32 {fmt}"] == pytest.approx(_geomean(ratios))
    assert s["every_path_ratio_min"] == pytest.approx(min(s["ratio_by_path"].values()))
    assert s["int8_speedup_vs_torchvision"] is None  # no engine rows in this plan

    top = _row(inf, model="vggnet", batch=max(TINY.infer_batches), head="paper", default=True)
    assert s["inference_fraction_of_bf16_ceiling"] == pytest.approx(top["gflops"] / result["ceilings"]["bf16"]["gflops"])
    assert s["inference_fraction_of_fp32_ceiling"] == pytest.approx(top["gflops"] / result["ceilings"]["fp32"]["gflops"])

    small_default = _row(train, case="small", default=True)
    small_fp32 = _row(train, case="small", precision="fp32", memory_format="NCHW")
    assert s["train_speedup_vs_fp32"] == pytest.approx(small_default["images_per_s"] / small_fp32["images_per_s"])
    large_default = _row(train, case="large", default=True)
    assert (large_default["size"], large_default["batch"]) == (TINY.image_size, TINY.large_batch)
    assert (small_default["size"], small_default["batch"]) == (TINY.small_size, TINY.small_batch)
    assert s["pipeline_to_train_ratio"] == pytest.approx(
        result["pipeline"]["images_per_s"]["vggnet"] / large_default["images_per_s"])


def test_only_the_classes_targets_are_judged(result):
    targets = result["summary"]["targets"]
    assert set(targets) == set(TARGETS[hardware_class("cpu")]) | set(COMMON_TARGETS)
    for name, t in targets.items():
        if t["value"] is None:
            assert t["status"] == "not measured"
        else:
            assert t["status"] == ("met" if t["value"] >= t["threshold"] else "not met")
    assert targets["bf16_top1_agreement"]["status"] == "not measured"  # no checkpoint given


def test_a_cpu_without_bf16_units_is_judged_by_its_own_targets(result):
    other = {**result, "machine": {**result["machine"], "hardware_class": "cpu"}}
    targets = bench_sections.summarize(other)["targets"]
    assert TARGETS["cpu"]["inference_speedup_vs_torchvision"] == 1.6
    assert "int8_speedup_vs_torchvision" in targets and "inference_fraction_of_bf16_ceiling" not in targets


def test_pipeline_and_multicrop_are_measured(result):
    p = result["pipeline"]
    assert p["images"] == TINY.pipeline_images and p["workers"] == 0
    assert set(p["images_per_s"]) == {"vggnet", "torchvision"} and min(p["images_per_s"].values()) > 0
    m = result["multicrop"]["A"]
    assert m["image"] == [TINY.eval_scale, round(TINY.eval_scale * 4 / 3)] and m["crop"] == TINY.multicrop_crop
    assert m["multicrop_over_dense"] == pytest.approx(m["multicrop_s_per_image"] / m["dense_s_per_image"])
    assert m["engine"].startswith("engine ")
    ops = result["profile"]["A"]["ops"]
    assert ops and sum(o["share"] for o in ops) <= 1 + 1e-9


def test_markdown_names_every_target(result):
    text = format_markdown(result)
    for name in TARGETS[result["summary"]["hardware_class"]]:
        assert f"| {name} |" in text
    assert "### inference" in text and "### training" in text and "torchvision" in text


def test_agreement_of_a_digits_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = build_data(None)
    model = vgg("A", head="compact", num_classes=data.num_classes, init="kaiming").eval()
    path = save_checkpoint(tmp_path / "digits.pt", model, meta=data.meta())
    calls = []
    real = bench_sections.posteriors
    monkeypatch.setattr(bench_sections, "posteriors", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    same = precision_agreement(path, precisions=("fp32",), limit=12)
    assert same["images"] == 12 and same["agreement"] == {} and set(same["top1"]) == {"fp32"}
    assert calls == ["center"]  # the test path users run, not a copy
    bf16 = precision_agreement(path, precisions=("bf16",), limit=4, batch_size=2)
    assert bf16["images"] == 4 and set(bf16["top1"]) == {"fp32", "bf16"}
    assert bf16["agreement"]["bf16"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert bf16["changed"]["bf16"] == round(4 * (1 - bf16["agreement"]["bf16"]))
    # accuracies can differ by at most the share of images whose prediction changed
    assert abs(bf16["top1"]["fp32"] - bf16["top1"]["bf16"]) <= 1 - bf16["agreement"]["bf16"] + 1e-9


def test_cli_writes_json_and_rejects_bad_sections(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--sections", "ceilings", "--budget", "0", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(SUMMARY_NAMES) <= set(saved["summary"]) and saved["plan"]["name"] == "quick"
    assert saved["summary"]["targets"]["pipeline_to_train_ratio"]["status"] == "not measured"
    assert "| fp32 |" in capsys.readouterr().out
    assert main(["bench", "--sections", "ceilings,bogus"]) == 2
    assert main(["bench", "--sections", "agreement"]) == 2
    assert "agreement" in SECTIONS


def test_engine_rows_build_int8_on_an_fp32_runtime(tmp_path):
    """The int8 engine row runs inside an fp32 runtime (int8 is the engine's precision, not the runtime's)."""
    torch.manual_seed(0)
    model = vgg("A", head="compact", num_classes=3).eval()
    plan = dataclasses.replace(TINY, calibration_images=2)
    nets = bench_sections._engine_nets(model, plan, torch.device("cpu"), ["onnxruntime int8"], str(tmp_path))
    net, rt, precision = nets["onnxruntime int8"]
    assert (rt.precision, precision) == ("fp32", "int8")
    out = net.engine("crop", net.model, torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
