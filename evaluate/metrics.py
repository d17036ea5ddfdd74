"""Pure metric functions on arrays: fidelity, kNN, zero-shot, mIoU.

Letters: N rows, D feature width, M bank rows, Q queries, K classes, P pixels (or grid tokens).
Inputs may be numpy arrays or torch tensors; results are Python floats or numpy arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255  # mask value that is neither background nor a class


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def cosine_rows(a, b) -> np.ndarray:
    """Cosine of matching rows: (N, D), (N, D) -> (N,)."""
    return F.cosine_similarity(_t(a), _t(b), dim=-1).numpy()


def knn_predict(bank, bank_labels, queries, *, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Weighted kNN classifier of DINO (Caron et al. 2021): cosine similarity, the k nearest bank rows
    vote for their label with weight exp(cos / temperature).

    Args:
        bank: (M, D) features with known labels.
        bank_labels: (M,) int labels >= 0.
        queries: (Q, D) features to classify.
        k: neighbours (capped at M).
        temperature: vote temperature (0.07 as in DINO).
        num_classes: K; default max label + 1.
        chunk: queries per similarity block (bounds memory at chunk x M).

    Returns:
        (Q,) predicted labels.
    """
    bank = F.normalize(_t(bank), dim=-1)  # (M, D)
    labels = _t(bank_labels, torch.long)  # (M,)
    queries = F.normalize(_t(queries), dim=-1)  # (Q, D)
    K = int(num_classes if num_classes is not None else labels.max() + 1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T  # (q, M)
        top, idx = sim.topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(sim), K).scatter_add_(1, labels[idx], (top / temperature).exp())  # (q, K)
        out.append(votes.argmax(1))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def knn_top1(bank, bank_labels, queries, query_labels, **kwargs) -> float:
    """Top-1 accuracy of `knn_predict` on (Q,) `query_labels`."""
    pred = knn_predict(bank, bank_labels, queries, **kwargs)
    return float((pred == np.asarray(query_labels)).mean())


def zero_shot_predict(features, text) -> np.ndarray:
    """Nearest class embedding by cosine: (Q, D) image features, (K, D) text embeddings -> (Q,) labels."""
    return (F.normalize(_t(features), dim=-1) @ F.normalize(_t(text), dim=-1).T).argmax(1).numpy()


def zero_shot_top1(features, text, labels) -> float:
    """Top-1 accuracy of `zero_shot_predict` on (Q,) `labels`."""
    return float((zero_shot_predict(features, text) == np.asarray(labels)).mean())


def confusion(pred, target, *, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(K, K) counts, rows = target class, cols = predicted class, over (P,) label arrays; `ignore` skipped."""
    pred, target = np.asarray(pred).ravel().astype(np.int64), np.asarray(target).ravel().astype(np.int64)
    keep = target != ignore
    idx = target[keep] * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(K,) intersection over union from a (K, K) confusion matrix; NaN where a class is absent from both."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def miou(pred, target, *, num_classes: int, ignore: int = IGNORE) -> float:
    """Mean IoU over the classes present in `target` or `pred`, (P,) label arrays (any shape, flattened)."""
    return float(np.nanmean(iou_per_class(confusion(pred, target, num_classes=num_classes, ignore=ignore))))
