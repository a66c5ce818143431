"""ValidationMetrics (the `validation:` config section): upstream scPRINT's validation
metrics, computed on the validation split at the end of every validation loop.

During the loop it encodes up to ``max_cells`` validation cells once more without noise
(class predictions, cell embeddings, true labels) and up to ``denoise_cells`` cells from
a downsampled copy (reconstruction). At the loop's end every rank gathers all ranks' cells
and computes the same metrics (scprint.model.metrics), logged as ``val/acc/<class>``,
``val/acc`` (their mean), ``val/knn/<class>``, ``val/denoise`` (+ ``/reco2full``,
``/noisy2full``). Each loop's metrics are also kept in ``history`` (saved in checkpoints,
so a resumed run keeps the earlier loops), which `scprint train-run` writes to
results/train/<run>.json. The sanity-check loop before training is not measured; with
``before_training`` a full validation loop runs before the first training step instead,
logged at step 0 like any other (val_loss included).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from scprint.model import metrics, readout
from scprint.model.losses import label_sets


class ValidationMetrics(L.Callback):
    def __init__(
        self,
        max_cells: int = 100_000,
        denoise_cells: int = 1_000,
        noise: float = 0.6,
        knn_k: int = 10,
        knn_class: str = "cell_type_ontology_term_id",
        before_training: bool = False,
    ):
        """
        Args:
            max_cells: validation cells (all ranks together) whose class predictions and
                embeddings are kept for accuracy and kNN; 0 turns these metrics off.
                Upstream keeps 100,000.
            denoise_cells: validation cells (all ranks together) also encoded from a
                downsampled copy for the denoising score (their non-zero gene tokens are
                kept: 3 values each); 0: off.
            noise: share of the counts removed for the denoising score (binomial
                downsampling, seeded by the batch's counts: every loop, and any number of
                GPUs, sees the same noise).
            knn_k: neighbours of the kNN label accuracy on cell embeddings.
            knn_class: the class (obs column) kNN predicts; leaf labels only. Not
                measured if the model does not predict it.
            before_training: also validate once before the first training step (a fresh
                run only, not a resumed one), so every validation metric's first value
                is the model's before this run trained it (untrained, or the
                ``init_from`` checkpoint) and "first -> last" in results/train/<run>.json
                is what training changed. An untrained model's cell embeddings carry no
                cell-type information (its class tokens barely depend on the cell), so
                its kNN is near chance (demo: 0.04-0.18 for 13 types): the kNN's rise
                from there is what training put into the embedding. Off (upstream): the
                first values are those of the first scheduled validation
                (``trainer.val_check_interval`` steps in).
        """
        super().__init__()
        if max_cells < 0 or denoise_cells < 0:
            raise ValueError("validation.max_cells and validation.denoise_cells must be >= 0")
        if not 0.0 < noise < 1.0:
            raise ValueError(f"validation.noise={noise}: a share of counts in (0, 1)")
        if knn_k < 1:
            raise ValueError(f"validation.knn_k={knn_k}: must be >= 1")
        self.max_cells, self.denoise_cells, self.noise = max_cells, denoise_cells, noise
        self.knn_k, self.knn_class = knn_k, knn_class
        self.before_training = before_training
        self.history: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._kept = {"pred": [], "true": [], "emb": [], "denoise": []}
        self._n_cells = self._n_denoise = 0

    def _measuring(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (self.max_cells > 0 or self.denoise_cells > 0)

    # ---- before training: the untrained model's values ---------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not self.before_training or trainer.global_step > 0 or self.history:
            return  # off, or a resumed run: its step-0 loop ran at its first start
        # what the training epoch loop does around a scheduled validation (its
        # on_advance_end); the loop logs at step 0, hands the model back in train mode,
        # and runs nothing when there are no validation batches
        trainer.validating = True
        logger_connector = trainer._logger_connector
        first_loop_iter = logger_connector._first_loop_iter
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        logger_connector._first_loop_iter = first_loop_iter

    # ---- during the loop: keep what the metrics need ------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self._measuring(trainer):
            return
        world, n = trainer.world_size, batch["x"].shape[0]
        take = max(0, min(n, math.ceil(self.max_cells / world) - self._n_cells))
        take_denoise = max(0, min(n, math.ceil(self.denoise_cells / world) - self._n_denoise))
        net = pl_module.net
        with trainer.precision_plugin.forward_context():
            if take > 0:
                cells = _first(batch, take)
                cell_states, _ = readout.encode(net, cells)
                logits = readout.class_logits(net, cell_states)
                if logits:
                    preds = torch.stack([v.argmax(-1) for v in logits.values()], 1)
                    self._kept["pred"].append(preds)
                    self._kept["true"].append(cells["class"][:, : len(logits)].long())
                self._kept["emb"].append(readout.cell_embedding(pl_module, cell_states).float())
                self._n_cells += take
            if take_denoise > 0:
                cells = _first(batch, take_denoise)
                x = cells["x"].float()
                gen = torch.Generator(device=x.device)  # seeded by the cells themselves:
                gen.manual_seed(int(x.sum()) % 2**31)  # same noise whatever the rank or order
                noisy = torch.binomial(x, torch.full_like(x, 1.0 - self.noise), generator=gen)
                _, gene_states = readout.encode(net, cells, noisy)
                reco = readout.expected_counts(net, gene_states, x.sum(-1))
                seen = x != 0  # the metric reads only these entries: keep only them
                entries = torch.stack([reco[seen].float(), noisy[seen], x[seen]], dim=-1)
                self._kept["denoise"].append(entries)  # (entries, 3)
                self._n_denoise += take_denoise

    # ---- at the loop's end: gather, measure, log ---------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._measuring(trainer):
            return
        kept = {
            k: gather_rows(pl_module, _cat(v), torch.long if k in ("pred", "true") else torch.float)
            for k, v in self._kept.items()
        }
        self._reset()
        hp = pl_module.hparams
        classes = dict(hp.get("classes") or {})
        hierarchy = hp.get("labels_hierarchy") or {}
        out: dict[str, float] = {}
        if kept["pred"].numel():
            for i, (name, n_leaves) in enumerate(classes.items()):
                sets = label_sets(n_leaves, hierarchy.get(name))
                out[f"acc/{name}"] = metrics.hierarchical_accuracy(
                    kept["pred"][:, i], kept["true"][:, i], sets
                )
            accs = [v for v in out.values() if not math.isnan(v)]
            out["acc"] = sum(accs) / len(accs) if accs else math.nan
            if self.knn_class in classes:
                true = kept["true"][:, list(classes).index(self.knn_class)]
                leaves = true.masked_fill(true >= classes[self.knn_class], -1)  # no parents
                out[f"knn/{self.knn_class}"] = metrics.knn_accuracy(kept["emb"], leaves, self.knn_k)
        if kept["denoise"].numel():
            reco, noisy, full = kept["denoise"].unbind(-1)
            score = metrics.denoise_score(reco, noisy, full)
            out["denoise"] = score["score"]
            out["denoise/reco2full"] = score["reco2full"]
            out["denoise/noisy2full"] = score["noisy2full"]
        finite = {k: v for k, v in out.items() if not math.isnan(v)}
        for name, value in finite.items():
            # every rank computed the same value from the same gathered cells
            pl_module.log(f"val/{name}", value, sync_dist=True)
        self.history.append(
            {
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "n_cells": int(kept["emb"].shape[0]),
                "n_denoise_entries": int(kept["denoise"].shape[0]),
                **{k: (None if math.isnan(v) else v) for k, v in out.items()},
            }
        )

    # ---- checkpoints: a resumed run keeps the earlier loops' metrics -------------------
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def _first(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items() if torch.is_tensor(v)}


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of one kind kept on this rank; an empty (0, 0) tensor when none."""
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def gather_rows(pl_module: L.LightningModule, rows: torch.Tensor, dtype) -> torch.Tensor:
    """Every rank's ``rows`` (n_rank, F) as ``dtype``, concatenated in rank order, on every
    rank. all_gather needs one shape on all ranks: pad each to the largest, gather, trim."""
    if pl_module.trainer.world_size == 1:
        return rows.to(dtype)
    device = pl_module.device
    shapes = pl_module.all_gather(torch.tensor(rows.shape, device=device))  # (W, 2)
    n_max, width = (int(v) for v in shapes.max(0).values)
    padded = torch.zeros(n_max, width, dtype=dtype, device=device)
    padded[: rows.shape[0], : rows.shape[1]] = rows.to(device, dtype)
    gathered = pl_module.all_gather(padded)  # (W, n_max, F)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(shapes[:, 0].tolist())])
