"""Data sources: digits, CIFAR pickles, ImageFolder trees and synthetic images; bad input."""

import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import DIGITS_FRACTIONS, ImageFileDataset, _load_rgb, _stratified_split, build_data, eval_images
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
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
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
                        "data": None, "seed": 1, "hflip": False}


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
    assert len(test) == 30 and names == b.class_names and torch.allclose(test[4][0][1, 3, 3], torch.tensor(test[4][1] * 20 / 255))


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


def test_imagefolder_defaults_are_the_papers(tree):
    b = build_data(str(tree), mean_std="imagenet")
    assert (b.image_size, b.train_scale, b.eval_scale) == (224, (256, 256), 256)
    assert (b.mean, b.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert b.val[0][0].shape == (3, 224, 224)
    assert b.meta()["data"] == str(tree.resolve())


def test_imagefolder_strict_names_the_corrupt_file(tree):
    with pytest.raises(UserError, match=r"corrupt file: .*broken\.jpg"):
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
    assert x.shape == (3, 30, 40) and label == 0 and torch.allclose(x[0], torch.ones(30, 40))
    plain, names = eval_images(str(tree / "val" / "dog"))
    assert names == [] and len(plain) == 2 and plain[0][1] == -1
    one, _ = eval_images(str(tree / "val" / "cat" / "v0.png"))
    assert len(one) == 1
    labelled, names = eval_images(str(tree / "val"))                    # a folder of class folders
    assert names == ["cat", "dog"] and labelled.labels.tolist() == [0, 0, 1, 1]


def test_jpeg_draft_decodes_large_photos_small(tmp_path):
    _save(tmp_path / "big.jpg", (10, 200, 30), "JPEG", size=(800, 600))
    assert _load_rgb(str(tmp_path / "big.jpg"), 100).size == (200, 150)     # 1/4 scale, both sides >= 100
    assert _load_rgb(str(tmp_path / "big.jpg"), None).size == (800, 600)
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
    with pytest.raises(UserError, match=r"no val/"):
        build_data(str(other))


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"does not exist"),
    ("empty", r"is empty; expected"),
    ("neither", r"neither CIFAR nor ImageFolder"),
    ("file", r"expected a data directory"),
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
    with pytest.raises(UserError, match="mean_std"):
        build_data(mean_std="median")
    with pytest.raises(UserError, match="image_size <= S_min"):
        build_data(image_size=32, train_scale=(24, 40))
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
    xs = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    centres = torch.stack([xs[train.labels == c].mean(0) for c in range(10)])
    xt = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
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
