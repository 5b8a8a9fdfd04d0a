"""Loss and top-1 / top-5 accuracy, summed over batches and, under torchrun, over processes.

The paper reports top-1 and top-5 *error* (section 4); training logs accuracy and `curves.png`
plots error, both from the same counts. Counts are kept as sums (loss x images, correct images,
images) so that batches of different sizes and shards of different processes add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Meter", "correct_topk", "format_epoch"]


def correct_topk(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """How many rows of `logits` (N, classes) have their label among the k highest scores, for each k.

    k larger than the number of classes counts every row (top-5 of a 3-class problem is 100%).
    Returns 0-d tensors on the logits' device, so no synchronisation happens here.
    """
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (N, k_max), best first
    hits = top.eq(labels.view(-1, 1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


@dataclass
class Meter:
    """Running sums for one pass over a split; `update` stays on the device, `value` syncs once."""

    loss_sum: float = 0.0
    correct1: float = 0.0
    correct5: float = 0.0
    count: float = 0.0

    def __post_init__(self) -> None:
        self._pending: list[Tensor] = []

    def update(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Add one batch: `loss` is the batch's mean loss (0-d tensor)."""
        c1, c5 = correct_topk(logits.detach(), labels)
        n = labels.shape[0]
        self._pending.append(torch.stack([loss.detach().float() * n, c1.float(), c5.float(),
                                          torch.tensor(float(n), device=loss.device)]))
        if len(self._pending) >= 64:  # bound the list; one small sync per 64 batches
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            s = torch.stack(self._pending).sum(0).tolist()
            self._pending.clear()
            self.loss_sum += s[0]
            self.correct1 += s[1]
            self.correct5 += s[2]
            self.count += s[3]

    def all_reduce(self, device: torch.device) -> Meter:
        """Sum the counts of every process (a no-op outside torchrun); returns self."""
        self._flush()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.loss_sum, self.correct1, self.correct5, self.count],
                             dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self.loss_sum, self.correct1, self.correct5, self.count = t.tolist()
        return self

    def value(self) -> dict[str, float]:
        """{"loss", "top1", "top5", "images"}: mean loss and accuracies in percent."""
        self._flush()
        n = max(self.count, 1.0)
        return {"loss": self.loss_sum / n, "top1": 100.0 * self.correct1 / n,
                "top5": 100.0 * self.correct5 / n, "images": int(self.count)}


def format_epoch(row: dict[str, Any], epochs: int, *, best: bool = False) -> str:
    """The one line printed per epoch (a metrics.jsonl row); "*best" marks a new best val top-1."""
    width = len(str(epochs))
    return (f"epoch {row['epoch']:>{width}}/{epochs}  lr {row['lr']:.3g}  "
            f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}%  "
            f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%  "
            f"{row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s{'  *best' if best else ''}")
