"""The precision and memory-format choices of vggnet.runtime, with the hardware probes monkeypatched."""

from __future__ import annotations

import pytest
import torch

from vggnet import runtime
from vggnet.errors import UserError
from vggnet.runtime import choose_channels_last, hardware_class, resolve_precision, resolve_runtime

CPU = torch.device("cpu")


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: True)


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)


def test_hardware_class(amx):
    assert hardware_class(CPU) == "cpu-bf16"
    assert hardware_class("cuda:0") == "cuda"


def test_precision_auto_is_bf16_only_with_bf16_units(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    assert hardware_class(CPU) == "cpu"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for by hand: emulated, but allowed
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="unknown precision"):
        resolve_precision("int4", CPU)


def test_inference_is_channels_last_on_every_class(monkeypatch):
    for units in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda units=units: units)
        for prec in ("fp32", "bf16"):
            assert choose_channels_last(CPU, prec, training=False)[0] is True
    assert choose_channels_last("cuda", "bf16", training=True)[0] is True


def test_training_without_bf16_units_is_nchw_at_224_px(avx2):
    cl, why = choose_channels_last(CPU, "fp32", training=True, image_size=224)
    assert cl is False and "NCHW" in why and "224 px" in why
    assert choose_channels_last(CPU, "fp32", training=True, image_size=32)[0] is True  # a tie: inference's default
    assert choose_channels_last(CPU, "fp32", training=True)[0] is False  # size unknown: taken as large


def test_training_with_bf16_units_follows_precision(amx):
    assert choose_channels_last(CPU, "bf16", training=True, image_size=224)[0] is True
    assert choose_channels_last(CPU, "bf16", training=True, image_size=32)[0] is True
    assert choose_channels_last(CPU, "fp32", training=True, image_size=224)[0] is False
    assert choose_channels_last(CPU, "fp32", training=True, image_size=32)[0] is False


def test_resolve_runtime_auto_and_override(avx2):
    rt = resolve_runtime("cpu", "auto", None, training=True, image_size=224)
    assert (rt.precision, rt.channels_last) == ("fp32", False)
    assert "NCHW" in str(rt) and "224 px" in str(rt)
    forced = resolve_runtime("cpu", "auto", True, training=True, image_size=224)
    assert forced.channels_last is True and "as asked" in str(forced)
    assert forced == resolve_runtime("cpu", "fp32", True)  # the reason does not take part in equality
    assert resolve_runtime("cpu").channels_last is True
