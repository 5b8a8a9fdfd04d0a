"""Foreign weights files (safetensors, timm, Keras .h5, Caffe .caffemodel): recognised by content,
converted to vggnet's layout, giving the outputs their source tensors imply, preprocessing included.

Every file is built here from known tensors of a small net (configuration A, compact head, 5
classes): Caffe's protobuf is written by a hand-rolled wire encoder using caffe.proto's field
numbers, independent of the reader's descriptors; Keras's HDF5 with h5py in Keras's own layout.
"""

import pickle
import struct

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from safetensors.torch import save_file
from skimage import data as skdata

import vggnet
from vggnet.checkpoint import load_model, save_checkpoint
from vggnet.cli import main
from vggnet.errors import UserError
from vggnet.nets import load_net, net_from_model
from vggnet.weights import read_weights, sniff, write_safetensors
from vggnet.weights.keras import channels_last_to_first

CLASSES = 5
STAGES = ((1, 1), (2, 1), (3, 2), (4, 2), (5, 2))  # configuration A: (stage, convs in it)
BGR_MEAN = (103.939, 116.779, 123.68)


@pytest.fixture(scope="module")
def source():
    """A net with random, non-trivial weights; its state dict is the 'known tensors' (RGB first conv)."""
    torch.manual_seed(0)
    model = vggnet.vgg("A", head="compact", num_classes=CLASSES, init="kaiming").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def photo():
    """scikit-image's cat, shrunk to 40 x 56, as a (1, 3, H, W) tensor of [0, 1] RGB pixels."""
    x = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1)[None].float() / 255
    return nnf.interpolate(x, size=(40, 56), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _named_layers(model):
    """(caffe name, keras name, conv module) per conv, and the three Linear layers, of configuration A."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    names, k = [], 0
    for stage, count in STAGES:
        for i in range(1, count + 1):
            names.append((f"conv{stage}_{i}", f"block{stage}_conv{i}", convs[k]))
            k += 1
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    return names, linears


def _bgr_first(weight, first):
    return weight.flip(1) if first else weight  # the file's first conv reads B, G, R


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _logits(model, x):
    with torch.no_grad():
        return model(x)


# --- Caffe: a minimal protobuf wire encoder with caffe.proto's field numbers ---------------------

def _varint(n):
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _ld(number, payload):  # length-delimited field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number, value):  # varint field (wire type 0)
    return _varint(number << 3) + _varint(value)


def _blob(t, new_format):
    """BlobProto: new files give shape.dim (field 7), old ones num/channels/height/width (1-4); data = 5 packed."""
    dims = list(t.shape)
    if new_format:
        head = _ld(7, _ld(1, b"".join(_varint(d) for d in dims)))
    else:
        four = [1] * (4 - len(dims)) + dims
        head = b"".join(_int(f, d) for f, d in zip((1, 2, 3, 4), four))
    return head + _ld(5, t.detach().numpy().astype("<f4").tobytes())


def _caffe_layer(name, kind, blobs, new_format):
    v1_type = {"Convolution": 4, "InnerProduct": 14, "ReLU": 18, "Pooling": 17, "Data": 5, "LRN": 15}[kind]
    if new_format:  # LayerParameter: name 1, type 2 (string), blobs 7
        return _ld(100, _ld(1, name.encode()) + _ld(2, kind.encode()) + b"".join(_ld(7, b) for b in blobs))
    # V1LayerParameter: name 4, type 5 (enum), blobs 6
    return _ld(2, _ld(4, name.encode()) + _int(5, v1_type) + b"".join(_ld(6, b) for b in blobs))


def write_caffemodel(path, model, *, new_format, conv_names=None):
    convs, linears = _named_layers(model)
    parts = [_ld(1, b"VGG_ILSVRC_11_layers"), _int(4, 10), _int(4, 3),  # name, input_dim 10, 3, ...
             _caffe_layer("data", "Data", [], new_format)]
    for k, (name, _, conv) in enumerate(convs):
        name = conv_names[k] if conv_names else name
        blobs = [_blob(_bgr_first(conv.weight, k == 0), new_format), _blob(conv.bias, new_format)]
        parts += [_caffe_layer(name, "Convolution", blobs, new_format),
                  _caffe_layer(f"relu{k}", "ReLU", [], new_format)]
    for name, fc in zip(("fc6", "fc7", "fc8"), linears):
        parts.append(_caffe_layer(name, "InnerProduct", [_blob(fc.weight, new_format), _blob(fc.bias, new_format)],
                                  new_format))
    path.write_bytes(b"".join(parts))
    return path


# --- Keras: HDF5 in the layout Keras 2 / tf.keras writes ----------------------------------------

def write_keras_h5(path, model, *, under_model_weights=True, top=True, conv_names=None):
    convs, linears = _named_layers(model)
    layers = [("input_1", [])]
    for k, (_, name, conv) in enumerate(convs):
        kernel = _bgr_first(conv.weight, k == 0).permute(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
        layers.append((conv_names[k] if conv_names else name, [("kernel:0", kernel), ("bias:0", conv.bias)]))
    layers.append(("flatten", []))
    if top:
        for name, fc in zip(("fc1", "fc2", "predictions"), linears):
            layers.append((name, [("kernel:0", fc.weight.t()), ("bias:0", fc.bias)]))  # Dense kernel is (in, out)
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if under_model_weights else f
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        for name, weights in layers:
            group = root.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/{w}".encode() for w, _ in weights])
            for w, t in weights:
                group.create_dataset(f"{name}/{w}", data=t.detach().numpy())
    return path


def _timm_state(model):
    """timm's VGG keys: classifier.0/3 as pre_logits.fc1/fc2 convs, classifier.6 as head.fc."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(("classifier.0.", "classifier.3.")):  # compact head: a 1x1 map, so 1x1 convs
            key = ("pre_logits.fc1." if key[11] == "0" else "pre_logits.fc2.") + key[13:]
            value = value[:, :, None, None] if value.dim() == 2 else value
        elif key.startswith("classifier.6."):
            key = "head.fc." + key[13:]
        out[key] = value.contiguous()
    return out


def _model_with(state, **args):
    """A net holding exactly `state` (built on the meta device: no time spent initialising weights)."""
    with torch.device("meta"):
        model = vggnet.vgg(args.pop("config"), **args)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _reference(source):
    """The source net as the Caffe/Keras file holds it: first conv reading B, G, R."""
    state = dict(source.state_dict(), **{"features.0.weight": source.features[0].weight.flip(1)})
    return _model_with(state, **source.constructor_args)


def _converted(path):
    ckpt = read_weights(path)
    return _model_with(ckpt["state_dict"], **ckpt["model_args"]), ckpt


# --- conversions: outputs equal what the source tensors imply ------------------------------------

@pytest.mark.parametrize("new_format", [False, True], ids=["v1-layers", "new-layer"])
def test_caffe_gives_the_caffe_pipelines_logits(tmp_path, source, photo, new_format):
    path = write_caffemodel(tmp_path / "vgg.caffemodel", source, new_format=new_format)
    assert sniff(path) == "caffe"
    model, ckpt = _converted(path)
    assert ckpt["format"] == "caffe" and ckpt["model_args"]["config"] == "A"
    assert ckpt["model_args"]["head"] == "compact" and ckpt["model_args"]["num_classes"] == CLASSES
    meta = ckpt["meta"]
    assert meta["input_range"] == 255.0 and list(meta["std"]) == [1.0, 1.0, 1.0]
    assert list(meta["mean"]) == [123.68, 116.779, 103.939] and "class_names" not in meta
    # The Caffe pipeline by hand: BGR, 0-255, minus the BGR mean, through the file's own (BGR) tensors.
    reference = _reference(source)
    caffe_input = photo[:, [2, 1, 0]] * 255 - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    net = net_from_model(model, meta)
    _close(_logits(net.model, net.normalise(photo)), _logits(reference, caffe_input))
    if new_format:  # every verb's --weights reads the file directly (once is enough)
        loaded = load_net(path)
        _close(_logits(loaded.model, loaded.normalise(photo)), _logits(reference, caffe_input))


@pytest.mark.parametrize("under_model_weights", [True, False], ids=["model.save", "save_weights"])
def test_keras_gives_the_caffe_pipelines_logits(tmp_path, source, photo, under_model_weights):
    path = write_keras_h5(tmp_path / "vgg.h5", source, under_model_weights=under_model_weights)
    assert sniff(path) == "keras"
    model, ckpt = _converted(path)
    assert ckpt["meta"]["input_range"] == 255.0 and list(ckpt["meta"]["mean"]) == [123.68, 116.779, 103.939]
    # Keras's preprocess_input("caffe"): RGB -> BGR, minus the BGR mean, no scaling; the net saw BGR.
    reference = _reference(source)
    keras_input = photo[:, [2, 1, 0]] * 255 - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    net = net_from_model(model, ckpt["meta"])
    _close(_logits(net.model, net.normalise(photo)), _logits(reference, keras_input))


def test_channels_last_rows_are_reordered_to_pytorchs_flatten():
    """fc1 of Keras's paper head reads a (7, 7, 512) channels-last Flatten; PyTorch flattens (512, 7, 7)."""
    torch.manual_seed(1)
    x = torch.randn(512, 7, 7)
    keras_weight = torch.randn(6, 7 * 7 * 512)  # (out, H*W*C) after transposing Keras's (in, out) kernel
    keras_out = keras_weight @ x.permute(1, 2, 0).reshape(-1)
    torch_out = channels_last_to_first(keras_weight, 512) @ x.reshape(-1)
    torch.testing.assert_close(torch_out, keras_out, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(keras_weight @ x.reshape(-1), keras_out, atol=1e-2)  # the reorder matters


def test_torchvision_layout_safetensors_reads_with_imagenet_preprocessing(tmp_path, source, photo):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert sniff(path) == "safetensors"
    model, ckpt = _converted(path)
    assert ckpt["meta"]["input_range"] == 1.0 and list(ckpt["meta"]["mean"]) == [0.485, 0.456, 0.406]
    torch.testing.assert_close(_logits(model, photo), _logits(source, photo), rtol=0, atol=0)


def test_timm_layout_safetensors_maps_onto_the_classifier(tmp_path, source, photo):
    path = tmp_path / "timm.safetensors"
    save_file(_timm_state(source), str(path))
    model, ckpt = _converted(path)
    assert ckpt["meta"]["source_format"] == "timm safetensors"
    _close(_logits(model, photo), _logits(source, photo))


def test_vggnet_safetensors_round_trips_meta(tmp_path, source, photo):
    meta = {"class_names": list("abcde"), "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "image_size": 32}
    path = write_safetensors(tmp_path / "net.safetensors", source.state_dict(), meta,
                             model_args=source.constructor_args)
    model, ckpt = _converted(path)
    assert ckpt["model_args"] == source.constructor_args
    assert ckpt["meta"]["class_names"] == list("abcde") and ckpt["meta"]["mean"] == [0.5, 0.4, 0.3]
    torch.testing.assert_close(_logits(model, photo), _logits(source, photo), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # written through atomic_write


# --- vggnet convert -------------------------------------------------------------------------------

def test_convert_writes_a_checkpoint_and_safetensors(tmp_path, source, photo, capsys):
    src = write_caffemodel(tmp_path / "vgg.caffemodel", source, new_format=False)
    out = tmp_path / "vgg.pt"
    assert main(["convert", str(src), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "caffe" in line and "configuration A" in line and "5 classes" in line and "[0, 255]" in line
    model, meta = load_model(out)
    assert meta["input_range"] == 255.0
    net = net_from_model(model, meta)
    caffe_model, _ = _converted(src)
    torch.testing.assert_close(_logits(net.model, net.normalise(photo)),
                               _logits(caffe_model, net.normalise(photo)), rtol=0, atol=0)
    assert main(["convert", str(src), str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(out), str(tmp_path / "vgg.safetensors")]) == 0
    again, ckpt = _converted(tmp_path / "vgg.safetensors")
    assert ckpt["meta"]["source_format"] == "caffe" and ckpt["meta"]["input_range"] == 255.0
    torch.testing.assert_close(_logits(again, photo), _logits(model, photo), rtol=0, atol=0)


def test_convert_reads_torch_files_too(tmp_path, source):
    save_checkpoint(tmp_path / "a.pt", source, meta={"class_names": list("vwxyz")})
    torch.save(source.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert sniff(tmp_path / "a.pt") == "torch" and sniff(tmp_path / "legacy.pth") == "torch"
    assert main(["convert", str(tmp_path / "legacy.pth"), str(tmp_path / "b.pt")]) == 0
    assert main(["convert", "--force", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 0
    assert load_model(tmp_path / "b.pt")[1]["class_names"] == list("vwxyz")


# --- bad input: one line naming the file and what did not fit -------------------------------------

def _one_line_error(path, *words):
    with pytest.raises(UserError) as info:
        read_weights(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_unknown_formats_are_named(tmp_path, source):
    from PIL import Image

    Image.fromarray(skdata.chelsea()[:16, :16]).save(tmp_path / "cat.h5", format="PNG")
    (tmp_path / "notes.caffemodel").write_text("these are not weights\n")
    (tmp_path / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, words in [("cat.h5", "a PNG image"), ("notes.caffemodel", "text starting"),
                        ("noise.safetensors", "unrecognised binary data"), ("empty.pth", "an empty file")]:
        message = _one_line_error(tmp_path / name, words)
        assert message.startswith("expected a weights file (vggnet checkpoint, torchvision .pth, safetensors")


def test_truncated_files_are_refused(tmp_path, source):
    full = {"st": tmp_path / "full.safetensors", "h5": tmp_path / "full.h5", "caffe": tmp_path / "full.caffemodel"}
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(full["st"]))
    write_keras_h5(full["h5"], source)
    write_caffemodel(full["caffe"], source, new_format=True)
    for kind, path in full.items():
        cut = tmp_path / f"cut-{path.name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        _one_line_error(cut, "truncated")


def test_non_finite_weights_are_refused(tmp_path, source):
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "diverged.safetensors"))
    _one_line_error(tmp_path / "diverged.safetensors", "non-finite", "features.3.weight")


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    code = pickle.dumps(Payload(), protocol=4)
    for name in ("w.h5", "w.safetensors", "w.caffemodel"):
        (tmp_path / name).write_bytes(code)
        _one_line_error(tmp_path / name, "pickle")
    for name in ("zip.h5", "zip.safetensors"):  # a torch zip under another name
        torch.save({"state_dict": Payload()}, tmp_path / name)
        _one_line_error(tmp_path / name, "not safetensors" if name.endswith(".safetensors") else "refusing")
        assert main(["convert", str(tmp_path / name), str(tmp_path / "out.pt")]) == 2
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_non_vgg_keras_and_caffe_files_are_refused(tmp_path, source):
    resnet_names = ["conv1", "res2a_branch2a", "res3a_branch2a", "res3b_branch2a", "res4a_branch2a",
                    "res4b_branch2a", "res5a_branch2a", "res5b_branch2a"]
    _one_line_error(write_keras_h5(tmp_path / "resnet.h5", source, conv_names=resnet_names),
                    "does not hold a VGG", "'conv1'")
    _one_line_error(write_caffemodel(tmp_path / "alexnet.caffemodel", source, new_format=False,
                                     conv_names=resnet_names), "does not hold a VGG", "'conv1'")
    no_stage5 = [f"block{6 if s == 5 else s}_conv{i}" for s, n in STAGES for i in range(1, n + 1)]
    _one_line_error(write_keras_h5(tmp_path / "six.h5", source, conv_names=no_stage5), "stages [1, 2, 3, 4, 6]")
    _one_line_error(write_keras_h5(tmp_path / "notop.h5", source, top=False), "no classifier")


def test_wire_encoder_agrees_with_the_readers_message_classes(source):
    """The test's encoder and the reader's descriptors were written apart; a V1 blob decodes the same in both."""
    from vggnet.weights.caffe import net_parameter_class

    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    net = net_parameter_class().FromString(_caffe_layer("fc", "InnerProduct", [_blob(t, False)], False))
    blob = net.layers[0].blobs[0]
    assert net.layers[0].name == "fc" and (blob.num, blob.channels, blob.height, blob.width) == (1, 1, 2, 3)
    assert list(blob.data) == list(struct.unpack("<6f", t.numpy().tobytes()))
