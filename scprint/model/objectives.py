"""Upstream scPRINT 2.3.8's pre-training step: its passes, noise model and loss terms.

One training step runs, in upstream's order (``_full_training``):

1. with ``run_full_forward``, a pass on the cells as they are (no expression loss);
2. one pass per ``mask_ratio`` (a ratio, or "TF": 30% of the tokens drawn with TFs 20x
   as likely): the input is a downsampled copy (``downsample(x, 0.5, randsamp=True)``,
   when ``do_denoise``) with the masked tokens' expression hidden; ZINB loss on every token
   of that copy;
3. with ``do_denoise``, one pass per ``noise`` level: input ``downsample(x, level)``, ZINB
   loss against the original counts;
4. with ``do_generate``, expression decoded from the last pass's cell tokens alone
   (``run_full_forward``: the clean pass's), ZINB loss against the original counts.

Every pass adds ``class_embd_diss_scale`` x the independence of its cell tokens and, with
``do_ecs``, ``ecs_scale`` x ECS of its cell embedding; the first pass alone adds
``class_scale`` x the classification loss summed over classes (and the adversarial class
loss, MVC). CCE (``cce_scale``) contrasts the cell embeddings of every pair of passes.
Everything is summed: ``loss`` is upstream's ``total_loss``. Term names are upstream's
(``denoise_60%_expr``, ``mask_TF_cls``, ``gen_emb_independence``, ``cce``...).

The random parts (downsampling, masks, the context length) go through ``Corruption``,
drawn in upstream's order from torch's generator; tests replay upstream's own draws
through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scprint.model import losses
from scprint.model.model import ScPrint

TF_MASK_RATIO = 0.3  # upstream's "TF" masking hides 30% of the tokens
TF_INV_WEIGHT = 0.05  # ... a non-TF gene is drawn 1/20 as often as a TF
MIN_CONTEXT = 400  # var_context_length draws a length in [400, L)


@dataclass
class Objectives:
    """The loss side of ``scprint_training`` (upstream TrainingMode's keys and defaults)."""

    do_denoise: bool = True
    noise: list[float] = field(default_factory=lambda: [0.6])
    mask_ratio: list[float | str] = field(default_factory=list)
    run_full_forward: bool = False
    do_generate: bool = True
    do_cls: bool = True
    class_scale: float = 1.0
    class_embd_diss_scale: float = 0.1
    do_adv_cls: bool = False
    adv_class_scale: float = 0.1
    do_mvc: bool = False
    mvc_scale: float = 1.0
    do_cce: bool = False
    cce_temp: float = 0.2
    cce_scale: float = 0.1
    do_ecs: bool = False
    ecs_threshold: float = 0.4
    ecs_scale: float = 0.1
    zinb_and_mse: bool = False
    var_context_length: bool = False

    def __post_init__(self):
        self.noise = [float(p) for p in self.noise]
        self.mask_ratio = [r if r == "TF" else float(r) for r in self.mask_ratio]
        for p in self.noise:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"scprint_training.noise: levels in [0, 1), got {p}")
        for r in self.mask_ratio:
            if r != "TF" and not 0.0 < r < 1.0:
                raise ValueError(
                    f"scprint_training.mask_ratio: ratios in (0, 1) or 'TF', got {r!r}"
                )
        if not self.passes():
            raise ValueError(
                "scprint_training: no pass sees the cells (do_denoise is false or noise is "
                "empty, mask_ratio is empty and run_full_forward is false): nothing to train. "
                "Set noise: [0.6] with do_denoise: true, a mask_ratio, or run_full_forward: true"
            )

    def passes(self) -> list[tuple[str, float | str | None]]:
        """The encoder passes of a step, in upstream's order: (kind, level)."""
        out: list[tuple[str, float | str | None]] = []
        if self.run_full_forward:
            out.append(("full", None))
        out += [("mask", r) for r in self.mask_ratio]
        if self.do_denoise:
            out += [("denoise", p) for p in self.noise]
        return out

    def uses_expression_decoder(self) -> bool:
        return self.do_generate or any(kind != "full" for kind, _ in self.passes())


def set_trainable(net: ScPrint, obj: Objectives) -> None:
    """Freeze the modules no active objective uses, so every trainable parameter gets a
    gradient each step (plain DDP, no find_unused_parameters) and the optimizer skips them
    (upstream passes them to AdamW, which skips parameters without gradients: same steps)."""
    if obj.do_mvc and net.mvc_decoder is None:
        raise ValueError(
            "scprint_training.do_mvc is on but the model has no MVC decoder: set "
            "model.mvc_decoder: 'inner product' (or do_mvc: false)"
        )
    usage = {
        net.expr_decoder: obj.uses_expression_decoder(),
        net.cls_decoders: obj.do_cls,
    }
    if net.mvc_decoder is not None:
        usage[net.mvc_decoder] = obj.do_mvc
    for module, used in usage.items():
        module.requires_grad_(used)
    net.gene_encoder.embeddings.weight.requires_grad_(not net.cfg.freeze_embeddings)


# ---- the random parts of a step -----------------------------------------------------------
def downsample(x: torch.Tensor, noise: float, randsamp: bool = False) -> torch.Tensor:
    """Upstream's noise model ("new" downsample_profile): each gene loses
    Poisson(0.55 noise x) counts and is zeroed outright with probability 0.55 noise
    (noise 0.6 removes about half the counts and a third of the genes, high counts
    included). ``randsamp``: the level of each element is drawn uniformly in [0, noise).
    Draws, in order: (randsamp: uniform), Poisson, uniform: upstream's."""
    level: float | torch.Tensor = noise
    if randsamp:
        level = torch.rand(x.shape, device=x.device) * noise
    level = level * 1.1
    removed = torch.poisson(x * (level / 2)).int()
    kept = (torch.rand(x.shape, device=x.device) >= level / 2).int()
    return ((x - removed) * kept).clamp(min=0)


class Corruption:
    """Draws the noise, masks and context length of a step (torch's generator)."""

    downsample = staticmethod(downsample)

    def mask(self, shape: torch.Size, ratio: float, device) -> torch.Tensor:
        """(B, L) bool, each token hidden with probability ``ratio``."""
        return (torch.rand(shape) < ratio).to(device)

    def tf_mask(self, weights: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B, L) bool: exactly int(L ratio) tokens per cell, drawn without replacement with
        probability proportional to ``weights`` (B, L)."""
        n = int(weights.shape[1] * ratio)
        picked = torch.multinomial(weights / weights.sum(1, keepdim=True), n, replacement=False)
        return torch.zeros(weights.shape, dtype=torch.bool, device=weights.device).scatter_(
            1, picked, True
        )

    def context_length(self, length: int) -> int:
        return int(torch.randint(MIN_CONTEXT, length, (1,)).item())


def _pct(level: float | str) -> str:
    return "TF" if level == "TF" else f"{int(level * 100)}%"


def compute_losses(
    net: ScPrint,
    batch: dict[str, torch.Tensor],
    obj: Objectives,
    label_sets: dict[str, torch.Tensor],
    *,
    step: int = 0,
    tf_weights: torch.Tensor | None = None,
    corruption: Corruption | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms under upstream's names (unscaled) and ``loss``, the scaled sum.

    ``step``: the optimizer step (var_context_length shortens the context when it is a
    multiple of 5); ``tf_weights``: (n_genes,) draw weight of each gene for "TF" masking.
    """
    draw = corruption or Corruption()
    x, genes = batch["x"].float(), batch["genes"].long()  # (B, L)
    if obj.var_context_length and step % 5 == 0 and x.shape[1] > MIN_CONTEXT:
        length = draw.context_length(x.shape[1])
        x, genes = x[:, :length], genes[:, :length]
    total_count = batch["depth"].float() if "depth" in batch else x.sum(-1)  # (B,)
    library = x.sum(-1)  # (B,) counts over the cell's tokens: upstream's depth_mult
    classes = batch.get("class")
    identity = net.gene_identity(genes)  # 2 x (B, L, D), shared by every pass of this step

    terms: dict[str, torch.Tensor] = {}
    total = x.new_zeros(())
    cell_embs: list[torch.Tensor] = []  # (B, D) per pass, for CCE
    first = True
    cell_states = None
    full_cell_states = None

    def pass_losses(prefix, cell_states, decoded, target, mvc_library):
        """upstream's _compute_loss for one pass; returns its scaled total."""
        nonlocal first
        tot = x.new_zeros(())
        if decoded is not None:
            expr = losses.zinb_nll(target, **decoded).mean()
            if obj.zinb_and_mse:
                expr = expr + losses.zinb_mean_mse(decoded, target) / 10
            terms[f"{prefix}expr"] = expr
            tot = tot + expr
        if net.cfg.classes:
            indep = losses.within_sample(cell_states)
            terms[f"{prefix}emb_independence"] = indep
            tot = tot + obj.class_embd_diss_scale * indep
        if first and obj.do_cls and net.cfg.classes:
            logits = net.classify(cell_states)
            cls = sum(
                losses.classification(logits[name], classes[:, i], label_sets[name])
                for i, name in enumerate(net.cfg.classes)
            )
            terms[f"{prefix}cls"] = cls
            tot = tot + obj.class_scale * cls
            if obj.do_adv_cls:
                adv = adversarial_classification(net, cell_states, classes, label_sets)
                terms[f"{prefix}adv_cls"] = adv
                tot = tot + obj.adv_class_scale * adv
        if first and obj.do_mvc:
            mvc_out = net.decode_mvc(genes, net.cell_embedding(cell_states), mvc_library, identity)
            mvc = losses.zinb_nll(target, **mvc_out).mean()
            terms[f"{prefix}expr_mvc"] = mvc
            tot = tot + obj.mvc_scale * mvc
        if obj.do_ecs:
            ecs = losses.ecs(net.cell_embedding(cell_states), obj.ecs_threshold)
            terms[f"{prefix}ecs"] = ecs
            tot = tot + obj.ecs_scale * ecs
        first = False
        cell_embs.append(net.cell_embedding(cell_states))
        return tot

    for kind, level in obj.passes():
        if kind == "full":
            cell_states, _ = net.encode(genes, x, total_count, None, identity)
            total = total + pass_losses("full_forward_", cell_states, None, x, library)
            full_cell_states = cell_states
        elif kind == "mask":
            seen = draw.downsample(x, 0.5, randsamp=True) if obj.do_denoise else x
            if level == "TF":
                weights = tf_weights[genes] if tf_weights is not None else torch.ones_like(x)
                mask = draw.tf_mask(weights.float(), TF_MASK_RATIO)
            else:
                mask = draw.mask(genes.shape, level, genes.device)
            seen_library = seen.sum(-1)
            cell_states, gene_states = net.encode(genes, seen, seen_library, mask, identity)
            decoded = net.decode_expression(gene_states, seen_library)
            total = total + pass_losses(
                f"mask_{_pct(level)}_", cell_states, decoded, seen, seen_library
            )
        else:
            seen = draw.downsample(x, level)
            cell_states, gene_states = net.encode(genes, seen, total_count, None, identity)
            decoded = net.decode_expression(gene_states, library)
            total = total + pass_losses(f"denoise_{_pct(level)}_", cell_states, decoded, x, library)

    if obj.do_generate:
        source = full_cell_states if full_cell_states is not None else cell_states
        gen_cells, gen_genes = net.generate(genes, source, identity)
        decoded = net.decode_expression(gen_genes, library)
        total = total + pass_losses("gen_", gen_cells, decoded, x, library)

    if obj.do_cce:
        pairs = [
            losses.contrastive(a, b, obj.cce_temp)
            for i, a in enumerate(cell_embs)
            for b in cell_embs[i + 1 :]
        ]
        cce = torch.stack(pairs).mean() if pairs else x.new_zeros(())
        terms["cce"] = cce
        total = total + obj.cce_scale * cce

    terms["loss"] = total
    return terms


def adversarial_classification(
    net: ScPrint,
    cell_states: torch.Tensor,  # (B, C, D)
    classes: torch.Tensor,  # (B, n_classes) label codes
    label_sets: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Upstream's do_adv_cls: each class head reads the mean of the *other* class tokens
    through a gradient reversal, so those tokens learn to hide that class."""
    class_tokens = cell_states[:, 2:]  # (B, n_classes, D)
    names = list(net.cfg.classes)
    total = cell_states.new_zeros(())
    for j, name in enumerate(names):
        others = torch.ones(len(names), dtype=torch.bool)
        others[j] = False
        mean_others = losses.grad_reverse(class_tokens[:, others].mean(dim=1))  # (B, D)
        logits = net.cls_decoders[name](mean_others)
        total = total + losses.classification(logits, classes[:, j], label_sets[name])
    return total
