import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests import shared constants from each other (e.g. test_model.EXACT_PARAMS).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def digits_0_4_run(tmp_path_factory) -> Path:
    """A run directory of configuration A trained on the handwritten digits 0-4 only (130 training and
    10 validation images per class, as PNGs in an ImageFolder), through `resolve_config` + `train`.

    Trained once per session: test_transfer describes the digits 5-9 with it, test_finetune
    fine-tunes it on them.
    """
    from vggnet.data import _digits_images
    from vggnet.rundir import resolve_config
    from vggnet.train import train

    x, y = _digits_images()
    y = y.numpy()
    root = tmp_path_factory.mktemp("digits0-4")
    rng = np.random.default_rng(0)
    for c in range(5):
        idx = rng.permutation(np.flatnonzero(y == c))
        val, train_ = idx[:10], idx[10:140]
        for split, chosen in (("val", val), ("train", train_)):
            (root / split / str(c)).mkdir(parents=True)
            for i in chosen:
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / split / str(c) / f"{i}.png")
    run = tmp_path_factory.mktemp("run") / "digits0-4"
    # The digits recipe's optimisation; its image settings apply to the built-in digits only, and
    # these PNGs are those digits, so they are given back: 32 px, S in [32, 36], no flips or lighting.
    cfg = resolve_config(None, data=str(root), epochs=2, batch_size=64, lr=0.02, image_size=32,
                         train_scale=(32, 36), test_scale=32, lighting=0.0, hflip=False, seed=0,
                         precision="fp32", workers=0, out=str(run))
    summary = train(cfg)
    # a net that learned nothing of its own task (chance: 20%) would make every use of it meaningless
    assert summary["best_val_top1"] >= 50, summary["best_val_top1"]
    return run
