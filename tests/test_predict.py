"""`predict` on real photographs (scikit-image's astronaut, chelsea, coffee), Grad-CAM, and `vggnet predict`.

No ImageNet weights exist on the test machine: the nets here are randomly initialised, or hand-set
so that the evidence for each class is known to lie in one region of the image.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

import vggnet
from vggnet.checkpoint import save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.nets import net_from_model
from vggnet.predict import grad_cam, image_cam, image_paths, overlay, predict, read_image
from vggnet.runtime import resolve_runtime

skdata = pytest.importorskip("skimage.data")
FP32 = resolve_runtime("cpu", "fp32")


def photo(name: str) -> torch.Tensor:
    """A scikit-image photograph as float 3 x H x W in [0, 1]."""
    return torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float() / 255


def save_photo(name: str, path) -> str:
    Image.fromarray(getattr(skdata, name)()).save(path)
    return str(path)


def compact_net(classes: int = 10, seed: int = 0, **meta):
    torch.manual_seed(seed)
    model = vggnet.vgg("A", head="compact", num_classes=classes, init="glorot")
    full = dict(name="photos", class_names=[f"class{i}" for i in range(classes)], mean=[0.45] * 3, std=[0.25] * 3,
                image_size=32, train_scale=[64, 64], eval_scale=64, **meta)
    return net_from_model(model, full, name="compact")


def test_predict_dense_on_non_square_photos():
    net = compact_net()
    cat, coffee = photo("chelsea"), photo("coffee")  # 300 x 451 and 400 x 600
    preds = predict(net, [cat, coffee], names=["chelsea", "coffee"], runtime=FP32)
    for p, img in zip(preds, (cat, coffee)):
        assert p.method == "dense" and p.scale == 64 and p.size == tuple(img.shape[1:])
        probs = [prob for _, _, prob in p.top]
        assert len(p.top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(name == f"class{i}" for name, i, _ in p.top)
    # Dense evaluation by hand: rescale to Q = 64 (64 x 96), score map averaged, mirror averaged.
    x = net.normalise(nnf.interpolate(cat[None], size=(64, 96), mode="bilinear", antialias=True, align_corners=False))
    with torch.inference_mode():
        dense = net.model.to_fully_conv()
        want = (nnf.softmax(dense(x).mean((2, 3)), 1) + nnf.softmax(dense(x.flip(-1)).mean((2, 3)), 1)) / 2
    top = want[0].topk(5)
    assert [i for _, i, _ in preds[0].top] == top.indices.tolist()
    assert [p for _, _, p in preds[0].top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.fixture(scope="module")
def paper_a():
    """Configuration A with the paper's head and 1000 classes (built once: 133M parameters)."""
    torch.manual_seed(0)
    return vggnet.vgg("A", init="glorot").eval()


def test_predict_falls_back_to_center_when_dense_cannot_run(paper_a):
    # The paper's head needs 224 px for its 7x7-conv FC1; a 32 px net of that head cannot run densely.
    net = net_from_model(paper_a, dict(name="x", image_size=32, eval_scale=32, train_scale=[32, 32]), name="paper32")
    (p,) = predict(net, [photo("astronaut")], top_k=3, runtime=FP32)
    assert (p.method, p.scale, len(p.top)) == ("center", 32, 3)
    assert all(name == str(i) for name, i, _ in p.top)  # no class names in the meta: numbered classes


def test_paper_head_at_224_on_a_photo(paper_a):
    # An ImageNet-shaped net (paper head, 1000 classes, no meta: read as torchvision's weights).
    net = net_from_model(paper_a, None, name="vgg11")
    (p,) = predict(net, [photo("chelsea")], scale=224, runtime=FP32)
    assert p.method == "dense" and p.scale == 224 and len(p.top) == 5
    assert all(name == net.class_names[i] for name, i, _ in p.top) and net.class_names[281] == "tabby"


def _evidence_net():
    """A hand-set compact net: class 0 = amount of red, class 1 = amount of green, class 2 = nothing.

    Every conv passes channels 0 and 1 through its centre tap, the FC layers pass them to classes 0
    and 1; with mean 0 and std 1 the red and green image planes reach the last ReLU unchanged
    except for pooling. Grad-CAM must then light up exactly where the red (or green) pixels are.
    """
    model = vggnet.vgg("A", head="compact", num_classes=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.zero_()
                m.bias.zero_()
                for c in (0, 1):
                    if isinstance(m, torch.nn.Conv2d):
                        m.weight[c, c, 1, 1] = 1.0
                    else:
                        m.weight[c, c] = 1.0
    meta = dict(name="evidence", class_names=["red", "green", "none"], mean=[0, 0, 0], std=[1, 1, 1],
                image_size=32, eval_scale=64, train_scale=[64, 64])
    return net_from_model(model, meta, name="evidence", flip=False)


def test_grad_cam_lights_up_where_the_evidence_is():
    net = _evidence_net()
    image = torch.zeros(3, 64, 96)  # non-square, so a transposed or mirrored map would be caught
    image[0, :32, 64:] = 1.0        # red: top right, 32 x 32
    image[1, 32:, :16] = 1.0        # green: bottom left, 32 x 16 (less of it)
    red, green = torch.zeros(64, 96, dtype=torch.bool), torch.zeros(64, 96, dtype=torch.bool)
    red[:32, 64:], green[32:, :16] = True, True
    (p,) = predict(net, [image], runtime=FP32)
    assert [name for name, _, _ in p.top] == ["red", "green", "none"]
    cam_red, cam_green = image_cam(net, image, 0, runtime=FP32), image_cam(net, image, 1, runtime=FP32)
    for cam, inside, outside in ((cam_red, red, green), (cam_green, green, red)):
        assert cam.shape == (64, 96) and cam.max() == 1.0 and cam.min() >= 0
        assert cam[inside].mean() > 0.8 and cam[outside].max() < 0.05
        assert cam[~inside].mean() < 0.15  # the rest is dark, apart from the blur at the region's edge
        peak = divmod(int(cam.argmax()), 96)
        assert inside[peak]
    assert image_cam(net, image, 2, runtime=FP32).max() == 0  # no evidence for "none" anywhere


def test_grad_cam_on_a_photo_depends_on_class_and_image():
    net = compact_net(classes=10, seed=1)
    cat = photo("chelsea")
    a, b = image_cam(net, cat, 0, runtime=FP32), image_cam(net, cat, 1, runtime=FP32)
    c = image_cam(net, photo("coffee")[:, :300, :451], 0, runtime=FP32)
    for cam in (a, b, c):
        assert cam.shape == (300, 451) and cam.min() >= 0 and cam.max() == pytest.approx(1.0) and cam.std() > 0.05
    assert (a - b).abs().mean() > 0.05 and (a - c).abs().mean() > 0.05
    # The map at the last ReLU: 64 x 96 input -> 4 x 6 (the dense form), before upsampling.
    x = net.normalise(nnf.interpolate(cat[None], size=(64, 96), mode="bilinear", antialias=True))
    assert grad_cam(net.dense(), x, 0).shape == (4, 6)
    shown = np.asarray(overlay(cat, a))
    assert shown.shape == (300, 451, 3) and shown.dtype == np.uint8


def test_bad_images(tmp_path):
    net = compact_net()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
        read_image(tmp_path / "broken.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(UserError, match="no images in directory"):
        image_paths([tmp_path / "empty"])
    with pytest.raises(UserError, match="image not found"):
        image_paths([tmp_path / "missing.png"])
    with pytest.raises(UserError, match="is 3x2 px, too small for compact.*at least 4 px"):
        predict(net, [torch.rand(3, 2, 3)], runtime=FP32)


def test_cli_predict_table_json_and_cam(tmp_path, capsys):
    torch.manual_seed(0)
    model = vggnet.vgg("A", head="compact", num_classes=4, init="glorot")
    meta = dict(name="photos", class_names=["cat", "mug", "rocket", "person"], mean=[0.45] * 3, std=[0.25] * 3,
                image_size=32, train_scale=[64, 64], eval_scale=64, data=None, seed=0)
    ckpt = save_checkpoint(tmp_path / "net.pt", model, meta=meta)
    cat = save_photo("chelsea", tmp_path / "chelsea.png")
    (tmp_path / "dir").mkdir()
    save_photo("rocket", tmp_path / "dir" / "rocket.jpg")
    assert main(["predict", "--weights", str(ckpt), cat, "--top", "2", "--cam", str(tmp_path / "cam.png")]) == 0
    out = capsys.readouterr().out
    assert "chelsea.png  (451x300 px, dense at Q=64)" in out and "Grad-CAM of" in out
    heat = Image.open(tmp_path / "cam.png")
    assert heat.size == (451, 300) and np.abs(np.asarray(heat, dtype=float) - skdata.chelsea()).mean() > 5
    assert main(["predict", "--weights", str(ckpt), cat, str(tmp_path / "dir"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["image"].rsplit("/", 1)[-1] for r in result] == ["chelsea.png", "rocket.jpg"]
    assert all(len(r["top"]) == 4 and r["method"] == "dense" for r in result)  # top-5 of 4 classes


def test_cli_predict_bad_inputs(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "net.pt", vggnet.vgg("A", head="compact", num_classes=4), meta={})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "empty").mkdir()
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 3)).save(tiny)
    for argv, match in ((["--weights", str(ckpt), str(tmp_path / "broken.png")], "cannot decode image"),
                        (["--weights", str(ckpt), str(tmp_path / "empty")], "no images in directory"),
                        (["--weights", str(ckpt), str(tiny)], "too small"),
                        (["--weights", str(ckpt), "--config", "E", str(tiny)], "does not fit configuration E")):
        assert main(["predict", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
