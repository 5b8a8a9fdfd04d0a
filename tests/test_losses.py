"""Perceptual and style losses on a real photograph (scikit-image's astronaut, 64 px)."""

import pytest
import torch
import torch.nn.functional as nnf
from skimage import data as skdata
from torchvision.transforms.v2 import functional as F

import vggnet
from vggnet.errors import UserError
from vggnet.losses import LPIPS_LAYERS, PerceptualLoss, StyleLoss, gram


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    # Kaiming init keeps activations alive through 13 convs; the properties tested hold for any weights.
    return vggnet.net_from_model(vggnet.vgg16(head="compact", num_classes=10, init="kaiming"))


@pytest.fixture(scope="module")
def photo():
    x = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return nnf.interpolate(x, size=(64, 64), mode="area")


def test_zero_for_identical_and_increasing_with_blur_and_noise(net, photo):
    loss = PerceptualLoss(net=net)
    assert loss(photo, photo).item() == 0.0
    blurred = [loss(photo, F.gaussian_blur(photo, [9, 9], [s, s])).item() for s in (0.5, 1.0, 2.0, 4.0)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(photo.shape, generator=g)
    noisy = [loss(photo, (photo + s * noise).clamp(0, 1)).item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    assert blurred[0] > 0


def test_minus_one_to_one_inputs_give_the_same_loss(net, photo):
    other = F.gaussian_blur(photo, [9, 9], [2.0, 2.0])
    a = PerceptualLoss(net=net)(photo, other)
    b = PerceptualLoss(net=net, input_range=(-1, 1))(photo * 2 - 1, other * 2 - 1)
    torch.testing.assert_close(a, b)


def test_gradient_reaches_the_input_only_and_one_forward_pass(net, photo):
    loss = PerceptualLoss(net=net)
    loss.train()  # the net must stay in eval mode anyway
    assert not net.model.training
    convs = [m for m in net.model.features if isinstance(m, torch.nn.Conv2d)]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in net.model.modules() if m is not net.model]
    x = photo.clone().requires_grad_(True)
    value = loss(x, F.gaussian_blur(photo, [9, 9], [2.0, 2.0]))
    for h in hooks:
        h.remove()
    # One pass stopping at relu5_3 (the last conv's ReLU): each module up to it exactly once, the head never.
    last = net.model.activation_index["relu5_3"]
    assert len(calls) == last + 1
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.model.parameters())
    assert len(convs) == 13


def _style_terms(feats, gram_fn):
    return torch.stack([(gram_fn(f[:1]) - gram_fn(f[1:])).double().square().mean() for f in feats])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_style_loss_is_finite_under_autocast_where_a_naive_gram_is_not(net, photo, dtype):
    style = StyleLoss(net=net)
    # Bright, saturated images give large activations; the second differs from the first slightly.
    x = (photo * 4).clamp(0, 1)
    y = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    naive_gram = lambda f: torch.bmm(f.flatten(2), f.flatten(2).transpose(1, 2)) / f[0, 0].numel()
    with torch.autocast("cpu", dtype=dtype):
        value = style(x, y)
        feats = style.features(torch.cat([x, y]))            # the activations autocast computes
        naive = _style_terms(feats, naive_gram)
        ours = _style_terms(feats, gram)
    exact = _style_terms(feats, lambda f: naive_gram(f.double()))
    assert torch.isfinite(value) and value.dtype == torch.float32
    ours_err = ((ours - exact).abs() / exact).max().item()
    naive_err = ((naive - exact).abs() / exact).nan_to_num(float("inf")).max().item()
    assert ours_err < 1e-3 and naive_err > 10 * ours_err, (ours_err, naive_err)
    assert gram(torch.ones(1, 2, 3, 3, dtype=dtype)).dtype == torch.float32


def test_style_loss_accepts_one_style_image_of_another_size(net, photo):
    style = StyleLoss(net=net)
    big = nnf.interpolate(photo, size=(96, 96), mode="bilinear")
    out = style(photo.repeat(2, 1, 1, 1), big)
    assert out.shape == () and torch.isfinite(out)
    assert style(photo, photo).item() == 0.0


def test_bad_arguments_say_what_was_expected(net):
    with pytest.raises(UserError, match="relu5_3"):
        PerceptualLoss(net=net, layers=("relu9_9",))
    with pytest.raises(UserError, match="one weight per layer"):
        PerceptualLoss(net=net, weights=(1.0,))
    with pytest.raises(UserError, match="Net, a VGG or a weights path"):
        PerceptualLoss(net=None)
    assert PerceptualLoss(net=net).features.layers == list(LPIPS_LAYERS)
