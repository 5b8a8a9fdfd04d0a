"""`vggnet info`: Table 2 reproduced, multiply-accumulates, receptive fields."""

import json

import pytest
import torch

import vggnet
from vggnet.analysis import count_macs, layer_table, summary
from vggnet.cli import main
from test_model import EXACT_PARAMS

# torchvision's published "GFLOPS" (multiply-accumulates at 224 px), PAPER.md.
TORCHVISION_GMACS = {"A": 7.609, "B": 11.308, "D": 15.47, "E": 19.632}
# Receptive field of one unit of the last conv: r += 2 * jump per 3x3 conv, jump doubles at each pool.
LAST_CONV_RF = {"A": 134, "A-LRN": 134, "B": 140, "C": 140, "D": 196, "E": 252}


@pytest.fixture(scope="module")
def rows():
    return summary()


def test_summary_reproduces_table_2(rows):
    assert len(rows) == 12
    for r in rows:
        assert r.params == EXACT_PARAMS[r.config, r.batch_norm]
        assert r.receptive_field == LAST_CONV_RF[r.config]
        if r.config in TORCHVISION_GMACS:
            assert r.gmacs == pytest.approx(TORCHVISION_GMACS[r.config], abs=0.0005)
    millions = {r.config: round(r.params / 1e6) for r in rows if not r.batch_norm}
    assert millions == {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}  # the paper's Table 2
    weight_layers = {r.config: r.weight_layers for r in rows}
    assert weight_layers == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def test_macs_counts_real_compute():
    # C's three 1x1 convs cost exactly their in * out * h * w over B.
    with torch.device("meta"):
        b, c = count_macs(vggnet.vgg("B")), count_macs(vggnet.vgg("C"))
    assert c - b == 256 * 256 * 56 * 56 + 512 * 512 * 28 * 28 + 512 * 512 * 14 * 14


def test_layer_table_shows_stacked_receptive_fields():
    with torch.device("meta"):
        rows = {r.name: r for r in layer_table(vggnet.vgg("D"))}
    assert rows["conv1_1"].receptive_field == 3 and rows["conv1_2"].receptive_field == 5  # two 3x3 = 5x5
    # three 3x3 convs on the pool2 grid (jump 4): 1 + 3 * 2 = 7 of its positions, a 7x7 filter's reach
    assert (rows["conv3_3"].receptive_field - rows["pool2"].receptive_field) // rows["conv3_1"].jump == 6
    assert rows["pool5"].output_shape == (512, 7, 7) and rows["pool5"].jump == 32
    assert rows["fc6"].params == 25088 * 4096 + 4096
    assert sum(r.params for r in rows.values()) == EXACT_PARAMS["D", False]


def test_info_cli_table_and_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {(d["config"], d["batch_norm"]): d["params"] for d in data} == EXACT_PARAMS
    assert all({"config", "batch_norm", "params", "macs", "receptive_field"} <= set(d) for d in data)
    assert main(["info", "C"]) == 0
    out = capsys.readouterr().out
    assert "133,638,952" in out and "133,647,400" in out and "11.771" in out
    assert main(["info", "vgg16", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "conv5_3" in out and "512x7x7" in out and "102,764,544" in out


def test_info_cli_bad_config(capsys):
    assert main(["info", "F"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown configuration or model 'F'" in err
