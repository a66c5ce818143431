"""Upstream scPRINT 2.3.8's training, as its ``scprint fit`` builds it, from given weights.

Runs INSIDE the upstream venv (.bench-venv-seed) as ``python -I bench/upstream_recipe.py
SPEC.json``; bench/recipe.py writes SPEC and reads the curve this writes. Self-contained on
purpose (our package has the same import name): it imports nothing of this repository but
bench/seed_step.py's torchvision stand-in.

What upstream's ``scprint fit`` does, built by hand so the weights can be given without its
``ckpt_path`` (which would also restore an optimizer and a step): scdataloader's DataModule
on the laminDB collection (LAMIN_SETTINGS_DIR: the pipeline's SQLite instance), the model
from an exported checkpoint (``scPrint.load_from_checkpoint``: weights only, a fresh
optimizer), upstream's TrainingMode callback with the recipe's keys, its EarlyStopping
group (no LearningRateMonitor: it logs only, and refuses a Trainer without a logger), a
Lightning Trainer. Neutralised, and only these:
- ``hparams.lr`` is set to ``scprint_training.lr`` (upstream's optimizer reads the model's
  lr, never TrainingMode's);
- ``log_adata`` (UMAP/Leiden images, per-class accuracy of the validation cells, run at each
  validation end) returns nothing, and ``test_every`` is larger than the run (its external
  benchmark suite, utils.test, never runs): side effects, not losses;
- torch 2.13's Sampler takes no argument, which scdataloader's LabelWeightedSampler passes:
  ``Sampler.__init__`` is given one that accepts it;
- torch 2.13's ReduceLROnPlateau takes no ``verbose``, which upstream passes: dropped;
- transformer "normal", fp32 (the flash kernel and the fp16 default need a GPU);
- the gene table is frozen or learned as ``model.freeze_embeddings`` says (its own fit
  freezes a table read from embeddings; an exported checkpoint loads as a learned one).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_step import shim_torchvision  # noqa: E402


def main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    import numpy as np
    import torch

    shim_torchvision()
    import lightning as L
    from lightning.pytorch.callbacks import Callback, EarlyStopping
    from torch.utils.data import Sampler

    Sampler.__init__ = lambda self, data_source=None: None  # scdataloader passes None

    class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        """torch 2.13's takes no ``verbose``, which upstream's configure_optimizers passes."""

        def __init__(self, *args, verbose=None, **kwargs):
            super().__init__(*args, **kwargs)

    torch.optim.lr_scheduler.ReduceLROnPlateau = ReduceLROnPlateau

    from scdataloader import DataModule

    from scprint import scPrint
    from scprint.trainer import TrainingMode

    class QuietScPrint(scPrint):
        """Upstream's model without its validation-end plotting (losses untouched)."""

        def log_adata(self, *args, **kwargs):
            return None

    training = spec["scprint_training"]
    L.seed_everything(spec["seed"])
    model = QuietScPrint.load_from_checkpoint(
        spec["checkpoint"],
        map_location="cpu",
        transformer="normal",
        lr=training["lr"],
        dropout=spec["dropout"],
    )
    data = spec["data"]
    dm = DataModule(**data, gene_subset=list(model.genes))  # its Collator's valid genes
    keep = set(model.genes)  # the Collator indexes them in the gene table's order
    dm.gene_subset = [g for g in dm.dataset.genedf.index if g in keep]
    permute_genes(model, dm.gene_subset, torch)
    # its `scprint fit` builds the gene table from precpt_gene_emb, frozen by
    # freeze_embeddings; load_from_checkpoint of an export builds a plain, learned one
    model.gene_encoder.embeddings.weight.requires_grad_(not spec["freeze_embeddings"])

    curve: list[dict] = []

    class RecordValLoss(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            curve.append(
                {
                    "step": int(trainer.global_step),
                    "val_loss": float(trainer.callback_metrics["val_loss"]),
                    "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
                    "seconds": time.perf_counter() - started,
                }
            )

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[
            TrainingMode(**training),
            EarlyStopping(monitor="val_loss", **spec["early_stopping"]),
            RecordValLoss(),
        ],
        **spec["trainer"],
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    valid = np.asarray(dm.valid_idx).tolist()
    out = {
        "curve": curve,
        "seconds": time.perf_counter() - started,
        "valid_idx": valid,
        "torch": torch.__version__,
        "steps": int(trainer.global_step),
    }
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def permute_genes(model, genes: list[str], torch) -> None:
    """Put the model's gene axis in ``genes``' order (the gene table's, which the Collator
    indexes): every parameter and buffer with one row per gene is permuted alike, which
    leaves the model the same function of (gene name, expression)."""
    old = list(model.genes)
    if old == genes:
        return
    if sorted(old) != sorted(genes):
        raise SystemExit("the DataModule's genes are not the checkpoint's")
    index = {g: i for i, g in enumerate(old)}
    perm = torch.tensor([index[g] for g in genes])
    with torch.no_grad():
        tensors = [t for _, t in [*model.named_parameters(), *model.named_buffers()]]
        pe = getattr(getattr(model, "pos_encoder", None), "pe", None)  # per gene
        if pe is not None and not any(pe is t for t in tensors):
            tensors.append(pe)
        for tensor in tensors:
            if tensor.ndim and tensor.shape[0] == len(old):
                tensor.copy_(tensor[perm].clone())
    if model.gene_pos_enc is not None:
        model.gene_pos_enc = [model.gene_pos_enc[i] for i in perm.tolist()]
    model.genes = genes


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
