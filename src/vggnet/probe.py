"""Linear classifiers on Appendix B descriptors: the paper's linear SVM and its two metrics.

A `LinearSVC` (one-vs-rest) is fitted to the training descriptors; its regularisation C is
chosen on a held-out stratified 20% of the training images (the paper's Caltech protocol) and the
classifier is then refitted on all of them. Reported: top-1 accuracy, mean class recall
(Caltech's metric), per-class average precision of the one-vs-rest decision scores and their mean
(VOC's mAP), and the confusion matrix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checkpoint import atomic_write
from .errors import UserError
from .features import Features

__all__ = ["DEFAULT_CS", "HELD_OUT", "ProbeResult", "check_compatible", "fit_probe", "run_probe", "score_probe",
           "plot_confusion"]

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
HELD_OUT = 0.2  # Appendix B: 20% of the training images hold out the hyper-parameters (Caltech)
_MUST_MATCH = ("net_id", "layer", "scales", "aggregate", "flip", "dim")


@dataclass(kw_only=True)
class ProbeResult:
    """The figures of one probe; `as_dict()` is what `--json` writes."""

    C: float
    validation: dict[float, float]  # held-out accuracy per C tried
    top1: float                     # %
    mean_class_recall: float        # %
    average_precision: dict[str, float]
    mAP: float                      # %
    confusion: np.ndarray           # (classes, classes): rows true, columns predicted
    class_names: list[str]
    train_images: int
    test_images: int

    def as_dict(self) -> dict[str, Any]:
        r = lambda v: round(float(v), 4)
        return {"C": self.C, "validation": {str(c): r(a) for c, a in self.validation.items()},
                "top1": r(self.top1), "mean_class_recall": r(self.mean_class_recall), "mAP": r(self.mAP),
                "average_precision": {k: r(v) for k, v in self.average_precision.items()},
                "confusion": self.confusion.tolist(), "class_names": self.class_names,
                "train_images": self.train_images, "test_images": self.test_images}


def check_compatible(train: Features, test: Features, *, train_name: str = "train", test_name: str = "test") -> None:
    """Both files must hold descriptors of the same net, layer, scales, aggregation and flips, and labels."""
    for key in _MUST_MATCH:
        a, b = train.meta.get(key), test.meta.get(key)
        if a != b:
            what = "weights" if key == "net_id" else key
            a, b = (a[:12], b[:12]) if key == "net_id" and a and b else (a, b)
            raise UserError(f"{train_name} and {test_name} hold descriptors of different {what}: {a} vs {b}; "
                            f"extract both with the same --weights, --layer, --test-scale, --aggregate and flips")
    for f, name in ((train, train_name), (test, test_name)):
        if f.labels is None:
            raise UserError(f"{name} has no labels (its images were not in class folders); the probe needs them")
    if train.class_names != test.class_names:
        raise UserError(f"{train_name} and {test_name} have different classes: "
                        f"{train.class_names[:5]}... vs {test.class_names[:5]}...")


def _svm(C: float, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, max_iter=10000, random_state=seed)


def fit_probe(X: np.ndarray, y: np.ndarray, *, Cs: Sequence[float] = DEFAULT_CS, seed: int = 0):
    """(classifier refitted on all of X, chosen C, held-out accuracy per C)."""
    from sklearn.model_selection import train_test_split

    if len(np.unique(y)) < 2:
        raise UserError(f"the probe needs training images of at least 2 classes, got {len(np.unique(y))}")
    validation: dict[float, float] = {}
    if len(Cs) > 1:
        counts = np.bincount(y)
        if counts[counts > 0].min() < 2:
            raise UserError("choosing C holds out 20% of each class, so every class needs >= 2 training images; "
                            "give one --C value to skip the choice")
        fit_x, val_x, fit_y, val_y = train_test_split(X, y, test_size=HELD_OUT, stratify=y, random_state=seed)
        for C in Cs:
            validation[float(C)] = float(_svm(C, seed).fit(fit_x, fit_y).score(val_x, val_y))
        best = max(validation, key=lambda c: (validation[c], -c))  # ties: the stronger regularisation
    else:
        best = float(Cs[0])
    return _svm(best, seed).fit(X, y), best, validation


def score_probe(clf: Any, X: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, mean class recall, per-class AP / mAP (over the classes present in y) and the confusion matrix."""
    from sklearn.metrics import average_precision_score, confusion_matrix

    scores = clf.decision_function(X)
    if scores.ndim == 1:  # two classes: sklearn returns the score of the second one
        scores = np.stack([-scores, scores], axis=1)
    predicted = clf.classes_[scores.argmax(axis=1)]
    present = np.unique(y)
    recall = [float((predicted[y == c] == c).mean()) for c in present]
    ap = {}
    for j, c in enumerate(clf.classes_):
        if c in present:
            ap[class_names[c]] = 100.0 * float(average_precision_score(y == c, scores[:, j]))
    labels = np.arange(len(class_names))
    return {"top1": 100.0 * float((predicted == y).mean()), "mean_class_recall": 100.0 * float(np.mean(recall)),
            "average_precision": ap, "mAP": float(np.mean(list(ap.values()))),
            "confusion": confusion_matrix(y, predicted, labels=labels)}


def run_probe(train: Features, test: Features, *, Cs: Sequence[float] = DEFAULT_CS, seed: int = 0,
              train_name: str = "train", test_name: str = "test") -> ProbeResult:
    """Check the two descriptor sets fit together, fit the SVM on `train`, score it on `test`."""
    check_compatible(train, test, train_name=train_name, test_name=test_name)
    if any(c <= 0 for c in Cs) or not Cs:
        raise UserError(f"--C expects positive numbers, got {list(Cs)}")
    clf, C, validation = fit_probe(train.features, train.labels, Cs=Cs, seed=seed)
    figures = score_probe(clf, test.features, test.labels, train.class_names)
    return ProbeResult(C=C, validation=validation, class_names=list(train.class_names),
                       train_images=len(train.labels), test_images=len(test.labels), **figures)


def plot_confusion(result: ProbeResult, path: str | os.PathLike) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted; each row as a fraction)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.confusion.astype(float)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(result.class_names)
    size = min(4 + 0.3 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), result.class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), result.class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {result.top1:.1f}%, mean class recall {result.mean_class_recall:.1f}%, mAP {result.mAP:.1f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
