"""What the benchmark times, section by section, on the functions users run.

- ceilings: the fp32 and bf16 matmul ceilings (GFLOP/s);
- inference: images/s at image_size for each batch, vggnet next to torchvision with identical weights
  (fp32 NCHW, fp32 channels_last, bf16 channels_last), and vggnet through each engine of
  vggnet.engines (onnxruntime fp32 and int8; torch.compile with `compile`); the default row is the
  path `vggnet eval` takes here (`resolve_runtime()` + `attach_engine(engine="auto")` on a test set);
- training: `vggnet.train.train_step` at 32 px (compact head, BN) and image_size (paper head), fp32
  NCHW and channels_last, bf16 where the hardware has bf16 units, and the default runtime for training;
- pipeline: JPEG decode + the paper's augmentation (section 3.1) against torchvision's;
- multicrop: `vggnet.evaluate.posteriors` "dense" against "multicrop" (section 3.2), seconds per image;
- profile: where one default eager pass spends its time (torch.profiler);
- agreement: top-1 agreement of a checkpoint's bf16 and int8 predictions with fp32 (`posteriors`, centre).

On a CPU without bf16 units bf16 is emulated (a VGG-16 pass takes seconds per image), so its rows
use batch 1 and one timed pass and are marked "emulated".
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import count_macs
from ..engines import ORT_MIN_IMAGES, attach_engine, choose_engine
from ..errors import UserError
from ..evaluate import posteriors
from ..features import FeatureExtractor
from ..model import vgg
from ..nets import Net, load_net, net_from_model
from ..runtime import Runtime, cpu_has_bf16_units, resolve_device, resolve_runtime
from .report import summarize
from .timing import machine_info, matmul_ceiling, median, memory, reset_peaks, rss_peak_mb, sync, time_interleaved

__all__ = ["BenchPlan", "FULL", "QUICK", "SECTIONS", "bench_inference", "bench_training", "bench_pipeline",
           "bench_multicrop", "profile_inference", "precision_agreement", "default_workers", "run_benchmark"]

_TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}


@dataclass(frozen=True)
class BenchPlan:
    """Sizes and time budgets of one run. `FULL` is the recorded protocol; `QUICK` trims it to minutes."""

    name: str = "full"
    image_size: int = 224                  # inference, 224 px training, pipeline crop
    infer_batches: tuple[int, ...] = (1, 16)
    small_size: int = 32                   # CIFAR-sized training (compact head)
    small_batch: int = 128
    large_batch: int = 16                  # training at image_size
    large_head: str = "paper"              # ... with the paper's FC-4096 head
    multicrop_head: str = "paper"          # the net of the dense vs multi-crop section
    multicrop_crop: int = 224              # its crop size
    eval_scale: int = 256                  # Q of the dense / multi-crop image (its shorter side)
    pipeline_images: int = 256             # generated JPEGs in the ImageFolder
    jpeg_size: tuple[int, int] = (500, 375)
    budget_s: float = 15.0                 # per interleaved group, after warm-up
    min_reps: int = 2                      # rounds per group, however long they take
    max_reps: int = 25
    large_compare: bool = True             # also time fp32 NCHW / channels_last at image_size (else the default)
    engines: tuple[str, ...] = ("onnxruntime fp32", "onnxruntime int8")
    calibration_images: int = 32           # int8 calibration of the random-weight net (speed only)
    ceiling_sizes: tuple[int, ...] = (1024, 2048, 4096)
    bf16_emulated_size: int = 512          # matmul size for the emulated-bf16 ceiling (seconds, not hours)
    emulated_bf16_models: tuple[str, ...] = ("vggnet", "torchvision")
    emulated_bf16_warmup: int = 1


FULL = BenchPlan()
QUICK = BenchPlan(name="quick", infer_batches=(1, 2), small_batch=16, large_batch=2, multicrop_head="compact",
                  multicrop_crop=32, eval_scale=40, pipeline_images=64, budget_s=1.5, min_reps=1, max_reps=5,
                  large_compare=False, calibration_images=4, ceiling_sizes=(2048,), emulated_bf16_models=("vggnet",),
                  emulated_bf16_warmup=0)
SECTIONS = ("ceilings", "inference", "training", "pipeline", "multicrop", "profile", "agreement")


def _timed(plan: BenchPlan, fns: dict[str, Callable[[], Any]], device: torch.device = torch.device("cpu"),
           ) -> dict[str, list[float]]:
    return time_interleaved(fns, budget_s=plan.budget_s, max_reps=plan.max_reps, min_reps=plan.min_reps,
                            device=device)


def _plain(d: dict) -> dict:
    """Tuples as lists, so the result equals its own JSON round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _bf16_emulated(device: torch.device) -> bool:
    return device.type == "cpu" and not cpu_has_bf16_units()


def _fmt(rt: Runtime) -> str:
    return "channels_last" if rt.channels_last else "NCHW"


def _pair(config: str) -> dict[str, nn.Module]:
    """vggnet's and torchvision's net for `config` holding the same weights (speed must not depend on them)."""
    import torchvision

    if config not in _TORCHVISION:
        return {"vggnet": vgg(config, init="kaiming")}
    theirs = getattr(torchvision.models, _TORCHVISION[config])(weights=None)
    with torch.device("meta"):  # no second initialisation: ours takes (copies of) their tensors
        ours = vgg(config)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()), assign=True)
    return {"vggnet": ours, "torchvision": theirs}


def _macs(config: str, size: int, *, head: str = "paper", batch_norm: bool = False, num_classes: int = 1000) -> int:
    with torch.device("meta"):  # shapes only: nothing is computed
        return count_macs(vgg(config, head=head, batch_norm=batch_norm, num_classes=num_classes), size)


def default_path(device: torch.device) -> tuple[Runtime, str]:
    """The runtime and engine `vggnet eval` takes on a test set here (auto precision, auto engine)."""
    rt = resolve_runtime(str(device))
    engine, _ = choose_engine(rt, rt.precision, images=ORT_MIN_IMAGES)
    return rt, engine


def _infer(model: nn.Module, rt: Runtime, x: torch.Tensor) -> Callable[[], Any]:
    def fn():
        with torch.inference_mode(), rt.autocast():
            return model(x)
    return fn


def _engine_fn(net: Net, rt: Runtime, x: torch.Tensor) -> Callable[[], Any]:
    """One forward pass through the net's engine, as vggnet.evaluate makes it (key "crop")."""
    def fn():
        with torch.inference_mode():
            return net.engine("crop", net.model, x)
    return fn


def _row(config: str, model: str, engine: str, rt: Runtime, precision: str, size: int, batch: int, ts: list[float],
         macs: int, default: bool, head: str = "paper", note: str = "") -> dict:
    t = median(ts)
    return {"config": config, "model": model, "engine": engine, "head": head, "precision": precision,
            "memory_format": _fmt(rt), "size": size, "batch": batch, "default": default,
            "images_per_s": batch / t, "ms_per_batch": 1e3 * t, "images_per_s_best": batch / min(ts), "reps": len(ts),
            "gflops": 2 * macs * batch / t / 1e9, "note": note}


def _engine_nets(model: nn.Module, plan: BenchPlan, device: torch.device, specs: Sequence[str], cache: str,
                 ) -> dict[str, tuple[Net, Runtime, str]]:
    """A Net (sharing `model`'s tensors) with each engine attached: "onnxruntime fp32", "onnxruntime int8", "compile"."""
    out = {}
    calibration = torch.rand(plan.calibration_images, 3, plan.image_size, plan.image_size)
    for spec in specs:
        engine, _, precision = spec.partition(" ")
        # int8 is the engine's precision; the runtime around it (inputs, outputs) is fp32
        rt = resolve_runtime(str(device), "fp32" if precision == "int8" else precision or "auto",
                             channels_last=engine == "compile")
        if engine == "onnxruntime" and device.type != "cpu":
            continue  # onnxruntime's CPU kernels; a GPU run times eager and compiled paths
        net = net_from_model(model, {"image_size": plan.image_size}, name=spec)
        attach_engine(net, rt, engine=engine, precision=precision or rt.precision, cache_dir=cache,
                      calibration=calibration if precision == "int8" else None)
        out[spec] = (net, rt, precision or rt.precision)
    return out


def bench_inference(config: str, plan: BenchPlan, device: torch.device, *, compile: bool = False) -> list[dict]:
    """Images/s at image_size for each batch: vggnet eager next to torchvision, then vggnet through each engine."""
    default_rt, default_engine = default_path(device)
    emulated = _bf16_emulated(device)
    eager = [Runtime(device, "fp32", False), Runtime(device, "fp32", True), Runtime(device, "bf16", True)]
    eager = list(dict.fromkeys([*eager, default_rt]))
    # One copy of each net per memory format (converting in place would change the other rows' net).
    models = {}
    for src, model in _pair(config).items():
        for cl in (True, False):
            rt = Runtime(device, "fp32", cl)
            models[(src, cl)] = rt.prepare(model if not cl else copy.deepcopy(model)).eval()
    specs = list(plan.engines) + (["compile"] if compile else [])
    if default_engine == "onnxruntime":
        specs = list(dict.fromkeys([f"onnxruntime {default_rt.precision}", *specs]))
    macs = _macs(config, plan.image_size)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-onnx-") as cache:
        nets: dict[str, tuple[Net, Runtime, str]] = {}
        for spec in specs:  # compile runs channels_last, onnxruntime takes NCHW input
            nets.update(_engine_nets(models[("vggnet", spec == "compile")], plan, device, [spec], cache))
        if default_engine == "eager":
            # What `vggnet eval` attaches for eager: on a bf16 CPU, the weights cast to bf16 once (CastEngine)
            net = net_from_model(models[("vggnet", default_rt.channels_last)], {"image_size": plan.image_size},
                                 name="default")
            attach_engine(net, default_rt, engine="eager")
            if net.engine is not None:
                nets["cast"] = (net, default_rt, default_rt.precision)
                default_engine = "cast"
        for i, batch in enumerate(plan.infer_batches):
            x = torch.randn(batch, 3, plan.image_size, plan.image_size)
            fast, slow = {}, {}
            for rt in eager:
                for src in ("vggnet", "torchvision"):
                    if (src, rt.channels_last) not in models:
                        continue
                    key = (src, "eager", rt, rt.precision)
                    fn = _infer(models[(src, rt.channels_last)], rt, rt.inputs(x))
                    if rt.precision == "bf16" and emulated:
                        if i == 0 and src in plan.emulated_bf16_models:
                            slow[key] = fn
                    else:
                        fast[key] = fn
            for spec, (net, rt, precision) in nets.items():
                fast[("vggnet", spec.split()[0], rt, precision)] = _engine_fn(net, rt, rt.inputs(x))
            groups = [(_timed(plan, {str(k): f for k, f in fast.items()}, device), fast, "")]
            if slow:
                times = time_interleaved({str(k): f for k, f in slow.items()}, budget_s=0, max_reps=1,
                                         warmup=plan.emulated_bf16_warmup, device=device)
                groups.append((times, slow, "emulated bf16 (CPU lacks bf16 units): one timed pass"))
            for times, fns, note in groups:
                for (src, engine, rt, precision) in fns:
                    default = src == "vggnet" and engine == default_engine and precision == default_rt.precision \
                        and (engine != "eager" or rt == default_rt)
                    rows.append(_row(config, src, engine, rt, precision, plan.image_size, batch,
                                     times[str((src, engine, rt, precision))], macs, default, note=note))
        del nets
    return rows


def _train_runtimes(plan: BenchPlan, device: torch.device, case: str, size: int) -> tuple[list[Runtime], Runtime]:
    """fp32 and (where the hardware has bf16 units) bf16, NCHW and channels_last, plus the training default."""
    default = resolve_runtime(str(device), training=True, image_size=size)
    if case == "large" and not plan.large_compare:
        return [default], default
    precisions = ["fp32"] + ([] if _bf16_emulated(device) else ["bf16"])
    wanted = [Runtime(device, p, cl) for p in precisions for cl in (False, True)]
    return list(dict.fromkeys([*wanted, default])), default


def bench_training(config: str, plan: BenchPlan, device: torch.device) -> list[dict]:
    """Training images/s (`vggnet.train.train_step`) at small_size (compact head, BN) and image_size (paper head)."""
    from ..train import train_step  # loaded on use: `vggnet info` need not import the trainer
    rows = []
    cases = [("small", plan.small_size, plan.small_batch, dict(head="compact", batch_norm=True, num_classes=10)),
             ("large", plan.image_size, plan.large_batch, dict(head=plan.large_head, batch_norm=False, num_classes=1000))]
    for case, size, batch, kw in cases:
        base = vgg(config, init="kaiming", **kw)
        runtimes, default = _train_runtimes(plan, device, case, size)
        fns, keys = {}, {}
        for rt in runtimes:
            model = rt.prepare(copy.deepcopy(base)).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=rt.precision == "fp16")
            x = rt.inputs(torch.randn(batch, 3, size, size))
            y = torch.randint(0, kw["num_classes"], (batch,), device=device)
            name = f"{'default ' if rt == default else ''}{rt.precision} {_fmt(rt)}"
            # `vggnet train`'s own step (forward under autocast, cross-entropy, backward, SGD update).
            fns[name] = functools.partial(train_step, model, x, y, opt, rt, scaler=scaler, check_finite=False)
            keys[name] = rt
        del base
        times = _timed(plan, fns, device)
        macs = _macs(config, size, **kw)
        for name, ts in times.items():
            t, rt = median(ts), keys[name]
            rows.append({"config": config, "case": case, "head": kw["head"], "batch_norm": kw["batch_norm"],
                         "precision": rt.precision, "memory_format": _fmt(rt), "size": size, "batch": batch,
                         "default": rt == default, "default_reason": default.reason if rt == default else "",
                         "images_per_s": batch / t, "ms_per_step": 1e3 * t, "images_per_s_best": batch / min(ts),
                         "reps": len(ts), "gflops": 2 * 3 * macs * batch / t / 1e9})  # backward ~ 2x forward
        del fns
    return rows


def default_workers() -> int:
    """DataLoader workers `vggnet train` uses unless told otherwise (TrainConfig.workers)."""
    from ..train import TrainConfig
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "workers")


def _write_jpegs(root: Path, plan: BenchPlan) -> None:
    """An ImageFolder of smooth random photos-sized JPEGs: train/c{0,1}/*.jpg and one val image per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = plan.jpeg_size
    for i in range(plan.pipeline_images + 2):
        split, cls = ("val", i % 2) if i >= plan.pipeline_images else ("train", i % 2)
        folder = root / split / f"c{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        # Low-frequency colour plus noise compresses like a photo, unlike pure noise.
        small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)


def bench_pipeline(plan: BenchPlan, *, workers: int | None = None) -> dict:
    """Images/s of JPEG decode + augmentation through a DataLoader: vggnet's ImageFolder vs torchvision's."""
    from torchvision import datasets, transforms

    from ..data import build_data
    from ..transforms import IMAGENET_MEAN, IMAGENET_STD

    workers = default_workers() if workers is None else workers
    batch = 32
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        _write_jpegs(Path(tmp), plan)
        bundle = build_data(tmp, image_size=plan.image_size, mean_std="imagenet")
        theirs = datasets.ImageFolder(Path(tmp) / "train", transform=transforms.Compose([
            transforms.RandomResizedCrop(plan.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
        with warnings.catch_warnings():
            # `vggnet train`'s default may exceed the cores; the pipeline is measured as training runs it.
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
            loaders = {name: torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                                         persistent_workers=workers > 0)
                       for name, ds in (("vggnet", bundle.train), ("torchvision", theirs))}
            # One epoch per call; the warm-up epoch starts the (persistent) workers.
            times = _timed(plan, {name: lambda ld=ld: sum(1 for _ in ld) for name, ld in loaders.items()})
        n = len(bundle.train)
        del loaders
    return {"workers": workers, "images": n, "jpeg_size": list(plan.jpeg_size), "batch": batch,
            "images_per_s": {name: n / median(ts) for name, ts in times.items()},
            "reps": {name: len(ts) for name, ts in times.items()},
            "vggnet_transform": f"build_data(DIR).train: isotropic rescale to S in {list(bundle.train_scale)}, "
                                f"random {plan.image_size} crop, flip, PCA lighting, normalise",
            "torchvision_transform": f"RandomResizedCrop({plan.image_size}), RandomHorizontalFlip, ToTensor, Normalize"}


def bench_multicrop(config: str, plan: BenchPlan, device: torch.device) -> dict:
    """Seconds per image of `vggnet.evaluate.posteriors` "dense" against "multicrop" (section 3.2), and of
    Appendix B's descriptor (`vggnet.features.FeatureExtractor`, fc7) against dense evaluation.

    One 4:3 image at shorter side Q = eval_scale, default runtime and engine: dense runs the
    fully-convolutional net on the image and its flip; multi-crop a 5x5 grid of crops and their
    flips (50 views). The same calls `vggnet eval --methods dense,multicrop` makes.
    """
    rt, engine = default_path(device)
    crop, q = plan.multicrop_crop, plan.eval_scale
    model = rt.prepare(vgg(config, head=plan.multicrop_head, init="kaiming")).eval()
    net = net_from_model(model, {"image_size": crop, "eval_scale": q}, name=config, flip=True)
    image = [torch.rand(3, q, round(q * 4 / 3))]
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-onnx-") as cache:
        how = attach_engine(net, rt, engine=engine, cache_dir=cache, images=ORT_MIN_IMAGES)
        fns = {p: functools.partial(posteriors, net, image, p, q, runtime=rt, batch_size=64)
               for p in ("dense", "multicrop")}
        # Appendix B's descriptor at the same Q and batch: `vggnet features` runs this extractor
        fns["features"] = FeatureExtractor(net=net, layer="fc7", scales=(q,), runtime=rt, batch_size=64)
        fns["features"] = functools.partial(fns["features"], image)
        times = _timed(plan, fns, device)
    dense_s, crops_s = median(times["dense"]), median(times["multicrop"])
    features_s = median(times["features"])
    return {"config": config, "head": plan.multicrop_head, "image": [q, round(q * 4 / 3)], "crop": crop,
            "runtime": str(rt), "engine": how, "dense_s_per_image": dense_s, "multicrop_s_per_image": crops_s,
            "multicrop_over_dense": crops_s / dense_s, "features_s_per_image": features_s,
            "features_over_dense": features_s / dense_s, "reps": {k: len(v) for k, v in times.items()},
            "note": "" if plan.multicrop_head == "paper" else f"{plan.multicrop_head} head at {crop} px (quick plan)"}


def profile_inference(config: str, plan: BenchPlan, device: torch.device, *, top: int = 8) -> dict:
    """Where one default-path forward pass (image_size, batch 1) spends its time, by operator (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rt = resolve_runtime(str(device))
    model = rt.prepare(vgg(config, init="kaiming")).eval()
    fn = _infer(model, rt, rt.inputs(torch.randn(1, 3, plan.image_size, plan.image_size)))
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {"runtime": str(rt), "size": plan.image_size, "batch": 1, "total_ms": total / 1e3,
            "ops": [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                     "calls": e.count} for e in events[:top]]}


def precision_agreement(checkpoint: str | os.PathLike, *, precisions: Sequence[str] = ("bf16", "int8"),
                        device: str | None = "cpu", batch_size: int = 64, limit: int | None = None,
                        split: str = "test", cache_dir: str | os.PathLike | None = None,
                        protocol: str = "center") -> dict:
    """Top-1 agreement of a checkpoint's predictions in each of `precisions` with fp32, on its data's test split.

    Every pass is `vggnet.evaluate.posteriors` with `protocol` ("center" or "dense") at the net's Q,
    as `vggnet eval --methods PROTOCOL` runs it, through the engine `vggnet eval` attaches: int8 on
    onnxruntime (calibrated on the net's training images, cached in `cache_dir`), bf16 eager with the
    weights cast once on CPUs.
    """
    from ..data import eval_images

    net = load_net(checkpoint)
    dataset, _ = eval_images(net.meta.get("data"), split, seed=int(net.meta.get("seed", 0)))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = [dataset[i][0] for i in range(n)]
    labels = torch.tensor([int(dataset[i][1]) for i in range(n)])
    dev = resolve_device(device)
    preds, seconds = {}, {}
    for prec in dict.fromkeys(("fp32", *precisions)):
        rt = resolve_runtime(str(dev), "fp32" if prec == "int8" else prec)
        net.to(rt)
        attach_engine(net, rt, engine="onnxruntime" if prec == "int8" else "eager",
                      precision="int8" if prec == "int8" else None, cache_dir=cache_dir)
        t0 = time.perf_counter()
        preds[prec] = posteriors(net, images, protocol, net.eval_scale, runtime=rt, batch_size=batch_size).argmax(1)
        seconds[prec] = time.perf_counter() - t0
    net.engine = None
    return {"checkpoint": str(checkpoint), "split": split, "images": n, "protocol": protocol, "device": str(dev),
            "agreement": {p: float((preds["fp32"] == v).float().mean()) for p, v in preds.items() if p != "fp32"},
            "top1": {p: float((v == labels).float().mean()) for p, v in preds.items()},
            "changed": {p: int((preds["fp32"] != v).sum()) for p, v in preds.items() if p != "fp32"},
            "seconds": seconds, "target": 0.99}


def _ceilings(plan: BenchPlan, device: torch.device) -> dict:
    """fp32 and bf16 matmul ceilings; emulated bf16 gets one small size (it runs at about 1 GFLOP/s)."""
    emulated = _bf16_emulated(device)
    kw = dict(budget_s=plan.budget_s / 2, max_reps=plan.max_reps, device=device)
    fp32_sizes = plan.ceiling_sizes if device.type == "cpu" else (4096, 8192)
    bf16_sizes = (plan.bf16_emulated_size,) if emulated else fp32_sizes
    return {"fp32": matmul_ceiling(torch.float32, **kw, sizes=fp32_sizes),
            "bf16": {**matmul_ceiling(torch.bfloat16, **kw, sizes=bf16_sizes), "emulated": emulated}}


def run_benchmark(*, configs: Sequence[str] = ("D",), plan: BenchPlan = FULL, device: str | None = "auto",
                  sections: Sequence[str] = SECTIONS[:-1], compile: bool = False, workers: int | None = None,
                  agreement: str | os.PathLike | None = None, agreement_limit: int | None = None,
                  agreement_precisions: Sequence[str] = ("bf16", "int8"),
                  command: str = "", progress: Callable[[str], None] | None = None,
                  on_section: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the JSON-ready result (machine, plan, sections, memory, summary).

    `on_section(result)` is called after each section with the result so far (summary included),
    so a run cut short by a time limit still leaves its finished sections behind.

    "agreement" (in `sections` or implied by `agreement`, a checkpoint or run directory) adds the
    top-1 agreement of that checkpoint's `agreement_precisions` with fp32 on its test split
    (`precision_agreement`).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown benchmark sections {unknown}; expected some of {', '.join(SECTIONS)}")
    if "agreement" in sections and agreement is None:
        raise UserError("the agreement section needs a checkpoint (agreement=PATH)")
    if agreement is not None and "agreement" not in sections:
        sections = [*sections, "agreement"]
    dev = resolve_device(device)
    say = progress or (lambda _: None)
    result: dict[str, Any] = {"machine": machine_info(dev), "command": command, "plan": _plain(asdict(plan)),
                              "configs": list(configs), "memory": {}}
    per_config = {"inference": lambda c: bench_inference(c, plan, dev, compile=compile),
                  "training": lambda c: bench_training(c, plan, dev),
                  "multicrop": lambda c: bench_multicrop(c, plan, dev),
                  "profile": lambda c: profile_inference(c, plan, dev)}
    once = {"ceilings": lambda: _ceilings(plan, dev),
            "pipeline": lambda: bench_pipeline(plan, workers=workers),
            "agreement": lambda: precision_agreement(agreement, device=str(dev), limit=agreement_limit, precisions=agreement_precisions)}
    result["section_seconds"] = {}
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest conv algorithms (CUDA only)
    started = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in sections:
                continue
            t0, fresh = time.perf_counter(), reset_peaks(dev)
            if name in once:
                say(name)
                result[name] = once[name]()
            else:
                out = {}
                for config in configs:
                    say(f"{name} {config}")
                    out[config] = per_config[name](config)
                result[name] = [r for rows in out.values() for r in rows] if name in ("inference", "training") else out
            result["memory"][name] = memory(dev, fresh)
            result["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            if on_section is not None:
                on_section({**result, "partial": True, "summary": summarize(result)})
    finally:
        torch.backends.cudnn.benchmark = cudnn
    sections_peak = [m["rss_peak_mb"] for m in result["memory"].values()]
    result["memory"]["rss_peak_mb"] = max([round(rss_peak_mb(), 1), *sections_peak])
    # The largest child process (DataLoader workers): forked, so pages it shares with this one count too.
    result["memory"]["children_rss_peak_mb"] = round(rss_peak_mb(children=True), 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary"] = summarize(result)
    return result
