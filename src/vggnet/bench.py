"""How fast vggnet runs, measured against torchvision and against this machine's own ceilings (issue 5).

One process, one run: every comparison that becomes a ratio is timed in the same process, with
the contenders interleaved round by round (A B, B A, ...) after a warm-up, and each figure is
the median of its rounds, so a neighbour loading the machine slows both sides alike. The run
measures, for each configuration asked for (D by default):

- the machine's matmul ceilings (fp32, bf16) in GFLOP/s, and the GFLOP/s each inference row
  reaches (2 x multiply-accumulates from `analysis.count_macs`) as a fraction of them;
- inference images/s at 224 px, batch 1 and 16: fp32 NCHW, fp32 channels_last, bf16 and the
  default path (`runtime.resolve_runtime()`), vggnet next to torchvision with identical weights;
  and at 32 px (compact head) NCHW against channels_last;
- training images/s: 32 px batch 128 (compact head, BN) and 224 px batch 16 (paper head),
  fp32 NCHW against the default path;
- the input pipeline: JPEG decode + the paper's augmentation (section 3.1) with the default
  DataLoader workers, next to torchvision's ImageFolder + RandomResizedCrop;
- dense against 50-crop evaluation cost per image (section 3.2);
- peak memory (process RSS; CUDA max allocated) and a profile of one default inference pass;
- optionally the default inference path under torch.compile, and the fp32 vs bf16 top-1
  agreement of a trained checkpoint on its test split.

On a CPU without bf16 matrix units bf16 is emulated (on a 2-core AVX2 EPYC: a GEMM 40x slower
than fp32, a VGG-16 pass 6x), so its rows use batch 1 and one timed pass and are marked
"emulated"; the default path there is fp32. `summary` holds the ratios the issue sets targets for, and `summary.targets` says for each
whether it is met, with the measured value and, where it is not, why.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import count_macs
from .errors import UserError
from .model import vgg
from .runtime import Runtime, cpu_has_bf16_units, resolve_device, resolve_runtime

try:
    import resource  # Unix only; elsewhere peak RSS is reported as 0
except ImportError:  # pragma: no cover
    resource = None

__all__ = ["BenchPlan", "FULL", "QUICK", "SECTIONS", "TARGETS", "machine_info", "matmul_ceiling", "time_interleaved",
           "bench_inference", "bench_training", "bench_pipeline", "bench_multicrop", "profile_inference",
           "default_workers", "run_benchmark", "summarize", "format_markdown", "precision_agreement"]

# Issue 5, requirement 2: what each summary ratio should reach.
TARGETS = {
    "inference_speedup_vs_torchvision": 3.5,     # default path vs torchvision's default fp32 vgg16
    "inference_fraction_of_bf16_ceiling": 0.85,  # default path's GFLOP/s vs the bf16 matmul ceiling
    "fp32_ratio_vs_torchvision": 0.97,           # vggnet fp32 vs torchvision fp32, same settings
    "train_speedup_vs_fp32": 1.6,                # default training vs fp32 NCHW at 32 px
    "pipeline_to_train_ratio": 1.5,              # input pipeline vs the 224 px training step rate
}
_TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
_MULTICROP_VIEWS = 50  # 5 x 5 grid x 2 flips (section 3.2)


@dataclass(frozen=True)
class BenchPlan:
    """Sizes and time budgets of one run. `FULL` is the issue's protocol; `QUICK` trims it to minutes."""

    name: str = "full"
    image_size: int = 224                  # inference, 224 px training, pipeline crop, multi-crop crop
    infer_batches: tuple[int, ...] = (1, 16)
    small_size: int = 32                   # CIFAR-sized training and inference (compact head)
    small_batch: int = 128
    large_batch: int = 16                  # training at image_size
    large_head: str = "paper"              # ... with the paper's FC-4096 head
    eval_scale: int = 256                  # Q of the dense / multi-crop image (its shorter side)
    crops: int = 50                        # multi-crop views actually run; the cost is scaled to 50
    pipeline_images: int = 256             # generated JPEGs in the ImageFolder
    jpeg_size: tuple[int, int] = (500, 375)
    budget_s: float = 15.0                 # per interleaved group, after warm-up
    min_reps: int = 2                      # rounds per group, however long they take
    max_reps: int = 25
    large_compare: bool = True             # also time fp32 NCHW at image_size (else only the default path)
    ceiling_sizes: tuple[int, ...] = (1024, 2048, 4096)
    bf16_emulated_size: int = 512          # matmul size for the emulated-bf16 ceiling (seconds, not hours)
    # Where bf16 is emulated a VGG-16 pass takes seconds per image: these models, batch 1, one pass.
    emulated_bf16_models: tuple[str, ...] = ("vggnet", "torchvision")
    emulated_bf16_warmup: int = 1


FULL = BenchPlan()
QUICK = BenchPlan(name="quick", infer_batches=(1, 2), small_batch=16, large_batch=2, crops=2, pipeline_images=64,
                  budget_s=1.5, min_reps=1, max_reps=5, large_compare=False, ceiling_sizes=(2048,),
                  emulated_bf16_models=("vggnet",), emulated_bf16_warmup=0)


# ----------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, budget_s: float, max_reps: int, warmup: int = 1,
                     min_reps: int = 1, device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds per call of each function: warm each up, then call them in turn, round after round.

    Rounds continue until `budget_s` has passed (at least `min_reps`, at most `max_reps` rounds).
    Interleaving keeps ratios fair when the machine's load changes during the run, and every other
    round runs in reverse order (A B, B A, ...) so that no function always follows the same one.
    On CUDA the device is synchronised around every call, so the times are of finished work.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    names = list(fns)
    for rep in range(max_reps):
        for name in names if rep % 2 == 0 else reversed(names):
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if rep + 1 >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return times


def _timed(plan: BenchPlan, fns: dict[str, Callable[[], Any]], device: torch.device = torch.device("cpu"),
           ) -> dict[str, list[float]]:
    return time_interleaved(fns, budget_s=plan.budget_s, max_reps=plan.max_reps, min_reps=plan.min_reps,
                            device=device)


def _median(ts: Sequence[float]) -> float:
    return statistics.median(ts)


def matmul_ceiling(dtype: torch.dtype, device: torch.device, *, sizes: Sequence[int], budget_s: float,
                   max_reps: int) -> dict:
    """GFLOP/s of the fastest square `dtype` matmul over `sizes` and repetitions: what the hardware gives a GEMM.

    A ceiling takes the fastest repetition, not the median: a busy neighbour can only slow a GEMM down.
    """
    best = {"gflops": 0.0, "size": None, "median_gflops": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        ts = time_interleaved({"mm": lambda: a @ b}, budget_s=budget_s, max_reps=max_reps, device=device)["mm"]
        gflops = 2 * n ** 3 / min(ts) / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": n, "median_gflops": 2 * n ** 3 / _median(ts) / 1e9}
    return best


def _plain(d: dict) -> dict:
    """Tuples as lists, so the result equals its own JSON round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _rss_peak_mb(children: bool = False) -> float:
    """Peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS); children: the largest child's."""
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if platform.system() == "Darwin" else peak / 2 ** 10


def _reset_peaks(device: torch.device) -> bool:
    """Start a section's peak memory afresh; False where the OS keeps one peak per process (then peaks accumulate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the RSS high-water mark
        return True
    except OSError:
        return False


def _memory(device: torch.device, per_section: bool) -> dict:
    out = {"rss_peak_mb": round(_rss_peak_mb(), 1), "per_section": per_section}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on: CPU model and cores, GPU, bf16 units, library versions, date."""
    import torchvision

    cpu = platform.machine()  # not platform.processor(): it forks `uname -p` on Linux
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_units": cpu_has_bf16_units(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # fp32 rows on CUDA: matmuls are true fp32 unless allow_tf32; cuDNN convs use TF32 by default.
        info["cuda_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_tf32_conv"] = torch.backends.cudnn.allow_tf32
    return info


def _bf16_emulated(device: torch.device) -> bool:
    return device.type == "cpu" and not cpu_has_bf16_units()


def _label(rt: Runtime) -> str:
    return f"{rt.precision} {'channels_last' if rt.channels_last else 'NCHW'}"


# ----------------------------------------------------------------------------- models

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


def _runtimes(device: torch.device) -> tuple[list[Runtime], Runtime]:
    """The runtimes measured (fp32 NCHW, fp32 channels_last, bf16 channels_last, the default) and the default."""
    default = resolve_runtime(str(device))
    listed = [Runtime(device, "fp32", False), Runtime(device, "fp32", True), Runtime(device, "bf16", True), default]
    return list(dict.fromkeys(listed)), default


def _infer(model: nn.Module, rt: Runtime, x: torch.Tensor) -> Callable[[], Any]:
    def fn():
        with torch.inference_mode(), rt.autocast():
            return model(x)
    return fn


# ----------------------------------------------------------------------------- sections

def bench_inference(config: str, plan: BenchPlan, device: torch.device, *, compile: bool = False) -> list[dict]:
    """Images/s of every runtime at image_size for each batch, vggnet next to torchvision; then 32 px formats.

    With `compile`, the default path under torch.compile is one more row. On the CPU inductor's
    freezing is switched on for it: weights become constants and each conv + ReLU becomes one
    fused oneDNN call (inference only). torch.compile(options={"freezing": True}) does not do
    this in torch 2.14 (measured: the convs stayed unfused), so the config is patched instead.
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=compile and device.type == "cpu"):
        return _bench_inference(config, plan, device, compile=compile)


def _bench_inference(config: str, plan: BenchPlan, device: torch.device, *, compile: bool) -> list[dict]:
    runtimes, default = _runtimes(device)
    emulated = _bf16_emulated(device)
    # One copy of each net per memory format (converting in place would change the other rows' net).
    models = {}
    for src, net in _pair(config).items():
        formats = sorted({rt.channels_last for rt in runtimes})
        for cl in formats:
            rt = Runtime(device, "fp32", cl)
            models[(src, cl)] = rt.prepare(net if cl == formats[-1] else copy.deepcopy(net)).eval()
    if compile:  # static shapes: one compilation per batch size, at its warm-up call
        models[("vggnet+compile", default.channels_last)] = torch.compile(
            models[("vggnet", default.channels_last)], dynamic=False)
    macs = _macs(config, plan.image_size)
    rows: list[dict] = []

    def add(times: dict[str, list[float]], keys: dict[str, tuple[str, Runtime]], batch: int, size: int,
            macs: int, head: str = "paper", note: str = "") -> None:
        for name, ts in times.items():
            src, rt = keys[name]
            t = _median(ts)
            rows.append({"config": config, "model": src, "head": head, "precision": rt.precision,
                         "memory_format": "channels_last" if rt.channels_last else "NCHW", "size": size,
                         # "default": the path vggnet takes unless told otherwise (compiling is opt-in)
                         "batch": batch, "default": src == "vggnet" and rt == default, "images_per_s": batch / t,
                         "ms_per_batch": 1e3 * t, "images_per_s_best": batch / min(ts), "reps": len(ts),
                         "gflops": 2 * macs * batch / t / 1e9,
                         "note": note})

    for i, batch in enumerate(plan.infer_batches):
        fast, slow = {}, {}
        for rt in runtimes:
            x = rt.inputs(torch.randn(batch, 3, plan.image_size, plan.image_size))
            for src in ("vggnet", "vggnet+compile", "torchvision"):
                if (src, rt.channels_last) not in models or (src == "vggnet+compile" and rt != default):
                    continue
                fn = (src, rt), _infer(models[(src, rt.channels_last)], rt, x)
                if rt.precision == "bf16" and emulated:
                    # Emulated bf16: a VGG-16 pass takes seconds per image; one size, one pass, ours first.
                    if i == 0 and src in plan.emulated_bf16_models:
                        slow[f"{src} {_label(rt)}"] = fn
                else:
                    fast[f"{src} {_label(rt)}"] = fn
        times = _timed(plan, {k: f for k, (_, f) in fast.items()}, device)
        add(times, {k: key for k, (key, _) in fast.items()}, batch, plan.image_size, macs)
        if slow:
            times = time_interleaved({k: f for k, (_, f) in slow.items()}, budget_s=0, max_reps=1,
                                     warmup=plan.emulated_bf16_warmup, device=device)
            add(times, {k: key for k, (key, _) in slow.items()}, batch, plan.image_size, macs,
                note="emulated bf16 (CPU lacks bf16 units): one timed pass")
    del models

    # 32 px, compact head: does channels_last pay off on small maps too?
    small = vgg(config, head="compact", num_classes=10, init="kaiming").eval()
    x = torch.randn(plan.small_batch, 3, plan.small_size, plan.small_size)
    fns = {}
    for rt in (Runtime(device, "fp32", False), Runtime(device, "fp32", True)):
        fns[f"vggnet {_label(rt)}"] = ("vggnet", rt), _infer(rt.prepare(copy.deepcopy(small)), rt, rt.inputs(x))
    times = _timed(plan, {k: f for k, (_, f) in fns.items()}, device)
    add(times, {k: key for k, (key, _) in fns.items()}, plan.small_batch, plan.small_size,
        _macs(config, plan.small_size, head="compact", num_classes=10), head="compact")
    return rows


def bench_training(config: str, plan: BenchPlan, device: torch.device) -> list[dict]:
    """Training images/s at small_size (compact head, BN) and image_size (paper head): fp32 NCHW vs the default."""
    from .train import train_step  # loaded on use: `vggnet info` need not import the trainer
    _, default = _runtimes(device)
    emulated = _bf16_emulated(device)
    rows = []
    cases = [("small", plan.small_size, plan.small_batch, dict(head="compact", batch_norm=True, num_classes=10)),
             ("large", plan.image_size, plan.large_batch, dict(head=plan.large_head, batch_norm=False, num_classes=1000))]
    for case, size, batch, kw in cases:
        base = vgg(config, init="kaiming", **kw)
        wanted = [Runtime(device, "fp32", False), Runtime(device, "fp32", True), default]
        if case == "large" and not plan.large_compare:
            wanted = [default]
        fns, keys = {}, {}
        for rt in dict.fromkeys(wanted):
            if rt.precision == "bf16" and emulated:
                continue  # never the default there; minutes per step
            model = rt.prepare(copy.deepcopy(base)).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=rt.precision == "fp16")
            x = rt.inputs(torch.randn(batch, 3, size, size))
            y = torch.randint(0, kw["num_classes"], (batch,), device=device)
            name = f"{'default ' if rt == default else ''}{_label(rt)}"
            # `vggnet train`'s own step (forward under autocast, cross-entropy, backward, SGD update).
            fns[name] = functools.partial(train_step, model, x, y, opt, rt, scaler=scaler, check_finite=False)
            keys[name] = rt
        del base
        times = _timed(plan, fns, device)
        macs = _macs(config, size, **kw)
        for name, ts in times.items():
            t, rt = _median(ts), keys[name]
            rows.append({"config": config, "case": case, "head": kw["head"], "batch_norm": kw["batch_norm"],
                         "precision": rt.precision, "memory_format": "channels_last" if rt.channels_last else "NCHW",
                         "size": size, "batch": batch, "default": rt == default, "images_per_s": batch / t,
                         "ms_per_step": 1e3 * t, "images_per_s_best": batch / min(ts), "reps": len(ts),
                         # backward costs about twice the forward: 3 x forward MACs per image
                         "gflops": 2 * 3 * macs * batch / t / 1e9})
        del fns
    return rows


def default_workers() -> int:
    """DataLoader workers `vggnet train` uses unless told otherwise (TrainConfig.workers)."""
    from .train import TrainConfig
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

    from .data import build_data
    from .transforms import IMAGENET_MEAN, IMAGENET_STD

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
            "images_per_s": {name: n / _median(ts) for name, ts in times.items()},
            "reps": {name: len(ts) for name, ts in times.items()},
            "vggnet_transform": f"build_data(DIR).train: isotropic rescale to S in {list(bundle.train_scale)}, "
                                f"random {plan.image_size} crop, flip, PCA lighting, normalise",
            "torchvision_transform": f"RandomResizedCrop({plan.image_size}), RandomHorizontalFlip, ToTensor, Normalize"}


def _grid(length: int, crop: int, n: int = 5) -> list[int]:
    return [round(i * (length - crop) / (n - 1)) for i in range(n)]


def bench_multicrop(config: str, plan: BenchPlan, device: torch.device) -> dict:
    """Seconds per image of dense evaluation (image + flip) against 50-crop evaluation (section 3.2).

    The image is a 4:3 photo rescaled to shorter side Q = eval_scale. Dense: the fully-convolutional
    net on the whole image and its flip, score maps averaged. Multi-crop: a 5x5 grid of crops of
    image_size on the image and its flip; `plan.crops` of the 50 are run (in one batch) and the cost
    is scaled to 50. The paper head's dense form needs >= 224 px, so smaller plans use the compact head.
    """
    rt = resolve_runtime(str(device))
    head = "paper" if plan.image_size >= 224 else "compact"
    model = vgg(config, head=head, init="kaiming").eval()
    dense = rt.prepare(model.to_fully_conv()).eval()
    model = rt.prepare(model)
    h, w, c = plan.eval_scale, round(plan.eval_scale * 4 / 3), plan.image_size
    image = torch.randn(1, 3, h, w)
    views = [image[..., y:y + c, x:x + c] for y in _grid(h, c) for x in _grid(w, c)]
    views = torch.cat(views + [v.flip(-1) for v in views])[: plan.crops]
    both = rt.inputs(torch.cat([image, image.flip(-1)]))
    views = rt.inputs(views)

    def run_dense():
        with torch.inference_mode(), rt.autocast():
            return dense(both).float().softmax(1).mean((0, 2, 3))

    def run_crops():
        with torch.inference_mode(), rt.autocast():
            return model(views).float().softmax(1).mean(0)

    times = _timed(plan, {"dense": run_dense, "multicrop": run_crops}, device)
    dense_s = _median(times["dense"])
    crops_s = _median(times["multicrop"]) * _MULTICROP_VIEWS / plan.crops
    return {"config": config, "head": head, "image": [h, w], "crop": c, "runtime": str(rt),
            "dense_s_per_image": dense_s, "multicrop_s_per_image": crops_s, "multicrop_over_dense": crops_s / dense_s,
            "crops_run": plan.crops, "reps": {k: len(v) for k, v in times.items()},
            "note": "" if plan.crops == _MULTICROP_VIEWS else
                    f"multi-crop timed on {plan.crops} of the 50 views in one batch, scaled to 50"}


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
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {"runtime": str(rt), "size": plan.image_size, "batch": 1, "total_ms": total / 1e3,
            "ops": [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                     "calls": e.count} for e in events[:top]]}


# ----------------------------------------------------------------------------- the run

def _ceilings(plan: BenchPlan, device: torch.device) -> dict:
    """fp32 and bf16 matmul ceilings; emulated bf16 gets one small size (it runs at about 1 GFLOP/s)."""
    emulated = _bf16_emulated(device)
    kw = dict(budget_s=plan.budget_s / 2, max_reps=plan.max_reps, device=device)
    fp32_sizes = plan.ceiling_sizes if device.type == "cpu" else (4096, 8192)
    bf16_sizes = (plan.bf16_emulated_size,) if emulated else fp32_sizes
    return {"fp32": matmul_ceiling(torch.float32, **kw, sizes=fp32_sizes),
            "bf16": {**matmul_ceiling(torch.bfloat16, **kw, sizes=bf16_sizes), "emulated": emulated}}


SECTIONS = ("ceilings", "inference", "training", "pipeline", "multicrop", "profile", "agreement")


def run_benchmark(*, configs: Sequence[str] = ("D",), plan: BenchPlan = FULL, device: str | None = "auto",
                  sections: Sequence[str] = SECTIONS[:-1], compile: bool = False, workers: int | None = None,
                  agreement: str | os.PathLike | None = None, agreement_limit: int | None = None,
                  command: str = "", progress: Callable[[str], None] | None = None,
                  on_section: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the JSON-ready result (machine, plan, sections, memory, summary).

    `on_section(result)` is called after each section with the result so far (summary included),
    so a run cut short by a time limit still leaves its finished sections behind.

    "agreement" (in `sections` or implied by `agreement`, a checkpoint or run directory) adds the
    fp32 vs bf16 top-1 agreement of that checkpoint on its test split (`precision_agreement`).
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
            "agreement": lambda: precision_agreement(agreement, device=str(dev), limit=agreement_limit)}
    result["section_seconds"] = {}
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest conv algorithms (CUDA only)
    started = time.perf_counter()
    try:
        for name in SECTIONS:
            if name not in sections:
                continue
            t0, fresh = time.perf_counter(), _reset_peaks(dev)
            if name in once:
                say(name)
                result[name] = once[name]()
            else:
                out = {}
                for config in configs:
                    say(f"{name} {config}")
                    out[config] = per_config[name](config)
                result[name] = [r for rows in out.values() for r in rows] if name in ("inference", "training") else out
            result["memory"][name] = _memory(dev, fresh)
            result["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            if on_section is not None:
                on_section({**result, "partial": True, "summary": summarize(result)})
    finally:
        torch.backends.cudnn.benchmark = cudnn
    sections_peak = [m["rss_peak_mb"] for m in result["memory"].values()]
    result["memory"]["rss_peak_mb"] = max([round(_rss_peak_mb(), 1), *sections_peak])
    # The largest child process (DataLoader workers): forked, so pages it shares with this one count too.
    result["memory"]["children_rss_peak_mb"] = round(_rss_peak_mb(children=True), 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary"] = summarize(result)
    return result


# ----------------------------------------------------------------------------- the summary

def _find(rows: Sequence[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def summarize(result: dict) -> dict:
    """The issue's ratios, computed from the measured rows of the first configuration, and the targets."""
    config = result["configs"][0]
    inf = [r for r in result.get("inference", []) if r["config"] == config and r["head"] == "paper"]
    batches = sorted({r["batch"] for r in inf})
    ceil = result.get("ceilings", {})
    s: dict[str, Any] = {"config": config}

    speedups, fp32_ratios, cl_gain = [], {}, {}
    for b in batches:
        default = _find(inf, model="vggnet", batch=b, default=True)
        tv = _find(inf, model="torchvision", batch=b, precision="fp32", memory_format="NCHW")
        if default and tv:
            speedups.append(default["images_per_s"] / tv["images_per_s"])
        for fmt in ("NCHW", "channels_last"):
            ours = _find(inf, model="vggnet", batch=b, precision="fp32", memory_format=fmt)
            theirs = _find(inf, model="torchvision", batch=b, precision="fp32", memory_format=fmt)
            if ours and theirs:
                fp32_ratios[f"batch {b} {fmt}"] = ours["images_per_s"] / theirs["images_per_s"]
        nchw = _find(inf, model="vggnet", batch=b, precision="fp32", memory_format="NCHW")
        cl = _find(inf, model="vggnet", batch=b, precision="fp32", memory_format="channels_last")
        if nchw and cl:
            cl_gain[f"inference {result['plan']['image_size']} px batch {b}"] = cl["images_per_s"] / nchw["images_per_s"]
    compiled = [c["images_per_s"] / d["images_per_s"] for b in batches
                if (c := _find(inf, model="vggnet+compile", batch=b)) and (d := _find(inf, model="vggnet", batch=b, default=True))]
    s["compile_speedup_vs_default"] = _geomean(compiled)
    s["inference_speedup_vs_torchvision"] = _geomean(speedups)
    s["inference_speedup_by_batch"] = dict(zip(map(str, batches), speedups)) if len(speedups) == len(batches) else {}
    s["fp32_ratio_vs_torchvision"] = _geomean(list(fp32_ratios.values()))
    s["fp32_ratio_by_setting"] = fp32_ratios
    s["fp32_ratio_min"] = min(fp32_ratios.values()) if fp32_ratios else None

    top = _find(inf, model="vggnet", batch=batches[-1], default=True) if batches else None
    fp32_c, bf16_c = ceil.get("fp32", {}).get("gflops"), ceil.get("bf16", {}).get("gflops")
    s["default_inference_gflops"] = top["gflops"] if top else None
    s["default_precision"] = top["precision"] if top else None
    s["inference_fraction_of_bf16_ceiling"] = top["gflops"] / bf16_c if top and bf16_c else None
    s["inference_fraction_of_fp32_ceiling"] = top["gflops"] / fp32_c if top and fp32_c else None
    own = {"fp32": fp32_c}.get(top["precision"], bf16_c) if top else None
    s["inference_fraction_of_own_ceiling"] = top["gflops"] / own if top and own else None

    small = [r for r in result.get("training", []) if r["config"] == config and r["case"] == "small"]
    large = [r for r in result.get("training", []) if r["config"] == config and r["case"] == "large"]
    d_small, f_small = _find(small, default=True), _find(small, precision="fp32", memory_format="NCHW")
    s["train_speedup_vs_fp32"] = d_small["images_per_s"] / f_small["images_per_s"] if d_small and f_small else None
    for case, rows in (("small", small), ("large", large)):
        nchw = _find(rows, precision="fp32", memory_format="NCHW")
        cl = _find(rows, precision="fp32", memory_format="channels_last")
        if nchw and cl:
            cl_gain[f"training {rows[0]['size']} px batch {rows[0]['batch']}"] = cl["images_per_s"] / nchw["images_per_s"]
    for r in result.get("inference", []):
        if r["config"] == config and r["head"] == "compact" and r["memory_format"] == "channels_last":
            nchw = _find(result["inference"], config=config, head="compact", memory_format="NCHW", batch=r["batch"])
            if nchw:
                cl_gain[f"inference {r['size']} px batch {r['batch']}"] = r["images_per_s"] / nchw["images_per_s"]
    s["channels_last_over_nchw"] = cl_gain

    d_large = _find(large, default=True)
    pipe = result.get("pipeline", {}).get("images_per_s", {}).get("vggnet")
    s["pipeline_to_train_ratio"] = pipe / d_large["images_per_s"] if pipe and d_large else None
    s["bf16_top1_agreement"] = result["agreement"]["agreement"] if "agreement" in result else None
    s["targets"] = _targets(s, result)
    return s


def _targets(s: dict, result: dict) -> dict:
    """met / not met / not measured per target, with the value, the threshold and, where missed, why."""
    bf16_units = result["machine"]["cpu_bf16_units"] or result["machine"]["device"].startswith("cuda")
    no_bf16 = ("this CPU has no bf16 matrix units (no AMX / AVX-512 BF16), so the default path is fp32: "
               "the same arithmetic as torchvision's fp32, where only memory format and overheads can differ")
    why_missed = {
        "inference_speedup_vs_torchvision": no_bf16 + "; the 3.5x assumes bf16 on AMX" if not bf16_units else "",
        "inference_fraction_of_bf16_ceiling":
            ("bf16 is emulated here, its 'ceiling' is far below fp32's; the default path runs fp32 and reaches "
             f"{s['inference_fraction_of_fp32_ceiling']:.0%} of the fp32 ceiling" if not bf16_units
             and s.get("inference_fraction_of_fp32_ceiling") else ""),
        "train_speedup_vs_fp32": no_bf16 + "; the 1.6x assumes bf16 training" if not bf16_units else "",
        "fp32_ratio_vs_torchvision": "both run the same ops on the same weights; see fp32_ratio_by_setting "
                                     "and the rows' reps for the spread between rounds",
        "pipeline_to_train_ratio": f"the loader ({result.get('pipeline', {}).get('workers')} workers) feeds fewer "
                                   "images than training consumes: raise --workers",
        "bf16_top1_agreement": "bf16 rounding changes the top-1 class of more than 1% of the test images",
    }
    out = {}
    for name, threshold in {**TARGETS, "bf16_top1_agreement": 0.99}.items():
        value = s.get(name)
        if value is None:
            out[name] = {"value": None, "threshold": threshold, "status": "not measured", "why": ""}
            continue
        status = "met" if value >= threshold else "not met"
        why = why_missed.get(name, "")
        if name == "inference_fraction_of_bf16_ceiling" and not bf16_units:
            status = "not applicable"  # a ratio against an emulated 'ceiling' says nothing about speed
        out[name] = {"value": value, "threshold": threshold, "status": status,
                     "why": why if status != "met" else ""}
    return out


# ----------------------------------------------------------------------------- the table

def _md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_markdown(result: dict) -> str:
    """The run as Markdown: machine, ceilings, each section's table, the summary and the targets."""
    m = result["machine"]
    out = [f"## vggnet bench ({result['plan']['name']} plan), {m['date']}",
           f"{m.get('gpu', m['cpu'])}; {m['cpu_cores']} cores, {m['torch_threads']} torch threads; "
           f"bf16 units: {'yes' if m['cpu_bf16_units'] else 'no'}; torch {m['torch']}, torchvision {m['torchvision']}",
           f"command: `{result['command']}`; {result['seconds']} s"]
    if "ceilings" in result:
        c = result["ceilings"]
        out += ["", _md(["matmul", "GFLOP/s", "size"],
                        [["fp32", _f(c["fp32"]["gflops"], 1), c["fp32"]["size"]],
                         ["bf16" + (" (emulated)" if c["bf16"]["emulated"] else ""), _f(c["bf16"]["gflops"], 2),
                          c["bf16"]["size"]]])]
    fp32_c = result.get("ceilings", {}).get("fp32", {}).get("gflops")
    if "inference" in result:
        out += ["", "### inference", _md(
            ["config", "model", "head", "precision", "format", "px", "batch", "images/s", "ms/batch", "GFLOP/s",
             "of fp32 ceiling", "reps", "note"],
            [[r["config"], r["model"] + (" (default)" if r["default"] else ""), r["head"], r["precision"],
              r["memory_format"],
              r["size"], r["batch"], _f(r["images_per_s"]), _f(r["ms_per_batch"], 1), _f(r["gflops"], 1),
              _f(r["gflops"] / fp32_c if fp32_c else None), r["reps"], r["note"]] for r in result["inference"]])]
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
        out += ["", "### dense vs multi-crop (seconds per image)", _md(
            ["config", "image", "dense", "50-crop", "ratio", "note"],
            [[c, f"{r['image'][0]}x{r['image'][1]}", _f(r["dense_s_per_image"], 3), _f(r["multicrop_s_per_image"], 3),
              _f(r["multicrop_over_dense"], 1), r["note"]] for c, r in result["multicrop"].items()])]
    if "profile" in result:
        for c, p in result["profile"].items():
            out += ["", f"### profile: {c}, one pass at {p['size']} px, batch 1 ({p['runtime']}), {p['total_ms']:.0f} ms",
                    _md(["op", "self ms", "share", "calls"],
                        [[o["op"], _f(o["self_ms"], 1), f"{o['share']:.0%}", o["calls"]] for o in p["ops"]])]
    if "agreement" in result:
        a = result["agreement"]
        out += ["", f"### fp32 vs {a['precision']} top-1 agreement ({a['checkpoint']}, {a['split']} split)",
                _md(["images", "agreement", "top-1 fp32", f"top-1 {a['precision']}", "seconds fp32",
                     f"seconds {a['precision']}"],
                    [[a["images"], f"{a['agreement']:.2%}", f"{a['top1']['fp32']:.2%}",
                      f"{a['top1'][a['precision']]:.2%}", _f(a["seconds"]["fp32"], 1),
                      _f(a["seconds"][a["precision"]], 1)]])]
    mem = result["memory"]
    fresh = all(v["per_section"] for v in mem.values() if isinstance(v, dict))
    out += ["", f"### peak memory (MiB, {'each section' if fresh else 'high-water mark so far'}; "
                f"process peak {mem['rss_peak_mb']}; largest loader worker {mem['children_rss_peak_mb']}, "
                f"pages shared with this process included)",
            _md(["section", "RSS peak", "CUDA max allocated"],
                [[k, v["rss_peak_mb"], v.get("cuda_max_allocated_mb", "-")] for k, v in mem.items() if isinstance(v, dict)])]
    s = result["summary"]
    out += ["", f"### targets ({s['config']})", _md(
        ["ratio", "measured", "target", "status", "why"],
        [[k, _f(t["value"]), f">= {t['threshold']}", t["status"], t["why"]] for k, t in s["targets"].items()])]
    if s.get("compile_speedup_vs_default"):
        out += ["", f"torch.compile on the default inference path: {s['compile_speedup_vs_default']:.2f}x the default "
                    "(not the default: compilation takes tens of seconds per input shape)"]
    if s.get("channels_last_over_nchw"):
        out += ["", "channels_last / NCHW (fp32, vggnet): " +
                ", ".join(f"{k}: {v:.2f}" for k, v in s["channels_last_over_nchw"].items())]
    return "\n".join(out)


# ----------------------------------------------------------------------------- bf16 vs fp32 agreement

def precision_agreement(checkpoint: str | os.PathLike, *, precision: str = "bf16", device: str | None = "cpu",
                        batch_size: int = 64, limit: int | None = None, split: str = "test") -> dict:
    """Top-1 agreement of a checkpoint's predictions in fp32 and in `precision` on its data's test split.

    The images are the checkpoint's own data (meta["data"], e.g. None for digits), rescaled and
    normalised as its meta says (section 3.2 single crop). Issue 5 asks for >= 99% on digits.
    """
    from .checkpoint import load_model
    from .data import eval_images
    from .transforms import eval_transform

    model, meta = load_model(checkpoint)
    if "mean" not in meta or "image_size" not in meta:
        raise UserError(f"checkpoint {checkpoint} has no data meta (mean, std, image_size); expected one written by vggnet train")
    dataset, _ = eval_images(meta.get("data"), split, seed=int(meta.get("seed", 0)))
    size = int(meta["image_size"])
    tf = eval_transform(image_size=size, eval_scale=int(meta.get("eval_scale", size)), mean=meta["mean"], std=meta["std"])
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = torch.stack([tf(dataset[i][0]) for i in range(n)])
    labels = torch.tensor([int(dataset[i][1]) for i in range(n)])
    dev = resolve_device(device)
    preds, seconds = {}, {}
    for prec in dict.fromkeys(("fp32", precision)):
        rt = resolve_runtime(str(dev), prec)
        net = rt.prepare(copy.deepcopy(model)).eval()
        out, t0 = [], time.perf_counter()
        with torch.inference_mode(), rt.autocast():
            for start in range(0, n, batch_size):
                out.append(net(rt.inputs(images[start:start + batch_size])).float().argmax(1).cpu())
        _sync(dev)
        seconds[prec], preds[prec] = time.perf_counter() - t0, torch.cat(out)
    return {"checkpoint": str(checkpoint), "split": split, "images": n, "precision": precision,
            "agreement": float((preds["fp32"] == preds[precision]).float().mean()),
            "top1": {p: float((v == labels).float().mean()) for p, v in preds.items()},
            "seconds": seconds, "device": str(dev), "target": 0.99}
