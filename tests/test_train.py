"""`vggnet train`: recipes and flags, the run directory, exact resume after SIGKILL, the paper's
plateau schedule, divergence, bad input, and two DistributedDataParallel processes on the CPU.

Every run is tiny (synthetic 32 px images, 16-image batches, configuration A with the compact
head), so the whole file stays within about a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import vggnet.train as vt
from vggnet.checkpoint import load_checkpoint, save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.rundir import RunDir, default_run_dir, list_recipes, load_recipe, resolve_config

TINY = ["--data", "synthetic", "--synthetic-size", "32", "--batch-size", "16", "--workers", "0", "--seed", "3"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())}
TIMING = ("seconds", "images_per_s")


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# ----------------------------------------------------------------------------- recipes and flags

def test_recipes_are_the_papers():
    names = set(list_recipes())
    assert {"digits", "cifar10", "cifar100", "imagenet-A", "imagenet-A-LRN", "imagenet-B", "imagenet-C",
            "imagenet-D", "imagenet-E", "imagenet-D-jitter"} <= names
    for config in ("A", "A-LRN", "B", "C", "D", "E"):
        r = load_recipe(f"imagenet-{config}")
        assert (r["config"], r["lr"], r["momentum"], r["weight_decay"], r["dropout"], r["batch_size"]) == \
            (config, 0.01, 0.9, 5e-4, 0.5, 256), config
        assert (r["train_scale"], r["image_size"], r["head"], r["max_lr_drops"]) == ([256, 256], 224, "paper", 3)
        # section 3.1: deeper nets start from a trained net A; A and A-LRN from random init
        assert r.get("init_from") == ("required" if config in "BCDE" else None), config
    assert load_recipe("imagenet-D-jitter")["train_scale"] == [256, 512]
    with pytest.raises(UserError, match="--init-from"):
        resolve_config("imagenet-D", data="/some/imagenet")
    with pytest.raises(UserError, match="--data"):
        resolve_config("cifar10")
    cfg = resolve_config("imagenet-D", data="/some/imagenet", init_from="a.pt")
    assert (cfg.config, cfg.init_from, cfg.recipe) == ("D", "a.pt", "imagenet-D")
    assert resolve_config("imagenet-E", data="/x", init_from="none").init_from is None
    for name in names:  # every shipped recipe resolves once its required values are given
        assert resolve_config(name, data="/x", init_from="a.pt").recipe == name


def test_defaults_flags_and_recipe_files(tmp_path):
    cfg = resolve_config()
    assert (cfg.recipe, cfg.config, cfg.data, cfg.head) == ("digits", "A", None, "compact")
    cfg = resolve_config(None, lr=0.5, config="vgg16_bn", epochs=None)
    assert (cfg.lr, cfg.config, cfg.batch_norm, cfg.epochs) == (0.5, "D", True, load_recipe("digits")["epochs"])
    own = tmp_path / "mine.yaml"
    own.write_text("base: cifar10\nepochs: 7\n")
    cfg = resolve_config(str(own), data="/cifar")
    assert (cfg.epochs, cfg.config, cfg.lr) == (7, load_recipe("cifar10")["config"], load_recipe("cifar10")["lr"])
    own.write_text("epochs: 7\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting learning_rate"):
        load_recipe(str(own))
    assert default_run_dir("D", "/data/imagenet/").parent == Path("runs")
    assert default_run_dir("D", "/data/imagenet/").name.endswith("-D-imagenet")
    assert default_run_dir("A", None).name.endswith("-A-digits")


@pytest.mark.parametrize("argv, message", [
    (["--config", "F"], "unknown configuration or model 'F'"),
    (["--recipe", "imagenet-Z"], "unknown recipe 'imagenet-Z'"),
    (["--recipe", "imagenet-D", "--data", "synthetic"], "warm-starts from a trained net A"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--set", "colour=red"], "unknown setting colour"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("config: A\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- determinism pieces

def test_augmentation_depends_on_seed_epoch_and_index_only():
    bundle = pytest.importorskip("vggnet.data").build_data("synthetic", synthetic_size=8, seed=0)
    items = vt._SeededItems(bundle.train, seed=5)
    torch.manual_seed(0)
    a = items[(2, 3)][0]
    before = torch.get_rng_state()
    b = items[(2, 3)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG (dropout) is untouched
    assert torch.equal(a, b) and not torch.equal(a, items[(3, 3)][0])
    assert not torch.equal(a, vt._SeededItems(bundle.train, seed=6)[(2, 3)][0])


def test_train_step_refuses_a_nan_loss_before_touching_the_weights():
    from vggnet.runtime import resolve_runtime

    runtime = resolve_runtime("cpu", "fp32")
    model = runtime.prepare(vt.vgg("A", batch_norm=False, num_classes=10, head="compact"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, logits = vt.train_step(model, x, y, opt, runtime)
    assert loss.ndim == 0 and logits.shape == (4, 10) and not loss.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vt.TrainingDiverged, match="loss is nan"):
        vt.train_step(model, torch.full_like(x, float("nan")), y, opt, runtime)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run through the CLI (in this process), for the resume test to match."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code = main(["train", *TINY, "--epochs", "2", "--lr", "0.02", "--out", str(out)])
    assert code == 0
    return out


def test_run_directory_layout(reference, capsys):
    run = RunDir(reference)
    config = yaml.safe_load(run.config.read_text())
    assert (config["lr"], config["epochs"], config["data"], config["recipe"]) == (0.02, 2, "synthetic", "digits")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1",
                            "val_top5", "images_per_s", "seconds"}
    assert run.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())
    summary = json.loads(run.summary.read_text())
    assert summary["epochs"] == 2 and summary["test_split"] == "test" and summary["precision"] == "fp32"
    assert 0 <= summary["test_top1"] <= summary["test_top5"] <= 100 and summary["images_per_s"] > 0
    last = load_checkpoint(run.last)
    assert last["train_state"]["epoch"] == 2 and set(last) >= {"optimizer", "scheduler", "model_args", "meta"}
    assert last["meta"]["train_config"]["lr"] == 0.02 and last["meta"]["name"] == "synthetic"
    best = load_checkpoint(run.best)
    assert best["train_state"]["epoch"] == summary["best_epoch"]
    assert max(r["val_top1"] for r in rows) == summary["best_val_top1"] == best["train_state"]["val"]["top1"]


def test_resume_keeps_the_recorded_configuration(reference, capsys):
    assert main(["train", "--resume", str(reference), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr cannot change" in err and err.count("\n") == 1
    assert main(["train", "--out", str(reference), *TINY]) == 2  # a fresh run may not overwrite it
    assert "already holds a run" in capsys.readouterr().err


def test_sigkill_then_resume_ends_exactly_like_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    # one worker process here (the reference used none): augmentation must not depend on it
    cmd = [sys.executable, "-m", "vggnet", "train", *TINY, "--workers", "1", "--epochs", "2", "--lr", "0.02",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (out / "summary.json").exists()  # it really died before the end
    killed_at = load_checkpoint(last)["train_state"]["epoch"]
    assert killed_at == 1
    assert main(["train", "--resume", str(out)]) == 0
    assert _metrics(out) == _metrics(reference)
    ours, theirs = json.loads((out / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert [ours[k] for k in ("test_top1", "test_top5", "test_loss", "best_epoch", "steps")] == \
        [theirs[k] for k in ("test_top1", "test_top5", "test_loss", "best_epoch", "steps")]
    a, b = load_checkpoint(last)["state_dict"], load_checkpoint(reference / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_warm_start_and_fine_tune_from_a_checkpoint(reference, tmp_path):
    ckpt = str(reference / "checkpoints" / "best.pt")
    source = load_checkpoint(ckpt)["state_dict"]
    logged = []
    cfg = resolve_config(None, config="B", init_from=ckpt)
    model = vt.build_model(cfg, 10, log=logged.append)
    assert "warm start: copied" in logged[0]
    # A's conv1_1 is B's first conv (features.0), A's second conv (features.4 with BN) is B's conv2_1
    assert torch.equal(model.state_dict()["features.0.weight"], source["features.0.weight"])
    assert torch.equal(model.state_dict()["features.7.weight"], source["features.4.weight"])
    assert torch.equal(model.state_dict()["classifier.6.weight"], source["classifier.6.weight"])
    model = vt.build_model(resolve_config(None, init_from=ckpt), 10, log=logged.append)
    assert logged[1].startswith("fine-tune: loaded all")
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    other = save_checkpoint(tmp_path / "b.pt", vt.vgg("B", batch_norm=True, num_classes=10, head="compact"))
    with pytest.raises(UserError, match="expects a checkpoint of configuration A .* got configuration B"):
        vt.build_model(resolve_config(None, config="C", init_from=str(other)), 10)


def test_plateau_schedule_stops_after_the_allowed_decreases(tmp_path):
    # no BN (its running statistics would move) and an lr too small to move val accuracy:
    # every epoch after the first is a plateau
    cfg = resolve_config(None, data="synthetic", synthetic_size=16, batch_size=16, workers=0, epochs=10, lr=1e-5,
                         batch_norm=False,
                         lr_patience=0, max_lr_drops=1, out=str(tmp_path / "run"))
    summary = vt.train(cfg)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([1e-5, 1e-5, 1e-6])  # one decrease allowed; the second ends training
    assert summary["epochs"] == 3 and "lowest learning rate (1 decreases allowed" in summary["stop_reason"]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = torch.nn.functional
    calls = {"train": 0}

    class Poisoned:  # the loss turns NaN in the second epoch (2 steps per epoch here)
        def __getattr__(self, name):
            return getattr(real, name)

        def cross_entropy(self, logits, labels):
            loss = real.cross_entropy(logits, labels)
            if logits.requires_grad:
                calls["train"] += 1
                if calls["train"] > 2:
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(vt, "F", Poisoned())
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at epoch 2, step 3" in err[0]
    kept = load_checkpoint(out / "checkpoints" / "last.pt")
    assert kept["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_absurd_learning_rate_diverges_with_a_message(tmp_path, capsys):
    code = main(["train", *TINY, "--no-batch-norm", "--lr", "1e6", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert code == 1
    assert "vggnet train: error: loss is" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_identical_weights(tmp_path):
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    env = {**ENV, "VGGNET_WEIGHT_HASH_DIR": str(hashes), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "vggnet", "train", *TINY, "--epochs", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert rank0 == rank1
    # the replicas are the saved net, and only rank 0 wrote and printed
    model = vt.vgg(**{k: v for k, v in load_checkpoint(out / "checkpoints" / "last.pt")["model_args"].items()})
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["state_dict"])
    assert vt._state_hash(model) + "\n" == rank0
    assert done.stdout.count("run directory:") == 2  # once at the start, once at the end
    assert "2 processes" in done.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
