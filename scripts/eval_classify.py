"""eval.py on a classification run: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix of the fine-tune, beside two baselines on the same held-out records.

The baselines: the majority class (always answer the training split's most common label) and
the base model with its untrained head (a fresh trainer of the run: LoRA's B is zero and the
head is the one the run's seed draws, so it is exactly the run's step-0 model). Metrics follow
scikit-learn's definitions: a class's precision is 0 when it is never predicted, its recall 0
when it never occurs, F1 0 when both are; macro-F1 is the unweighted mean over the run's
labels. The confusion matrix has a row per true label and a column per predicted one, in the
run's label order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baton.session.card import save_png
from baton.training.classify import predict


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def confusion_matrix(true: list[int], pred: list[int], n: int) -> list[list[int]]:
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(true, pred):
        matrix[t][p] += 1
    return matrix


def per_class(matrix: list[list[int]], labels: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for i, label in enumerate(labels):
        hit = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision, recall = _ratio(hit, predicted), _ratio(hit, support)
        f1 = _ratio(2 * hit, predicted + support)  # = 2PR/(P+R), and 0 when both are 0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def scores(logits: torch.Tensor, true: list[int], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1, loss (mean cross-entropy), per_class and confusion of one model."""
    target = torch.tensor(true, dtype=torch.long)
    pred = logits.argmax(-1).tolist()
    matrix = confusion_matrix(true, pred, len(labels))
    classes = per_class(matrix, labels)
    return {"accuracy": _ratio(sum(matrix[i][i] for i in range(len(labels))), len(true)),
            "macro_f1": sum(c["f1"] for c in classes.values()) / len(labels),
            "loss": float(F.cross_entropy(logits, target)),
            "per_class": classes, "confusion": matrix}


def judge_classifier(trainer, folder: Path) -> dict[str, Any]:
    """The result object of eval.py --json for a classification run (DESIGN.md)."""
    samples = trainer.data.eval_samples()
    labels = list(trainer.spec.labels)
    true = [s.label for s in samples]
    base = scores(predict(trainer, samples), true, labels)
    trainer.load(folder)
    tuned = scores(predict(trainer, samples), true, labels)
    top, majority_accuracy = trainer.data.majority()
    return {
        "eval_records": len(samples), "labels": labels,
        "majority": {"accuracy": majority_accuracy, "label": labels[top]},
        "base": {k: base[k] for k in ("accuracy", "macro_f1", "loss")},
        "tuned": {k: tuned[k] for k in ("accuracy", "macro_f1", "loss", "per_class")},
        "confusion": tuned["confusion"],
    }


def verdict(result: dict[str, Any]) -> str:
    tuned, base = result["tuned"], result["base"]
    best = max(result["majority"]["accuracy"], base["accuracy"])
    where = f"on {result['eval_records']} held-out records, {len(result['labels'])} classes"
    line = (f"accuracy {tuned['accuracy']:.3f} (macro-F1 {tuned['macro_f1']:.3f}) vs majority "
            f"class {result['majority']['accuracy']:.3f} and base model {base['accuracy']:.3f}")
    if tuned["accuracy"] > best:
        return f"verdict: the fine-tune helps {where}: {line}"
    return (f"verdict: the fine-tune does NOT beat its baselines {where}: {line}; train "
            "longer or check the labels")


def show(result: dict[str, Any], console=None) -> None:
    """Per-class table, then the confusion matrix, then the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="per class (tuned)")
    for col in ("label", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for label, c in result["tuned"]["per_class"].items():
        table.add_row(label, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                      str(c["support"]))
    console.print(table)
    matrix = Table(title="confusion (rows: true label, columns: predicted)")
    matrix.add_column("")
    for i, _ in enumerate(result["labels"]):
        matrix.add_column(str(i), justify="right")
    for i, (label, row) in enumerate(zip(result["labels"], result["confusion"])):
        matrix.add_row(f"{i} {label}", *(str(x) for x in row))
    console.print(matrix)
    console.print(verdict(result), highlight=False)


def plot_confusion(result: dict[str, Any], path: Path) -> Path:
    """The tuned model's confusion matrix as a PNG (counts in the cells)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a notebook VM or CI
    import matplotlib.pyplot as plt

    labels, matrix = result["labels"], result["confusion"]
    size = 2.5 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels, rotation=45, ha="right")
        ax.set_yticks(ticks, labels)
        top = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if count > top / 2 else "black", fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=(
            f"checkpoint {result.get('checkpoint', '?')}: accuracy "
            f"{result['tuned']['accuracy']:.3f}, macro-F1 {result['tuned']['macro_f1']:.3f}"))
        return save_png(fig, path)
    finally:
        plt.close(fig)


def png_beside(json_path: Path) -> Path:
    """eval.json -> eval.confusion.png, in the same folder."""
    return json_path.with_name(json_path.stem + ".confusion.png")
