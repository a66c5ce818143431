"""Loss functions, each a pure function of tensors (no modules, no state)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    hierarchy were built from. Unchecked, it is an IndexError in classification (a
    device-side assert on CUDA), or a ~1e38 loss for a row with no leaves. Call it on
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


def classification(logits: torch.Tensor, labels: torch.Tensor, sets: torch.Tensor):
    """Upstream's classification loss: BCE with logits over the (B, K) one-hot leaf matrix,
    averaged over every element, unknown cells (code -1) included with weight 0.

    A cell labelled with a parent term (code >= K) is right if any of its leaves is: its
    leaves leave the BCE (weight 0) and one extra column scores them together
    (logsumexp of their logits, target 1); the other leaves stay negatives. The extra
    column exists only when the batch has such a cell (then the mean is over B x (K + 1)).
    logits (B, K); labels (B,) codes; sets (K + P, K) from label_sets.
    """
    logits = logits.float()
    B, K = logits.shape
    labels = labels.long()
    known = labels >= 0
    leaf = known & (labels < K)
    target = torch.zeros_like(logits)
    target[leaf, labels[leaf]] = 1.0
    weight = known[:, None].expand(B, K).to(logits.dtype)
    parent = labels >= K
    if parent.any():
        rows = sets[labels.clamp(min=0)]  # (B, K) the leaves each code stands for
        weight = weight.masked_fill(rows & parent[:, None], 0.0)
        score = logits.masked_fill(~rows, torch.finfo(logits.dtype).min).logsumexp(-1)
        logits = torch.cat([logits, score[:, None]], dim=1)
        target = torch.cat([target, torch.ones_like(score)[:, None]], dim=1)
        weight = torch.cat([weight, parent.to(logits.dtype)[:, None]], dim=1)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def within_sample(cell_states: torch.Tensor) -> torch.Tensor:
    """Upstream's emb_independence: the cell tokens of one cell (B, C, D) should point
    different ways (squared cosine similarity of each pair) and lie apart (inverse of their
    mean L2 distance / sqrt(D)); the diagonal counts as 0 in both means."""
    B, C, D = cell_states.shape
    x = cell_states.float()
    unit = F.normalize(x, p=2, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, C, C)
    dist = torch.cdist(x, x, p=2) / math.sqrt(D)  # (B, C, C)
    off = 1.0 - torch.eye(C, device=x.device)
    cos_term = (cos * off).pow(2).mean()
    dist_term = 1.0 / (dist * off + 1e-3).mean()
    return 0.5 * cos_term + 0.5 * dist_term


def contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """CCE (InfoNCE, one way): cell i of the first pass should be most similar (cosine /
    temperature) to cell i of the second, among all cells of the batch."""
    sim = F.cosine_similarity(z1.float()[:, None], z2.float()[None], dim=2) / temperature
    return F.cross_entropy(sim, torch.arange(z1.shape[0], device=z1.device))


def ecs(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """ECS: mean over every pair of cells (the diagonal counted as similarity 0) of
    1 - (relu(cosine) - threshold)^2: positive similarities are pushed away from the
    threshold."""
    unit = F.normalize(z.float(), p=2, dim=1)
    sim = unit @ unit.T  # (B, B)
    sim = sim.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), 0.0).relu()
    return (1 - (sim - threshold) ** 2).mean()


def zinb_mean_mse(decoded: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """zinb_and_mse's extra term (before its / 10): MSE between the expected non-dropout
    log expression and log(1 + x), each log2(1 + .)-transformed and scaled to sum 10,000
    per cell, as upstream's loss.mse."""
    expected = torch.log(decoded["mean"] + 1) * (1 - torch.sigmoid(decoded["pi_logit"]))
    a, b = torch.log2(expected + 1), torch.log2(torch.log(target.float() + 1) + 1)
    a = a / a.sum(1, keepdim=True) * 10_000
    b = b / b.sum(1, keepdim=True) * 10_000
    return F.mse_loss(a, b)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg()


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward (adversarial losses)."""
    return _GradReverse.apply(x)
