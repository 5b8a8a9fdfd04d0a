"""Engines agree with eager PyTorch: same top-1 on every digits test image, fp32 logits within 1e-4.

The net is a compact-head A with fixed random weights (nothing is trained); its ONNX files go to a
per-module temporary cache. Nothing here is timed.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from vggnet import engines
from vggnet.data import build_data, eval_images
from vggnet.engines import (CastEngine, CompiledEngine, OnnxEngine, attach_engine, choose_engine, default_cache_dir,
                            export_int8_onnx, weights_digest)
from vggnet.errors import UserError
from vggnet.evaluate import dense_pooled, posteriors
from vggnet.model import vgg
from vggnet.nets import net_from_model
from vggnet.runtime import Runtime

CPU = torch.device("cpu")
FP32 = Runtime(CPU, "fp32", False)


@pytest.fixture(scope="module")
def digits():
    images = [img for img, _ in eval_images(None, "test")[0]]
    return torch.stack(images).float() / 255  # (359, 3, 32, 32) in [0, 1]


@pytest.fixture(scope="module")
def meta():
    return build_data(None).meta()


def _net(meta, seed: int = 0):
    torch.manual_seed(seed)
    return net_from_model(vgg("A", head="compact", num_classes=10, init="kaiming"), meta, name="digits-A")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.inference_mode()
def test_onnxruntime_fp32_matches_eager_on_every_digit(digits, meta, cache):
    net = _net(meta)
    x = net.normalise(digits)
    eager = net.model(x)
    engine = OnnxEngine(net, precision="fp32", cache_dir=cache)
    ort = engine("crop", net.model, x)
    assert _rel(ort, eager) <= 1e-4
    assert torch.equal(ort.argmax(1), eager.argmax(1))
    # through the test path: the centre protocol, and the dense form at a size it was not exported at
    want = posteriors(net, list(digits), "center", 32, runtime=FP32)
    dense_want = dense_pooled(net, digits[:20], runtime=FP32)
    line = attach_engine(net, FP32, engine="onnxruntime", cache_dir=cache)
    assert line.startswith("engine onnxruntime, precision fp32")
    got = posteriors(net, list(digits), "center", 32, runtime=FP32)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert _rel(dense_pooled(net, digits[:20], runtime=FP32), dense_want) <= 1e-4
    big = torch.nn.functional.interpolate(digits[:4], size=(48, 56), mode="bilinear")
    net.engine = None
    dense_big = dense_pooled(net, big, runtime=FP32)
    attach_engine(net, FP32, engine="onnxruntime", cache_dir=cache)
    assert _rel(dense_pooled(net, big, runtime=FP32), dense_big) <= 1e-4


@torch.inference_mode()
def test_compiled_engine_matches_eager(digits):
    # inductor compiles for tens of seconds per net on 2 cores: a two-conv net keeps the test short
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    x = (digits - 0.3) / 0.3
    eager = module(x)
    compiled = CompiledEngine(FP32)("crop", module, x)
    assert _rel(compiled, eager) <= 1e-4
    assert torch.equal(compiled.argmax(1), eager.argmax(1))


@torch.inference_mode()
def test_int8_agrees_with_fp32_and_is_cached_with_its_calibration(digits, meta, cache, monkeypatch, tmp_path):
    net = _net(meta)
    calib = torch.stack([img for img, _ in eval_images(None, "train")[0]][:64])  # uint8 pixels
    fp32 = posteriors(net, list(digits), "center", 32, runtime=FP32).argmax(1)
    attach_engine(net, FP32, precision="int8", cache_dir=cache, calibration=calib)
    int8 = posteriors(net, list(digits), "center", 32, runtime=FP32).argmax(1)
    agreement = float((int8 == fp32).float().mean())
    print(f"int8 top-1 agreement with fp32 on {len(digits)} digits (random weights): {agreement:.2%}")
    assert agreement >= 0.9
    path = net.engine.path("crop", net.normalise(digits[:1]))
    assert path.exists() and path.with_suffix(".calib.pt").exists()
    stored = torch.load(path.with_suffix(".calib.pt"), weights_only=True)["pixels"]
    assert stored.shape == calib.shape and stored.dtype == torch.uint8
    # a second attach reuses the file: no export, no calibration
    monkeypatch.setattr(engines, "_export_onnx", lambda *a: pytest.fail("exported again"))
    again = _net(meta)
    attach_engine(again, FP32, precision="int8", cache_dir=cache, calibration=calib)
    assert torch.equal(posteriors(again, list(digits), "center", 32, runtime=FP32).argmax(1), int8)
    # `vggnet export --precision int8` writes the same cached file where it is asked to
    out = export_int8_onnx(again, tmp_path / "net-int8.onnx", calib, cache_dir=cache)
    assert out.read_bytes() == path.read_bytes()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": again.normalise(digits[:8]).numpy()})[0].shape == (8, 10)


def _fake_export(module, x, key):  # the cache's bookkeeping, without exporting
    return f"onnx {key} {tuple(x.shape)}".encode()


def test_changing_one_weight_makes_a_new_artefact(meta, cache, monkeypatch):
    monkeypatch.setattr(engines, "_export_onnx", _fake_export)
    net = _net(meta)
    x = torch.zeros(2, 3, 32, 32)
    before = OnnxEngine(net, cache_dir=cache).path("crop", x)
    assert OnnxEngine(_net(meta), cache_dir=cache).path("crop", x) == before  # same weights, same file
    digest = weights_digest(net.model)
    with torch.no_grad():
        net.model.features[0].weight[0, 0, 0, 0] += 1e-3
    assert weights_digest(net.model) != digest
    engine = OnnxEngine(net, cache_dir=cache)
    after = engine.path("crop", x)
    assert after != before
    assert not after.exists()
    assert engine.artefact("crop", net.model, x) == after and after.exists()
    assert OnnxEngine(net, precision="int8", cache_dir=cache).path("crop", x) != after  # precision is in the key
    assert engine.path("dense", x) != after  # and so is the key


def test_auto_follows_the_hardware_class(meta, cache, monkeypatch):
    net = _net(meta, seed=5)
    monkeypatch.setattr(engines, "hardware_class", lambda device: "cpu")
    assert choose_engine(FP32, "fp32")[0] == "eager"  # export not paid for
    assert choose_engine(FP32, "fp32", images=engines.ORT_MIN_IMAGES)[0] == "onnxruntime"
    assert choose_engine(FP32, "fp32", cached=True)[0] == "onnxruntime"
    assert attach_engine(net, FP32, cache_dir=cache).startswith("engine eager") and net.engine is None
    monkeypatch.setattr(engines, "_export_onnx", _fake_export)
    OnnxEngine(net, cache_dir=cache).artefact("crop", net.model, torch.zeros(2, 3, 32, 32))  # now it is cached
    assert attach_engine(net, FP32, cache_dir=cache).startswith("engine onnxruntime")
    monkeypatch.setattr(engines, "hardware_class", lambda device: "cpu-bf16")
    bf16 = Runtime(CPU, "bf16", True)
    assert attach_engine(net, bf16, cache_dir=cache).startswith("engine eager")
    assert isinstance(net.engine, CastEngine)          # eager bf16 with the weights cast once
    assert choose_engine(bf16, "int8")[0] == "onnxruntime"


def test_bad_choices_are_user_errors(meta):
    net = _net(meta)
    with pytest.raises(UserError, match="unknown engine"):
        attach_engine(net, FP32, engine="tensorrt")
    with pytest.raises(UserError, match="int8 needs engine onnxruntime"):
        attach_engine(net, FP32, engine="compile", precision="int8")
    with pytest.raises(UserError, match="onnxruntime runs fp32 or int8"):
        attach_engine(net, Runtime(CPU, "bf16", True), engine="onnxruntime")
    with pytest.raises(UserError, match="differs from the runtime"):
        attach_engine(net, FP32, precision="bf16")


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "vggnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-2:] == (".cache", "vggnet")


def test_cast_engine_equals_autocast_and_follows_weight_changes(digits, meta):
    net = _net(meta)
    bf16 = Runtime(CPU, "bf16", True)
    x = net.normalise(digits[:64]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = net.model(x).float()
    engine = CastEngine(bf16)
    cast = engine("crop", net.model, x)
    assert cast.dtype == torch.float32
    assert (cast.argmax(1) == autocast.argmax(1)).float().mean() >= 0.95
    assert _rel(cast, autocast) <= 5e-2          # bf16 has 8 bits of mantissa; the two differ only in rounding
    assert next(net.model.parameters()).dtype == torch.float32   # the net itself is untouched
    with torch.no_grad():
        net.model.classifier[-1].bias.add_(10.0)             # a change in place: the bf16 copy is rebuilt
    assert torch.allclose(engine("crop", net.model, x), cast + 10.0, atol=0.5)


def test_auto_casts_bf16_weights_once_on_cpus_with_bf16_units(meta, monkeypatch):
    import vggnet.engines as engines

    monkeypatch.setattr(engines, "hardware_class", lambda device: "cpu-bf16")
    net = _net(meta)
    line = attach_engine(net, Runtime(CPU, "bf16", True))
    assert isinstance(net.engine, CastEngine) and "engine eager" in line
    attach_engine(net, FP32)
    assert net.engine is None


def test_weights_digest_covers_batch_norm_nets():
    from vggnet.engines import weights_digest

    torch.manual_seed(0)
    model = vgg("A", batch_norm=True, head="compact", num_classes=3)   # holds 0-d num_batches_tracked tensors
    before = weights_digest(model)
    with torch.no_grad():
        model.features[1].running_var[0] += 1.0
    assert weights_digest(model) != before and len(before) == 64
