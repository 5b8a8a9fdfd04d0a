"""Section 3.1's training protocol, end to end: recipe -> run directory with checkpoints and metrics.

    cfg = resolve_config("digits", epochs=5)      # a recipe (recipes/*.yaml) plus overrides
    summary = train(cfg)                          # -> runs/<time>-A-digits/ (see rundir.py)

The paper's optimisation: mini-batch SGD with momentum 0.9 and weight decay 5e-4, dropout 0.5 on
the first two FC layers, learning rate 1e-2 divided by 10 whenever validation accuracy stops
improving; the rate was decreased three times. We read "decreased 3 times" as: the rate may drop
three times (1e-2 -> 1e-5); when validation accuracy stalls once more at the lowest rate, the
fourth drop that would follow ends training. The epoch budget (74 in the paper) ends it otherwise.

Starting points (`--init-from W`, any weights file vggnet reads): net A's first four conv layers
and FC layers into a deeper net (the paper's warm start, section 3.1); all tensors of the same
net (the S = 384 net from the S = 256 one); or, for new classes, every tensor but the last FC
layer, which is re-initialised (fine-tuning). `--finetune head` trains only the FC layers on
frozen features (Table 8 compares the two); the weights' preprocessing comes with them.

Determinism (what makes `--resume` exact): the shuffling order of epoch e comes from a sampler
seeded with (seed, e), and each training image's augmentation from torch's RNG seeded with
(seed, e, index), inside the worker that loads it. Every loader draws its workers' seeds from its
own generator, never from the global RNG, so starting worker processes in a resumed run does not
shift the random numbers dropout draws. Dropout and everything else in the main process draw from
the global RNGs, whose states every checkpoint stores.

Under `torchrun` each process trains a DistributedDataParallel replica on its shard of every
epoch; losses and accuracies are summed over processes, and only rank 0 writes or prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from .checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from .data import DataBundle, build_data
from .errors import UserError
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, complete_meta
from .metrics import Meter, format_epoch
from .model import VGG, vgg, warm_start
from .rundir import (DEFAULT_RECIPE, RECIPES_DIR, RunDir, TrainConfig, default_run_dir, flag_of, list_recipes,
                     load_recipe, resolve_config, resume_config)
from .runtime import Runtime, resolve_runtime
from .weights import read_weights

__all__ = ["TrainConfig", "TrainState", "Trainer", "TrainingFailed", "TrainingDiverged", "RECIPES_DIR",
           "DEFAULT_RECIPE", "list_recipes", "load_recipe", "resolve_config", "resume_config", "train", "train_step",
           "evaluate", "build_model", "pretrained", "weights_sha256"]

Log = Callable[[str], None]


class TrainingFailed(RuntimeError):
    """A run that had started could not go on (a full disk, an unwritable run directory); exit status 1."""


class TrainingDiverged(TrainingFailed):
    """The loss or the weights became NaN or infinite; the run stops and its last good checkpoint stays on disk."""


# ----------------------------------------------------------------------------- one step, one pass

def train_step(model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer,
               runtime: Runtime, *, scaler: torch.amp.GradScaler | None = None,
               check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """One SGD step on one batch: forward under autocast, cross-entropy, backward, update.

    images (N, 3, H, W) and labels (N,) may live on the CPU; they are moved to `runtime`'s device
    and memory format. Returns the detached (loss, logits). With `check_finite` a NaN or infinite
    loss raises TrainingDiverged *before* the weights change (one host sync per step; under
    torchrun all processes agree, so none is left waiting). Benchmarks pass check_finite=False.
    """
    images = runtime.inputs(images)
    labels = labels.to(runtime.device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with runtime.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    if check_finite:
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise TrainingDiverged(f"loss is {loss.item()}")
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) of `model` over `loader`, summed over processes."""
    model.eval()
    meter = Meter()
    for images, labels in loader:
        labels = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = model(runtime.inputs(images))
        meter.update(F.cross_entropy(logits.float(), labels), logits, labels)
    return meter.all_reduce(runtime.device).value()


def weights_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """A fingerprint of a state dict (names and bytes, in order): equal weights, equal digests."""
    h = hashlib.sha256()
    for key, value in state_dict.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _finite(model: nn.Module) -> bool:
    """True when every floating-point tensor of `model` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


# ----------------------------------------------------------------------------- starting points

@dataclass
class InitReport:
    """What `--init-from` did to the net: tensors loaded, re-initialised and frozen."""

    how: str
    loaded: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.how}: loaded {len(self.loaded)} tensors"]
        if self.reset:
            parts.append(f"re-initialised {len(self.reset)} ({', '.join(sorted({k.rsplit('.', 1)[0] for k in self.reset}))})")
        parts.append(f"froze {len(self.frozen)} (the conv layers)" if self.frozen else "froze none")
        return "; ".join(parts)


def resolve_net(cfg: TrainConfig, source: Mapping[str, Any] | None) -> TrainConfig:
    """Fill what the config leaves to the weights: configuration, batch norm, head, preprocessing."""
    args = source["model_args"] if source is not None else {}
    updates = {k: args[k] for k in ("config", "batch_norm", "head") if getattr(cfg, k) is None and k in args}
    if cfg.width is None:
        updates["width"] = float(args.get("width", 1.0))
    if cfg.mean_std is None:
        updates["mean_std"] = "weights" if source is not None and _preprocessing(source) else "dataset"
    return dataclasses.replace(cfg, **updates)


def _preprocessing(source: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mean/std/input_range a weights file was trained with, when it says (or is torchvision's ImageNet file)."""
    meta = source.get("meta") or {}
    if not meta.get("mean") and int(source["model_args"]["num_classes"]) != 1000:
        return None
    done = complete_meta(meta, source["model_args"])
    return {"mean": [float(v) for v in done["mean"]], "std": [float(v) for v in done["std"]],
            "input_range": float(done.get("input_range", 1.0))}


def build_model(cfg: TrainConfig, num_classes: int, *, log: Log = print, source: Mapping[str, Any] | None = None,
                class_names: list[str] | None = None) -> VGG:
    """The net of `cfg` with `num_classes` outputs, started from `cfg.init_from` when set.

    `source` is the already loaded `cfg.init_from` (vggnet.weights.read_weights: any format), read
    again when omitted. The last FC layer is re-initialised when the class count differs, or
    when both the weights and `class_names` name their classes and the names differ (digits 0-4
    -> 5-9). Logs what was loaded, re-initialised and frozen.
    """
    if cfg.init_from and source is None:
        source = read_weights(cfg.init_from)
    cfg = resolve_net(cfg, source)
    model = vgg(cfg.config, batch_norm=cfg.batch_norm, num_classes=num_classes, head=cfg.head,
                dropout=cfg.dropout, init=cfg.init, width=cfg.width)
    if source is None:
        return model
    known = (source.get("meta") or {}).get("class_names")
    new_classes = int(source["model_args"]["num_classes"]) != num_classes or bool(
        known and class_names and [str(c) for c in known] != [str(c) for c in class_names])
    report = _load_start(model, source, cfg, new_classes=new_classes)
    if cfg.finetune == "head":
        for name, p in model.features.named_parameters():
            p.requires_grad_(False)
            report.frozen.append(f"features.{name}")
    log(f"{report} (from {cfg.init_from})")
    return model


def _load_start(model: VGG, source: Mapping[str, Any], cfg: TrainConfig, *, new_classes: bool) -> InitReport:
    """Load `source` into `model`: the same net (fine-tune, new classes re-initialised) or net A (warm start)."""
    src_args, state = source["model_args"], dict(source["state_dict"])
    last = f"classifier.{len(model.classifier) - 1}"
    if src_args["config"] == cfg.config:
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(last + ".")}
        if new_classes:  # the last FC layer is the one part that cannot carry over to other classes
            state.update(fresh)
        check_state_dict(model, state, source=f"--init-from {cfg.init_from}")
        model.load_state_dict(state)
        how = "fine-tune" if new_classes else f"fine-tune (configuration {cfg.config}, all tensors)"
        return InitReport(how, loaded=[k for k in state if k not in fresh or not new_classes],
                          reset=list(fresh) if new_classes else [])
    if src_args["config"] != "A":
        raise UserError(f"--init-from expects weights of configuration A (warm start, section 3.1) or of "
                        f"{cfg.config} (fine-tuning), got configuration {src_args['config']} in {cfg.init_from}; "
                        f"pass --config {src_args['config']} to fine-tune that net")
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(last + ".")} if new_classes else {}
    try:
        warm = warm_start(model, {**state, **fresh})
    except ValueError as e:
        raise UserError(f"--init-from {cfg.init_from}: {e}") from None
    loaded = [k for k in warm.copied if k not in fresh]
    return InitReport(f"warm start from net A (section 3.1), {len(warm.fresh)} tensors left fresh", loaded=loaded,
                      reset=list(fresh))


def pretrained(weights: str | os.PathLike, *, num_classes: int | None = None, finetune: str = "all",
               dropout: float = 0.5, log: Log | None = None) -> VGG:
    """The net a weights file holds (any format vggnet reads), every tensor loaded, ready to fine-tune.

    With `num_classes` different from the file's, the last FC layer is re-initialised (timm's
    `reset_classifier`); `finetune="head"` freezes the conv layers. The file's preprocessing is
    in `read_weights(weights)["meta"]` (see vggnet.nets.load_net for a net ready to test).
    """
    source = read_weights(weights)
    cfg = resolve_net(TrainConfig(config=None, batch_norm=None, head=None, dropout=dropout, init="glorot",
                                  init_from=str(weights), finetune=finetune), source)
    classes = num_classes or int(source["model_args"]["num_classes"])
    return build_model(cfg, classes, log=log or (lambda line: None), source=source)


def _param_groups(model: VGG, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The FC layers at lr, the conv layers at lr x features_lr_mult; frozen tensors left out."""
    head = [p for p in model.classifier.parameters() if p.requires_grad]
    features = [p for p in model.features.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.lr, "lr_mult": 1.0, "name": "classifier"}]
    if features:
        groups.append({"params": features, "lr": cfg.lr * cfg.features_lr_mult, "lr_mult": cfg.features_lr_mult,
                       "name": "features"})
    return groups


_OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW"}


def _optimizer(model: VGG, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The paper's SGD with momentum, or AdamW (decoupled weight decay; `momentum` is its beta1)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- determinism

def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (SeedSequence: well mixed, stable across processes and versions)."""
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(2, np.uint64)[0] >> 1)


class _SeededItems(Dataset):
    """dataset[(epoch, i)]: item i augmented with torch's RNG seeded from (seed, epoch, i).

    The caller's RNG state is left untouched (with workers=0 this runs in the training process,
    where dropout draws from the same global RNG).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.dataset[index]


class _EpochSampler(Sampler):
    """Wraps a DistributedSampler (shuffle seeded by seed + epoch) and tags each index with the epoch."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def _seed_worker(worker_id: int) -> None:
    # The DataLoader seeds torch per worker from its generator; give python and numpy matching seeds.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as weights_only-loadable data (tensors, ints, lists)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


# ----------------------------------------------------------------------------- processes

class _Procs:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, owns_group: bool = False) -> None:
        self.rank, self.world, self.owns_group = rank, world, owns_group
        self.main = rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_state(self, module: nn.Module) -> None:
        """Every process takes rank 0's parameters and buffers (BN running statistics)."""
        if self.world > 1:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)


def _init_processes(device: str) -> tuple[_Procs, str]:
    """Join the torchrun job if there is one: nccl and this local rank's GPU on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Procs(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return _Procs(dist.get_rank(), dist.get_world_size(), owns), device


@dataclass
class _Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader | None


def _loaders(bundle: DataBundle, cfg: TrainConfig, procs: _Procs, runtime: Runtime) -> _Loaders:
    """Train loader (seeded per epoch and image, sharded by DistributedSampler); val/test sharded without padding.

    Each loader has its own generator: a DataLoader without one draws its workers' base seed from
    the global RNG when its first iterator starts, which happens at a different moment in a
    resumed process and would shift dropout's random numbers from then on.
    """
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=runtime.device.type == "cuda",
                  worker_init_fn=_seed_worker)
    sampler = _EpochSampler(DistributedSampler(bundle.train, num_replicas=procs.world, rank=procs.rank,
                                               shuffle=True, seed=cfg.seed))
    # Full batches only (when there are enough images): equal step sizes, and no 1-image batch for BN.
    train = DataLoader(_SeededItems(bundle.train, cfg.seed), sampler=sampler, drop_last=len(sampler) >= cfg.batch_size,
                       persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed), **common)

    def shard(ds: Dataset, persistent: bool) -> DataLoader:
        return DataLoader(Subset(ds, range(procs.rank, len(ds), procs.world)), generator=torch.Generator(),
                          persistent_workers=persistent and cfg.workers > 0, **common)

    return _Loaders(train, shard(bundle.val, persistent=True),
                    shard(bundle.test, persistent=False) if bundle.test is not None else None)


def _build_data(cfg: TrainConfig, source: Mapping[str, Any] | None) -> DataBundle:
    """The data bundle of `cfg`; errors from the data speak in flags (--image-size), not field names."""
    mean_std: Any = cfg.mean_std
    if cfg.mean_std == "weights":
        mean_std = _preprocessing(source) if source is not None else None
        if mean_std is None:
            raise UserError(f"--mean-std weights: {cfg.init_from or 'the run'} records no preprocessing "
                            "(mean/std); use --mean-std dataset or imagenet")
        if _is_imagenet(mean_std):
            mean_std = "imagenet"  # the same numbers, under the name every data source knows
    try:
        return build_data(cfg.data, image_size=cfg.image_size, train_scale=cfg.train_scale, test_scale=cfg.test_scale,
                          mean_std=mean_std, lighting=cfg.lighting, strict=cfg.strict, seed=cfg.seed,
                          synthetic_size=cfg.synthetic_size, hflip=cfg.hflip)
    except UserError as e:
        raise UserError(_in_flags(str(e))) from None


def _is_imagenet(pre: Mapping[str, Any]) -> bool:
    return pre["input_range"] == 1.0 and all(abs(a - b) < 1e-7 for a, b in zip([*pre["mean"], *pre["std"]],
                                                                               [*IMAGENET_MEAN, *IMAGENET_STD]))


_FIELD_WORDS = re.compile(r"\b(image_size|train_scale|eval_scale|test_scale|mean_std|synthetic_size|lighting)\b(=?)")


def _in_flags(message: str) -> str:
    """Internal field names in a message -> the flags that set them (eval_scale=32 -> --test-scale 32)."""
    def flag(m: re.Match) -> str:
        name = "test_scale" if m.group(1) == "eval_scale" else m.group(1)
        return flag_of(name) + (" " if m.group(2) else "")
    return _FIELD_WORDS.sub(flag, message)


# ----------------------------------------------------------------------------- the run

@dataclass
class TrainState:
    """Where a run stands; checkpoints/last.pt stores it (as a dict) with the RNG states."""

    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    lr_drops: int = 0
    stop_reason: str | None = None
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Train as `cfg` says, into the run directory `cfg.out` (default runs/<time>-<config>-<data>).

    `resume=True` continues the run in `cfg.out` from checkpoints/last.pt (use `resume_config`
    to read its configuration); `force=True` lets a new run write into a directory that holds
    other files or a finished run. Returns the summary also written to summary.json. Raises
    UserError for bad input (before training starts), TrainingDiverged when the loss or the
    weights stop being finite and TrainingFailed when run files cannot be written.
    """
    start = time.perf_counter()
    procs, device = _init_processes(cfg.device)
    try:
        trainer = Trainer.create(cfg, procs=procs, device=device, resume=resume, force=force,
                                 log=log if procs.main else (lambda line: None))
        return trainer.fit(start)
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


@dataclass(kw_only=True)
class Trainer:
    """One run: the net, its optimiser and data, the run directory and where training stands."""

    cfg: TrainConfig
    procs: _Procs
    run: RunDir
    runtime: Runtime
    bundle: DataBundle
    model: VGG                   # the net itself: checkpoints, BN broadcast
    net: nn.Module               # what trains: DDP and/or compiled wrapper of model
    eval_net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    loaders: _Loaders
    meta: dict[str, Any]
    state: TrainState
    log: Log
    resumed: bool = False
    writer: Any = None
    started: float = 0.0         # perf_counter() when this process began
    prior_wall: float = 0.0      # wall seconds of the run before this process (resumed runs)

    @classmethod
    def create(cls, cfg: TrainConfig, *, procs: _Procs, device: str, resume: bool, force: bool, log: Log) -> Trainer:
        """Check the run directory, load the data and the starting weights, build the optimiser."""
        source = read_weights(cfg.init_from) if cfg.init_from and not resume else None
        cfg = resolve_net(cfg, source)  # config.yaml records the resolved net
        run = RunDir(cfg.out or procs.broadcast(str(_fresh(default_run_dir(cfg.config, cfg.data)))))
        if resume:
            run.require_checkpoint()
        elif procs.main:
            run.check_new(force=force)
        resumed = load_checkpoint(run.last) if resume else None  # on the CPU: RNG states must stay CPU tensors
        cfg = dataclasses.replace(cfg, out=str(run.path))
        _seed_everything(cfg.seed + procs.rank)
        bundle = _build_data(cfg, source or resumed)  # bad data is refused before anything is written
        if procs.main:
            run.create().write_config(cfg.to_dict())
        runtime = resolve_runtime(device, cfg.precision, cfg.channels_last, training=True, image_size=bundle.image_size)
        if runtime.device.type == "cuda":
            torch.backends.cudnn.benchmark = True          # fixed input sizes: let cuDNN pick the fastest kernels
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _log_header(log, cfg, bundle, runtime, procs, run)
        model = build_model(dataclasses.replace(cfg, init_from=None) if resume else cfg, bundle.num_classes,
                            log=log, source=source, class_names=list(bundle.class_names))
        if resume and cfg.finetune == "head":
            model.features.requires_grad_(False)
        model = runtime.prepare(model)
        optimizer = _optimizer(model, cfg)
        net: nn.Module = DistributedDataParallel(model) if procs.world > 1 else model
        eval_net: nn.Module = model
        if cfg.compile:
            net, eval_net = torch.compile(net), torch.compile(model)
        trainer = cls(cfg=cfg, procs=procs, run=run, runtime=runtime, bundle=bundle, model=model, net=net,
                      eval_net=eval_net, optimizer=optimizer,
                      scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(
                          optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience),
                      scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16"),
                      loaders=_loaders(bundle, cfg, procs, runtime), meta=_run_meta(bundle, cfg, source or resumed),
                      state=TrainState(), log=log, resumed=resume)
        if resumed is not None:
            trainer.restore(resumed)
        return trainer

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue from checkpoints/last.pt: weights, optimiser, schedule, scaler, state and RNGs."""
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        saved = dict(ckpt["train_state"])
        rng = saved.pop("rng")
        self.state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
        self.log(f"resuming {self.run.path} after epoch {self.state.epoch} (step {self.state.step})")
        # last: everything before may draw random numbers (model init)
        _set_rng_state(rng[self.procs.rank] if len(rng) == self.procs.world else rng[0])

    def fit(self, start: float) -> dict[str, Any]:
        """The epoch loop (section 3.1's schedule), then the test of the best-validation weights."""
        self.started, self.prior_wall = start, self.state.wall_seconds
        if self.procs.main:
            self.writer = self.run.tensorboard_writer(purge_step=self.state.epoch + 1 if self.resumed else None)
        try:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                if self.state.stop_reason:
                    break
                self.epoch(epoch)
                if self.state.stop_reason:
                    self.log(f"stopping: {self.state.stop_reason}")
            final_hashes = self.procs.gather(weights_sha256(self.model.state_dict()))
            summary = self.finish(final_hashes)
        finally:
            if self.writer is not None:
                self.writer.close()
        self.log(f"test ({summary['test_split']}) top-1 {summary['test_top1']:.2f}%  top-5 {summary['test_top5']:.2f}%  "
                 f"(best epoch {self.state.best_epoch} of {self.state.epoch}, {summary['wall_seconds']:.0f} s)")
        self.log(f"run directory: {self.run.path}")
        return summary

    def epoch(self, epoch: int) -> None:
        """Train one epoch, validate, step the schedule, save (checkpoints first) and log one line."""
        train_m, seconds = self.train_epoch(epoch)
        self.procs.broadcast_state(self.model)  # BN statistics: rank 0's everywhere, as checkpoints hold them
        if not _finite(self.model):
            raise TrainingDiverged(f"the weights became non-finite in epoch {epoch + 1}; training stopped, the last "
                                   "good checkpoint is kept (try a lower --lr or --batch-norm)")
        val_m = evaluate(self.eval_net, self.loaders.val, self.runtime)
        lr = self.optimizer.param_groups[0]["lr"]
        self.step_schedule(epoch, val_m["top1"])
        improved = val_m["top1"] > self.state.best_top1
        if improved:
            self.state.best_top1, self.state.best_epoch = val_m["top1"], epoch + 1
        row = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train_m.items() if k != "images"},
               **{f"val_{k}": v for k, v in val_m.items() if k != "images"},
               "images_per_s": train_m["images"] / seconds, "seconds": seconds}
        self.state.history.append(row)
        self.state.epoch = epoch + 1
        self.state.wall_seconds = self.prior_wall + time.perf_counter() - self.started
        rngs = self.procs.gather(_rng_state())
        if self.procs.main:
            self.save(row, improved, val_m, rngs)
            self.log(format_epoch(row, self.cfg.epochs, best=improved))

    def step_schedule(self, epoch: int, val_top1: float) -> None:
        """lr / 10 when val top-1 stalls; a stall past the allowed decreases ends training (section 3.1)."""
        lr = self.optimizer.param_groups[0]["lr"]
        if epoch + 1 >= self.cfg.warmup_epochs:
            self.scheduler.step(val_top1)
            if self.optimizer.param_groups[0]["lr"] < lr:
                self.state.lr_drops += 1
        if self.state.lr_drops > self.cfg.max_lr_drops:
            self.state.stop_reason = (f"validation top-1 stopped improving at the lowest learning rate "
                                      f"({self.cfg.max_lr_drops} decreases allowed, section 3.1)")

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One pass over the training shard with a progress bar (loss, accuracy, images/s, ETA) on rank 0."""
        self.net.train()
        if self.cfg.finetune == "head":
            self.model.features.eval()  # frozen features: BN keeps the weights' running statistics
        loader = self.loaders.train
        loader.sampler.set_epoch(epoch)
        warmup_steps = round(self.cfg.warmup_epochs * len(loader))
        meter = Meter()
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", leave=False,
                   dynamic_ncols=True, disable=True if not self.procs.main else None)
        begin, seen = time.perf_counter(), 0
        for i, (images, labels) in enumerate(loader):
            if self.state.step < warmup_steps:  # linear warm-up (recipe option; not in the paper)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.lr * group.get("lr_mult", 1.0) * (self.state.step + 1) / warmup_steps
            try:
                loss, logits = train_step(self.net, images, labels, self.optimizer, self.runtime, scaler=self.scaler)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {self.state.step + 1}; training stopped, the "
                                       "last good checkpoint is kept (try a lower --lr or --batch-norm)") from None
            meter.update(loss, logits, labels.to(self.runtime.device))
            self.state.step += 1
            seen += len(labels) * self.procs.world
            if not bar.disable and (i % 5 == 0 or i + 1 == len(loader)):
                v = meter.value()
                bar.set_postfix({"loss": f"{v['loss']:.4f}", "acc": f"{v['top1']:.1f}%",
                                 "img/s": f"{seen / (time.perf_counter() - begin):.0f}"})
            bar.update()
        bar.close()
        return meter.all_reduce(self.runtime.device).value(), time.perf_counter() - begin

    def save(self, row: dict[str, Any], improved: bool, val_m: dict[str, float], rngs: list[Any]) -> None:
        """Rank 0, after each epoch: checkpoints first (atomic), then metrics.jsonl, curves.png, TensorBoard.

        A write that fails (a full disk) stops the run with TrainingFailed; the atomic writer leaves
        the previous file whole, so the last checkpoint is the previous epoch's.
        """
        epoch = row["epoch"]
        state = {**dataclasses.asdict(self.state), "rng": rngs}
        with _writing(self.run):
            if improved:
                save_checkpoint(self.run.best, self.model, meta=self.meta, train_state={"epoch": epoch, "val": val_m})
            save_checkpoint(self.run.last, self.model, meta=self.meta, optimizer=self.optimizer.state_dict(),
                            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), train_state=state)
            self.run.write_metrics(self.state.history)
            self.run.plot_curves(self.state.history)
        for key, value in row.items():
            if key != "epoch":  # train_loss -> train/loss, val_top1 -> val/top1; lr, images_per_s, seconds as is
                name = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def finish(self, final_hashes: list[str]) -> dict[str, Any]:
        """Test the best-validation weights (section 4 reports the selected net) and write summary.json.

        The test runs at the run's precision and memory format, the ones summary.json records.
        """
        if self.procs.main and self.run.best.is_file():
            self.model.load_state_dict(load_checkpoint(self.run.best)["state_dict"])
        self.procs.broadcast_state(self.model)
        loader = self.loaders.test or self.loaders.val
        test_m = evaluate(self.eval_net, loader, self.runtime)
        history, state = self.state.history, self.state
        train_seconds = sum(r["seconds"] for r in history)
        images = sum(r["images_per_s"] * r["seconds"] for r in history)
        summary = {"test_split": "test" if self.loaders.test is not None else "val",
                   "test_top1": test_m["top1"], "test_top5": test_m["top5"], "test_loss": test_m["loss"],
                   "test_images": test_m["images"], "best_epoch": state.best_epoch, "best_val_top1": state.best_top1,
                   "epochs": state.epoch, "steps": state.step, "stop_reason": state.stop_reason or "epoch budget",
                   "wall_seconds": self.prior_wall + time.perf_counter() - self.started,
                   "images_per_s": images / train_seconds if train_seconds else 0.0,
                   "precision": self.runtime.precision,
                   "memory_format": "channels_last" if self.runtime.channels_last else "NCHW",
                   "device": str(self.runtime.device), "processes": self.procs.world,
                   "weights_sha256": final_hashes[0], "config": self.cfg.to_dict()}
        if self.procs.world > 1:
            summary["replica_weights_sha256"] = final_hashes
        if self.procs.main:
            with _writing(self.run):
                self.run.write_summary(summary)
            for k in ("top1", "top5", "loss"):
                self.writer.add_scalar(f"test/{k}", summary[f"test_{k}"], state.epoch)
        return summary


class _writing:
    """Turn an OSError while writing run files into TrainingFailed: one line, exit status 1."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, OSError):
            what = error.strerror or str(error)
            raise TrainingFailed(f"cannot write to the run directory {self.run.path} ({what}); training stopped, "
                                 f"the previous checkpoint is intact: free space, then --resume {self.run.path}") from None
        return False


def _run_meta(bundle: DataBundle, cfg: TrainConfig, source: Mapping[str, Any] | None) -> dict[str, Any]:
    """What checkpoints record about the inputs (eval, predict and export read it) and the config."""
    meta = {**bundle.meta(), "train_config": cfg.to_dict()}
    pre = _preprocessing(source) if cfg.mean_std == "weights" and source is not None else None
    if pre is not None:
        meta.setdefault("input_range", pre["input_range"])
    return meta


def _fresh(path: Path) -> Path:
    """`path`, or path-2, path-3, ... if a run started in the same second already took it."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _log_header(log: Log, cfg: TrainConfig, bundle: DataBundle, runtime: Runtime, procs: _Procs, run: RunDir) -> None:
    bn = " with batch norm" if cfg.batch_norm else ""
    log(f"vggnet train: configuration {cfg.config}{bn} ({cfg.head} head, {cfg.init} init, dropout {cfg.dropout}), "
        f"recipe {cfg.recipe}" + (f", from {cfg.init_from} ({cfg.finetune} layers train)" if cfg.init_from else ""))
    sizes = " / ".join(f"{len(d)} {s}" for s, d in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
                       if d is not None)
    log(f"data: {bundle.name}, {bundle.num_classes} classes, {sizes} images"
        + (f"; {bundle.skipped} unreadable images skipped" if bundle.skipped else ""))
    for note in getattr(bundle, "notes", ()) or ():
        log(f"data: {note}")
    log(f"sizes: {_sizes_line(cfg, bundle)}")
    log(f"preprocessing: mean {_fmt(bundle.mean)} std {_fmt(bundle.std)} ({_mean_std_reason(cfg)})")
    memory = "" if cfg.channels_last is None else (" (--channels-last)" if cfg.channels_last else " (--no-channels-last)")
    log(f"{runtime}{memory}; {cfg.workers} loader worker{'s' * (cfg.workers != 1)}; "
        f"torch.compile {'on' if cfg.compile else 'off'}; {procs.world} process{'es' if procs.world > 1 else ''}")
    stall = cfg.lr_patience + 1
    mult = f", conv layers at lr x {cfg.features_lr_mult:g}" if cfg.features_lr_mult != 1 and cfg.finetune == "all" else ""
    moment = f"momentum {cfg.momentum}" if cfg.optimizer == "sgd" else f"betas ({cfg.momentum}, 0.999)"
    log(f"{_OPTIMIZER_NAMES[cfg.optimizer]} lr {cfg.lr}{mult} {moment} weight decay {cfg.weight_decay}, "
        f"batch {cfg.batch_size}"
        f"{' per process' if procs.world > 1 else ''}; lr / {1 / cfg.lr_factor:g} after {stall} epoch{'s' * (stall > 1)} "
        f"without a better val top-1, {cfg.max_lr_drops} times at most; {cfg.epochs} epochs at most")
    log(f"run directory: {run.path}")


def _sizes_line(cfg: TrainConfig, bundle: DataBundle) -> str:
    """Crop, S and Q, each with where it came from (flag or recipe, or chosen to suit the data)."""
    def why(value: Any, flag: str) -> str:
        return f"{flag} or recipe" if value is not None else "chosen for the data"
    s_min, s_max = bundle.train_scale
    scale = f"in [{s_min}, {s_max}]" if s_min != s_max else f"= {s_min}"
    reason = getattr(bundle, "sizes_reason", None)
    return (f"{bundle.image_size} px crops ({why(cfg.image_size, '--image-size')}), training scale S {scale} "
            f"({why(cfg.train_scale, '--train-scale')}), test scale Q = {bundle.eval_scale} "
            f"({why(cfg.test_scale, '--test-scale')})" + (f"; {reason}" if reason else ""))


def _mean_std_reason(cfg: TrainConfig) -> str:
    return {"weights": f"the preprocessing {cfg.init_from} was trained with",
            "imagenet": "ImageNet's published statistics",
            "dataset": "measured on the training images"}.get(str(cfg.mean_std), str(cfg.mean_std))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.3f}" for v in values) + "]"
