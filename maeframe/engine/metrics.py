"""Classification metrics of downstream evaluation and results.json (with the confusion-matrix picture).

Accuracies are percentages (as the MAE paper reports them). Single-label: top-1, top-5, per-class accuracy
and the confusion matrix (rows: true class, columns: predicted). Multi-label (multi-hot targets): mAP, the
mean over classes of average precision.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..pictures import save_confusion_matrix


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """scores [N, C], labels [N] -> {"top1": %, "top5": %}; a k above C is left out."""
    out = {}
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    for k in ks:
        if k <= scores.shape[1]:
            hit = (ranked[:, :k] == labels[:, None]).any(1)
            out[f"top{k}"] = round(100.0 * hit.float().mean().item(), 4)
    return out


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[C, C] counts; entry (t, p) counts samples of true class t predicted as p."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: Tensor) -> list[float | None]:
    """Recall of each class in % from a confusion matrix; None for a class absent from the labels."""
    totals = matrix.sum(1)
    return [round(100.0 * matrix[c, c].item() / totals[c].item(), 4) if totals[c] else None for c in range(len(matrix))]


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """AP per class [C] (NaN where a class has no positive): scores [N, C], multi-hot targets [N, C].
    AP = mean over positives of the precision at their rank (ties broken by order)."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)[:, None]
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision * hits).sum(0) / positives.clamp(min=1), float("nan"))


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """mAP in % over the classes that have at least one positive."""
    ap = average_precision(scores, targets)
    return round(100.0 * ap[~ap.isnan()].mean().item(), 4)


def classification_metrics(scores: Tensor, labels: Tensor, classes: list[str], multi_label: bool = False,
                           details: bool = False) -> dict[str, Any]:
    """Headline metrics (top1/top5, or mAP); with `details` also per-class values and the confusion matrix."""
    scores, labels = scores.float().cpu(), labels.cpu()
    if multi_label:
        out: dict[str, Any] = {"mAP": mean_average_precision(scores, labels)}
        if details:
            ap = average_precision(scores, labels)
            out["per_class_ap"] = {name: None if v.isnan() else round(100.0 * v.item(), 4) for name, v in zip(classes, ap)}
        return out
    out = topk_accuracy(scores, labels)
    if details:
        matrix = confusion_matrix(scores.argmax(1), labels, len(classes))
        out["per_class_accuracy"] = dict(zip(classes, per_class_accuracy(matrix)))
        out["confusion_matrix"] = matrix.tolist()
    return out


def write_results(run_dir: Path, results: dict[str, Any], classes: list[str]) -> Path:
    """Write results.json (and confusion_matrix.png when there is one) into the run directory."""
    final = results.get("final", {})
    if "confusion_matrix" in final:
        title = f"{results['name']} ({results['task']}): top-1 {final['top1']:.2f}%"
        save_confusion_matrix(final["confusion_matrix"], classes, run_dir / "confusion_matrix.png", title)
        results["confusion_matrix_png"] = "confusion_matrix.png"
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run_dir / "results.json")
    return run_dir / "results.json"


def format_results(results: dict[str, Any]) -> str:
    """A few lines for the terminal: headline metrics, best epoch, worst classes."""
    final = results.get("final", {})
    headline = ", ".join(f"{k} {final[k]:.2f}%" for k in ("top1", "top5", "mAP") if k in final)
    lines = [f"{results['task']} {results['name']} (init {results['init']['format']}): {headline}"]
    if results.get("best"):
        best = results["best"]
        lines.append(f"  best epoch {best['epoch']}: {best['metric']} {best['value']:.2f}%")
    if "ema" in results:
        lines.append(f"  EMA weights: top-1 {results['ema'].get('top1', float('nan')):.2f}%")
    per_class = {k: v for k, v in final.get("per_class_accuracy", {}).items() if v is not None}
    if per_class:
        worst = sorted(per_class.items(), key=lambda kv: kv[1])[:3]
        lines.append("  weakest classes: " + ", ".join(f"{name} {acc:.1f}%" for name, acc in worst))
    lines.append(f"  results: {results.get('path', 'results.json')}")
    return "\n".join(lines)
