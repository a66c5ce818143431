"""What validation, prediction and fine-tuning read from the network, one function per use.

Everything outside the network that needs its outputs or its layout goes through these
functions, so a change of the network's interface (e.g. the upstream-parity model) is
adapted here only. Inputs are the batch dict of scprint.trainer (x, genes, depth, class).
Opening a checkpoint is scprint.model.checkpoint's (the Lightning module imports this one).
"""

from __future__ import annotations

import torch
from torch import nn


def encode(
    net: nn.Module, batch: dict, expression: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell token states (B, C, D), gene token states (B, L, D)) of the batch's cells,
    seeing ``expression`` (B, L) instead of batch["x"] when given (a noisy copy)."""
    x = batch["x"] if expression is None else expression
    return net.encode(batch["genes"].long(), x, batch.get("depth"))


def class_logits(net: nn.Module, cell_states: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class name -> leaf logits (B, K), in the model's class order."""
    return net.classify(cell_states)


def cell_embedding(module: nn.Module, cell_states: torch.Tensor) -> torch.Tensor:
    """The cell embedding (B, D) that predictions and upstream's validation kNN use: the
    ScPrintModule's (mean of the pred_embedding classes' tokens), not the network's mean
    of all cell tokens."""
    return module.cell_embedding(cell_states)


def expected_counts(
    net: nn.Module, gene_states: torch.Tensor, library: torch.Tensor
) -> torch.Tensor:
    """The expression decoder's mean counts (B, L) for a cell of ``library`` total counts."""
    return net.decode_expression(gene_states, library)["mean"]


def label_names(codes: torch.Tensor, decoder: dict[int, str] | None) -> list[str]:
    """Leaf codes (B,) -> label names (ontology ids); "code:<n>" where the checkpoint has
    no name for a code (trained before label names were kept)."""
    decoder = {int(k): v for k, v in (decoder or {}).items()}
    return [decoder.get(int(c), f"code:{int(c)}") for c in codes.tolist()]


def train_without_dropout(net: nn.Module) -> None:
    """Train mode (recomputation in backward included) with the network's own dropout
    off: its Dropout layers and the attention-weight dropout of the "normal" path."""
    from scprint.model.model import MHA

    net.train()
    for module in net.modules():
        if isinstance(module, nn.Dropout | MHA):
            module.eval()


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
