"""The test protocols of section 3.2 (centre, dense, multi-crop, multi-scale, ensembles) and `vggnet eval`.

Small randomly initialised compact-head nets at 32-48 px: no trained weights exist on the test
machine, so the tests check the protocols' arithmetic against direct computations, not accuracy.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import vggnet
import vggnet.evaluate as ev
from vggnet.checkpoint import save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.nets import Net, load_net, net_from_model
from vggnet.evaluate import (evaluate, parse_methods, parse_scales, posteriors,
                             training_scales)
from vggnet.imagenet import IMAGENET_MEAN, imagenet_class_names
from vggnet.runtime import resolve_runtime

FP32 = resolve_runtime("cpu", "fp32")


def small_meta(classes: int = 3, **kw) -> dict:
    meta = dict(name="synthetic", class_names=[f"c{i}" for i in range(classes)], mean=[0.5] * 3, std=[0.25] * 3,
                image_size=32, train_scale=[32, 32], eval_scale=32, data=None, seed=0)
    return {**meta, **kw}


def small_net(classes: int = 3, seed: int = 0, flip: bool | None = None, **meta) -> Net:
    torch.manual_seed(seed)
    model = vggnet.vgg("A", head="compact", num_classes=classes, init="glorot")
    return net_from_model(model, small_meta(classes, **meta), name=f"net{seed}", flip=flip)


def images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for _ in range(n)]


def test_parse_methods_and_scales():
    assert parse_methods(None) == ["center", "dense", "multicrop", "multicrop+dense"]
    assert parse_methods("dense, multicrop+dense") == ["dense", "multicrop+dense"]
    with pytest.raises(UserError, match="unknown method.*tencrop"):
        parse_methods("center,tencrop")
    net = small_net(train_scale=[32, 48], eval_scale=36)
    assert parse_scales(None, net) == (36,)
    assert parse_scales("256,384,512", net) == (256, 384, 512)
    assert parse_scales("train", net) == (32, 40, 48)  # jittered S: {S_min, middle, S_max}
    with pytest.raises(UserError, match="comma-separated integers"):
        parse_scales("big", net)
    # Fixed S = 256 gives the paper's {S-32, S, S+32}; small-image nets step by S/8, dropping Q < crop.
    assert training_scales(small_net(train_scale=[256, 256], image_size=224)) == (224, 256, 288)
    assert training_scales(small_net(train_scale=[32, 32])) == (32, 36)


def test_protocols_against_direct_computation():
    net = small_net(classes=4, flip=True)
    imgs = images(2, 32, 44)  # non-square: dense sees 32 x 44, multi-crop slides along the width
    x = net.normalise(torch.stack(imgs))
    with torch.inference_mode():
        # centre crop: the middle 32 x 32
        want = nnf.softmax(net.model(x[..., 6:38]), 1)
        assert torch.allclose(posteriors(net, imgs, "center", 32, runtime=FP32), want, atol=1e-6)
        # dense: class-score map averaged over space, soft-max averaged with the mirror image
        dense = net.model.to_fully_conv()
        want = (nnf.softmax(dense(x).mean((2, 3)), 1) + nnf.softmax(dense(x.flip(-1)).mean((2, 3)), 1)) / 2
        assert torch.allclose(posteriors(net, imgs, "dense", 32, runtime=FP32), want, atol=1e-6)
        # multi-crop: 5 offsets along the width (0, 3, 6, 9, 12) x 5 identical rows x 2 flips
        crops = torch.cat([x[..., l:l + 32] for l in (0, 3, 6, 9, 12)])
        crops = torch.cat([crops, crops.flip(-1)])
        want = nnf.softmax(net.model(crops), 1).view(10, 2, 4).mean(0)
        assert torch.allclose(posteriors(net, imgs, "multicrop", 32, runtime=FP32), want, atol=1e-6)
        # all 25 grid crops, coinciding ones included: offsets 0, 0.5, 1, 1.5, 2 rounded to 0, 0, 1, 2, 2
        y = net.normalise(images(1, 34, 34, seed=3)[0][None])
        crops = torch.cat([y[..., t:t + 32, l:l + 32] for t in (0, 0, 1, 2, 2) for l in (0, 0, 1, 2, 2)])
        want = nnf.softmax(net.model(torch.cat([crops, crops.flip(-1)])), 1).mean(0, keepdim=True)
        got = posteriors(net, images(1, 34, 34, seed=3), "multicrop", 34, runtime=FP32)
        assert torch.allclose(got, want, atol=1e-6)


def test_dense_equals_center_on_a_one_position_map():
    # A 32 px image under the compact head gives a 1x1 score map: dense (no flip) is the plain net.
    net = small_net(flip=False)
    imgs = images(3)
    center = posteriors(net, imgs, "center", 32, runtime=FP32)
    assert torch.allclose(posteriors(net, imgs, "dense", 32, runtime=FP32), center, atol=1e-5)
    assert torch.allclose(posteriors(net, imgs, "multicrop", 32, runtime=FP32), center, atol=1e-5)
    # Images of different sizes in one call are grouped, and each keeps its own row.
    mixed = [imgs[0], images(1, 40, 36, seed=5)[0], imgs[1]]
    p = posteriors(net, mixed, "center", 32, runtime=FP32)
    assert torch.allclose(p[[0, 2]], center[:2], atol=1e-5)
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)


def test_evaluate_combines_scales_methods_and_nets(monkeypatch):
    """Rows must be exactly: posteriors averaged over scales, methods and nets, then top-1 / top-k.

    The protocols themselves are checked above; here they are replaced by fixed random posteriors
    per (net, protocol, Q), so that any other combination (a scale left out, an unweighted mix,
    one net standing in for the ensemble) gives different error counts over 300 images.
    """
    classes, n = 7, 300
    nets = [small_net(classes, seed=0, flip=False), small_net(classes, seed=1, flip=False)]
    g = torch.Generator().manual_seed(0)
    table = {(net.name, part, q): torch.distributions.Dirichlet(torch.ones(classes)).sample((n,))
             for net in nets for part in ("dense", "multicrop") for q in (32, 40)}
    labels = torch.randint(0, classes, (n,), generator=g)
    # Each "image" carries its own index, so the fake protocol knows which rows to return.
    data = [(torch.full((3, 32, 32), float(i)), int(labels[i])) for i in range(n)]
    calls = []

    def fake(net, imgs, protocol, q, **kw):
        calls.append((net.name, protocol, q, len(imgs)))
        return table[(net.name, protocol, q)][[int(img[0, 0, 0]) for img in imgs]]

    monkeypatch.setattr(ev, "posteriors", fake)
    rows = evaluate(nets, data, methods=["dense", "multicrop+dense"], scales=[(32,), (32, 40)], runtime=FP32,
                    batch_size=128, warmup=False)
    assert len(rows) == 2 * 2 * 3  # scale sets x methods x (two nets + ensemble)
    assert len(calls) == 2 * 2 * 2 * 3  # each (net, protocol, Q) once per batch of 128: no recomputation
    errors = set()
    for row in rows:
        names = [net.name for net in nets] if row.net.startswith("ensemble") else [row.net]
        parts = ("multicrop", "dense") if row.method == "multicrop+dense" else ("dense",)
        p = torch.stack([torch.stack([table[(name, part, q)] for part in parts for q in row.scales]).mean(0)
                         for name in names]).mean(0)
        top = p.topk(5, dim=1).indices
        assert row.top_k == 5 and row.images == n and row.images_per_s > 0
        assert row.top1_error == pytest.approx(100 * (top[:, 0] != labels).float().mean().item())
        assert row.top5_error == pytest.approx(100 * (top != labels[:, None]).all(1).float().mean().item())
        errors.add((row.top1_error, row.top5_error))
    assert len(errors) >= 10  # the 12 combinations really differ, so a mix-up cannot pass unnoticed
    assert [r.views_per_image for r in rows[:3]] == [1, 1, 2]  # dense without flips: one view per net


def test_top_k_is_capped_by_the_number_of_classes():
    net = small_net(classes=3, flip=False)
    rows = evaluate([net], [(img, i % 3) for i, img in enumerate(images(3))], methods=["center"], runtime=FP32)
    assert rows[0].top_k == 3 and rows[0].top5_error == 0.0  # top-5 of 3 classes always holds the label


def test_dense_costs_less_than_multicrop():
    # At Q = 64 the 25 crops are all distinct: 50 network inputs against dense's 2 (image + mirror).
    net = small_net(flip=True, eval_scale=64)
    data = [(img, 0) for img in images(2, 64, 64)]
    rows = {r.method: r for r in evaluate([net], data, methods=["dense", "multicrop"], scales=[(64,)], runtime=FP32)}
    assert rows["multicrop"].views_per_image == 50 and rows["dense"].views_per_image == 2
    assert rows["dense"].images_per_s > 2 * rows["multicrop"].images_per_s


def test_scale_too_small_and_ensemble_mismatch():
    with torch.device("meta"):  # the scale check comes before any computation: no weights needed
        paper = net_from_model(vggnet.vgg("A", num_classes=3), small_meta(3), name="paper-head")
    with pytest.raises(UserError, match="dense evaluation of paper-head needs Q >= 224"):
        evaluate([paper], [(images(1)[0], 0)], methods=["dense"], runtime=FP32)
    with pytest.raises(UserError, match="needs Q >= its 32 px crop, got Q=24"):
        evaluate([small_net()], [(images(1)[0], 0)], methods=["center"], scales=[(24,)], runtime=FP32)
    with pytest.raises(UserError, match="disagree in classes: net0 has 3, net1 has 5"):
        evaluate([small_net(3, seed=0), small_net(5, seed=1)], [], runtime=FP32)
    with pytest.raises(UserError, match="no labels"):
        evaluate([small_net()], [(images(1)[0], -1)], methods=["center"], runtime=FP32)


def test_torchvision_state_dict_gets_imagenet_names_and_preprocessing(tmp_path):
    # A bare 1000-class state dict (the shape of vgg16-397923af.pth), here with the compact head.
    model = vggnet.vgg("A", head="compact", num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "vgg11-like.pth")
    net = load_net(tmp_path / "vgg11-like.pth")
    assert net.meta["name"] == "imagenet" and net.class_names == imagenet_class_names()
    assert net.class_names[:2] == ["tench", "goldfish"] and len(net.class_names) == 1000
    assert net.meta["mean"] == IMAGENET_MEAN and (net.image_size, net.eval_scale) == (224, 256)


def _digits_checkpoint(path, classes=10, config="A"):
    torch.manual_seed(0)
    model = vggnet.vgg(config, head="compact", num_classes=classes, init="glorot")
    meta = dict(name="digits", class_names=[str(i) for i in range(classes)], num_classes=classes,
                mean=[0.3] * 3, std=[0.4] * 3, image_size=32, train_scale=[32, 48], eval_scale=32, data=None, seed=0)
    save_checkpoint(path, model, meta=meta)
    return path


def test_cli_eval_on_the_digits_by_default(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path / "digits.pt")
    out = tmp_path / "table.json"
    assert main(["eval", "--weights", str(ckpt), "--methods", "center,dense", "--limit", "12",
                 "--json", str(out), "--precision", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "top-1 err (%)" in table and "top-5 err (%)" in table and "images/s" in table
    result = json.loads(out.read_text())
    assert result["data"] == "digits" and result["images"] == 12
    assert [(r["method"], r["scales"], r["views_per_image"]) for r in result["rows"]] == \
        [("center", [32], 1), ("dense", [32], 1)]  # digits: no flips (a mirrored 2 is no 2)


def test_cli_eval_bad_inputs(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path / "digits.pt")
    five = _digits_checkpoint(tmp_path / "five.pt", classes=5)

    def fails(*argv, match):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert match in err, err

    fails("--weights", str(ckpt), "--config", "B", match="missing features.")
    fails("--weights", str(ckpt), "--classes", "7", match="classifier.6.weight (10, 512) vs (7, 512)")
    fails("--weights", str(ckpt), str(five), match="disagree in classes: digits.pt has 10, five.pt has 5")
    fails("--weights", str(five), match="the data has 10 classes, five.pt was trained on 5")
    fails("--weights", str(tmp_path / "nope.pt"), match="weights file not found")
    (tmp_path / "empty").mkdir()
    fails("--weights", str(ckpt), "--data", str(tmp_path / "empty"), match="empty")
    other = tmp_path / "other.pt"
    save_checkpoint(other, vggnet.vgg("A", head="compact", num_classes=10), meta={"name": "cifar10"})
    fails("--weights", str(other), match="--data is needed")


class _Payload:
    """Unpickling this runs open(marker, "w"): the file appears iff pickled code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"format": "vggnet", "state_dict": {}, "payload": _Payload(marker)}, tmp_path / "evil.pt")
    assert main(["eval", "--weights", str(tmp_path / "evil.pt")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists()


def _photo_folder(root, per_split=(6, 3, 4)):
    """An ImageFolder of real photographs: JPEG crops of three scikit-image pictures, one class each."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    for cls, name in enumerate(("astronaut", "chelsea", "coffee")):
        photo = getattr(skdata, name)()
        for split, n in zip(("train", "val", "test"), per_split):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                top = int(rng.integers(0, photo.shape[0] - 150))
                left = int(rng.integers(0, photo.shape[1] - 200))
                Image.fromarray(photo[top:top + 150, left:left + 200]).save(folder / f"{i}.jpg", quality=90)
    return root


def test_eval_center_reproduces_the_runs_own_test_top1(tmp_path, capsys):
    """One test path: training's test evaluation and `vggnet eval --methods center` see the same pixels
    (same decoder and JPEG draft, same rescale, crop and normalisation), so their top-1 agree exactly."""
    data = _photo_folder(tmp_path / "photos")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--config", "A", "--head", "compact", "--batch-norm",
                 "--image-size", "32", "--train-scale", "40", "--test-scale", "44", "--epochs", "2",
                 "--batch-size", "6", "--lr", "0.01", "--precision", "fp32", "--workers", "0",
                 "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--weights", str(run), "--methods", "center", "--precision", "fp32",
                 "--json", str(tmp_path / "eval.json")]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["rows"][0]
    assert row["images"] == summary["test_images"] == 12
    assert row["scales"] == [44]
    correct_eval = round(row["images"] * (1 - row["top1_error"] / 100))
    correct_train = round(summary["test_images"] * summary["test_top1"] / 100)
    assert correct_eval == correct_train


def test_training_test_view_is_the_eval_center_view_pixel_for_pixel(tmp_path):
    from torchvision.transforms.v2 import functional as F

    from vggnet.data import build_data, eval_draft, eval_images
    from vggnet.transforms import normalize, rescale, to_float

    data = _photo_folder(tmp_path / "photos", per_split=(3, 2, 2))
    bundle = build_data(str(data), image_size=32, train_scale=(40, 40), eval_scale=44)
    images, _ = eval_images(str(data), "test", draft=eval_draft(32, 44))
    assert len(images) == len(bundle.test) == 6
    for i in range(len(images)):
        x = F.center_crop(rescale(to_float(images[i][0])[None], 44), [32, 32])
        expected = normalize(x, bundle.mean, bundle.std)[0]
        assert torch.equal(bundle.test[i][0], expected)
