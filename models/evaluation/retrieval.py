"""Retrieval on frozen features: same-class mAP and copy detection among distractors.

Similarity is cosine. Same-class retrieval ranks a database (train) for every query (test)
and averages the average precision over queries. Copy detection queries with augmented
copies of images whose originals sit in a database padded with distractors; a copy has one
right answer, so its average precision is 1 / rank of its original.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _normalised(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)


def retrieval_map(database_features: np.ndarray, database_labels: np.ndarray,
                  query_features: np.ndarray, query_labels: np.ndarray,
                  batch_size: int = 256) -> dict[str, float]:
    """Mean average precision of retrieving same-class database items for each query."""
    db = _normalised(database_features)
    queries = _normalised(query_features)
    db_y = torch.as_tensor(database_labels, dtype=torch.int64)
    q_y = torch.as_tensor(query_labels, dtype=torch.int64)
    ranks = torch.arange(1, db.shape[0] + 1, dtype=torch.float32)  # (N,)
    ap_sum, n_scored = 0.0, 0
    for start in range(0, queries.shape[0], batch_size):
        order = (queries[start:start + batch_size] @ db.T).argsort(dim=1, descending=True)  # (b, N)
        relevant = (db_y[order] == q_y[start:start + batch_size, None]).float()  # (b, N)
        n_relevant = relevant.sum(dim=1)
        precision = relevant.cumsum(dim=1) / ranks  # precision at every rank
        ap = (precision * relevant).sum(dim=1) / n_relevant.clamp(min=1)
        has_match = n_relevant > 0  # a query whose class is absent from the database is not scored
        ap_sum += float(ap[has_match].sum())
        n_scored += int(has_match.sum())
    return {"retrieval_map": ap_sum / max(n_scored, 1)}


def copy_detection(copy_features: np.ndarray, original_features: np.ndarray,
                   distractor_features: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Copy ``i`` should retrieve original ``i`` among originals + distractors: recall@1 and mAP."""
    if len(copy_features) != len(original_features):
        raise ValueError("copy detection: one copy per original is expected")
    db = torch.cat([_normalised(original_features), _normalised(distractor_features)])  # (N_o + N_d, D)
    copies = _normalised(copy_features)
    hits, ap_sum = 0, 0.0
    for start in range(0, copies.shape[0], batch_size):
        sims = copies[start:start + batch_size] @ db.T  # (b, N)
        target = torch.arange(start, start + sims.shape[0])
        target_sim = sims[torch.arange(sims.shape[0]), target]
        # rank of the original = 1 + how many database items score strictly higher
        rank = 1 + (sims > target_sim[:, None]).sum(dim=1)
        hits += int((rank == 1).sum())
        ap_sum += float((1.0 / rank.float()).sum())
    n = max(copies.shape[0], 1)
    return {"copy_recall1": hits / n, "copy_map": ap_sum / n}
