"""The counting behind every top-1 / top-5 figure: `correct_topk`, `Meter` and the epoch line."""

from __future__ import annotations

import pytest
import torch

from vggnet.metrics import Meter, correct_topk, format_epoch


def test_correct_topk_counts_labels_among_the_k_best():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5],     # ranks: 1, 6, 5, 4, 3, 0, 2
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    labels = torch.tensor([1, 2, 0])           # row 0: top-1; row 1: 7th of 7; row 2: 7th of 7
    assert [int(c) for c in correct_topk(logits, labels, (1, 2, 5))] == [1, 1, 1]
    labels = torch.tensor([6, 6, 2])           # row 0: 2nd; row 1: 2nd; row 2: 5th
    assert [int(c) for c in correct_topk(logits, labels, (1, 2, 5))] == [0, 2, 3]


def test_top5_of_three_classes_counts_every_row():
    logits = torch.randn(4, 3)
    assert [int(c) for c in correct_topk(logits, torch.tensor([0, 1, 2, 0]), (1, 5))][1] == 4


def test_meter_weights_batches_by_their_size():
    meter = Meter()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    meter.update(torch.tensor(1.0), logits[:2], torch.tensor([0, 0]))   # 1 of 2 right, mean loss 1.0
    meter.update(torch.tensor(4.0), logits[2:], torch.tensor([0]))      # 1 of 1 right, loss 4.0
    v = meter.value()
    assert v["images"] == 3
    assert v["loss"] == pytest.approx((1.0 * 2 + 4.0 * 1) / 3)
    assert v["top1"] == pytest.approx(100 * 2 / 3) and v["top5"] == pytest.approx(100.0)


def test_epoch_line_marks_a_new_best():
    row = dict(epoch=3, lr=0.01, train_loss=0.5, train_top1=80.0, val_loss=0.6, val_top1=75.5, val_top5=99.0,
               images_per_s=123.4, seconds=9.87)
    line = format_epoch(row, 10, best=True)
    assert line.startswith("epoch  3/10  lr 0.01") and "val loss 0.6000 top-1 75.50%" in line
    assert line.endswith("*best") and not format_epoch(row, 10).endswith("*best")
