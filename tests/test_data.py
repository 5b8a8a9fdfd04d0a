"""Data sources: digits, CIFAR pickles, ImageFolder trees and synthetic images; bad input."""

import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from vggnet.data import (DIGITS_FRACTIONS, ImageFileDataset, _stratified_split, build_data, eval_images, open_image,
                         eval_draft)
from vggnet.errors import UserError
from vggnet.transforms import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------- digits

def test_digits_split_sizes_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    y = load_digits().target
    b = build_data(seed=0)
    assert (b.name, b.num_classes, b.class_names) == ("digits", 10, [str(k) for k in range(10)])
    assert (len(b.train), len(b.val), len(b.test)) == (1258, 180, 359)
    per_class = np.bincount(y)
    for ds, frac in zip((b.train, b.val, b.test), DIGITS_FRACTIONS):
        counts = np.bincount(ds.labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * per_class) <= 1)      # every class split 70/10/20
    assert sum(np.bincount(ds.labels.numpy(), minlength=10) for ds in (b.train, b.val, b.test)).tolist() == per_class.tolist()
    parts = _stratified_split(y, DIGITS_FRACTIONS, 0)
    assert len(np.unique(np.concatenate(parts))) == len(y)          # disjoint and complete
    assert (b.image_size, b.train_scale, b.eval_scale, b.skipped) == (32, (32, 48), 32, 0)


def test_digits_split_is_a_pure_function_of_the_seed():
    y = np.repeat(np.arange(10), 180)
    a, b = _stratified_split(y, DIGITS_FRACTIONS, 3), _stratified_split(y, DIGITS_FRACTIONS, 3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[2], _stratified_split(y, DIGITS_FRACTIONS, 4)[2])
    # A golden value: the same indices in every process and on every machine (PCG64 is stable).
    assert _stratified_split(np.repeat(np.arange(2), 10), (0.5, 0.5), 0)[1].tolist() == [0, 1, 5, 8, 9, 11, 14, 15, 17, 18]
    t1, names = eval_images(None, "test", seed=5)
    t2, _ = eval_images(None, "test", seed=5)
    assert torch.equal(t1.images, t2.images) and names == [str(k) for k in range(10)]


def test_digits_images_are_upsampled_rgb_and_normalised_with_train_stats():
    b = build_data(seed=1)
    raw, _ = eval_images(None, "val", seed=1)
    x, label = raw[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    x = x.float() / 255
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])           # grey digits replicated to RGB
    train = b.train.images.double() / 255
    assert np.allclose(b.mean, train.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(b.std, train.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-9)
    # val = (raw - mean) / std: Q = crop = 32 leaves the geometry alone.
    y, label2 = b.val[0]
    m, s = torch.tensor(b.mean).view(3, 1, 1).float(), torch.tensor(b.std).view(3, 1, 1).float()
    assert label2 == label and torch.allclose(y, (x - m) / s, atol=1e-5)
    assert b.meta() == {"name": "digits", "class_names": b.class_names, "num_classes": 10, "mean": list(b.mean),
                        "std": list(b.std), "image_size": 32, "train_scale": [32, 48], "eval_scale": 32,
                        "data": None, "seed": 1, "hflip": False, "input_range": 1.0}


# ----------------------------------------------------------------------------- CIFAR

def _write_cifar(root, *, classes=10, per_class=10, test_per_class=3, hundred=False, protocol=2, missing=()):
    """CIFAR python-format pickles; pixel 0 holds a unique id, the rest the label * 20."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(0).shuffle(labels)
    test_labels = np.repeat(np.arange(classes), test_per_class)

    def batch(lab, first_id):
        data = np.repeat((lab * 20).astype(np.uint8)[:, None], 3072, axis=1)
        data[:, 0] = (first_id + np.arange(len(lab))) % 256
        return {b"data": data, (b"fine_labels" if hundred else b"labels"): lab.tolist(), b"batch_label": b"x"}

    files = {}
    if hundred:
        files["train"] = batch(labels, 0)
        files["test"] = batch(test_labels, 0)
        files["meta"] = {b"fine_label_names": [f"c{k}".encode() for k in range(classes)]}
    else:
        for k, chunk in enumerate(np.array_split(labels, 5)):
            files[f"data_batch_{k + 1}"] = batch(chunk, k * len(chunk))
        files["test_batch"] = batch(test_labels, 0)
        files["batches.meta"] = {b"label_names": [f"c{k}".encode() for k in range(classes)]}
    for name, obj in files.items():
        if name not in missing:
            (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_from_pickles(tmp_path, protocol):
    folder = _write_cifar(tmp_path, protocol=protocol)
    b = build_data(str(tmp_path), seed=0)                      # DIR holding cifar-10-batches-py
    assert (b.name, b.num_classes, b.class_names[:2]) == ("cifar10", 10, ["c0", "c1"])
    assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 30)
    assert np.bincount(b.val.labels.numpy()).tolist() == [1] * 10            # stratified 10%
    ids = lambda ds: set(ds.images[:, 0, 0, 0].tolist())
    assert ids(b.train).isdisjoint(ids(b.val)) and len(ids(b.train) | ids(b.val)) == 100
    for ds in (b.train, b.val, b.test):                                   # labels stay with their images
        assert torch.equal(ds.images[:, 1, 5, 5].long(), ds.labels * 20)
    train = b.train.images.double() / 255
    assert np.allclose(b.mean, train.mean(dim=(0, 2, 3)).tolist()) and np.allclose(b.std, train.std(dim=(0, 2, 3), unbiased=False).tolist())
    again = build_data(str(folder), seed=0, mean_std="imagenet")        # the batches folder itself
    assert torch.equal(again.val.images, b.val.images)
    assert (again.mean, again.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not torch.equal(build_data(str(folder), seed=1).val.images, b.val.images)
    x, label = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    test, names = eval_images(str(tmp_path), "test")
    assert len(test) == 30 and names == b.class_names and test[4][0].dtype == torch.uint8
    assert int(test[4][0][1, 3, 3]) == test[4][1] * 20


def test_cifar100_from_pickles(tmp_path):
    _write_cifar(tmp_path, classes=100, per_class=10, test_per_class=1, hundred=True, protocol=4)
    b = build_data(str(tmp_path / "cifar-100-python"))
    assert (b.name, b.num_classes, len(b.train), len(b.val), len(b.test)) == ("cifar100", 100, 900, 100, 100)
    assert b.class_names[99] == "c99" and np.bincount(b.val.labels.numpy()).tolist() == [1] * 100


def test_cifar_missing_batches_are_named(tmp_path):
    _write_cifar(tmp_path, missing=("data_batch_3", "test_batch"))
    with pytest.raises(UserError, match=r"missing data_batch_3, test_batch"):
        build_data(str(tmp_path))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = _write_cifar(tmp_path)
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load .*mkdir"):
        build_data(str(tmp_path))
    assert not target.exists()


# ----------------------------------------------------------------------------- ImageFolder

def _save(path, colour, fmt, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


@pytest.fixture
def tree(tmp_path):
    """train/{cat,dog}: 5 good images each (PNG + JPEG, mixed-case extensions) + one corrupt each."""
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for c, colour in colours.items():
        for k in range(3):
            _save(tmp_path / "train" / c / f"{k}.png", colour, "PNG")
        _save(tmp_path / "train" / c / "a.JPG", colour, "JPEG")
        _save(tmp_path / "train" / c / "sub" / "b.jpeg", colour, "JPEG")      # nested, like torchvision
        for k in range(2):
            _save(tmp_path / "val" / c / f"v{k}.png", colour, "PNG")
        (tmp_path / "train" / c / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buf, "JPEG")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    (tmp_path / "train" / "dog" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return tmp_path


def test_imagefolder_indexes_classes_and_skips_corrupt_images(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="vggnet"):
        b = build_data(str(tree), image_size=32, train_scale=(32, 40), eval_scale=36, seed=0)
    assert (b.name, b.class_names, b.num_classes, b.skipped) == ("imagefolder", ["cat", "dog"], 2, 2)
    assert (len(b.train), len(b.val), b.test) == (10, 4, None)
    assert b.train.labels.tolist() == [0] * 5 + [1] * 5
    assert "broken.jpg" in caplog.text and "garbage.png" in caplog.text
    # Solid red cats and blue dogs: mean (0.5, 0, 0.5) and std (0.5, 0, 0.5) up to JPEG rounding.
    assert np.allclose(b.mean, (0.5, 0, 0.5), atol=0.01) and np.allclose(b.std[::2], (0.5, 0.5), atol=0.01)
    x, label = b.val[3]
    assert x.shape == (3, 32, 32) and label == 1
    assert x[2].mean() > 0.9 and x[0].mean() < -0.9                      # blue after (x - mean) / std
    torch.manual_seed(0)
    x, label = b.train[0]
    assert x.shape == (3, 32, 32) and label == 0


def test_imagefolder_sizes_follow_the_images(tree, tmp_path_factory):
    b = build_data(str(tree), mean_std="imagenet")                 # 40x30 images: trained at their own size
    assert (b.image_size, b.train_scale, b.eval_scale) == (32, (32, 48), 32)
    assert b.sizes_reason.startswith("images are 40x30 px (median of 10 sampled; smaller side 30 px): crop 32, "
                                     "S in [32, 48], Q 32") and b.suggested_head == "compact"
    assert (b.mean, b.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert b.val[0][0].shape == (3, 32, 32) and b.meta()["data"] == str(tree.resolve())
    assert "--image-size as given" in build_data(str(tree), image_size=32, mean_std="imagenet").sizes_reason
    photos = tmp_path_factory.mktemp("photos")
    for c in ("a", "b"):
        for k in range(2):
            _save(photos / "train" / c / f"{k}.jpg", (9, 9, 9), "JPEG", size=(300, 250))
            _save(photos / "val" / c / f"{k}.jpg", (9, 9, 9), "JPEG", size=(300, 250))
    p = build_data(str(photos), mean_std="imagenet")                # photos: the paper's 224 crops at 256
    assert (p.image_size, p.train_scale, p.eval_scale, p.suggested_head) == (224, (256, 256), 256, None)


@pytest.mark.parametrize("side, expected", [(8, (32, (32, 48), 32)), (40, (32, (32, 48), 40)),
                                            (63, (32, (32, 63), 63)), (100, (96, (96, 144), 100)),
                                            (223, (192, (192, 288), 223)), (224, (224, (256, 256), 256)),
                                            (1000, (224, (256, 256), 256))])
def test_sizes_for_images(side, expected):
    from vggnet.data import sizes_for_images

    crop, scale, q, why = sizes_for_images(side)
    assert (crop, scale, q) == expected
    assert crop % 32 == 0 and crop <= max(side, 32) and crop <= scale[0] <= scale[1] and crop <= q   # a valid run


def test_train_only_folder_holds_out_a_seeded_stratified_val(tmp_path, caplog):
    for c, n in (("a", 20), ("b", 10), ("c", 2)):
        for k in range(n):
            _save(tmp_path / "train" / c / f"{k}.png", (k, 0, 0), "PNG")
    b = build_data(str(tmp_path), mean_std="imagenet", seed=3)
    assert np.bincount(b.val.labels.numpy()).tolist() == [2, 1, 1]      # 10% per class, at least one
    assert (len(b.train), b.holdout, b.test) == (28, 0.1, None)
    assert "no val/ folder: a seeded stratified 10% of train/ (4 images) is held out" in b.sizes_reason
    train_files, val_files = {s for s, _ in b.train.samples}, {s for s, _ in b.val.samples}
    assert train_files.isdisjoint(val_files) and len(train_files | val_files) == 32
    assert val_files == {s for s, _ in build_data(str(tmp_path), mean_std="imagenet", seed=3).val.samples}
    assert val_files != {s for s, _ in build_data(str(tmp_path), mean_std="imagenet", seed=4).val.samples}
    ev, names = eval_images(str(tmp_path), "val", seed=3)               # eval sees the same held-out images
    assert {s for s, _ in ev.samples} == val_files and names == ["a", "b", "c"]
    with caplog.at_level(logging.WARNING, logger="vggnet"):
        ev, _ = eval_images(str(tmp_path), "test", seed=3)              # no test/: the held-out val
    assert {s for s, _ in ev.samples} == val_files
    _save(tmp_path / "test" / "a" / "t.png", (0, 0, 0), "PNG")
    for c in "bc":
        _save(tmp_path / "test" / c / "t.png", (0, 0, 0), "PNG")
    b = build_data(str(tmp_path), mean_std="imagenet", seed=3)          # train/ + test/, no val/: the same
    assert len(b.test) == 3 and {s for s, _ in b.val.samples} == val_files


def test_eval_images_decode_exactly_as_training_test(tmp_path):
    """eval_images(draft=Q) gives the pixels training's val/test decode, and the test view of those
    pixels is exactly the val item: `vggnet eval --methods center` sees what training saw."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for k in range(2):
            for split in ("train", "val"):
                path = tmp_path / split / c / f"{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)).save(path, quality=90)
    b = build_data(str(tmp_path), image_size=64, train_scale=(80, 80), test_scale=80, mean_std="imagenet")
    assert b.val.draft == eval_draft(64, 80) == 80
    ev, _ = eval_images(str(tmp_path), "val", draft=80)
    for i in range(len(ev)):
        x, label = ev[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 88, 113)       # JPEG decoded at 1/8 scale, sides >= 80
        assert torch.equal(x, F.pil_to_tensor(open_image(ev.samples[i][0], draft=80)))
        assert torch.equal(b.val.transform(x), b.val[i][0]) and label == b.val[i][1]
    full, _ = eval_images(str(tmp_path), "val")                         # no draft: full size
    assert full[0][0].shape == (3, 700, 900)


def test_study_hook(monkeypatch):
    import sys
    import types

    canvas = 48
    made = {}

    def build_splits(seed: int = 0):
        made["seed"] = seed
        g = torch.Generator().manual_seed(seed)
        split = lambda n: (torch.randint(0, 256, (n, 3, canvas, canvas), dtype=torch.uint8, generator=g),
                           torch.arange(n) % 3)
        return {"train": split(12), "val": split(6), "test": split(6)}, ["x", "y", "z"]

    monkeypatch.setitem(sys.modules, "vggnet.studydata", types.SimpleNamespace(build_splits=build_splits))
    b = build_data("study", seed=2, mean_std="imagenet")
    assert made["seed"] == 2 and (b.name, b.class_names, b.data, b.hflip) == ("study", ["x", "y", "z"], "study", False)
    s = canvas * 256 // 224  # the paper's S = Q = 256 for 224 crops, in proportion: 54 for 48 (36 for 32)
    assert (b.image_size, b.train_scale, b.eval_scale) == (canvas, (s, s), s) == (48, (54, 54), 54)
    assert (len(b.train), len(b.val), len(b.test)) == (12, 6, 6) and b.val[0][0].shape == (3, canvas, canvas)
    ev, names = eval_images("study", "test", seed=2)
    assert ev[0][0].dtype == torch.uint8 and names == ["x", "y", "z"]


def test_study_without_its_module_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vggnet.studydata", None)          # import fails like a missing module
    with pytest.raises(UserError, match="--data study needs vggnet.studydata"):
        build_data("study")


def test_imagefolder_strict_names_the_corrupt_file(tree):
    with pytest.raises(UserError, match=r"cannot decode image .*broken\.jpg.*without --strict"):
        build_data(str(tree), strict=True)


def test_imagefolder_datasets_survive_pickling_and_workers(tree):
    b = build_data(str(tree), image_size=32, train_scale=(32, 32), eval_scale=32, mean_std="imagenet")
    val = pickle.loads(pickle.dumps(b.val))
    assert torch.equal(val[1][0], b.val[1][0])
    loader = torch.utils.data.DataLoader(b.train, batch_size=10, num_workers=1)
    x, y = next(iter(loader))
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [0] * 5 + [1] * 5


def test_eval_images_native_size_and_unlabelled_folders(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="vggnet"):
        ds, names = eval_images(str(tree), "test")                     # no test/: falls back to val/
    assert "no test/ folder" in caplog.text
    assert names == ["cat", "dog"] and len(ds) == 4
    x, label = ds[0]
    assert x.shape == (3, 30, 40) and x.dtype == torch.uint8 and label == 0 and bool((x[0] == 255).all())
    plain, names = eval_images(str(tree / "val" / "dog"))
    assert names == [] and len(plain) == 2 and plain[0][1] == -1
    one, _ = eval_images(str(tree / "val" / "cat" / "v0.png"))
    assert len(one) == 1
    labelled, names = eval_images(str(tree / "val"))                    # a folder of class folders
    assert names == ["cat", "dog"] and labelled.labels.tolist() == [0, 0, 1, 1]


def test_jpeg_draft_decodes_large_photos_small(tmp_path):
    _save(tmp_path / "big.jpg", (10, 200, 30), "JPEG", size=(800, 600))
    assert open_image(tmp_path / "big.jpg", draft=100).size == (200, 150)     # 1/4 scale, both sides >= 100
    assert open_image(tmp_path / "big.jpg").size == (800, 600)
    # A JPEG with bytes after its end marker is still a good image.
    (tmp_path / "tail.jpg").write_bytes((tmp_path / "big.jpg").read_bytes() + b"\0" * 200)
    ds = ImageFileDataset(samples=[(str(tmp_path / "tail.jpg"), 0)])
    assert ds[0][0].shape == (3, 600, 800)
    from vggnet.data import _check_image
    assert _check_image(tmp_path / "tail.jpg") is None


# ----------------------------------------------------------------------------- bad input

def test_imagefolder_problems_are_one_line_user_errors(tree, tmp_path_factory):
    (tree / "val" / "bird").mkdir()
    _save(tree / "val" / "bird" / "x.png", (0, 0, 0), "PNG")
    with pytest.raises(UserError, match=r"same class folders.*unexpected \['bird'\]"):
        build_data(str(tree))
    (tree / "train" / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*train/bird has no images"):
        build_data(str(tree))
    other = tmp_path_factory.mktemp("trainonly")
    _save(other / "train" / "a" / "x.png", (0, 0, 0), "PNG")
    with pytest.raises(UserError, match=r"no val/ folder and too few images per class"):
        build_data(str(other))


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"does not exist"),
    ("empty", r"is an empty directory; expected"),
    ("neither", r"neither CIFAR nor an ImageFolder"),
    ("file", r"--data expects a data directory"),
])
def test_bad_data_directories(tmp_path, case, pattern):
    path = tmp_path / "d"
    if case == "empty":
        path.mkdir()
    elif case == "neither":
        path.mkdir()
        (path / "readme.md").write_text("hello")
    elif case == "file":
        path.write_text("x")
    with pytest.raises(UserError, match=pattern) as e:
        build_data(str(path))
    assert "\n" not in str(e.value)


def test_bad_arguments():
    with pytest.raises(UserError, match="--mean-std must be"):
        build_data(mean_std="median")
    with pytest.raises(UserError, match=r"^--image-size 32 must be <= the training scale S \(--train-scale 24 40\)"):
        build_data(image_size=32, train_scale=(24, 40))
    with pytest.raises(UserError, match=r"^--test-scale 16 must be >= --image-size 32"):
        build_data(image_size=32, test_scale=16)
    with pytest.raises(UserError, match=r"^--train-scale S_MIN S_MAX needs S_MIN <= S_MAX, got 48 40"):
        build_data(train_scale=(48, 40))
    with pytest.raises(UserError, match=r"^--test-scale must be between 1 and 4096 px, got 100000"):
        build_data(test_scale=100000)
    with pytest.raises(UserError, match=r"^--image-size expects an integer number of pixels, got 'big'"):
        build_data(image_size="big")
    with pytest.raises(UserError, match=r"given twice with different values: 32 and 40"):
        build_data(eval_scale=32, test_scale=40)
    assert build_data(test_scale=40).eval_scale == build_data(eval_scale=40).test_scale == 40
    with pytest.raises(UserError, match="split must be"):
        eval_images(None, "holdout")


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_seeded_balanced_and_learnable():
    b = build_data("synthetic", synthetic_size=200, seed=3)
    assert (b.name, b.num_classes, len(b.train), len(b.val), len(b.test)) == ("synthetic", 10, 200, 50, 50)
    assert np.bincount(b.train.labels.numpy()).tolist() == [20] * 10
    assert torch.equal(b.val[7][0], build_data("synthetic", synthetic_size=200, seed=3).val[7][0])
    assert not torch.equal(b.val[7][0], build_data("synthetic", synthetic_size=200, seed=4).val[7][0])
    assert b.meta()["synthetic_size"] == 200 and b.meta()["data"] == "synthetic"
    # Nearest class mean on raw pixels separates the classes: a net has something to learn.
    train, _ = eval_images("synthetic", "train", seed=3, synthetic_size=200)
    test, _ = eval_images("synthetic", "test", seed=3, synthetic_size=200)
    xs = torch.stack([train[i][0] for i in range(len(train))]).flatten(1).float()
    centres = torch.stack([xs[train.labels == c].mean(0) for c in range(10)])
    xt = torch.stack([test[i][0] for i in range(len(test))]).flatten(1).float()
    pred = torch.cdist(xt, centres).argmin(1)
    assert (pred == test.labels).float().mean() >= 0.9
    assert not torch.equal(train[0][0], test[0][0])                      # splits hold different images


def test_synthetic_at_imagenet_size():
    b = build_data("synthetic", image_size=224, synthetic_size=20, mean_std="imagenet")
    assert (b.train_scale, b.eval_scale) == ((256, 256), 256)
    assert b.train[0][0].shape == (3, 224, 224) and b.val[0][0].shape == (3, 224, 224)


def test_cifar_pickles_from_numpy_1_load_under_numpy_2(tmp_path):
    # The official files (and any written with numpy < 2) name numpy.core.multiarray._reconstruct.
    folder = _write_cifar(tmp_path, protocol=2)
    for f in folder.iterdir():
        f.write_bytes(f.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in (folder / "test_batch").read_bytes()
    ds, names = eval_images(str(folder), "test")
    assert len(ds) == 30 and names[0] == "c0"


# ----------------------------------------------------------------------------- decoding: every pixel mode

def _rgb(path, **kw):
    return np.asarray(open_image(path, **kw)).astype(int)


def _write(tmp_path, im, fmt, name=None, **kw):
    path = tmp_path / (name or f"img.{fmt.lower()}")
    im.save(path, fmt, **kw)
    return path


def test_16_bit_grey_is_scaled_by_its_range_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)      # 4 x 256
    png = _write(tmp_path, Image.fromarray(ramp), "PNG")
    assert Image.open(png).mode == "I;16"
    expected = np.round(ramp / 257).astype(int)
    out = _rgb(png)
    assert out.shape == (4, 256, 3) and (out == expected[..., None]).all()
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and out[0, 128, 0] == 128       # a full 0..255 ramp
    tif = _write(tmp_path, Image.frombytes("I;16B", (256, 4), ramp.astype(">u2").tobytes()), "TIFF")
    assert Image.open(tif).mode == "I;16B" and (_rgb(tif) == expected[..., None]).all()
    ppm = _write(tmp_path, Image.fromarray(ramp), "PPM")                # 16-bit PGM: PIL reads mode I
    assert Image.open(ppm).mode == "I" and (_rgb(ppm) == expected[..., None]).all()
    wide = _write(tmp_path, Image.fromarray(np.array([[-1000, 0, 99000]], dtype=np.int32)), "TIFF", "wide.tif")
    assert _rgb(wide)[0, :, 0].tolist() == [0, 3, 255]                 # beyond 16 bits: its own range


def test_float_grey_maps_its_range_and_refuses_non_finite(tmp_path):
    unit = _write(tmp_path, Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF", "unit.tif")
    assert Image.open(unit).mode == "F" and _rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    wide = _write(tmp_path, Image.fromarray(np.array([[-3.0, 1.0, 5.0]], dtype=np.float32)), "TIFF", "wide.tif")
    assert _rgb(wide)[0, :, 1].tolist() == [0, 128, 255]
    nan = _write(tmp_path, Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)), "TIFF", "nan.tif")
    with pytest.raises(UserError, match=r"nan\.tif.*NaN or infinity"):
        open_image(nan)


def test_palette_grey_1bit_cmyk_ycbcr_lab(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    assert _rgb(_write(tmp_path, pal, "PNG", "p.png"))[0, :2].tolist() == [[255, 0, 0], [0, 128, 255]]
    gif = _write(tmp_path, pal, "GIF")
    assert _rgb(gif)[0, :2].tolist() == [[255, 0, 0], [0, 128, 255]]
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert _rgb(_write(tmp_path, grey, "PNG", "l.png"))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    bits = Image.fromarray(np.array([[True, False]])).convert("1")
    assert _rgb(_write(tmp_path, bits, "PNG", "1.png"))[0].tolist() == [[255] * 3, [0] * 3]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))                 # full magenta + yellow = red
    assert _rgb(_write(tmp_path, cmyk, "TIFF", "cmyk.tif"))[0, 0].tolist() == [255, 0, 0]
    ycc = Image.new("RGB", (2, 2), (10, 200, 30)).convert("YCbCr")
    assert np.abs(_rgb(_write(tmp_path, ycc, "TIFF", "ycc.tif"))[0, 0] - [10, 200, 30]).max() <= 3
    lab = Image.new("LAB", (2, 2), (128, 128, 128))                    # L* = 50, a* = b* = 0: mid grey
    assert np.abs(_rgb(_write(tmp_path, lab, "TIFF", "lab.tif"))[0, 0] - 119).max() <= 2


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0] = [[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]       # opaque red, clear, half black
    out = _rgb(_write(tmp_path, Image.fromarray(rgba, "RGBA"), "PNG", "rgba.png"))[0]
    assert out[0].tolist() == [255, 0, 0] and out[1].tolist() == [255, 255, 255]
    assert np.abs(out[2] - 127).max() <= 1                             # 50% black over white
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert _rgb(_write(tmp_path, la, "PNG", "la.png"))[0].tolist() == [[255] * 3, [0] * 3]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    out = _rgb(_write(tmp_path, pal, "PNG", "pt.png", transparency=0))[0]
    assert out.tolist() == [[255, 255, 255], [0, 0, 255]]               # index 0 transparent
    out = _rgb(_write(tmp_path, pal, "GIF", "pt.gif", transparency=1))[0]
    assert out.tolist() == [[0, 255, 0], [255, 255, 255]]


def test_animated_and_multi_page_give_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "PNG", "TIFF", "WEBP"):
        path = tmp_path / f"anim.{fmt.lower()}"
        frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
        assert getattr(Image.open(path), "n_frames", 1) == 3, fmt
        assert np.abs(_rgb(path)[0, 0] - [255, 0, 0]).max() <= 2, fmt


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))                           # white left edge
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # "rotate 90 clockwise to view"
    path = _write(tmp_path, im, "JPEG", "rot.jpg", exif=exif, quality=95)
    out = _rgb(path)
    assert out.shape == (40, 20, 3) and out[:10, :, 0].mean() > 200 and out[-10:, :, 0].mean() < 50


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [100_000, 10_000, 8_500])
def test_decompression_bombs_are_refused_by_name(tmp_path, side):
    import warnings

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no warning escapes either
        with pytest.raises(UserError, match=r"^refusing image .*bomb\.png: a decompression bomb .*64 Mi pixels"):
            open_image(path)
        from vggnet.data import _check_image, image_size_of
        assert "decompression bomb" in _check_image(path)
        with pytest.raises(UserError, match="decompression bomb"):
            image_size_of(path)
    assert warnings.filters == filters                                   # global state unchanged
    assert Image.MAX_IMAGE_PIXELS == 89478485


@pytest.mark.parametrize("content, pattern", [
    (b"", r"not a picture vggnet reads"),
    (b"hello, this is text\n", r"not a picture vggnet reads"),
    (_png_header(40, 30)[:40], r"a corrupt or truncated PNG file"),
    (_png_header(0, 30), r"a corrupt or truncated PNG file"),
    (_png_header(40, 30)[:-30], r"a corrupt or truncated PNG file"),
    (b"\xff\xd8\xff\xe0" + bytes(50), r"a corrupt or truncated JPEG file"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"not a picture vggnet reads"),   # never Ghostscript
])
def test_hostile_or_broken_files_are_one_line_naming_the_file(tmp_path, content, pattern):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(UserError, match=pattern) as e:
        open_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"image not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match=r"got the directory"):
        open_image(tmp_path)


def test_new_extensions_are_indexed(tmp_path):
    for k, fmt in enumerate(("BMP", "GIF", "WEBP", "TIFF", "PPM")):
        for split in ("train", "val"):
            for c in ("a", "b"):
                path = tmp_path / split / c / f"{k}.{fmt.lower()}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (200, 10, 10)).save(path, fmt)
    b = build_data(str(tmp_path), mean_std="imagenet")
    assert (len(b.train), b.skipped) == (10, 0)
