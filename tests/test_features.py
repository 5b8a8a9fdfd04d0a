"""Appendix B descriptors: the dense path of eval, scale aggregation, files (chunked, resumable, atomic), errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.checkpoint import save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.evaluate import dense_pooled, rescale
from vggnet.features import FeatureExtractor, extract_features, load_features
from vggnet.runtime import resolve_runtime

RT = resolve_runtime("cpu", "fp32", False)
META = {"name": "digits", "image_size": 32, "eval_scale": 32, "train_scale": [32, 48], "mean": [0.3] * 3,
        "std": [0.4] * 3, "class_names": ["a", "b"]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vggnet.vgg11(head="compact", num_classes=2, init="kaiming")


@pytest.fixture(scope="module")
def net(model):
    return vggnet.net_from_model(model, META)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 32, 40, generator=g) * 255).to(torch.uint8) for _ in range(10)]


class _Items(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 2


def test_descriptor_is_evaluates_dense_path_flip_averaged_and_l2_normalised(net, images):
    ex = FeatureExtractor(net=net, scales=[32, 48], runtime=RT)
    got = ex(images[:3])
    x = torch.stack(images[:3]).float() / 255
    flipped = vggnet.nets.Net(model=net.model, meta=net.meta, name="n", flip=True)
    per_q = [dense_pooled(flipped, rescale(x, q), runtime=RT, layer="fc7").mean(1) for q in (32, 48)]
    want = torch.nn.functional.normalize(torch.stack(per_q).mean(0), dim=1)
    torch.testing.assert_close(got, want)
    assert got.shape == (3, 512) and torch.allclose(got.norm(dim=1), torch.ones(3))
    # uint8 and float [0, 1] give the same descriptor
    torch.testing.assert_close(ex([img.float() / 255 for img in images[:3]]), got)


def test_stack_gives_d_columns_per_scale_and_average_d(net, images):
    stacked = FeatureExtractor(net=net, scales=[32, 48, 64], aggregate="stack", runtime=RT)
    averaged = FeatureExtractor(net=net, scales=[32, 48, 64], aggregate="average", runtime=RT)
    single = [FeatureExtractor(net=net, scales=[q], runtime=RT)(images[:2]) for q in (32, 48, 64)]
    s, a = stacked(images[:2]), averaged(images[:2])
    assert (stacked.dim, averaged.dim, s.shape[1], a.shape[1]) == (3 * 512, 512, 3 * 512, 512)
    # Stacked: the per-scale (unnormalised) descriptors side by side, scale-major, then one L2 norm,
    # so each block is parallel to that scale's own descriptor.
    for k, d in enumerate(single):
        block = torch.nn.functional.normalize(s[:, 512 * k:512 * (k + 1)], dim=1)
        torch.testing.assert_close(block, d, atol=1e-5, rtol=1e-4)
    conv = FeatureExtractor(net=net, layer="relu3_2", scales=[32], runtime=RT)
    assert conv(images[:1]).shape == (1, 256)


def test_bad_layer_and_small_scale(net):
    with pytest.raises(UserError, match="expected one of relu1_1.*fc7"):
        FeatureExtractor(net=net, layer="fc8", runtime=RT)
    paper = vggnet.net_from_model(vggnet.vgg11(num_classes=2))
    with pytest.raises(UserError, match="needs test scales Q >= 224 px, got 128"):
        FeatureExtractor(net=paper, scales=[128, 256], runtime=RT)
    assert FeatureExtractor(net=paper, layer="stage5", scales=[64], runtime=RT).scales == (64,)


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_file_round_trip_resume_and_mismatch(net, images, tmp_path, suffix):
    ex = FeatureExtractor(net=net, scales=[32], runtime=RT, batch_size=4)
    data = _Items(images)
    out = tmp_path / f"f{suffix}"
    seen = []

    def stop_after_two_chunks(done):
        seen.append(done)
        if done > 8:  # inside the third chunk, after two were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(ex, data, out, class_names=["a", "b"], chunk_size=4, progress=stop_after_two_chunks)
    parts = tmp_path / f"f{suffix}.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("chunk-*")) == ["chunk-000000.npz", "chunk-000001.npz"]
    resumed = []
    extract_features(ex, data, out, class_names=["a", "b"], chunk_size=4, progress=resumed.append)
    assert resumed[0] == 4 and not parts.exists()  # the two finished chunks were skipped, not recomputed
    f = load_features(out)
    torch.testing.assert_close(torch.from_numpy(f.features), ex(images), atol=1e-6, rtol=1e-5)
    assert f.labels.tolist() == [i % 2 for i in range(10)] and f.class_names == ["a", "b"]
    assert f.meta["layer"] == "fc7" and f.meta["scales"] == [32] and len(f.meta["net_id"]) == 64
    if suffix == ".npz":
        z = np.load(out)  # numpy reads it directly, without pickles
        assert z["features"].shape == (10, 512) and z["paths"][0] == "image#0"
    else:
        first, header = out.read_text().splitlines()[:2]
        assert json.loads(first.split(" ", 2)[2])["dim"] == 512 and header.startswith("path,label,f0,f1")
    other = FeatureExtractor(net=net, layer="relu5_2", scales=[32], runtime=RT)
    with pytest.raises(UserError, match=r"\(layer: fc7 then, relu5_2 now\); use --force"):
        extract_features(other, data, out, class_names=["a", "b"])
    extract_features(other, data, out, class_names=["a", "b"], force=True)
    assert load_features(out).meta["layer"] == "relu5_2"


def _folder(root, sizes=((40, 36), (32, 48))):
    g = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_cli_features_writes_paths_labels_and_rows(model, tmp_path, capsys):
    weights = save_checkpoint(tmp_path / "net.pt", model, meta={**META, "class_names": ["cat", "dog"]})
    data = _folder(tmp_path / "photos")
    out = tmp_path / "feats.npz"
    argv = ["features", "--weights", str(weights), "--data", str(data), "--out", str(out), "--test-scale", "32,40",
            "--aggregate", "stack", "--device", "cpu", "--precision", "fp32"]
    assert main(argv) == 0
    f = load_features(out)
    assert f.features.shape == (4, 1024) and f.labels.tolist() == [0, 0, 1, 1]
    assert f.paths[0].endswith("cat/0.png") and f.meta["aggregate"] == "stack" and f.meta["flip"] is True


def test_cli_features_bad_input_is_one_line(model, tmp_path, capsys):
    weights = save_checkpoint(tmp_path / "net.pt", model, meta=META)
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["features", "--weights", str(weights), "--out", str(tmp_path / "o.npz")]
    cases = [(["--layer", "conv9"], "unknown layer 'conv9'; expected one of relu1_1"),
             (["--test-scale", "16"], "needs test scales Q >= 32 px, got 16"),
             (["--data", str(empty)], "empty"),
             (["--out", str(tmp_path / "o.txt")], "must end in .npz or .csv")]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
