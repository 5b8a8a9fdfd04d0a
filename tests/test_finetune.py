"""Fine-tuning (`--init-from W` with other classes, `--finetune head|all`, `--features-lr-mult`) on real
images, offline: handwritten digits 0-4 -> 5-9, and a 1,000-class torchvision-format state dict -> a
3-class folder of scikit-image's photographs.

Runs are small (configuration A with batch norm and the compact head, fp32, one or a few steps
per epoch) so the file stays within about half a minute of CPU on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet.train as vt
from vggnet.checkpoint import load_checkpoint
from vggnet.cli import main
from vggnet.imagenet import IMAGENET_MEAN, IMAGENET_STD

FAST = ["--precision", "fp32", "--workers", "0", "--seed", "0"]


def _save_folder(root: Path, split: str, images: dict[str, list[np.ndarray]]) -> None:
    for label, items in images.items():
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(items):
            Image.fromarray(pixels).save(root / split / label / f"{i:03d}.png")


def _digits(classes: range, counts: dict[str, int], seed: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """{split: {class: [32x32 RGB uint8]}}: scikit-learn's 8x8 digits upsampled, disjoint per split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    x = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {split: {} for split in counts}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(d.target == c))
        start = 0
        for split, n in counts.items():
            out[split][str(c)] = [np.ascontiguousarray(x[i]) for i in idx[start:start + n]]
            start += n
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_digits_0_to_4_net_fine_tuned_on_5_to_9_beats_training_from_scratch(tmp_path, capsys):
    pre, new = tmp_path / "digits0-4", tmp_path / "digits5-9"
    for split, images in _digits(range(0, 5), {"train": 30, "val": 4}, seed=0).items():
        _save_folder(pre, split, images)
    for split, images in _digits(range(5, 10), {"train": 10, "val": 4, "test": 20}, seed=1).items():
        _save_folder(new, split, images)
    assert main(["train", "--data", str(pre), *FAST, "--epochs", "3", "--batch-size", "25", "--lr", "0.01",
                 "--out", str(tmp_path / "pre")]) == 0
    weights = tmp_path / "pre" / "checkpoints" / "best.pt"
    # both arms normalise with the statistics of the new images: the starting weights are the one difference
    common = ["--data", str(new), "--mean-std", "dataset", *FAST, "--epochs", "4", "--batch-size", "25", "--lr", "0.01"]
    capsys.readouterr()
    assert main(["train", *common, "--init-from", str(weights), "--out", str(tmp_path / "tuned")]) == 0
    log = capsys.readouterr().out
    assert "fine-tune: loaded 60 tensors; re-initialised 2 (classifier.6); froze none" in log
    assert main(["train", *common, "--out", str(tmp_path / "scratch")]) == 0
    tuned, scratch = _summary(tmp_path / "tuned")["test_top1"], _summary(tmp_path / "scratch")["test_top1"]
    print(f"digits 5-9, 10 training images per class: fine-tuned {tuned:.1f}%, from scratch {scratch:.1f}%")
    assert tuned > scratch + 10, (tuned, scratch)
    tuned_meta = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "best.pt")["meta"]
    assert tuned_meta["class_names"] == [str(c) for c in range(5, 10)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A 3-class ImageFolder of scikit-image's photographs cut into 48 px crops (train/ and val/)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "chelsea", "coffee"):
        picture = getattr(data, name)()
        crops = []
        for _ in range(8):
            top, left = rng.integers(0, picture.shape[0] - 96), rng.integers(0, picture.shape[1] - 96)
            crops.append(np.asarray(Image.fromarray(picture[top:top + 96, left:left + 96]).resize((48, 48))))
        _save_folder(root, "train", {name: crops[:6]})
        _save_folder(root, "val", {name: crops[6:]})
    return root


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-format file: a bare state dict of a 1,000-class net (compact head to stay small)."""
    torch.manual_seed(0)
    model = vt.vgg("A", batch_norm=True, num_classes=1000, head="compact", init="glorot")
    with torch.no_grad():  # running statistics that are not the defaults, so "unchanged" means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    path = tmp_path_factory.mktemp("weights") / "vgg11_bn_imagenet.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_head_fine_tuning_from_a_1000_class_state_dict_trains_only_the_fc_layers(photos, imagenet_like, tmp_path,
                                                                                  capsys):
    path, source = imagenet_like
    out = tmp_path / "head"
    assert main(["train", "--data", str(photos), "--init-from", str(path), "--finetune", "head", *FAST,
                 "--epochs", "2", "--batch-size", "18", "--lr", "0.01", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    n_features = sum(1 for k in source if k.startswith("features.") and not k.endswith("num_batches_tracked"))
    n_frozen = sum(1 for _ in vt.vgg("A", batch_norm=True, head="compact").features.parameters())
    assert f"re-initialised 2 (classifier.6); froze {n_frozen} (the conv layers)" in log
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    state = last["state_dict"]
    assert last["model_args"]["num_classes"] == 3 and state["classifier.6.weight"].shape == (3, 512)
    assert (last["model_args"]["config"], last["model_args"]["batch_norm"]) == ("A", True)  # from the weights
    # frozen: every conv weight and BN statistic is the file's (BN stayed in eval mode), the FC layers moved
    features = [k for k in source if k.startswith("features.") and not k.endswith("num_batches_tracked")]
    assert len(features) == n_features and all(torch.equal(state[k], source[k]) for k in features)
    assert not torch.equal(state["classifier.0.weight"], source["classifier.0.weight"])
    groups = last["optimizer"]["param_groups"]
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("classifier", 0.01, 6)]
    # the weights' preprocessing (torchvision's ImageNet mean/std) trained the net and is recorded for eval
    assert last["meta"]["mean"] == pytest.approx(IMAGENET_MEAN) and last["meta"]["std"] == pytest.approx(IMAGENET_STD)
    assert "preprocessing: mean [0.485, 0.456, 0.406]" in log


def test_all_layers_with_a_lower_features_rate_and_the_python_api(photos, imagenet_like, tmp_path):
    path, source = imagenet_like
    out = tmp_path / "all"
    assert main(["train", "--data", str(photos), "--init-from", str(path), "--features-lr-mult", "0.1",
                 "--mean-std", "dataset", *FAST, "--epochs", "1", "--batch-size", "18", "--lr", "0.01",
                 "--out", str(out)]) == 0
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    groups = {g["name"]: g for g in last["optimizer"]["param_groups"]}
    n_conv = sum(1 for _ in vt.vgg("A", batch_norm=True, head="compact").features.parameters())
    assert groups["classifier"]["lr"] == 0.01 and len(groups["classifier"]["params"]) == 6
    assert groups["features"]["lr"] == pytest.approx(0.001) and len(groups["features"]["params"]) == n_conv
    assert not torch.equal(last["state_dict"]["features.0.weight"], source["features.0.weight"])
    assert last["meta"]["mean"] != pytest.approx(IMAGENET_MEAN)  # --mean-std dataset overrides the weights'

    model = vt.pretrained(path, num_classes=3, finetune="head")
    assert model.num_classes == 3 and model.classifier[-1].weight.shape == (3, 512)
    assert all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in source.items() if not k.startswith("classifier.6."))


def test_the_weights_preprocessing_comes_with_them():
    caffe_like = {"model_args": {"config": "D", "num_classes": 1000}, "state_dict": {},
                  "meta": {"mean": [123.68, 116.779, 103.939], "std": [1.0, 1.0, 1.0], "input_range": 255.0}}
    assert vt._preprocessing(caffe_like) == {"mean": [123.68, 116.779, 103.939], "std": [1.0, 1.0, 1.0],
                                             "input_range": 255.0}
    cfg = vt.resolve_config(None, init_from="w.caffemodel")
    assert (cfg.config, cfg.batch_norm, cfg.head, cfg.mean_std) == (None, None, None, None)
    cfg = vt.resolve_net(cfg, caffe_like)
    assert (cfg.config, cfg.mean_std) == ("D", "weights")
    unknown = {"model_args": {"config": "A", "num_classes": 7}, "state_dict": {}, "meta": {}}
    assert vt.resolve_net(vt.resolve_config(None, init_from="w.pth"), unknown).mean_std == "dataset"
    assert vt.resolve_net(vt.resolve_config(None, init_from="w.pth", mean_std="imagenet"), caffe_like).mean_std == "imagenet"


def test_bad_fine_tuning_input_is_one_line(photos, imagenet_like, tmp_path, capsys):
    path, _ = imagenet_like
    junk = tmp_path / "notes.pth"
    junk.write_text("not weights at all")
    bad = [([str(path), "--head", "paper"], "does not fit configuration A"),  # a mismatch beyond the classifier
           ([str(junk)], str(junk))]
    for argv, message in bad:
        assert main(["train", "--data", str(photos), "--init-from", *argv, *FAST, "--epochs", "1",
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
