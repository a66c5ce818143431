"""Everything fine-tuning knows about the scPRINT network, in one place.

Fine-tuning depends only on: ``ScPrintModule.load(path)``, its hparams (genes,
transformer), the network's ``encode(genes, expression, depth) -> (cell_states,
gene_states)``, the module's ``cell_embedding(cell_states)`` (:func:`readout`), and which
``nn.Linear`` layers sit inside the transformer blocks (:func:`lora_targets`). If the
network changes, adapt this file only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_backbone(path: str | Path, device: str = "cpu"):
    """The ScPrintModule of a checkpoint, on ``device``, in eval mode. A model trained
    with transformer='flash' runs with 'sdpa' (same weights) where flash cannot run."""
    from scprint.model.lightning import ScPrintModule

    overrides = {}
    # only the hyperparameters: mmap leaves the weights on disk until the real load below
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    hparams = ckpt.get("hyper_parameters", {})
    if hparams.get("transformer") == "flash" and not str(device).startswith("cuda"):
        log.info("checkpoint uses transformer='flash', which needs CUDA: running with 'sdpa'")
        overrides["transformer"] = "sdpa"
    module = ScPrintModule.load(path, map_location=device, **overrides)
    return module.eval()


def vocabulary(module) -> list[str]:
    """The checkpoint's genes, in the order of the network's gene indices."""
    return list(module.hparams.genes)


Readout = Callable[[torch.Tensor], torch.Tensor]  # (B, C, D) cell token states -> (B, D)


def readout(module) -> Readout:
    """The cell embedding fine-tuning trains on: the module's prediction embedding, i.e.
    upstream's (mean of the pred_embedding classes' tokens, all classes' when empty), the
    ``cell_emb`` that ``scprint predict`` writes. Not ``net.cell_embedding`` (mean of all
    cell tokens): that mean includes the depth token, a function of the library size
    alone. The bound method holds no weights: the module's net is the one being adapted."""
    return module.cell_embedding


def cell_embedding(
    net: nn.Module, read: Readout, genes: torch.Tensor, x: torch.Tensor, depth: torch.Tensor
) -> torch.Tensor:
    """(B, L) gene indices, (B, L) counts, (B,) depth -> (B, D) cell embedding."""
    cell_states, _ = net.encode(genes.long(), x, depth)  # (B, C, D), (B, L, D)
    return read(cell_states)


def embedding_width(net: nn.Module, read: Readout) -> int:
    """D of :func:`cell_embedding`, measured on one tiny fake cell (no config key needed)."""
    device = next(net.parameters()).device
    genes = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        return cell_embedding(
            net, read, genes, torch.ones(1, 1, device=device), torch.ones(1, device=device)
        ).shape[-1]


def lora_targets(net: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of the nn.Linear layers inside the transformer blocks (attention
    projections and MLP layers): every Linear under an nn.ModuleList of same-class blocks.
    Decoders, classifier heads and input encoders are left out."""
    targets = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        for sub, layer in module.named_modules(prefix=name):
            if isinstance(layer, nn.Linear):
                targets.append(f"{prefix}{sub}")
    if not targets:
        raise ValueError(
            "found no nn.Linear inside a stack of transformer blocks (an nn.ModuleList) of "
            f"{type(net).__name__}: set lora.target_modules by hand"
        )
    return targets
