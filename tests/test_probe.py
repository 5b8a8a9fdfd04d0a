"""Linear probes on descriptors: the figures (top-1, mean class recall, mAP, confusion), CLI output and errors."""

import json

import numpy as np
import pytest
import torch

import vggnet
from vggnet.cli import main
from vggnet.features import FeatureExtractor, Features, extract_features
from vggnet.probe import run_probe
from vggnet.runtime import resolve_runtime

RT = resolve_runtime("cpu", "fp32", False)
META = {"name": "digits", "image_size": 32, "eval_scale": 32, "train_scale": [32, 32], "mean": [0.3] * 3,
        "std": [0.4] * 3}


def _file(tmp_path, name, X, y, **meta):
    base = {"format": "vggnet-features", "net_id": "a" * 64, "layer": "fc7", "scales": [32], "aggregate": "average",
            "flip": True, "dim": X.shape[1], "net": "n"}
    return Features(features=X, paths=[f"{name}#{i}" for i in range(len(y))], labels=y, class_names=["a", "b", "c"],
                    meta={**base, **meta})


def test_probe_figures_on_separable_descriptors(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 3
    y_tr, y_te = np.repeat(np.arange(3), 20), np.array([0, 0, 1, 1, 2, 2, 2, 2])
    X_tr, X_te = centres[y_tr] + 0.1 * rng.standard_normal((60, 8)), centres[y_te] + 0.1 * rng.standard_normal((8, 8))
    r = run_probe(_file(tmp_path, "tr", X_tr, y_tr), _file(tmp_path, "te", X_te, y_te))
    assert (r.top1, r.mean_class_recall, r.mAP) == (100.0, 100.0, 100.0)
    assert r.confusion.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 4]] and set(r.validation) == {0.01, 0.1, 1.0, 10.0, 100.0}
    # Mean class recall weighs classes equally; top-1 weighs images: they differ when one class fails.
    wrong = y_te.copy()
    wrong[:2] = 1
    r2 = run_probe(_file(tmp_path, "tr", X_tr, y_tr), _file(tmp_path, "te", X_te, wrong), Cs=[1.0])
    assert r2.top1 == 75.0 and r2.mean_class_recall == pytest.approx(100 * (0 + 0.5 + 1) / 2)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_cli_probe_json_confusion_and_mismatched_files(tmp_path, capsys):
    torch.manual_seed(0)
    net = vggnet.net_from_model(vggnet.vgg11(head="compact", num_classes=2, init="kaiming"),
                                {**META, "class_names": ["a", "b"]})
    fc7 = FeatureExtractor(net=net, scales=[32], runtime=RT)
    stage5 = FeatureExtractor(net=net, layer="stage5", scales=[32], runtime=RT)
    train = extract_features(fc7, _Items(12, 0), tmp_path / "train.npz", class_names=["a", "b"])
    test = extract_features(fc7, _Items(6, 1), tmp_path / "test.csv", class_names=["a", "b"])
    other = extract_features(stage5, _Items(6, 1), tmp_path / "other.npz", class_names=["a", "b"])
    png, js = tmp_path / "confusion.png", tmp_path / "probe.json"
    assert main(["probe", "--features", str(train), "--test", str(test), "--confusion", str(png),
                 "--json", str(js), "--C", "1"]) == 0
    figures = json.loads(js.read_text())
    assert figures["test_images"] == 6 and sum(map(sum, figures["confusion"])) == 6 and figures["C"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean class recall" in capsys.readouterr().out
    assert main(["probe", "--features", str(train), "--test", str(test), "--json", "--C", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["train_images"] == 12
    assert main(["probe", "--features", str(train), "--test", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "different layer: fc7 vs stage5" in err and len(err.splitlines()) == 1
    assert main(["probe", "--features", str(train)]) == 2
    assert "expected --features TRAIN --test TEST" in capsys.readouterr().err
