"""Property-based attacks on the readers: random bytes and truncations of valid files fed to the
image decoder and the checkpoint loader. The only exception allowed out is vggnet's UserError."""

import io
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vggnet.checkpoint import load_checkpoint, save_checkpoint
from vggnet.data import open_image
from vggnet.errors import UserError
from vggnet.model import vgg

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _tiny_net():
    torch.manual_seed(0)
    return vgg("A", head="compact", num_classes=3)


def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = save_checkpoint(os.path.join(d, "net.pt"), _tiny_net(), meta={"class_names": ["a", "b", "c"]})
        return path.read_bytes()


def _state_dict_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_tiny_net().state_dict(), buf)
    return buf.getvalue()


VALID = {"png": _image_bytes("PNG"), "jpeg": _image_bytes("JPEG")}
CHECKPOINTS = {"vggnet": _checkpoint_bytes(), "state_dict": _state_dict_bytes()}


def _mutations(valid: bytes):
    """Truncations, byte flips and random bytes spliced into a valid file, and pure random bytes."""
    n = len(valid)
    truncated = st.integers(0, n - 1).map(lambda k: valid[:k])
    flipped = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: bytes(_apply(valid, edits)))
    spliced = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0]:])
    return st.one_of(truncated, flipped, spliced, st.binary(max_size=256))


def _apply(valid: bytes, edits) -> bytearray:
    out = bytearray(valid)
    for i, b in edits:
        out[i] = b
    return out


def _only_user_errors(fn, path) -> None:
    try:
        fn(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_image_decoder_lets_only_user_errors_out(tmp_path, kind):
    path = tmp_path / f"x.{kind}"

    @SETTINGS
    @given(data=_mutations(VALID[kind]))
    def attack(data):
        path.write_bytes(data)
        _only_user_errors(open_image, path)
        _only_user_errors(lambda p: open_image(p, draft=8), path)

    attack()


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_checkpoint_loader_lets_only_user_errors_out(tmp_path, kind):
    path = tmp_path / "w.pt"
    assert load_checkpoint_ok(path, CHECKPOINTS[kind])

    @SETTINGS
    @given(data=_mutations(CHECKPOINTS[kind]))
    def attack(data):
        path.write_bytes(data)
        _only_user_errors(load_checkpoint, path)

    attack()


def load_checkpoint_ok(path, data: bytes) -> bool:
    """The unmutated file loads (so the attack starts from a valid file)."""
    path.write_bytes(data)
    return load_checkpoint(path)["state_dict"]["features.0.weight"].shape[0] == 64
