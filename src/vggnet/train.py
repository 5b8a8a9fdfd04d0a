"""Section 3.1's training protocol, end to end: recipe -> run directory with checkpoints and metrics.

    cfg = resolve_config("digits", epochs=5)      # a recipe (recipes/*.yaml) plus overrides
    summary = train(cfg)                          # -> runs/<time>-A-digits/ (see rundir.py)

The paper's optimisation: mini-batch SGD with momentum 0.9 and weight decay 5e-4, dropout 0.5 on
the first two FC layers, learning rate 1e-2 divided by 10 whenever validation accuracy stops
improving; the rate was decreased three times. We read "decreased 3 times" as: the rate may drop
three times (1e-2 -> 1e-5); when validation accuracy stalls once more at the lowest rate, the
fourth drop that would follow ends training. The epoch budget (74 in the paper) ends it otherwise.

Determinism (what makes `--resume` exact): the shuffling order of epoch e comes from a sampler
seeded with (seed, e), and each training image's augmentation from torch's RNG seeded with
(seed, e, index), inside the worker that loads it. So epoch e sees the same crops whatever
happened before it: a restart, a different number of worker processes. Dropout and everything
else in the main process draw from the global RNGs, whose states every checkpoint stores.

Under `torchrun` each process trains a DistributedDataParallel replica on its shard of every
epoch; losses and accuracies are summed over processes, and only rank 0 writes or prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time
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
from .data import build_data
from .errors import UserError
from .metrics import Meter, format_epoch
from .model import VGG, vgg, warm_start
from .rundir import (DEFAULT_RECIPE, RECIPES_DIR, RunDir, TrainConfig, default_run_dir, list_recipes, load_recipe,
                     resolve_config, resume_config)
from .runtime import Runtime, resolve_runtime

__all__ = ["TrainConfig", "TrainingDiverged", "RECIPES_DIR", "DEFAULT_RECIPE", "list_recipes", "load_recipe",
           "resolve_config", "resume_config", "train", "train_step", "evaluate", "build_model"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops and its last good checkpoint stays on disk."""


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


def build_model(cfg: TrainConfig, num_classes: int, *, log=print) -> VGG:
    """The net of `cfg`; with `init_from`, warm-started from net A (section 3.1) or fine-tuned from the same net."""
    model = vgg(cfg.config, batch_norm=cfg.batch_norm, num_classes=num_classes, head=cfg.head,
                dropout=cfg.dropout, init=cfg.init)
    if cfg.init_from:
        ckpt = load_checkpoint(cfg.init_from)
        src = ckpt["model_args"]
        if src["config"] == cfg.config:  # e.g. S=384 from the S=256 net, jitter from S=384
            check_state_dict(model, ckpt["state_dict"], source=cfg.init_from)
            model.load_state_dict(ckpt["state_dict"])
            log(f"fine-tune: loaded all {len(ckpt['state_dict'])} tensors of configuration {cfg.config} from {cfg.init_from}")
        elif src["config"] == "A":
            try:
                log(str(warm_start(model, ckpt["state_dict"])) + f" (from {cfg.init_from})")
            except ValueError as e:
                raise UserError(f"--init-from {cfg.init_from}: {e}") from None
        else:
            raise UserError(f"--init-from expects a checkpoint of configuration A (warm start, section 3.1) or of "
                            f"{cfg.config} (fine-tuning), got configuration {src['config']} in {cfg.init_from}")
    return model


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


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


def _loaders(bundle, cfg: TrainConfig, procs: _Procs, runtime: Runtime):
    """Train loader (seeded per epoch and image, sharded by DistributedSampler); val/test loaders sharded without padding."""
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=runtime.device.type == "cuda",
                  worker_init_fn=_seed_worker)
    sampler = _EpochSampler(DistributedSampler(bundle.train, num_replicas=procs.world, rank=procs.rank,
                                               shuffle=True, seed=cfg.seed))
    # Full batches only (when there are enough images): equal step sizes, and no 1-image batch for BN.
    train = DataLoader(_SeededItems(bundle.train, cfg.seed), sampler=sampler, drop_last=len(sampler) >= cfg.batch_size,
                       persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed), **common)

    def shard(ds: Dataset, persistent: bool) -> DataLoader:
        return DataLoader(Subset(ds, range(procs.rank, len(ds), procs.world)),
                          persistent_workers=persistent and cfg.workers > 0, **common)

    val = shard(bundle.val, persistent=True)
    test = shard(bundle.test, persistent=False) if bundle.test is not None else None
    return train, val, test


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train as `cfg` says, into the run directory `cfg.out` (default runs/<time>-<config>-<data>).

    `resume=True` continues the run in `cfg.out` from checkpoints/last.pt (use `resume_config`
    to read its configuration). Returns the summary also written to summary.json. Raises
    UserError for bad input and TrainingDiverged when the loss stops being finite.
    """
    start = time.perf_counter()
    procs, device = _init_processes(cfg.device)
    try:
        return _train(cfg, resume, procs, device, start)
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, procs: _Procs, device: str, start: float) -> dict[str, Any]:
    log = print if procs.main else (lambda *a, **k: None)
    run = RunDir(cfg.out or procs.broadcast(str(_fresh(default_run_dir(cfg.config, cfg.data)))))
    cfg = dataclasses.replace(cfg, out=str(run.path))  # config.yaml records where the run lives
    if resume:
        run.require_checkpoint()
    elif run.last.exists():
        raise UserError(f"{run.path} already holds a run (checkpoints/last.pt): continue it with "
                        f"--resume {run.path}, or choose another --out")
    _seed_everything(cfg.seed + procs.rank)
    bundle = build_data(cfg.data, image_size=cfg.image_size, train_scale=cfg.train_scale, eval_scale=cfg.eval_scale,
                        mean_std=cfg.mean_std, lighting=cfg.lighting, strict=cfg.strict, seed=cfg.seed,
                        synthetic_size=cfg.synthetic_size, hflip=cfg.hflip)
    runtime = resolve_runtime(device, cfg.precision, cfg.channels_last)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True          # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = runtime.prepare(build_model(cfg, bundle.num_classes, log=log if not resume else (lambda *a: None)))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_top1": -1.0, "best_epoch": 0, "lr_drops": 0,
                             "stop_reason": None, "wall_seconds": 0.0, "history": []}
    rng = None
    if resume:
        ckpt = load_checkpoint(run.last)  # on the CPU: RNG states must stay CPU tensors
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["train_state"].pop("rng")
        state.update(ckpt["train_state"])
    net: nn.Module = DistributedDataParallel(model) if procs.world > 1 else model
    eval_net: nn.Module = model
    if cfg.compile:
        net, eval_net = torch.compile(net), torch.compile(model)
    train_loader, val_loader, test_loader = _loaders(bundle, cfg, procs, runtime)
    meta = {**bundle.meta(), "train_config": cfg.to_dict()}

    if procs.main:
        run.create().write_config(cfg.to_dict())
        writer = run.tensorboard_writer(purge_step=state["epoch"] + 1 if resume else None)
    _log_header(log, cfg, bundle, runtime, procs, run, state if resume else None)
    if rng is not None:  # last: everything above may draw random numbers (model init)
        _set_rng_state(rng[procs.rank] if len(rng) == procs.world else rng[0])
    prior_wall = state["wall_seconds"]
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            if state["stop_reason"]:
                break
            train_m, seconds = _train_epoch(net, train_loader, optimizer, runtime, scaler, cfg, epoch, state, procs)
            procs.broadcast_state(model)  # BN statistics: rank 0's everywhere, as checkpoints hold them
            val_m = evaluate(eval_net, val_loader, runtime)
            lr = optimizer.param_groups[0]["lr"]
            if epoch + 1 >= cfg.warmup_epochs:
                scheduler.step(val_m["top1"])
                if optimizer.param_groups[0]["lr"] < lr:
                    state["lr_drops"] += 1
            if state["lr_drops"] > cfg.max_lr_drops:
                state["stop_reason"] = (f"validation top-1 stopped improving at the lowest learning rate "
                                        f"({cfg.max_lr_drops} decreases allowed, section 3.1)")
            improved = val_m["top1"] > state["best_top1"]
            if improved:
                state["best_top1"], state["best_epoch"] = val_m["top1"], epoch + 1
            row = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train_m.items() if k != "images"},
                   **{f"val_{k}": v for k, v in val_m.items() if k != "images"},
                   "images_per_s": train_m["images"] / seconds, "seconds": seconds}
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["wall_seconds"] = prior_wall + time.perf_counter() - start
            rngs = procs.gather(_rng_state())
            if procs.main:
                _save_epoch(run, writer, model, meta, optimizer, scheduler, scaler, {**state, "rng": rngs}, row,
                            improved, val_m)
                tqdm.write(format_epoch(row, cfg.epochs, best=improved))
            if state["stop_reason"]:
                log(f"stopping: {state['stop_reason']}")
        _debug_hash(model, procs)
        summary = _finish(cfg, run, model, eval_net, test_loader or val_loader, runtime, procs, state, prior_wall,
                          start, test_split="test" if test_loader is not None else "val")
        if procs.main:
            for k in ("top1", "top5", "loss"):
                writer.add_scalar(f"test/{k}", summary[f"test_{k}"], state["epoch"])
    finally:
        if procs.main:
            writer.close()
    log(f"test ({summary['test_split']}) top-1 {summary['test_top1']:.2f}%  top-5 {summary['test_top5']:.2f}%  "
        f"(best epoch {state['best_epoch']} of {state['epoch']}, {summary['wall_seconds']:.0f} s)")
    log(f"run directory: {run.path}")
    return summary


def _save_epoch(run: RunDir, writer, model: VGG, meta: dict, optimizer, scheduler, scaler, train_state: dict,
                row: dict[str, Any], improved: bool, val_m: dict[str, float]) -> None:
    """Rank 0, after each epoch: checkpoints first (atomic), then metrics.jsonl, curves.png, TensorBoard."""
    epoch = row["epoch"]
    if improved:
        save_checkpoint(run.best, model, meta=meta, train_state={"epoch": epoch, "val": val_m})
    save_checkpoint(run.last, model, meta=meta, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(), train_state=train_state)
    run.write_metrics(train_state["history"])
    run.plot_curves(train_state["history"])
    for key, value in row.items():
        if key != "epoch":  # train_loss -> train/loss, val_top1 -> val/top1; lr, images_per_s, seconds as is
            writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key, value, epoch)
    writer.flush()


def _train_epoch(net: nn.Module, loader: DataLoader, optimizer, runtime: Runtime, scaler, cfg: TrainConfig,
                 epoch: int, state: dict[str, Any], procs: _Procs) -> tuple[dict[str, float], float]:
    """One pass over the training shard with a progress bar (loss, accuracy, images/s, ETA) on rank 0."""
    net.train()
    loader.sampler.set_epoch(epoch)
    warmup_steps = round(cfg.warmup_epochs * len(loader))
    meter = Meter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               dynamic_ncols=True, disable=True if not procs.main else None)
    begin, seen = time.perf_counter(), 0
    for i, (images, labels) in enumerate(loader):
        if state["step"] < warmup_steps:  # linear warm-up (recipe option; not in the paper)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (state["step"] + 1) / warmup_steps
        try:
            loss, logits = train_step(net, images, labels, optimizer, runtime, scaler=scaler)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {state['step'] + 1}; training stopped, "
                                   "the last good checkpoint is kept (try a lower --lr or --batch-norm)") from None
        meter.update(loss, logits, labels.to(runtime.device))
        state["step"] += 1
        seen += len(labels) * procs.world
        if not bar.disable and (i % 5 == 0 or i + 1 == len(loader)):
            v = meter.value()
            bar.set_postfix({"loss": f"{v['loss']:.4f}", "acc": f"{v['top1']:.1f}%",
                             "img/s": f"{seen / (time.perf_counter() - begin):.0f}"})
        bar.update()
    bar.close()
    return meter.all_reduce(runtime.device).value(), time.perf_counter() - begin


def _finish(cfg, run: RunDir, model: VGG, eval_net: nn.Module, loader: DataLoader, runtime: Runtime, procs: _Procs,
            state: dict[str, Any], prior_wall: float, start: float, test_split: str) -> dict[str, Any]:
    """Test the best-validation weights (section 4 reports the selected net) and write summary.json."""
    if procs.main and run.best.is_file():
        model.load_state_dict(load_checkpoint(run.best)["state_dict"])
    procs.broadcast_state(model)
    test_m = evaluate(eval_net, loader, runtime)
    history = state["history"]
    train_seconds = sum(r["seconds"] for r in history)
    images = sum(r["images_per_s"] * r["seconds"] for r in history)
    summary = {"test_split": test_split, "test_top1": test_m["top1"], "test_top5": test_m["top5"],
               "test_loss": test_m["loss"], "test_images": test_m["images"],
               "best_epoch": state["best_epoch"], "best_val_top1": state["best_top1"], "epochs": state["epoch"],
               "steps": state["step"], "stop_reason": state["stop_reason"] or "epoch budget",
               "wall_seconds": prior_wall + time.perf_counter() - start,
               "images_per_s": images / train_seconds if train_seconds else 0.0,
               "precision": runtime.precision, "memory_format": "channels_last" if runtime.channels_last else "NCHW",
               "device": str(runtime.device), "processes": procs.world, "config": cfg.to_dict()}
    if procs.main:
        run.write_summary(summary)
    return summary


def _fresh(path) -> Path:
    """`path`, or path-2, path-3, ... if a run started in the same second already took it."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _log_header(log, cfg: TrainConfig, bundle, runtime: Runtime, procs: _Procs, run: RunDir, resumed) -> None:
    bn = " with batch norm" if cfg.batch_norm else ""
    log(f"vggnet train: configuration {cfg.config}{bn} ({cfg.head} head, {cfg.init} init, dropout {cfg.dropout}), "
        f"recipe {cfg.recipe}")
    sizes = " / ".join(f"{len(d)} {s}" for s, d in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))
                       if d is not None)
    s_min, s_max = bundle.train_scale
    log(f"data: {bundle.name}, {bundle.num_classes} classes, {sizes} images; {bundle.image_size} px crops, "
        f"S {'in [%d, %d]' % (s_min, s_max) if s_min != s_max else '= %d' % s_min}, Q = {bundle.eval_scale}"
        + (f"; {bundle.skipped} unreadable images skipped" if bundle.skipped else ""))
    log(f"{runtime}; {cfg.workers} loader worker{'s' * (cfg.workers != 1)}; torch.compile {'on' if cfg.compile else 'off'}; "
        f"{procs.world} process{'es' if procs.world > 1 else ''}")
    stall = cfg.lr_patience + 1
    log(f"SGD lr {cfg.lr} momentum {cfg.momentum} weight decay {cfg.weight_decay}, batch {cfg.batch_size}"
        f"{' per process' if procs.world > 1 else ''}; lr / {1 / cfg.lr_factor:g} after {stall} epoch{'s' * (stall > 1)} "
        f"without a better val top-1, {cfg.max_lr_drops} times at most; {cfg.epochs} epochs at most")
    if resumed:
        log(f"resuming {run.path} after epoch {resumed['epoch']} (step {resumed['step']})")
    log(f"run directory: {run.path}")


def _debug_hash(model: nn.Module, procs: _Procs) -> None:
    # Test hook: the DDP test checks that every replica ends with the same weights.
    out = os.environ.get("VGGNET_WEIGHT_HASH_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{procs.rank}.sha256").write_text(_state_hash(model) + "\n")
