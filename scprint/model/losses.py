"""Loss functions, each a pure function of tensors (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` where ``weight`` is 1; 0 (still in the graph) where nothing counts."""
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def zinb_nll(
    x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, pi_logit: torch.Tensor, eps=1e-8
) -> torch.Tensor:
    """Negative log-likelihood of counts ``x`` under ZINB(mean, theta, pi), elementwise.

    log P(0)   = log(pi + (1 - pi) NB(0))       = logaddexp(pi_logit, log NB(0)) - softplus(pi_logit)
    log P(x>0) = log(1 - pi) + log NB(x)        = log NB(x) - softplus(pi_logit)
    """
    x = x.float()
    log_theta_mean = torch.log(theta + mean + eps)
    log_nb_zero = theta * (torch.log(theta + eps) - log_theta_mean)
    log_nb = (
        log_nb_zero
        + x * (torch.log(mean + eps) - log_theta_mean)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    softplus_pi = F.softplus(pi_logit)
    log_zero = torch.logaddexp(pi_logit, log_nb_zero) - softplus_pi
    log_nonzero = log_nb - softplus_pi
    return -torch.where(x < 0.5, log_zero, log_nonzero)


def label_sets(n_leaves: int, hierarchy: dict[int, list[int]] | None) -> torch.Tensor:
    """(K + P, K) bool: row c lists the leaves label c stands for (itself, or a parent's leaves).

    scdataloader codes leaves 0..K-1 and parent terms K..K+P-1 (unknown is -1).
    """
    hierarchy = {int(k): [int(i) for i in v] for k, v in (hierarchy or {}).items()}
    n_rows = max([n_leaves - 1, *hierarchy.keys()]) + 1
    sets = torch.zeros(n_rows, n_leaves, dtype=torch.bool)
    sets[torch.arange(n_leaves), torch.arange(n_leaves)] = True
    for parent, leaves in hierarchy.items():
        if parent < n_leaves:
            raise ValueError(f"parent label code {parent} collides with a leaf code (< {n_leaves})")
        sets[parent, leaves] = True
    return sets


def check_label_codes(classes: torch.Tensor, label_sets: dict[str, torch.Tensor]) -> None:
    """Raise a clear error for a label code the model has no leaves for.

    classes (B, C) codes in the column order of ``label_sets`` (-1 unknown). scdataloader's
    DataModule gives every code it emits a row (leaf, or a parent with its leaves), so such
    a code means the batch was encoded by other data than the model's classes and
    hierarchy were built from. Unchecked, it is an IndexError in hierarchical_bce (a
    device-side assert on CUDA), or an infinite loss for a row with no leaves. Call it on
    the batch while it is still on the CPU: on an accelerator it would cost a sync.
    """
    for column, (name, sets) in enumerate(label_sets.items()):
        codes = classes[:, column].long()
        codes = codes[codes >= 0]
        if codes.numel() == 0:
            continue
        n_leaves = sets.shape[1]
        bad = codes >= sets.shape[0]
        if not bad.any():
            bad = ~sets[codes].any(-1)  # a row that stands for no leaf
        if bad.any():
            known = torch.nonzero(sets.any(-1)).flatten().tolist()
            parents = [c for c in known if c >= n_leaves]
            raise ValueError(
                f"class {name}: label code {int(codes[bad][0])} has no row in the model's "
                f"labels hierarchy (the model knows leaf codes 0-{n_leaves - 1} and parent "
                f"codes {parents}). The batch's labels were encoded by other data than the "
                "model's classes and labels_hierarchy come from (a checkpoint trained on "
                "another collection, or other data.clss_to_predict / hierarchical_clss / "
                "ontologies). Fix: build the model from this data module (`scprint fit` links "
                "data.classes and data.labels_hierarchy into the model), or use the collection "
                "and data settings the checkpoint was trained with"
            )


def parent_scores(logits: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """Score of every label (leaves and parents): logsumexp of its leaves' logits. (B, K+P)."""
    masked = logits[:, None, :].masked_fill(~sets[None], float("-inf"))  # (B, K+P, K)
    return masked.logsumexp(-1)


def hierarchical_bce(logits: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor):
    """Multi-label BCE where a parent label is right if any of its leaves is.

    logits (B, K) leaf logits; labels (B,) codes, -1 unknown; sets (K+P, K) from label_sets.
    The positive term scores the label as logsumexp over its leaves; every leaf outside the
    label's set is a negative. Cells with unknown labels weigh 0 (but stay in the graph).
    """
    logits = logits.float()
    known = labels >= 0
    target = sets[labels.clamp(min=0).long()]  # (B, K) leaves the label allows
    pos_score = logits.masked_fill(~target, float("-inf")).logsumexp(-1)  # (B,)
    pos = F.softplus(-pos_score)  # -log sigmoid(score)
    neg = (F.softplus(logits) * ~target).sum(-1) / (~target).sum(-1).clamp(min=1)
    return masked_mean(pos + neg, known)


def contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cell contrastive (CCE): two views of a cell attract, other cells of the batch repel."""
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    logits = z1 @ z2.T / temperature  # (B, B)
    target = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def elastic_cell_similarity(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """ECS: push cosine similarities of different cells away from ``threshold``."""
    z = F.normalize(z.float(), dim=-1)
    sim = (z @ z.T).clamp(min=0)  # (B, B)
    off_diagonal = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return masked_mean(1 - (sim - threshold) ** 2, off_diagonal)
