"""Every registered model, pinned: a golden output per model, builders, dense form, BN placement, warm start.

The golden file holds, for each of the 12 registered names, the logits of the net built with a fixed
seed (compact head, 10 classes, Kaiming init, BN statistics drawn from a seed) on a fixed 2 x 3 x 32 x 32 input. Any change to a
configuration (a layer added, moved or resized, LRN's constants, BN's place, the head) changes
them. Regenerate deliberately with `python tests/test_registry.py` and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import vggnet
from vggnet.configs import MODELS

GOLDEN = Path(__file__).with_name("golden") / "registry_logits.pt"
NAMES = vggnet.list_models()


def _golden_outputs(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = vggnet.get_model(name, head="compact", num_classes=10, init="kaiming").eval()
    g = torch.Generator().manual_seed(2)
    for m in model.modules():  # BN statistics away from the identity, so BN's presence shows in the output
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def test_registry_has_all_twelve():
    assert len(NAMES) == 12 and set(NAMES) == set(MODELS)
    assert {MODELS[n] for n in NAMES} == {(c, bn) for c in vggnet.CONFIGS for bn in (False, True)}


@pytest.mark.parametrize("name", NAMES)
def test_golden_output(name):
    golden = torch.load(GOLDEN, weights_only=True)
    torch.testing.assert_close(_golden_outputs(name), golden[name], rtol=1e-4, atol=1e-5)


def test_golden_outputs_tell_every_model_apart():
    golden = torch.load(GOLDEN, weights_only=True)
    assert set(golden) == set(NAMES)
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1:]:
            assert (golden[a] - golden[b]).abs().max() > 1e-2 * golden[a].abs().max(), (a, b)


@pytest.mark.parametrize("name", NAMES)
def test_builder_function_for_every_name(name):
    builder = getattr(vggnet, name)
    config, batch_norm = MODELS[name]
    model = builder(head="compact", num_classes=3)
    assert (model.config, model.batch_norm) == (config, batch_norm)
    assert builder.__doc__ and config in builder.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_dense_form_equals_model_and_shares_weights(name):
    torch.manual_seed(0)
    model = vggnet.get_model(name, head="compact", num_classes=5, init="glorot").eval()
    dense = model.to_fully_conv()
    assert {p.data_ptr() for p in dense.parameters()} == {p.data_ptr() for p in model.parameters()}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)
        # A trained net and its dense form stay one: changing the net changes the dense form.
        model.classifier[-1].bias.add_(1.0)
        torch.testing.assert_close(dense(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_norm_placement(name):
    model = vggnet.get_model(name, head="compact", num_classes=3)
    mods = list(model.features)
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    bns = [m for m in mods if isinstance(m, nn.BatchNorm2d)]
    if model.batch_norm:
        assert len(bns) == len(convs)
        for i in convs:  # conv -> BN over its channels -> ReLU
            assert isinstance(mods[i + 1], nn.BatchNorm2d) and mods[i + 1].num_features == mods[i].out_channels
            assert isinstance(mods[i + 2], nn.ReLU)
    else:
        assert not bns and all(isinstance(mods[i + 1], nn.ReLU) for i in convs)


@pytest.mark.parametrize("name", [n for n in NAMES if MODELS[n][0] != "A"])
def test_warm_start_from_net_a(name):
    torch.manual_seed(0)
    config, batch_norm = MODELS[name]
    net_a = vggnet.vgg("A", batch_norm=batch_norm, head="compact", num_classes=4)
    deep = vggnet.get_model(name, head="compact", num_classes=4)
    report = vggnet.warm_start(deep, net_a.state_dict())
    a, d = net_a.state_dict(), deep.state_dict()
    for target, source in report.copied.items():
        assert torch.equal(d[target], a[source])
    layers = {k.rsplit(".", 1)[0] for k in report.copied}
    assert len(layers) == (4 * 2 if batch_norm else 4) + 3       # conv1_1, conv2_1, conv3_1, conv3_2 (+BN), 3 FCs
    assert all(k not in report.copied for k in report.fresh)


@pytest.mark.parametrize("bad,message", [
    (dict(head="wide"), "head must be one of paper, compact, got 'wide'"),
    (dict(init="zeros"), "init must be one of"),
    (dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
    (dict(in_channels=2.5), "in_channels must be an integer >= 1"),
    (dict(dropout=1.0), "dropout must be a number in [0, 1)"),
])
def test_constructor_arguments_raise_value_error(bad, message):
    with pytest.raises(ValueError) as e:
        vggnet.vgg("A", **bad)
    assert message in str(e.value)


def test_reset_classifier_keeps_everything_else():
    torch.manual_seed(0)
    model = vggnet.vgg("B", batch_norm=True, head="compact", num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.reset_classifier(7)
    after = model.state_dict()
    assert layer is model.classifier[-1] and layer.out_features == 7
    assert model.num_classes == 7 and model.constructor_args["num_classes"] == 7
    changed = {k for k in after if k not in before or after[k].shape != before[k].shape or not torch.equal(after[k], before[k])}
    assert changed == {"classifier.6.weight", "classifier.6.bias"}
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7)


if __name__ == "__main__":  # regenerate the golden file (deliberately; say why in the commit)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({name: _golden_outputs(name) for name in NAMES}, GOLDEN)
    print(f"wrote {GOLDEN}")
