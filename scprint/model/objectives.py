"""Which pre-training objectives run, and the losses they produce for one batch.

A *view* is one corrupted copy of the batch the encoder sees: one per noise level
(denoising: counts downsampled, the model predicts the originals) and one per mask ratio
(masked expression: a share of the expression values hidden, predicted where hidden).
Every view also feeds classification and MVC; generation decodes the first view's cell
tokens; CCE contrasts the first two views; ECS acts on the first view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scprint.model import losses
from scprint.model.model import ScPrint

LOSS_NAMES = ("denoise", "mask", "generate", "cls", "mvc", "cce", "ecs")


@dataclass
class Objectives:
    noise: list[float] = field(default_factory=lambda: [0.6])  # [] turns denoising off
    mask_ratio: list[float] = field(default_factory=list)  # [] turns masking off
    do_generate: bool = True
    do_cls: bool = True
    do_mvc: bool = False
    do_cce: bool = False
    do_ecs: bool = False
    denoise_scale: float = 1.0
    mask_scale: float = 1.0
    generate_scale: float = 1.0
    cls_scale: float = 1.0
    mvc_scale: float = 1.0
    cce_scale: float = 1.0
    ecs_scale: float = 1.0
    cce_temp: float = 0.2
    ecs_threshold: float = 0.3

    def __post_init__(self):
        for p in [*self.noise, *self.mask_ratio]:
            if not 0.0 < p < 1.0:
                raise ValueError(f"noise levels and mask ratios must be in (0, 1), got {p}")
        if self.do_cce and len(self.noise) + len(self.mask_ratio) < 2:
            raise ValueError(
                "do_cce contrasts two views of each cell: give at least two noise levels / mask "
                "ratios in total (e.g. noise: [0.6] and mask_ratio: [0.3])"
            )
        if not any(self.active().values()):
            raise ValueError("every objective is switched off: nothing to train")

    def active(self) -> dict[str, bool]:
        return {
            "denoise": bool(self.noise),
            "mask": bool(self.mask_ratio),
            "generate": self.do_generate,
            "cls": self.do_cls,
            "mvc": self.do_mvc,
            "cce": self.do_cce,
            "ecs": self.do_ecs,
        }

    def scale(self, name: str) -> float:
        return getattr(self, f"{name}_scale")


def set_trainable(net: ScPrint, obj: Objectives) -> None:
    """Freeze the modules no active objective uses, so every trainable parameter gets a
    gradient each step (plain DDP, no find_unused_parameters) and the optimizer skips them."""
    on = obj.active()
    if on["mvc"] and net.mvc_decoder is None:
        raise ValueError(
            "scprint_training.do_mvc is on but the model has no MVC decoder: set "
            "model.mvc_decoder: 'inner product' (or do_mvc: false)"
        )
    usage = {
        net.expr_decoder: on["denoise"] or on["mask"] or on["generate"],
        net.cls_decoders: on["cls"],
    }
    if net.mvc_decoder is not None:
        usage[net.mvc_decoder] = on["mvc"]
    for module, used in usage.items():
        module.requires_grad_(used)
    net.gene_encoder.embeddings.weight.requires_grad_(not net.cfg.freeze_embeddings)


def downsample(counts: torch.Tensor, noise: float) -> torch.Tensor:
    """Keep each count with probability 1 - noise (binomial thinning of the cell's reads)."""
    return torch.binomial(counts.float(), torch.full_like(counts.float(), 1.0 - noise))


def compute_losses(
    net: ScPrint,
    batch: dict[str, torch.Tensor],
    obj: Objectives,
    label_sets: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Loss terms by name (unscaled), ``loss`` (their scaled sum) and ``cls/<class>``."""
    x, genes = batch["x"].float(), batch["genes"].long()  # (B, L)
    depth = batch.get("depth")
    library = x.sum(-1)  # (B,) counts over the cell's L tokens: the decoders' target total
    views = [("denoise", downsample(x, p), None) for p in obj.noise]
    views += [("mask", x, torch.rand_like(x) < r) for r in obj.mask_ratio]
    if not views:  # only cell-level objectives: the encoder sees the cell as is
        views = [("plain", x, None)]

    identity = net.gene_identity(genes)  # 2 x (B, L, D), shared by every pass of this step
    terms: dict[str, list[torch.Tensor]] = {}
    cell_embs, first_cell_states = [], None
    for kind, seen, mask in views:
        cell_states, gene_states = net.encode(genes, seen, depth, mask, identity)
        first_cell_states = cell_states if first_cell_states is None else first_cell_states
        cell_emb = net.cell_embedding(cell_states)  # (B, D)
        cell_embs.append(cell_emb)
        if kind != "plain":
            nll = losses.zinb_nll(x, **net.decode_expression(gene_states, library))
            terms.setdefault(kind, []).append(losses.masked_mean(nll, mask))
        if obj.do_cls:
            for i, (name, logits) in enumerate(net.classify(cell_states).items()):
                loss = losses.hierarchical_bce(logits, batch["class"][:, i], label_sets[name])
                terms.setdefault(f"cls/{name}", []).append(loss)
        if obj.do_mvc:
            nll = losses.zinb_nll(x, **net.decode_mvc(genes, cell_emb, library, identity))
            terms.setdefault("mvc", []).append(nll.mean())

    if obj.do_generate:
        generated = net.generate(genes, first_cell_states, identity)  # (B, L, D)
        nll = losses.zinb_nll(x, **net.decode_expression(generated, library))
        terms["generate"] = [nll.mean()]
    if obj.do_cce:
        terms["cce"] = [losses.contrastive(cell_embs[0], cell_embs[1], obj.cce_temp)]
    if obj.do_ecs:
        terms["ecs"] = [losses.elastic_cell_similarity(cell_embs[0], obj.ecs_threshold)]

    out = {name: torch.stack(values).mean() for name, values in terms.items()}
    cls_terms = [v for k, v in out.items() if k.startswith("cls/")]
    if cls_terms:
        out["cls"] = torch.stack(cls_terms).mean()
    out["loss"] = sum(obj.scale(name) * out[name] for name in LOSS_NAMES if name in out)
    return out
