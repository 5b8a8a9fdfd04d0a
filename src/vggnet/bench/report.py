"""What a benchmark run means: the summary's ratios, the targets of the machine's hardware class, Markdown.

Targets are keyed by hardware class (vggnet.runtime.hardware_class), so a machine is judged only by
what its class can reach:

- "cpu" (no bf16 units, e.g. AVX2 only): the default inference path >= 1.6x torchvision fp32;
  every path >= 0.97x torchvision at the same precision; int8 >= 2.5x torchvision fp32;
- "cpu-bf16" (AMX / AVX-512 BF16) and "cuda": the default path (bf16) >= 3.5x torchvision fp32 and
  >= 85% of the bf16 matmul ceiling; default training >= 1.6x fp32 NCHW at 32 px;
- every class: the input pipeline >= 1.5x the 224 px training rate, and bf16 and int8 top-1
  agreement with fp32 >= 99% where measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["TARGETS", "COMMON_TARGETS", "summarize", "format_markdown"]

_BF16_UNIT_TARGETS = {
    "inference_speedup_vs_torchvision": 3.5,     # default path vs torchvision's default fp32 model
    "inference_fraction_of_bf16_ceiling": 0.85,  # default path's GFLOP/s vs the bf16 matmul ceiling
    "train_speedup_vs_fp32": 1.6,                # default training vs fp32 NCHW at 32 px
}
TARGETS: dict[str, dict[str, float]] = {
    "cpu": {"inference_speedup_vs_torchvision": 1.6,
            "every_path_ratio_min": 0.97,              # each vggnet path vs torchvision at its precision
            "int8_speedup_vs_torchvision": 2.5},
    "cpu-bf16": dict(_BF16_UNIT_TARGETS),
    "cuda": dict(_BF16_UNIT_TARGETS),
}
COMMON_TARGETS = {"pipeline_to_train_ratio": 1.5, "bf16_top1_agreement": 0.99, "int8_top1_agreement": 0.99}
_WHY = {  # a hint where a target is missed; BENCHMARKS.md gives the profile-backed reason
    "inference_speedup_vs_torchvision": "see the profile section: where the default pass spends its time",
    "inference_fraction_of_bf16_ceiling": "convolutions below the GEMM ceiling, or memory-bound ReLU/pooling (profile)",
    "train_speedup_vs_fp32": "see the training rows and BENCHMARKS.md",
    "every_path_ratio_min": "see ratio_by_path for the slowest path",
    "int8_speedup_vs_torchvision": "see the int8 rows and BENCHMARKS.md",
    "pipeline_to_train_ratio": "the loader feeds fewer images than training consumes: raise --workers",
    "bf16_top1_agreement": "bf16 rounding changes the top-1 class of more than 1% of the test images",
    "int8_top1_agreement": "int8 quantisation changes the top-1 class of more than 1% of the test images",
}


def _find(rows: Sequence[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _path(r: dict) -> str:
    return f"{r['engine']} {r['precision']} {r['memory_format']}"


def _inference_ratios(s: dict, inf: list[dict], batches: list[int]) -> None:
    """Default vs torchvision fp32, each vggnet path vs torchvision at its precision, engines vs torchvision."""
    speedups, by_path, engines = [], {}, {"onnxruntime fp32": [], "onnxruntime int8": [], "compile": []}
    for b in batches:
        tv = _find(inf, model="torchvision", batch=b, precision="fp32", memory_format="NCHW")
        default = _find(inf, model="vggnet", batch=b, default=True)
        if default and tv:
            speedups.append(default["images_per_s"] / tv["images_per_s"])
        for r in (r for r in inf if r["model"] == "vggnet" and r["batch"] == b and "emulated" not in r["note"]):
            # eager paths meet torchvision at the same precision and format; other engines its fp32 default
            same = _find(inf, model="torchvision", batch=b, precision=r["precision"], memory_format=r["memory_format"]) \
                if r["engine"] == "eager" else _find(inf, model="torchvision", batch=b, precision="fp32",
                                                      memory_format="NCHW")
            if same and r["precision"] != "int8":
                by_path.setdefault(_path(r), []).append(r["images_per_s"] / same["images_per_s"])
            name = f"{r['engine']} {r['precision']}" if r["engine"] == "onnxruntime" else r["engine"]
            if name in engines and tv:
                engines[name].append(r["images_per_s"] / tv["images_per_s"])
    s["inference_speedup_vs_torchvision"] = _geomean(speedups)
    s["inference_speedup_by_batch"] = dict(zip(map(str, batches), speedups)) if len(speedups) == len(batches) else {}
    s["ratio_by_path"] = {k: _geomean(v) for k, v in by_path.items()}
    s["every_path_ratio_min"] = min(s["ratio_by_path"].values()) if by_path else None
    fp32 = [v for k, v in s["ratio_by_path"].items() if k.startswith("eager fp32")]
    s["fp32_ratio_vs_torchvision"] = _geomean(fp32)
    s["onnxruntime_fp32_speedup_vs_torchvision"] = _geomean(engines["onnxruntime fp32"])
    s["int8_speedup_vs_torchvision"] = _geomean(engines["onnxruntime int8"])
    s["compile_speedup_vs_torchvision"] = _geomean(engines["compile"])


def _ceiling_fractions(s: dict, inf: list[dict], batches: list[int], ceil: dict) -> None:
    top = _find(inf, model="vggnet", batch=batches[-1], default=True) if batches else None
    fp32_c, bf16_c = ceil.get("fp32", {}).get("gflops"), ceil.get("bf16", {}).get("gflops")
    s["default_inference_gflops"] = top["gflops"] if top else None
    s["default_path"] = _path(top) if top else None
    s["inference_fraction_of_bf16_ceiling"] = top["gflops"] / bf16_c if top and bf16_c else None
    s["inference_fraction_of_fp32_ceiling"] = top["gflops"] / fp32_c if top and fp32_c else None


def _training_ratios(s: dict, result: dict, config: str) -> None:
    cl_gain = {}
    small = [r for r in result.get("training", []) if r["config"] == config and r["case"] == "small"]
    large = [r for r in result.get("training", []) if r["config"] == config and r["case"] == "large"]
    d_small, f_small = _find(small, default=True), _find(small, precision="fp32", memory_format="NCHW")
    s["train_speedup_vs_fp32"] = d_small["images_per_s"] / f_small["images_per_s"] if d_small and f_small else None
    for rows in (small, large):
        for prec in ("fp32", "bf16"):
            nchw = _find(rows, precision=prec, memory_format="NCHW")
            cl = _find(rows, precision=prec, memory_format="channels_last")
            if nchw and cl:
                cl_gain[f"training {prec} {rows[0]['size']} px batch {rows[0]['batch']}"] = \
                    cl["images_per_s"] / nchw["images_per_s"]
    s["channels_last_over_nchw"] = cl_gain
    d_large = _find(large, default=True)
    pipe = result.get("pipeline", {}).get("images_per_s", {}).get("vggnet")
    s["pipeline_to_train_ratio"] = pipe / d_large["images_per_s"] if pipe and d_large else None


def summarize(result: dict) -> dict:
    """The ratios the targets name, computed from the measured rows of the first configuration, and the
    targets of the machine's hardware class (only those)."""
    config = result["configs"][0]
    inf = [r for r in result.get("inference", []) if r["config"] == config and r["head"] == "paper"]
    batches = sorted({r["batch"] for r in inf})
    s: dict[str, Any] = {"config": config, "hardware_class": result["machine"]["hardware_class"]}
    _inference_ratios(s, inf, batches)
    _ceiling_fractions(s, inf, batches, result.get("ceilings", {}))
    _training_ratios(s, result, config)
    agreement = result.get("agreement", {}).get("agreement", {})
    s["bf16_top1_agreement"] = agreement.get("bf16")
    s["int8_top1_agreement"] = agreement.get("int8")
    s["targets"] = _targets(s)
    return s


def _targets(s: dict) -> dict:
    """met / not met / not measured for each target of the class, with value, threshold and a hint."""
    out = {}
    for name, threshold in {**TARGETS[s["hardware_class"]], **COMMON_TARGETS}.items():
        value = s.get(name)
        if value is None:
            out[name] = {"value": None, "threshold": threshold, "status": "not measured", "why": ""}
            continue
        status = "met" if value >= threshold else "not met"
        out[name] = {"value": value, "threshold": threshold, "status": status,
                     "why": _WHY.get(name, "") if status != "met" else ""}
    return out


def _md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _head(result: dict) -> list[str]:
    m = result["machine"]
    out = [f"## vggnet bench ({result['plan']['name']} plan), {m['date']}",
           f"{m.get('gpu', m['cpu'])}; {m['cpu_cores']} cores, {m['torch_threads']} torch threads; "
           f"hardware class {m['hardware_class']}; torch {m['torch']}, torchvision {m['torchvision']}, "
           f"onnxruntime {m.get('onnxruntime')}",
           f"command: `{result['command']}`; {result['seconds']} s"]
    if "ceilings" in result:
        c = result["ceilings"]
        out += ["", _md(["matmul", "GFLOP/s", "size"],
                        [["fp32", _f(c["fp32"]["gflops"], 1), c["fp32"]["size"]],
                         ["bf16" + (" (emulated)" if c["bf16"]["emulated"] else ""), _f(c["bf16"]["gflops"], 2),
                          c["bf16"]["size"]]])]
    return out


def _sections(result: dict) -> list[str]:
    out = []
    fp32_c = result.get("ceilings", {}).get("fp32", {}).get("gflops")
    if "inference" in result:
        out += ["", "### inference", _md(
            ["config", "model", "engine", "head", "precision", "format", "px", "batch", "images/s", "ms/batch",
             "GFLOP/s", "of fp32 ceiling", "reps", "note"],
            [[r["config"], r["model"] + (" (default)" if r["default"] else ""), r["engine"], r["head"], r["precision"],
              r["memory_format"], r["size"], r["batch"], _f(r["images_per_s"]), _f(r["ms_per_batch"], 1),
              _f(r["gflops"], 1), _f(r["gflops"] / fp32_c if fp32_c else None), r["reps"], r["note"]]
             for r in result["inference"]])]
    if "training" in result:
        out += ["", "### training", _md(
            ["config", "head", "BN", "precision", "format", "px", "batch", "images/s", "ms/step", "GFLOP/s", "reps"],
            [[r["config"], r["head"], r["batch_norm"], r["precision"] + (" (default)" if r["default"] else ""),
              r["memory_format"], r["size"], r["batch"], _f(r["images_per_s"]), _f(r["ms_per_step"], 0),
              _f(r["gflops"], 1), r["reps"]] for r in result["training"]])]
    if "pipeline" in result:
        p = result["pipeline"]
        out += ["", f"### input pipeline ({p['images']} JPEGs {p['jpeg_size'][0]}x{p['jpeg_size'][1]}, "
                    f"{p['workers']} workers)",
                _md(["pipeline", "images/s"], [[k, _f(v, 1)] for k, v in p["images_per_s"].items()])]
    if "multicrop" in result:
        out += ["", "### dense vs multi-crop vs fc7 descriptor (seconds per image, vggnet.evaluate.posteriors, "
                    "vggnet.features)", _md(
            ["config", "image", "dense", "50-crop", "ratio", "descriptor", "descriptor / dense", "note"],
            [[c, f"{r['image'][0]}x{r['image'][1]}", _f(r["dense_s_per_image"], 3), _f(r["multicrop_s_per_image"], 3),
              _f(r["multicrop_over_dense"], 1), _f(r.get("features_s_per_image", math.nan), 3),
              _f(r.get("features_over_dense", math.nan), 2), r["note"]] for c, r in result["multicrop"].items()])]
    if "profile" in result:
        for c, p in result["profile"].items():
            out += ["", f"### profile: {c}, one pass at {p['size']} px, batch 1 ({p['runtime']}), {p['total_ms']:.0f} ms",
                    _md(["op", "self ms", "share", "calls"],
                        [[o["op"], _f(o["self_ms"], 1), f"{o['share']:.0%}", o["calls"]] for o in p["ops"]])]
    if "agreement" in result:
        a = result["agreement"]
        out += ["", f"### top-1 agreement with fp32 ({a['checkpoint']}, {a['split']} split, {a['images']} images, "
                    f"{a['protocol']} protocol)",
                _md(["precision", "agreement", "top-1", "top-1 change", "seconds"],
                    [[p, f"{a['agreement'][p]:.2%}" if p in a["agreement"] else "-", f"{a['top1'][p]:.2%}",
                      f"{a['top1'][p] - a['top1']['fp32']:+.2%}", _f(a["seconds"][p], 1)] for p in a["top1"]])]
    return out


def format_markdown(result: dict) -> str:
    """The run as Markdown: machine and class, ceilings, each section's table, memory and the class's targets."""
    out = _head(result) + _sections(result)
    mem = result["memory"]
    fresh = all(v["per_section"] for v in mem.values() if isinstance(v, dict))
    out += ["", f"### peak memory (MiB, {'each section' if fresh else 'high-water mark so far'}; "
                f"process peak {mem['rss_peak_mb']}; largest loader worker {mem['children_rss_peak_mb']}, "
                f"pages shared with this process included)",
            _md(["section", "RSS peak", "CUDA max allocated"],
                [[k, v["rss_peak_mb"], v.get("cuda_max_allocated_mb", "-")] for k, v in mem.items() if isinstance(v, dict)])]
    s = result["summary"]
    out += ["", f"### targets ({s['config']}, hardware class {s['hardware_class']})", _md(
        ["ratio", "measured", "target", "status", "why"],
        [[k, _f(t["value"]), f">= {t['threshold']}", t["status"], t["why"]] for k, t in s["targets"].items()])]
    if s.get("ratio_by_path"):
        out += ["", "vggnet / torchvision per path: " + ", ".join(f"{k}: {v:.2f}" for k, v in s["ratio_by_path"].items())]
    if s.get("channels_last_over_nchw"):
        out += ["", "channels_last / NCHW (vggnet training): " +
                ", ".join(f"{k}: {v:.2f}" for k, v in s["channels_last_over_nchw"].items())]
    return "\n".join(out)
