"""Validation metrics like upstream scPRINT's, as pure functions of tensors.

- hierarchical_accuracy: label prediction, where predicting a leaf under a true parent
  label counts as right (upstream's rule), averaged per true label (macro);
- denoise_score: Spearman(reconstructed, full) - Spearman(noisy, full) on the entries that
  are non-zero in the full counts, pooled over cells (upstream's
  reco2full - noisy2full);
- knn_accuracy: leave-one-out kNN label accuracy on cell embeddings (macro), a cheap proxy
  of upstream's embedding benchmarks that needs no external atlas.
A metric with nothing to measure is NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def macro_mean(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the distinct ``labels`` of the share of ``correct`` cells with that label."""
    if labels.numel() == 0:
        return math.nan
    _, group = torch.unique(labels, return_inverse=True)
    n = torch.bincount(group).double()
    hits = torch.bincount(group, weights=correct.double())
    return float((hits / n).mean())


def hierarchical_accuracy(pred: torch.Tensor, true: torch.Tensor, sets: torch.Tensor) -> float:
    """pred (N,) leaf codes, true (N,) label codes (-1 unknown: not counted), sets (K+P, K)
    bool from losses.label_sets: right when the predicted leaf is one the true label stands
    for (itself, or a leaf under the true parent label)."""
    known = true >= 0
    pred, true = pred[known].long(), true[known].long()
    correct = sets.to(pred.device)[true, pred]
    return macro_mean(correct, true)


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """0-based ranks of v (N,), ties sharing their average rank (as Spearman needs)."""
    sorted_v, order = v.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = ends - (counts.double() + 1) / 2  # average 0-based rank of each tie group
    ranks = torch.empty(v.shape, dtype=torch.float64, device=v.device)
    ranks[order] = mid[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb) / denom) if denom > 0 else math.nan


def denoise_score(
    reconstructed: torch.Tensor, noisy: torch.Tensor, full: torch.Tensor
) -> dict[str, float]:
    """Each (N,) or (B, L): entries of the same gene tokens. Positive: the model's
    reconstruction ranks the full counts better than the noisy counts it saw."""
    keep = full != 0
    reco2full = spearman(reconstructed[keep], full[keep])
    noisy2full = spearman(noisy[keep], full[keep])
    return {"reco2full": reco2full, "noisy2full": noisy2full, "score": reco2full - noisy2full}


def knn_accuracy(emb: torch.Tensor, labels: torch.Tensor, k: int = 10, chunk: int = 1024) -> float:
    """Leave-one-out k-nearest-neighbour (cosine) majority vote; macro accuracy over labels.

    emb (N, D), labels (N,) codes; cells with a negative label are left out. Rows are
    compared ``chunk`` at a time, so memory is chunk x N, not N x N."""
    keep = labels >= 0
    emb, labels = F.normalize(emb[keep].float(), dim=-1), labels[keep].long()
    n = labels.numel()
    k = min(k, n - 1)
    if k < 1:
        return math.nan
    n_labels = int(labels.max()) + 1
    votes_for = []
    for start in range(0, n, chunk):
        sim = emb[start : start + chunk] @ emb.T  # (c, N)
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = -math.inf  # not its own neighbour
        neighbours = labels[sim.topk(k, dim=-1).indices]  # (c, k)
        votes = torch.zeros(sim.shape[0], n_labels, device=sim.device)
        votes.scatter_add_(1, neighbours, torch.ones_like(neighbours, dtype=votes.dtype))
        votes_for.append(votes.argmax(-1))
    return macro_mean(torch.cat(votes_for) == labels, labels)
