"""The paper's augmentation (section 3.1) and the deterministic test crop (section 3.2)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.transforms import (IMAGENET_EIGVAL, IMAGENET_EIGVEC, PCALighting, RandomIsotropicRescale,
                               eval_transform, train_transform)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _size(img):
    return (img.height, img.width) if isinstance(img, Image.Image) else tuple(img.shape[-2:])


@pytest.mark.parametrize("kind", ["uint8", "float", "pil"])
@pytest.mark.parametrize("hw", [(40, 60), (90, 30)])
def test_isotropic_rescale_smaller_side_in_range_and_aspect_kept(kind, hw):
    h, w = hw
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    img = {"uint8": x, "float": x.float() / 255, "pil": Image.fromarray(x.permute(1, 2, 0).numpy())}[kind]
    rescale = RandomIsotropicRescale(20, 23)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        oh, ow = _size(rescale(img))
        s, long_side = min(oh, ow), max(oh, ow)
        assert 20 <= s <= 23
        assert long_side == int(s * max(h, w) / min(h, w))       # aspect ratio kept (to the pixel)
        assert (oh < ow) == (h < w)                               # orientation kept
        seen.add(s)
    assert seen == {20, 21, 22, 23}                               # every integer S is drawn


def test_fixed_scale_is_one_size():
    x = torch.zeros(3, 50, 70, dtype=torch.uint8)
    assert {_size(RandomIsotropicRescale(35, 35)(x)) for _ in range(10)} == {(35, 49)}
    with pytest.raises(ValueError):
        RandomIsotropicRescale(30, 20)


def test_pca_lighting_is_one_rgb_offset_along_the_eigenvectors():
    x = torch.rand(3, 8, 9)
    lighting = PCALighting(0.1)
    torch.manual_seed(7)
    out = lighting(x)
    diff = out - x
    offset = diff[:, 0, 0]
    assert torch.allclose(diff, offset.view(3, 1, 1).expand_as(diff), atol=1e-6)   # the same for every pixel
    # offset = V (alpha * lambda) with alpha the draw the module made: recover alpha in the eigenbasis.
    torch.manual_seed(7)
    alpha = torch.randn(3) * 0.1
    V, lam = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
    assert torch.allclose(offset, V @ (alpha * lam), atol=1e-6)
    assert torch.allclose(torch.linalg.solve(V, offset) / lam, alpha, atol=1e-4)
    assert torch.equal(PCALighting(0)(x), x)


def test_pca_lighting_covariance_matches_alexnet():
    # Over many images the offsets have covariance std^2 V diag(lambda^2) V^T: the colour noise
    # follows ImageNet's principal components, mostly along the first (brightness) one.
    torch.manual_seed(0)
    lighting = PCALighting(0.1)
    offsets = torch.stack([lighting.offset() for _ in range(20000)])
    V, lam = torch.tensor(IMAGENET_EIGVEC), torch.tensor(IMAGENET_EIGVAL)
    expected = 0.01 * V @ torch.diag(lam ** 2) @ V.T
    assert torch.allclose(torch.cov(offsets.T), expected, atol=2e-5)
    assert torch.allclose(offsets.mean(0), torch.zeros(3), atol=1e-3)


def test_train_transform_without_randomness_only_normalises():
    # S = crop = image size, no flip, no lighting: the pipeline must reduce to (x - mean) / std.
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = train_transform(image_size=32, train_scale=(32, 32), mean=MEAN, std=STD, lighting=0, hflip=False)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(t(x), expected, atol=1e-6)


def test_train_transform_flip_and_crop_come_from_the_image():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = train_transform(image_size=32, train_scale=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), lighting=0)
    flips = 0
    for _ in range(40):
        y = t(x)
        plain, flipped = torch.allclose(y, x.float() / 255), torch.allclose(y, x.flip(-1).float() / 255)
        assert plain or flipped
        flips += flipped
    assert 5 < flips < 35
    # Jittered S > crop: every output is a 24x24 window of the rescaled image, on any input type.
    t = train_transform(image_size=24, train_scale=(28, 40), mean=MEAN, std=STD)
    pil = Image.fromarray(np.random.randint(0, 255, (30, 50, 3), np.uint8))
    for img in (x, x.float() / 255, pil):
        y = t(img)
        assert type(y) is torch.Tensor and y.dtype == torch.float32 and y.shape == (3, 24, 24)


def test_eval_transform_is_the_deterministic_centre_crop():
    x = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    t = eval_transform(image_size=32, eval_scale=36, mean=MEAN, std=STD)
    a, b = t(x), t(x)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    from torchvision.transforms.v2 import functional as F
    r = F.resize(x.float() / 255, [36], antialias=True)                 # 36 x 54, rescaled in float (the test view)
    assert r.shape == (3, 36, 54)
    crop = r[:, 2:34, 11:43]                                            # centred 32 x 32
    assert torch.allclose(a, (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), atol=1e-6)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    assert torch.equal(t(pil), t(pil)) and t(pil).shape == (3, 32, 32)


def test_constant_image_normalises_exactly():
    x = torch.full((3, 40, 40), 0.6)
    y = eval_transform(image_size=32, eval_scale=32, mean=MEAN, std=STD)(x)
    for c in range(3):
        assert torch.allclose(y[c], torch.full((32, 32), (0.6 - MEAN[c]) / STD[c]), atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_fused_pil_rescale_crop_matches_rescale_then_crop(transpose):
    # train_transform fuses rescale + crop into one PIL resize of the crop's box (speed); with the
    # same seed it must give the two-step result: same window, same pixels up to resampling rounding.
    from torchvision.transforms import v2

    from vggnet.transforms import _RescaleCrop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    img = img.transpose(Image.TRANSPOSE) if transpose else img
    fused = _RescaleCrop(40, 90, 36)
    two_step = v2.Compose([RandomIsotropicRescale(40, 90), v2.RandomCrop(36, pad_if_needed=True)])
    for seed in range(10):
        torch.manual_seed(seed)
        a = np.asarray(fused(img)).astype(int)
        torch.manual_seed(seed)
        b = np.asarray(two_step(img)).astype(int)
        assert a.shape == b.shape == (36, 36, 3)
        assert np.abs(a - b).max() <= 2 and np.mean(a != b) < 0.03
    small = Image.new("RGB", (20, 30))                       # S < crop: padded like RandomCrop
    assert _RescaleCrop(20, 20, 24)(small).size == (24, 24)
