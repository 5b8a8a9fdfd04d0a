"""ONNX (run in onnxruntime) and TorchScript exports against PyTorch, and `vggnet export`."""

import json

import pytest
import torch

import vggnet
from vggnet.checkpoint import save_checkpoint
from vggnet.cli import main
from vggnet.nets import net_from_model
from vggnet.export import export_onnx, export_torchscript

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

META = dict(name="synthetic", class_names=["a", "b", "c", "d"], mean=[0.5] * 3, std=[0.25] * 3,
            image_size=32, train_scale=[32, 48], eval_scale=32, data="synthetic", seed=0)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return net_from_model(vggnet.vgg("A", head="compact", num_classes=4, init="glorot"), META, name="a")


def _close(got, want):
    """Equal up to float rounding, relative to the output's size (atol 1e-4 at unit scale)."""
    got = torch.as_tensor(got)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_onnx_dense_form_takes_any_batch_and_size(net, tmp_path):
    path = export_onnx(net, tmp_path / "dense.onnx", dense=True)
    model = onnx.load(str(path))
    assert _dims(model.graph.input[0])[:2] == ["batch", 3]
    assert all(isinstance(d, str) for d in _dims(model.graph.input[0])[2:])  # symbolic height and width
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["vggnet.class_names"]) == ["a", "b", "c", "d"]
    assert json.loads(props["vggnet.mean"]) == [0.5] * 3 and props["vggnet.image_size"] == "32"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dense = net.model.to_fully_conv().eval()
    for shape in ((1, 3, 32, 32), (3, 3, 70, 100)):  # batch 1 and 3; 1x1 and 2x3 score maps
        x = torch.randn(shape)
        scores, score_map = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            want = dense(x)
        _close(score_map, want)
        _close(scores, want.mean((2, 3)))
    assert score_map.shape == (3, 4, 2, 3)


def test_onnx_plain_net_has_a_dynamic_batch(net, tmp_path):
    path = export_onnx(net, tmp_path / "net.onnx")
    assert _dims(onnx.load(str(path)).graph.input[0]) == ["batch", 3, 32, 32]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        _close(session.run(None, {"image": x.numpy()})[0], net.model(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dense", [False, True])
def test_torchscript_round_trip(net, tmp_path, dense):
    path = export_torchscript(net, tmp_path / "net.pt", dense=dense)
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(json.loads(extra["meta.json"])["vggnet.class_names"]) == ["a", "b", "c", "d"]
    x = torch.randn(2, 3, 40, 72) if dense else torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        got = loaded(x)
        if dense:
            want = net.model.to_fully_conv()(x)
            _close(got[1], want)
            _close(got[0], want.mean((2, 3)))
        else:
            _close(got, net.model(x))


def test_cli_export(net, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "net.pt", net.model, meta=META)
    out = tmp_path / "out" / "net.ts"
    assert main(["export", "--weights", str(ckpt), "--format", "torchscript", "--out", str(out), "--dense"]) == 0
    line = capsys.readouterr().out
    assert out.is_file() and "N x 3 x H x W (H, W >= 32)" in line and "max |difference| from PyTorch" in line
    assert main(["export", "--weights", str(ckpt), "--format", "torchscript", "--out", str(out), "--config", "D"]) == 2
    assert "does not fit configuration D" in capsys.readouterr().err


def test_a_failed_export_keeps_the_previous_file(net, tmp_path, monkeypatch):
    """A full disk in the middle of an export: the previous export is untouched and no temporary file is left."""
    import errno

    import vggnet.checkpoint as ckpt

    path = export_torchscript(net, tmp_path / "net.pt")
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_torchscript(net, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


def test_safetensors_export_round_trips_weights_and_preprocessing(net, tmp_path):
    out = tmp_path / "a.safetensors"
    assert main(["export", "--weights", str(save_checkpoint(tmp_path / "a.pt", net.model, meta=META)),
                 "--format", "safetensors", "--out", str(out)]) == 0
    again = vggnet.load_net(out)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model(x), net.model.eval()(x))
    assert again.class_names == META["class_names"] and again.meta["mean"] == tuple(META["mean"])
