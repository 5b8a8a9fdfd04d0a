"""The model family against the paper's Table 1 / Table 2 and against torchvision."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import vggnet
from vggnet.configs import CONFIGS, MODELS, parse_config

# PAPER.md, Table 2 (1000 classes, biases included).
EXACT_PARAMS = {
    ("A", False): 132_863_336, ("A-LRN", False): 132_863_336, ("B", False): 133_047_848,
    ("C", False): 133_638_952, ("D", False): 138_357_544, ("E", False): 143_667_240,
    ("A", True): 132_868_840, ("A-LRN", True): 132_868_840, ("B", True): 133_053_736,
    ("C", True): 133_647_400, ("D", True): 138_365_992, ("E", True): 143_678_248,
}
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
ALL_MODELS = vggnet.list_models()


def small(name: str, **kw) -> vggnet.VGG:
    """A registered model with the compact head: same convolutional body, cheap to build."""
    return vggnet.get_model(name, head="compact", num_classes=10, **kw).eval()


def test_configs_are_table_1():
    assert list(CONFIGS) == ["A", "A-LRN", "B", "C", "D", "E"]
    convs = {c: [l for l in parse_config(c) if l.kind == "conv"] for c in CONFIGS}
    assert {c: len(v) + 3 for c, v in convs.items()} == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
    assert [l.name for l in convs["C"] if l.kernel == 1] == ["conv3_3", "conv4_3", "conv5_3"]
    assert all(l.kernel == 3 for c in "ABDE" for l in convs[c])
    assert [l.kind for l in parse_config("A-LRN")][:3] == ["conv", "lrn", "pool"]
    assert all(sum(l.kind == "pool" for l in parse_config(c)) == 5 for c in CONFIGS)
    assert len(ALL_MODELS) == 12 and set(MODELS.values()) == set(EXACT_PARAMS)


@pytest.mark.parametrize("config,batch_norm", list(EXACT_PARAMS))
def test_exact_parameter_counts(config, batch_norm):
    with torch.device("meta"):
        model = vggnet.vgg(config, batch_norm=batch_norm)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[config, batch_norm]
    fc = sum(p.numel() for p in model.classifier.parameters())
    assert fc == 123_642_856


@pytest.mark.parametrize("config", list(TORCHVISION))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_weights_load_and_outputs_match(config, batch_norm):
    name = TORCHVISION[config] + ("_bn" if batch_norm else "")
    # Outputs are compared on two of the eight (a plain and a BN net: initialising 130M+ weights
    # costs seconds each); keys and shapes, which decide whether weights load, on all eight.
    compare_outputs = (config, batch_norm) in (("A", False), ("D", True))
    with torch.device("cpu" if compare_outputs else "meta"):
        theirs = getattr(torchvision.models, name)(weights=None).eval()
    with torch.device("meta"):  # skip our own init: every tensor is replaced by theirs below
        ours = vggnet.vgg(config, batch_norm=batch_norm).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    if not compare_outputs:
        return
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # and the builder of the same name is the same network
    with torch.device("meta"):
        assert getattr(vggnet, name)().state_dict().keys() == theirs.state_dict().keys()


def test_c_keeps_resolution_at_1x1_convs():
    model = vggnet.vgg("C").eval()
    with torch.no_grad():
        acts = model.activations(torch.randn(1, 3, 224, 224), ["relu3_2", "relu3_3", "stage5"])
    assert acts["relu3_3"].shape == acts["relu3_2"].shape == (1, 256, 56, 56)
    assert acts["stage5"].shape == (1, 512, 7, 7)  # the seed's padding=1 gave 8x8
    ones = [m for m in model.features if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(ones) == 3 and all(m.padding == (0, 0) for m in ones)


def test_lrn_is_alexnets_formula():
    model = vggnet.vgg("A-LRN", head="compact", num_classes=10).eval()
    lrn = model.features[model.activation_index["lrn1"]]
    assert isinstance(lrn, nn.LocalResponseNorm)
    a = torch.rand(2, 64, 5, 6) * 30
    n, alpha, beta, k = 5, 1e-4, 0.75, 2.0
    sq = torch.nn.functional.pad(a.pow(2), (0, 0, 0, 0, n // 2, n // 2))  # zero channels beyond the edges
    window = torch.stack([sq[:, c:c + n].sum(1) for c in range(a.shape[1])], 1)
    expected = a / (k + alpha * window).pow(beta)
    torch.testing.assert_close(lrn(a), expected, rtol=1e-5, atol=1e-6)
    # the LRN sits after conv1_1's ReLU and before the first pool, as in Table 1
    kinds = [type(m).__name__ for m in model.features[:4]]
    assert kinds == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]


def test_batch_norm_after_every_conv_before_relu():
    model = vggnet.vgg("E", batch_norm=True, head="compact")
    mods = list(model.features)
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    for i in convs:
        assert isinstance(mods[i + 1], nn.BatchNorm2d) and mods[i + 1].num_features == mods[i].out_channels
        assert isinstance(mods[i + 2], nn.ReLU)


def test_paper_head_and_compact_head():
    model = vggnet.vgg("A", num_classes=7)
    assert model.avgpool.output_size == (7, 7)
    shapes = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)]
    assert shapes == [(25088, 4096), (4096, 4096), (4096, 7)]
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert all(m.p == 0.5 for m in model.classifier if isinstance(m, nn.Dropout))
    compact = vggnet.vgg("A", num_classes=7, head="compact", dropout=0.2)
    assert compact.avgpool.output_size == (1, 1)
    assert [(m.in_features, m.out_features) for m in compact.classifier if isinstance(m, nn.Linear)] == \
        [(512, 512), (512, 512), (512, 7)]
    assert all(m.p == 0.2 for m in compact.classifier if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("init", ["paper", "glorot", "kaiming"])
def test_initialisation(init):
    torch.manual_seed(0)
    model = vggnet.vgg("B", init=init, head="compact", num_classes=10)
    conv = model.features[2]  # conv1_2: 64 -> 64, 3x3 (fan_in = fan_out = 576)
    assert isinstance(conv, nn.Conv2d) and torch.count_nonzero(conv.bias) == 0
    std = conv.weight.std().item()
    expected = {"paper": 0.01, "glorot": (2 / (576 + 576)) ** 0.5, "kaiming": (2 / 576) ** 0.5}[init]
    assert std == pytest.approx(expected, rel=0.05)
    if init == "glorot":  # uniform, bounded by sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= (6 / 1152) ** 0.5


def test_warm_start_copies_four_convs_and_three_fcs():
    torch.manual_seed(0)
    net_a = vggnet.vgg("A", head="compact", num_classes=10, batch_norm=True)
    deep = vggnet.vgg("D", head="compact", num_classes=10, batch_norm=True)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    report = vggnet.warm_start(deep, net_a.state_dict())
    a, d = net_a.state_dict(), deep.state_dict()
    conv = lambda model, name: model.activation_index[name.replace("conv", "relu")] - 2
    for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2"):
        for suffix in ("weight", "bias"):
            assert torch.equal(d[f"features.{conv(deep, name)}.{suffix}"], a[f"features.{conv(net_a, name)}.{suffix}"])
        assert torch.equal(d[f"features.{conv(deep, name) + 1}.running_var"],
                           a[f"features.{conv(net_a, name) + 1}.running_var"])
    for fc in ("classifier.0", "classifier.3", "classifier.6"):
        assert torch.equal(d[f"{fc}.weight"], a[f"{fc}.weight"])
    # conv1_2 and conv5_3 (not in A's first four) keep their fresh init
    for name in ("conv1_2", "conv2_2", "conv3_3", "conv5_3"):
        key = f"features.{conv(deep, name)}.weight"
        assert torch.equal(d[key], before[key]) and key in report.fresh
    copied_layers = {k.rsplit(".", 1)[0] for k in report.copied}
    assert len(copied_layers) == 4 * 2 + 3  # 4 convs + their BNs, 3 FCs
    assert "copied" in str(report)


def test_warm_start_refuses_mismatches():
    deep = vggnet.vgg("D", head="compact", num_classes=10)
    with pytest.raises(ValueError, match=r"classifier.6.weight.*\(100, 512\).*\(10, 512\)"):
        vggnet.warm_start(deep, vggnet.vgg("A", head="compact", num_classes=100).state_dict())
    with pytest.raises(ValueError, match="no 'features.0.weight'"):
        vggnet.warm_start(deep, {})


@pytest.mark.parametrize("config", ["C"])   # every model at 32 px: test_registry.py
def test_dense_form_equals_model_at_224(config):
    torch.manual_seed(0)
    model = vggnet.vgg(config, num_classes=20).eval()
    dense = model.to_fully_conv().eval()
    assert [m.kernel for m in dense.classifier if hasattr(m, "kernel")] == [7, 1, 1]
    # The dense form shares the net's tensors: no copy of the ~124M FC parameters.
    shared = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in dense.parameters()} == shared
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        scores = dense(x)
        assert scores.shape == (2, 20, 1, 1)
        torch.testing.assert_close(scores.flatten(1), model(x), rtol=1e-4, atol=1e-5)
        # Larger, non-square images give a score map: (288/32 - 6) x (352/32 - 6)
        assert dense(torch.randn(1, 3, 288, 352)).shape == (1, 20, 3, 5)
    with pytest.raises(ValueError, match="at least 224 px, got 200x300"):
        dense(torch.randn(1, 3, 200, 300))


def test_dense_form_compact_head():
    model = vggnet.vgg("B", head="compact", num_classes=10).eval()
    dense = model.to_fully_conv().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)
        assert dense(torch.randn(1, 3, 64, 96)).shape == (1, 10, 2, 3)


def test_forward_features_head_and_feature_info():
    model = vggnet.vgg("D", head="compact", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 512, 2, 2)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        acts = model.activations(x)
    assert [i["num_chs"] for i in model.feature_info] == [64, 128, 256, 512, 512]
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    for info in model.feature_info:
        assert acts[info["name"]].shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
        assert info["module"] == f"features.{model.activation_index[info['name']]}"


def test_named_activations():
    model = vggnet.vgg("E", head="compact", num_classes=10).eval()
    names = model.activation_names
    assert names[:3] == ["relu1_1", "relu1_2", "stage1"] and names[-2:] == ["relu5_4", "stage5"]
    assert len([n for n in names if n.startswith("relu")]) == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        some = model.activations(x, ["relu3_3", "relu1_2"])
        assert list(some) == ["relu3_3", "relu1_2"]
        assert some["relu1_2"].shape == (1, 64, 32, 32) and some["relu3_3"].shape == (1, 256, 8, 8)
        # the same tensors through torchvision's feature extractor and the same names
        extractor = create_feature_extractor(model, return_nodes=model.return_nodes())
        out = extractor(x)
        torch.testing.assert_close(out["relu3_3"], some["relu3_3"])
        assert list(out) == names
    with pytest.raises(ValueError, match="unknown activation names \\['relu6_1'\\]"):
        model.activations(x, ["relu6_1"])


@pytest.mark.parametrize("bad,message", [
    (torch.randn(3, 32, 32), r"expected a 4-D input \(N, C, H, W\), got a 3-D tensor of shape \[3, 32, 32\]"),
    (torch.randn(1, 1, 32, 32), r"expected 3 input channels, got 1"),
    (torch.randn(1, 3, 31, 64), r"expected height and width of at least 32 px, got 31x64"),
    (torch.randn(1, 3, 64, 16), r"at least 32 px, got 64x16"),
])
def test_bad_inputs_raise_value_error(bad, message):
    model = vggnet.vgg("A", head="compact", num_classes=10).eval()
    with pytest.raises(ValueError, match=message):
        model(bad)


def test_any_size_from_32_px():
    model = vggnet.vgg("A", num_classes=10).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (33, 47), (100, 61)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 10)
    gray = vggnet.vgg("A", in_channels=1, head="compact", num_classes=10).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_torchscript_and_feature_extractor_on_every_model(name):
    model = small(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected)
        with pytest.raises(Exception, match="at least 32 px"):  # the input check survives scripting
            scripted(torch.randn(1, 3, 16, 16))
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        extractor = create_feature_extractor(model, return_nodes={"features.0": "conv", "classifier.6": "logits"})
        torch.testing.assert_close(extractor(x)["logits"], expected)


def test_torch_compile():
    """Dynamo captures the whole forward, input check included, as one graph (fullgraph: no breaks).

    The aot_eager backend runs the captured graph through AOTAutograd without inductor's C++
    code generation, which takes over a minute on 2 CPU cores; `vggnet train --compile` and
    `vggnet bench --compile` use the default backend.
    """
    model = small("vgg11_bn")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_unknown_configuration():
    with pytest.raises(ValueError, match="unknown configuration or model 'F'; expected one of A, A-LRN"):
        vggnet.vgg("F")
    assert vggnet.get_model("vgg16c_bn").constructor_args["config"] == "C"


def test_width_multiplies_every_layer_and_keeps_the_structure():
    narrow = vggnet.vgg("C", batch_norm=True, head="compact", num_classes=10, width=0.25)
    full = vggnet.vgg("C", batch_norm=True, head="compact", num_classes=10)
    convs = [m for m in narrow.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [
        m.out_channels // 4 for m in full.features if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [m.kernel_size for m in full.features if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16 and convs[-1].out_channels == 128
    assert [m.out_features for m in narrow.classifier if isinstance(m, nn.Linear)] == [128, 128, 10]
    assert [f["num_chs"] for f in narrow.feature_info] == [16, 32, 64, 128, 128]
    assert narrow.constructor_args["width"] == 0.25 and "width" not in full.constructor_args
    x = torch.randn(2, 3, 40, 40)
    assert narrow.eval()(x).shape == (2, 10)
    assert torch.allclose(narrow.to_fully_conv()(x).mean((2, 3)), narrow(x), atol=1e-5)  # dense form follows
    # the paper's nets are untouched by the option (Table 2's counts, state dict keys)
    with torch.device("meta"):
        assert sum(p.numel() for p in vggnet.vgg("D", width=1.0).parameters()) == EXACT_PARAMS[("D", False)]


@pytest.mark.parametrize("width", [0, -1, 5, True, "0.5", float("nan")])
def test_width_out_of_range_is_a_value_error(width):
    with pytest.raises(ValueError, match="width must be a number in"):
        vggnet.vgg("A", head="compact", width=width)


def test_a_narrow_net_round_trips_through_checkpoint_and_bare_state_dict(tmp_path):
    from vggnet.checkpoint import infer_model_args, load_model, save_checkpoint

    net = vggnet.vgg("B", batch_norm=True, head="compact", num_classes=7, width=0.5).eval()
    path = save_checkpoint(tmp_path / "n.pt", net)
    again, _ = load_model(path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(x), net(x)) and again.constructor_args == net.constructor_args
    assert infer_model_args(net.state_dict()) == net.constructor_args  # a bare state dict says its width
