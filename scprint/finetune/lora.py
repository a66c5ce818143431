"""The fine-tuned network: a pre-trained scPRINT with peft LoRA adapters on its transformer
blocks and a new linear head on the cell embedding; saving it as an adapter (small) or
merged into a checkpoint that loads like any other (``ScPrintModule.load``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from scprint.io import atomic_path
from scprint.model import readout
from scprint.model.checkpoint import load_checkpoint

Readout = Callable[[torch.Tensor], torch.Tensor]  # (B, C, D) cell token states -> (B, D)


@dataclass
class LoraSettings:
    """peft LoRA on the transformer blocks' Linear layers.

    Args:
        r: rank of each adapter (its trainable matrices are r x in and out x r).
        alpha: scaling numerator: the update is (alpha / r) * B @ A.
        dropout: dropout on the adapters' input; 0 by default: peft then feeds the layer's
            input to the adapter as is, where any other value keeps a dropped-out copy of
            every adapted layer's input for backward (bench/results/finetune.json: the steps
            add 1.15-1.38x the memory they add with 0).
        target_modules: peft target_modules (names or name suffixes of nn.Linear layers);
            null: every Linear inside the transformer blocks (attention and MLP).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


class Head(nn.Module):
    """The new classifier: a Linear layer on the cell embedding standardised with the
    frozen model's per-dimension mean and scale over the training cells, as the linear
    probe sees it. It starts as that probe (:meth:`start_from`, "LP-FT"): a head starting
    from zero sends large, uninformed gradients into the adapters, and the standardisation
    amplifies every change of the embedding by 1 / scale (~2,000x for the demo's barely
    trained model, whose cells differ by ~5e-4 per dimension), so fine-tuning collapsed."""

    def __init__(self, d: int, n_labels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        self.linear = nn.Linear(d, n_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.linear((emb - self.mean) / self.scale)

    @torch.no_grad()
    def start_from(self, probe) -> None:
        """Copy a fitted ``linear_probe`` (StandardScaler + LogisticRegression)."""
        scaler, logistic = probe[0], probe[-1]
        self.mean.copy_(torch.as_tensor(scaler.mean_))
        self.scale.copy_(torch.as_tensor(scaler.scale_))
        self.linear.weight.copy_(torch.as_tensor(logistic.coef_))
        self.linear.bias.copy_(torch.as_tensor(logistic.intercept_))


class Classifier(nn.Module):
    """The pre-trained network plus a new head: (B, L) cells -> (B, K) label logits.

    ``read`` picks the cell embedding (B, D) from the cell token states (B, C, D);
    default: the bare network's mean of all cell tokens."""

    def __init__(self, net: nn.Module, n_labels: int, read: Readout | None = None):
        super().__init__()
        self.net = net
        self.read = read or net.cell_embedding
        self.head = Head(net.cfg.d_model, n_labels)

    @classmethod
    def of(cls, module, n_labels: int) -> Classifier:
        """The classifier of a loaded ScPrintModule, on its prediction embedding (the
        ``cell_emb`` that ``scprint predict`` writes), not the network's mean of all cell
        tokens: that mean includes the depth token, a function of the library size alone.
        The partial holds no weights of its own: ``module.net`` is the one adapted."""
        return cls(module.net, n_labels, partial(readout.cell_embedding, module))

    def embed(self, genes, x, depth) -> torch.Tensor:  # (B, L) x 2, (B,) -> (B, D)
        cell_states, _ = readout.encode(self.net, {"genes": genes, "x": x, "depth": depth})
        return self.read(cell_states)

    def forward(self, genes, x, depth) -> torch.Tensor:  # (B, K)
        return self.head(self.embed(genes, x, depth))


def add_lora(model: Classifier, settings: LoraSettings):
    """Wrap ``model`` (in place) in a peft model: only the adapters and the head train."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or readout.lora_targets(model.net, prefix="net.")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=["head"],
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules={settings.target_modules}: {err}") from err


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def save_merged(
    peft_model, base_checkpoint: str | Path, out: str | Path, finetune_info: dict
) -> None:
    """The base checkpoint with LoRA merged into its weights; the head, its labels and the
    LoRA settings go under checkpoint["finetune"] (ScPrintModule.load ignores the key)."""
    merged = peft_model.merge_and_unload()  # peft: W + (alpha / r) B A, adapters removed
    base = torch.load(base_checkpoint, map_location="cpu", weights_only=False)
    state = {f"net.{k}": v.detach().cpu() for k, v in merged.net.state_dict().items()}
    if set(state) != set(base["state_dict"]):
        raise RuntimeError(
            f"merged weights do not match the checkpoint's keys: "
            f"{sorted(set(state) ^ set(base['state_dict']))[:5]}"
        )
    keep = ("hyper_parameters", "scprint", "pytorch-lightning_version", "hparams_name")
    checkpoint = {k: base[k] for k in keep if k in base}
    checkpoint.update(epoch=0, global_step=0, state_dict=state)
    checkpoint["finetune"] = {
        **finetune_info,
        "head": {k: v.detach().cpu() for k, v in merged.head.state_dict().items()},
    }
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)


def load_merged(path: str | Path, device: str = "cpu") -> tuple[Classifier, dict]:
    """A merged fine-tuned checkpoint -> (Classifier in eval mode, checkpoint["finetune"])."""
    info = torch.load(path, map_location="cpu", weights_only=False)["finetune"]
    module = load_checkpoint(path, device)
    model = Classifier.of(module, len(info["labels"]))
    model.head.load_state_dict(info["head"])
    return model.to(device).eval(), info


def load_adapter(base_checkpoint: str | Path, adapter_dir: str | Path, n_labels: int, device="cpu"):
    """Base checkpoint + saved adapter -> the peft model, in eval mode."""
    from peft import PeftModel

    module = load_checkpoint(base_checkpoint, device)
    model = Classifier.of(module, n_labels).to(device)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
