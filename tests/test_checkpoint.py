"""Checkpoints: atomic writes, weights-only loading, torchvision files recognised."""

import pickle

import pytest
import torch
import torchvision

import vggnet
from vggnet import checkpoint
from vggnet.checkpoint import atomic_save, infer_model_args, load_checkpoint, load_model, save_checkpoint
from vggnet.errors import UserError


def test_roundtrip_rebuilds_the_exact_net(tmp_path):
    model = vggnet.vgg("C", batch_norm=True, head="compact", num_classes=7, dropout=0.3).eval()
    path = save_checkpoint(tmp_path / "c.pt", model, meta={"class_names": list("abcdefg")}, epoch=3)
    loaded, meta = load_model(path)
    assert loaded.constructor_args == model.constructor_args and meta["class_names"] == list("abcdefg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert load_checkpoint(path)["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)

    def torn_save(obj, f):  # a full disk: half the bytes written, then an error
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": "vggnet", "payload": _Exploit(marker)}, f)
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing .*evil.pt.*never executes"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    model = vggnet.vgg("A", head="compact", num_classes=10)
    path = save_checkpoint(tmp_path / "a.pt", model)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["vgg11", "vgg13_bn", "vgg16", "vgg19_bn"])
def test_torchvision_state_dict_is_recognised(name, tmp_path):
    with torch.device("meta"):
        sd = getattr(torchvision.models, name)(weights=None).state_dict()
    args = infer_model_args(sd)
    config, bn = vggnet.MODELS[name]
    assert (args["config"], args["batch_norm"], args["num_classes"], args["head"]) == (config, bn, 1000, "paper")


@pytest.mark.parametrize("config", ["A-LRN", "C"])
def test_configs_beyond_torchvision_are_recognised(config, tmp_path):
    model = vggnet.vgg(config, head="compact", num_classes=5, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    loaded, meta = load_model(tmp_path / "bare.pt")
    assert loaded.constructor_args["config"] == config and loaded.in_channels == 1 and meta == {}


def test_mismatch_names_keys_and_shapes(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", vggnet.vgg("A", head="compact", num_classes=10))
    with pytest.raises(UserError, match=r"classifier.6.weight \(10, 512\) vs \(100, 512\)"):
        load_model(path, num_classes=100)
    with pytest.raises(UserError, match=r"does not fit configuration D .*missing features.2.weight.*unexpected features.3.weight"):
        load_model(path, config="D")
