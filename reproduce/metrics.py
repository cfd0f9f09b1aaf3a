"""Evaluation metrics of the BADR paper's Tables 3-6 (numpy + scipy; no scikit-learn).

- :func:`auc`: ROC AUC over all test pairs pooled, by the Mann-Whitney U statistic with
  average ranks for ties (equal to ``sklearn.metrics.roc_auc_score``).
- :func:`ranking_at_k`: NDCG@K, Recall@K and Precision@K computed per test user over that
  user's test items ranked by score, then averaged over users, vectorised (one sort for all
  users and all K); :func:`ndcg_recall_at_k` the first two at one K.

Users without a positive test item: the published code counts NDCG = 1 for them (the ideal
DCG is 0 and the ratio is set to 1), Recall = 0 (hits / max(1, #positives)) and Precision = 0;
``variant="strict"`` excludes those users from both averages instead.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

VARIANTS = ("published", "strict")


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"`scores` and `labels` must be 1-D of one length; got shapes {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("`scores` is empty; need at least one test pair")
    if not np.isfinite(scores).all():
        raise ValueError("`scores` contains NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("`labels` must contain only 0 and 1")
    return scores, labels.astype(bool)


def auc(scores, labels) -> float:
    """ROC AUC: ``(sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, ties averaged."""
    scores, labels = _check_scores_labels(scores, labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes among the labels; got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking_at_k(users, scores, labels, ks, variant: str = "published") -> dict[int, dict[str, float]]:
    """NDCG@K, Recall@K and Precision@K for each K of ``ks``, means over the test users, from one sort.

    For user ``u`` with test items ranked by descending score (ties keep the input order),
    ``DCG = sum_{rank r < K} y_r / log2(r + 2)``, ``IDCG`` the DCG of the ideal order,
    ``NDCG = DCG / IDCG``, ``Recall = hits@K / max(1, #positives)`` and ``Precision = hits@K / K``.
    ``variant`` says what a user without a positive test item counts: ``"published"`` NDCG = 1,
    Recall = 0 and Precision = 0 (as the published code), ``"strict"`` excludes the user.
    Returns ``{K: {"ndcg": ..., "recall": ..., "precision": ...}}``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}; got {variant!r}")
    ks = [ks] if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool) else list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"`k` must be a positive integer (or a list of them); got {ks!r}")
    scores, labels = _check_scores_labels(scores, labels)
    users = np.asarray(users)
    if users.shape != scores.shape or not np.issubdtype(users.dtype, np.integer):
        raise ValueError(f"`users` must be a 1-D integer array like `scores`; got shape {users.shape}, dtype {users.dtype}")
    # Sort by user, then by descending score; lexsort is stable, so ties keep the input order.
    order = np.lexsort((-scores, users))
    u, y = users[order], labels[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    group = np.cumsum(np.r_[False, u[1:] != u[:-1]])  # group id of each sorted pair
    rank = np.arange(u.size) - starts[group]
    n_groups = starts.size
    n_pos = np.bincount(group, weights=y.astype(np.float64), minlength=n_groups).astype(np.int64)
    has_pos = n_pos > 0
    if variant == "strict" and not has_pos.any():
        raise ValueError("no test user has a positive item; the strict NDCG / Recall are undefined")
    out = {}
    for k in dict.fromkeys(int(k) for k in ks):
        top = rank < k
        discount = 1.0 / np.log2(np.arange(k) + 2.0)
        dcg = np.bincount(group[top], weights=y[top] * discount[rank[top]], minlength=n_groups)
        hits = np.bincount(group[top], weights=y[top].astype(np.float64), minlength=n_groups)
        ideal = np.r_[0.0, np.cumsum(discount)][np.minimum(n_pos, k)]
        metrics = {"ndcg": np.where(has_pos, dcg / np.where(has_pos, ideal, 1.0), 1.0),
                   "recall": hits / np.maximum(1, n_pos), "precision": hits / k}
        out[k] = {name: float((v[has_pos] if variant == "strict" else v).mean()) for name, v in metrics.items()}
    return out


def ndcg_recall_at_k(users, scores, labels, k: int, variant: str = "published") -> tuple[float, float]:
    """Mean over test users of NDCG@K and Recall@K (binary relevance, log2 discount); see
    :func:`ranking_at_k`, which also gives Precision@K and several K from one sort."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be a positive integer; got {k!r}")
    m = ranking_at_k(users, scores, labels, [k], variant)[int(k)]
    return m["ndcg"], m["recall"]
