"""`vggnet train`: recipes and flags, the run directory, exact resume after SIGKILL, the paper's
plateau schedule, divergence, bad input, and two DistributedDataParallel processes on the CPU.

Every run is tiny (16 synthetic 32 px images, one 16-image step per epoch, fp32, configuration A
with the compact head): one 4-epoch reference run serves most tests.
"""

from __future__ import annotations

import argparse
import errno
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

import vggnet.checkpoint
import vggnet.train as vt
from vggnet.checkpoint import load_checkpoint, save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.rundir import RunDir, TrainConfig, default_run_dir, list_recipes, load_recipe, resolve_config

# The digits recipe's optimisation on 16 synthetic images; its loader workers (1) unless a test says otherwise.
TINY = ["--data", "synthetic", "--synthetic-size", "16", "--batch-size", "16", "--seed", "3", "--precision", "fp32"]
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
    assert (cfg.train_scale, cfg.test_scale) == (tuple(load_recipe("digits")["train_scale"]), 32)
    cfg = resolve_config(None, lr=0.5, config="vgg16_bn", epochs=None)
    assert (cfg.lr, cfg.config, cfg.batch_norm, cfg.epochs) == (0.5, "D", True, load_recipe("digits")["epochs"])
    # --data DIR without a recipe: the digits' sizes stay with the digits, the optimisation carries over
    cfg = resolve_config(None, data="/my/photos")
    assert (cfg.image_size, cfg.train_scale, cfg.test_scale, cfg.lr) == (None, None, None, load_recipe("digits")["lr"])
    own = tmp_path / "mine.yaml"
    own.write_text("base: cifar10\nepochs: 7\neval_scale: 40\n")  # eval_scale: the old name of test_scale
    cfg = resolve_config(str(own), data="/cifar")
    assert (cfg.epochs, cfg.config, cfg.lr, cfg.test_scale) == (7, "D", load_recipe("cifar10")["lr"], 40)
    own.write_text("epochs: 7\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting learning_rate"):
        load_recipe(str(own))
    assert default_run_dir("D", "/data/imagenet/").parent == Path("runs")
    assert default_run_dir("D", "/data/imagenet/").name.endswith("-D-imagenet")
    assert default_run_dir("A", None).name.endswith("-A-digits")


def test_flags_are_named_after_the_settings_and_old_spellings_still_work(capsys):
    from vggnet.cli import build_parser
    from vggnet.cli.train_cmd import _overrides

    fields = {f.name for f in vt.dataclasses.fields(TrainConfig)}
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train_parser._actions if a.option_strings and a.dest in fields}
    for action in train_parser._actions:  # every flag that sets a field is spelled like it (or is deprecated)
        if action.dest in fields and action.help != argparse.SUPPRESS:
            assert "--" + action.dest.replace("_", "-") in action.option_strings, action.option_strings
    assert fields - dests <= {"recipe"}
    new = _overrides(parser.parse_args(["train", "--train-scale", "40", "48", "--test-scale", "44", "--lr-patience", "2",
                                        "--no-channels-last"]))
    old = _overrides(parser.parse_args(["train", "--scale", "40", "48", "--eval-scale", "44", "--patience", "2",
                                        "--no-channels-last"]))
    assert new == old and (new["train_scale"], new["test_scale"], new["lr_patience"]) == ([40, 48], "44", "2")
    assert capsys.readouterr().err.count("is deprecated") == 3
    cfg = resolve_config(None, **new)
    assert (cfg.train_scale, cfg.test_scale, cfg.lr_patience, cfg.channels_last) == ((40, 48), 44, 2, False)


@pytest.mark.parametrize("argv, message", [
    (["--config", "F"], "unknown configuration or model 'F'"),
    (["--recipe", "imagenet-Z"], "unknown recipe 'imagenet-Z'"),
    (["--recipe", "imagenet-D", "--data", "synthetic"], "needs --init-from A_CHECKPOINT"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--set", "momentum=-1"], "--momentum must be a number in [0, 1), got -1"),
    (["--set", "weight_decay=-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--test-scale", "100000"], "--test-scale must be an integer in [1, 4096], got 100000"),
    (["--train-scale", "20", "10"], "--train-scale expects S or S_MIN S_MAX"),
    (["--image-size", "64", "--train-scale", "48"], "--image-size 64 must be at most the training scale"),
    (["--train-scale", "20"], "--train-scale"),  # the data's 32 px crop does not fit: said in flags
    (["--set", "colour=red"], "--set: unknown setting colour"),
    (["--set", "foo"], "--set expects KEY=VALUE"),
    (["--set", "epochs=many"], "--epochs must be an integer >= 1, got many"),
    (["--set", "batch_norm=3"], "--batch-norm must be true or false, got 3"),
    (["--finetune", "head"], "--finetune head trains the FC layers on frozen features, which need --init-from"),
    (["--width", "0"], "--width must be a number in [1/64, 4] (1: the paper's channel counts), got 0"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--synthetic-size", "16", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    if "unknown setting" not in err:  # that one lists the names --set takes
        assert not any(word in err for word in ("train_scale", "image_size", "eval_scale")), err
    assert not (out / "checkpoints" / "last.pt").exists()


def test_resume_needs_a_readable_run(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("config: A\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_out_refuses_what_is_not_an_unfinished_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("my own words")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "non-empty directory that is not a vggnet run" in err and "--force" in err and err.count("\n") == 1
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]
    assert (mine / "thesis.txt").read_text() == "my own words"
    finished = tmp_path / "finished"
    (finished / "checkpoints").mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    (finished / "checkpoints" / "best.pt").write_bytes(b"trained")
    with pytest.raises(UserError, match="holds a finished run"):
        RunDir(finished).check_new()
    RunDir(finished).check_new(force=True)
    RunDir(tmp_path / "empty").check_new()
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").check_new()


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


def test_starting_loader_workers_leaves_the_global_rng_alone():
    bundle = pytest.importorskip("vggnet.data").build_data("synthetic", synthetic_size=8, seed=0)
    cfg = resolve_config(None, data="synthetic", workers=1, batch_size=4)
    loaders = vt._loaders(bundle, cfg, vt._Procs(), vt.resolve_runtime("cpu", "fp32", False))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for loader in (loaders.train, loaders.val, loaders.test):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_train_step_refuses_a_nan_loss_before_touching_the_weights():
    from vggnet.runtime import resolve_runtime

    runtime = resolve_runtime("cpu", "fp32", False)
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

EPOCHS = ["--epochs", "4", "--lr", "0.02"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run through the CLI (in this process), for the resume test to match."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code = main(["train", *TINY, *EPOCHS, "--out", str(out)])
    assert code == 0
    return out


def test_run_directory_layout(reference, capsys):
    run = RunDir(reference)
    config = yaml.safe_load(run.config.read_text())
    assert (config["lr"], config["epochs"], config["data"], config["recipe"]) == (0.02, 4, "synthetic", "digits")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1",
                            "val_top5", "images_per_s", "seconds"}
    assert run.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard.iterdir())
    assert not [p for p in run.path.rglob("*.tmp")]  # the atomic writer leaves no temporary file
    summary = json.loads(run.summary.read_text())
    assert summary["epochs"] == 4 and summary["test_split"] == "test" and summary["precision"] == "fp32"
    assert 0 <= summary["test_top1"] <= summary["test_top5"] <= 100 and summary["images_per_s"] > 0
    last = load_checkpoint(run.last)
    assert last["train_state"]["epoch"] == 4 and set(last) >= {"optimizer", "scheduler", "model_args", "meta"}
    assert summary["weights_sha256"] == vt.weights_sha256(last["state_dict"])
    assert last["meta"]["train_config"]["lr"] == 0.02 and last["meta"]["name"] == "synthetic"
    best = load_checkpoint(run.best)
    assert best["train_state"]["epoch"] == summary["best_epoch"]
    assert max(r["val_top1"] for r in rows) == summary["best_val_top1"] == best["train_state"]["val"]["top1"]


def test_sigkill_then_resume_ends_exactly_like_the_uninterrupted_run(reference, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vggnet", "train", *TINY, *EPOCHS, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    curves = out / "curves.png"  # written after checkpoints/last.pt and metrics.jsonl of epoch 1
    deadline = time.monotonic() + 240
    while not curves.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (out / "summary.json").exists()  # it really died before the end
    assert 1 <= load_checkpoint(out / "checkpoints" / "last.pt")["train_state"]["epoch"] < 4
    # the original command line with --resume added; a value that differs is refused by name
    assert main(["train", *TINY, *EPOCHS, "--out", str(out), "--resume", str(out), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 differs from the recorded 0.02" in err and err.count("\n") == 1
    summary = tmp_path / "summary.json"
    assert main(["train", *TINY, *EPOCHS, "--out", str(out), "--resume", str(out), "--json", str(summary)]) == 0
    assert json.loads(summary.read_text()) == json.loads((out / "summary.json").read_text())
    assert _metrics(out) == _metrics(reference)
    ours, theirs = json.loads((out / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    keys = ("test_top1", "test_top5", "test_loss", "best_epoch", "steps", "weights_sha256")
    assert [ours[k] for k in keys] == [theirs[k] for k in keys]
    a, b = load_checkpoint(out / "checkpoints" / "last.pt")["state_dict"], load_checkpoint(reference / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_refuses_an_edited_config(reference, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes((reference / "checkpoints" / "last.pt").read_bytes())
    for text, message in (("lr: [oops\n", "is not valid YAML at line"), ("lr: fast\n", "--lr must be a finite"),
                          ("- a list\n", "should be a mapping"), ("speed: 3\n", "unknown setting speed")):
        (run / "config.yaml").write_text(text)
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_warm_start_and_fine_tune_from_a_checkpoint(reference, tmp_path):
    ckpt = str(reference / "checkpoints" / "best.pt")
    source = load_checkpoint(ckpt)["state_dict"]
    logged = []
    cfg = resolve_config(None, config="B", init_from=ckpt)
    model = vt.build_model(cfg, 10, log=logged.append)
    assert "warm start from net A" in logged[0]
    # A's conv1_1 is B's first conv (features.0), A's second conv (features.4 with BN) is B's conv2_1
    assert torch.equal(model.state_dict()["features.0.weight"], source["features.0.weight"])
    assert torch.equal(model.state_dict()["features.7.weight"], source["features.4.weight"])
    assert torch.equal(model.state_dict()["classifier.6.weight"], source["classifier.6.weight"])
    model = vt.build_model(resolve_config(None, init_from=ckpt), 10, log=logged.append)
    assert logged[1].startswith(f"fine-tune (configuration A, all tensors): loaded {len(source)} tensors; froze none")
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    other = save_checkpoint(tmp_path / "b.pt", vt.vgg("B", batch_norm=True, num_classes=10, head="compact"))
    with pytest.raises(UserError, match="expects weights of configuration A .* got configuration B"):
        vt.build_model(resolve_config(None, config="C", init_from=str(other)), 10)


def test_a_narrow_adamw_run_and_a_fine_tune_that_takes_its_width_from_the_weights(tmp_path, capsys):
    out = tmp_path / "narrow"
    assert main(["train", *TINY, "--epochs", "1", "--workers", "0", "--width", "0.25", "--optimizer", "adamw",
                 "--lr", "0.001", "--momentum", "0.8", "--out", str(out)]) == 0
    assert "AdamW lr 0.001 betas (0.8, 0.999)" in capsys.readouterr().out
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["model_args"]["width"] == 0.25 and last["state_dict"]["features.0.weight"].shape[0] == 16
    state = last["optimizer"]["state"][0]
    assert set(state) >= {"exp_avg", "exp_avg_sq"}                     # AdamW's moments, not SGD's buffer
    assert last["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.999)
    model = vt.build_model(resolve_config(None, init_from=str(out / "checkpoints" / "best.pt")), 3)
    assert model.width == 0.25 and model.classifier[-1].out_features == 3   # width from the weights, new classes
    best = load_checkpoint(out / "checkpoints" / "best.pt")["state_dict"]
    assert torch.equal(model.features[0].weight, best["features.0.weight"])   # the narrow weights loaded


def test_plateau_schedule_stops_after_the_allowed_decreases(tmp_path):
    # no BN (its running statistics would move) and an lr too small to move val accuracy:
    # every epoch after the first is a plateau
    cfg = resolve_config(None, data="synthetic", synthetic_size=8, batch_size=8, workers=0, epochs=10, lr=1e-5,
                         batch_norm=False, precision="fp32", lr_patience=0, max_lr_drops=1, out=str(tmp_path / "run"))
    summary = vt.train(cfg)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([1e-5, 1e-5, 1e-6])  # one decrease allowed; the second ends training
    assert summary["epochs"] == 3 and "lowest learning rate (1 decreases allowed" in summary["stop_reason"]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = torch.nn.functional
    calls = {"train": 0}

    class Poisoned:  # the loss turns NaN in the second epoch (one step per epoch here)
        def __getattr__(self, name):
            return getattr(real, name)

        def cross_entropy(self, logits, labels):
            loss = real.cross_entropy(logits, labels)
            if logits.requires_grad:
                calls["train"] += 1
                if calls["train"] > 1:
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(vt, "F", Poisoned())
    out = tmp_path / "run"
    assert main(["train", *TINY, "--workers", "0", "--epochs", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at epoch 2, step 2" in err[0]
    kept = load_checkpoint(out / "checkpoints" / "last.pt")
    assert kept["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_weights_that_blow_up_are_never_saved(tmp_path, capsys):
    # one step per epoch: the loss of that step is finite, the update it makes is not
    out = tmp_path / "r"
    code = main(["train", *TINY, "--workers", "0", "--no-batch-norm", "--lr", "1e30",
                 "--epochs", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "vggnet train: error:" in err, err
    for name in ("last.pt", "best.pt"):
        if (out / "checkpoints" / name).exists():
            state = load_checkpoint(out / "checkpoints" / name)["state_dict"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = vggnet.checkpoint.atomic_write, {"last": 0}

    def full_disk(path, data):
        if Path(path).name == "last.pt":
            calls["last"] += 1
            if calls["last"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(vggnet.checkpoint, "atomic_write", full_disk)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--workers", "0", "--epochs", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous checkpoint is intact" in err and err.count("\n") == 1
    assert load_checkpoint(out / "checkpoints" / "last.pt")["train_state"]["epoch"] == 1
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "vggnet", "train", *TINY, "--workers", "0", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rank0, rank1 = summary["replica_weights_sha256"]
    assert rank0 == rank1 == summary["weights_sha256"]
    # the replicas are the saved net, and only rank 0 wrote and printed
    assert vt.weights_sha256(load_checkpoint(out / "checkpoints" / "last.pt")["state_dict"]) == rank0
    assert done.stdout.count("run directory:") == 2  # once at the start, once at the end
    assert "2 processes" in done.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
