"""The `data:` section: scdataloader's DataModule on a laminDB collection, plus the gene
inputs of the model (embedding vocabulary, genomic positions).

We wrap scdataloader's DataModule instead of subclassing it so that laminDB is connected
(offline-capable, ``scprint.data.lamin.connect``) before scdataloader imports lamindb, and
to work around three of its traps with scdataloader 2.1.3 / torch 2.13:
- it requires organism_ontology_term_id in clss_to_predict (we add it first if missing);
- its LabelWeightedSampler calls ``Sampler.__init__(None)``, which torch 2.13 no longer
  accepts (we give it a base that does, see ``_weighted_sampler``);
- its ``__repr__`` raises when test_split=0 (ours does not call it).
"""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from scprint.io import StageError
from scprint.model.genes import gene_ranks

log = logging.getLogger(__name__)
ORGANISM = "organism_ontology_term_id"


class ScprintDataModule(L.LightningDataModule):
    def __init__(
        self,
        collection_name: str,
        organisms: list[str] | None = None,
        clss_to_predict: list[str] | None = None,
        hierarchical_clss: list[str] | None = None,
        clss_to_weight: list[str] | None = None,
        weight_scaler: int = 10,
        n_samples_per_epoch: int = 2_000_000,
        validation_split: float = 0.02,
        test_split: float = 0.0,
        how: str = "random expr",
        max_len: int = 2200,
        gene_embeddings: str | None = None,
        gene_positions: str | None = None,
        gene_position_tolerance: int | None = None,
        assays_to_drop: list[str] | None = None,
        replacement: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        sampler_workers: int | None = None,
        store_location: str | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        metacell_mode: float = 0.0,
        add_zero_genes: int = 0,
        do_gene_pos: str | None = None,
    ):
        """
        Args:
            collection_name: key of the laminDB collection (results/collection.json "key").
            organisms: organisms to train on (NCBITaxon ids); None: all in the collection.
            clss_to_predict: obs columns the model classifies (organism always included).
            hierarchical_clss: which of them use the ontology hierarchy (parent labels).
            clss_to_weight: obs columns whose rare values are oversampled.
            weight_scaler: balance of that oversampling (higher: more uniform); 0 samples
                the training split uniformly without replacement.
            n_samples_per_epoch: cells per epoch with weighted sampling.
            validation_split, test_split: share (float) or number (int) of cells held out;
                the test split takes whole datasets.
            how: which genes of a cell become tokens: "random expr", "most expr", "all".
            max_len: gene tokens per cell (expressed genes first, then unexpressed ones).
            gene_embeddings: parquet of gene embeddings; its index restricts the genes.
            gene_positions: parquet of genomic positions (`scprint gene-positions`), whose
                ``pos`` ranks are used as is; None: no position encoding.
            gene_position_tolerance: bp; genes whose start lies within this of the previous
                gene's start share a position (upstream's key): the ranks are recomputed
                from the file's coordinates with it. None: the file's ranks as built
                (`gene_positions.tolerance` of the workflow config).
            assays_to_drop: EFO ids of assays left out of training.
            replacement: weighted sampling with replacement.
            batch_size, num_workers: of every DataLoader.
            sampler_workers: processes building the weighted sampler's index (None: auto).
            store_location: folder caching the split and sampler indices between runs.
            pin_memory, prefetch_factor: of every DataLoader (prefetch only with workers).
            metacell_mode, add_zero_genes, do_gene_pos: upstream scPRINT keys this pipeline
                does not implement (metacells, extra zero genes, upstream's position file:
                use gene_positions); only their off value is accepted.
        """
        super().__init__()
        refused = {
            "metacell_mode": (metacell_mode, 0.0, "metacell sampling"),
            "add_zero_genes": (add_zero_genes, 0, "extra unexpressed genes per cell"),
            "do_gene_pos": (
                do_gene_pos,
                None,
                "upstream's position file (set data.gene_positions)",
            ),
        }
        for key, (value, off, what) in refused.items():
            if value != off:
                raise StageError(
                    f"data.{key}={value!r} is not supported: this pipeline does not implement "
                    f"upstream's {what}; leave it at {off!r}"
                )
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        from scprint.data.lamin import connect

        ln = connect()
        if ln.Collection.filter(key=collection_name, is_latest=True).first() is None:
            keys = sorted({c.key for c in ln.Collection.filter()})
            raise StageError(
                f"laminDB has no collection {collection_name!r} (it has: {keys or 'none'}): run "
                "the collection rule (`scprint collection`) or set data.collection_name"
            )
        import bionty as bt
        from scdataloader import DataModule

        unknown = [o for o in organisms or [] if bt.Organism.filter(ontology_id=o).first() is None]
        if unknown:
            raise StageError(
                f"data.organisms asks for {unknown}, which laminDB does not know (no genes, "
                f"no cells of collection {collection_name!r}): fix data.organisms"
            )

        clss_to_predict = list(clss_to_predict or [ORGANISM])
        if ORGANISM not in clss_to_predict:
            clss_to_predict.insert(0, ORGANISM)
        gene_subset = None
        if gene_embeddings is not None:
            gene_subset = pd.read_parquet(gene_embeddings, columns=[]).index.astype(str).tolist()
        self.inner = DataModule(
            collection_name=collection_name,
            organisms=organisms,
            clss_to_predict=clss_to_predict,
            hierarchical_clss=list(hierarchical_clss or []),
            clss_to_weight=list(clss_to_weight or [ORGANISM]),
            weight_scaler=weight_scaler,
            n_samples_per_epoch=n_samples_per_epoch,
            validation_split=validation_split,
            test_split=test_split,
            how=how,
            max_len=max_len,
            gene_subset=gene_subset,
            assays_to_drop=list(assays_to_drop if assays_to_drop is not None else ["EFO:0030007"]),
            replacement=replacement,
            sampler_workers=sampler_workers,
            store_location=store_location,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        present = set(self.inner.dataset.organisms)
        if organisms is not None and not set(organisms) <= present:
            raise StageError(
                f"data.organisms asks for {sorted(set(organisms) - present)} but collection "
                f"{collection_name!r} only holds {sorted(present)}: fix data.organisms"
            )
        # scdataloader concatenates the organisms' gene tables in the order of a set (its
        # class_topred), which string hashing changes from process to process: the gene
        # vocabulary, and so every checkpoint's gene table, would depend on the run. One
        # order: organisms sorted, each organism's genes as the table lists them.
        genedf = self.inner.dataset.genedf
        order = sorted(genedf["organism"].unique())
        if list(dict.fromkeys(genedf["organism"])) != order:
            genedf = pd.concat([genedf[genedf["organism"] == o] for o in order])
            self.inner.dataset.genedf = genedf
        if gene_subset is not None:
            # the collator indexes genes in the gene table's order: make dm.genes agree
            keep = set(gene_subset)
            self.inner.gene_subset = [g for g in genedf.index if g in keep]
            if not self.inner.gene_subset:
                raise StageError(
                    f"no gene of {gene_embeddings} is in the collection's gene table: the "
                    "embeddings were computed for other organisms or another gene id scheme"
                )
        self.how, self.max_len = how, max_len
        self.seed: int | None = None  # the run's (scprint.seeds.run_seed), set in setup()
        self.batches = None  # scprint.trainer.batches.BatchDataset, built in setup()
        self.gene_pos = None
        if gene_positions is not None:
            positions = pd.read_parquet(gene_positions)
            if gene_position_tolerance is not None:
                positions = rerank(positions, gene_position_tolerance, gene_positions)
            self.gene_pos = gene_ranks(positions, self.genes)
        log.info(
            "collection %s: %d cells, %d genes, classes %s",
            collection_name,
            self.inner.n_samples,
            len(self.genes),
            self.classes,
        )

    def __repr__(self) -> str:
        return f"ScprintDataModule({self.inner.collection_name!r}, {len(self.genes)} genes)"

    # ---- what the model needs (linked into `model:` by the CLI) -------------------------
    @property
    def genes(self) -> list[str]:
        return list(self.inner.genes)

    @property
    def classes(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.inner.classes.items()}

    @property
    def labels_hierarchy(self) -> dict[str, dict[int, list[int]]]:
        return {
            name: {int(parent): sorted(int(i) for i in leaves) for parent, leaves in tree.items()}
            for name, tree in self.inner.labels_hierarchy.items()
        }

    @property
    def label_decoders(self) -> dict[str, dict[int, str]]:
        """Class name -> {label code: name (ontology id)}, leaves, parents and -1 (unknown)."""
        decoders = self.inner.decoders
        return {name: {int(c): str(n) for c, n in decoders[name].items()} for name in self.classes}

    @property
    def organisms(self) -> list[str]:
        return sorted(str(o) for o in self.inner.dataset.organisms)

    # ---- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.inner.idx_full is None:
            self.inner.setup(stage)
        if self.seed is None:
            from scprint.seeds import run_seed

            self.seed = run_seed()
        if self.batches is None:
            from scprint.trainer.batches import from_scdataloader

            self.batches = from_scdataloader(self.inner, self.genes, self.how, self.max_len)
            if self.batches is None:
                log.warning("collection files are not local: using scdataloader's reader")
        if self.batches is not None:
            self.batches.seed = self.seed

    def _set_up(self) -> None:
        """A Trainer calls setup() before asking for loaders; a script need not."""
        if self.seed is None:
            self.setup("fit")

    # the run's seed rides in checkpoints: a resumed run draws what the first start would
    # have drawn even when seed_everything picked a new random seed (seed_everything: true)
    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
            if self.batches is not None:
                self.batches.seed = self.seed

    def train_dataloader(self):
        """Batches of the weighted sampler (or the training split in scdataloader's
        shuffled order when weight_scaler=0), read by :mod:`scprint.trainer.batches` (by
        scdataloader's reader and Collator when the files are not local), in a
        :class:`scprint.trainer.resume.ResumableLoader`: each epoch's cells are a function
        of (seed, epoch), shared out over the ranks, and a resumed run goes on from the
        checkpoint's batch with the same draws."""
        from scprint.trainer.resume import ResumableLoader, SeededCollate, SeededItems

        self._set_up()
        inner = self.inner
        if inner.clss_to_weight and inner.weight_scaler > 0:
            if self.batches is not None:
                sampler = self._weighted_sampler()
            else:
                sampler = self._label_weighted_sampler(inner.train_labels, inner.nnz)
            order = WeightedEpochs(sampler, self.seed)
        else:  # scdataloader's order: its shuffled split (the same every epoch)
            order = FixedEpochs(np.asarray(inner.idx_full))
        if self.batches is not None:
            from scprint.trainer.batches import passthrough

            dataset, collate = self.batches, passthrough
        else:
            dataset = SeededItems(inner.dataset, self.seed)
            collate = SeededCollate(inner.kwargs["collate_fn"])
        trainer = self.trainer
        return ResumableLoader(
            dataset,
            order,
            inner.kwargs["batch_size"],
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            collate_fn=collate,
            num_workers=inner.kwargs["num_workers"],
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            trained=None if trainer is None else partial(_epoch_batches_done, trainer),
        )

    def val_dataloader(self):
        return self._held_out_loader(self.inner.valid_idx, self.inner.val_dataloader)

    def test_dataloader(self):
        return self._held_out_loader(self.inner.test_idx, self.inner.test_dataloader)

    def _held_out_loader(self, indices, stock_loader):
        """A held-out split in order through the fast path; through scdataloader's reader
        and Collator (numpy seeded per batch) when the files are not local. Either way a
        batch's random genes are keyed by its cells (scprint.trainer.resume.batch_seed)."""
        self._set_up()
        if self.batches is not None:
            return [] if indices is None else self._loader(np.asarray(indices).tolist())
        stock = stock_loader()
        if not isinstance(stock, DataLoader):
            return stock
        from scprint.trainer.resume import SeededCollate, SeededItems

        kwargs = self.inner.kwargs
        return DataLoader(
            SeededItems(stock.dataset, self.seed),
            sampler=stock.sampler,
            batch_size=kwargs["batch_size"],
            num_workers=kwargs["num_workers"],
            collate_fn=SeededCollate(kwargs["collate_fn"]),
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if kwargs["num_workers"] else None,
        )

    def predict_dataloader(self):
        return self.inner.predict_dataloader()

    def _loader(self, sampler):
        from scprint.trainer.batches import passthrough

        return DataLoader(
            self.batches,
            sampler=sampler,
            batch_size=self.inner.kwargs["batch_size"],
            num_workers=self.inner.kwargs["num_workers"],
            collate_fn=passthrough,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.inner.kwargs["num_workers"] else None,
        )

    def _weighted_sampler(self):
        """scdataloader's LabelWeightedSampler on the training cells.

        Cells outside the training split, and of organisms left out by data.organisms, get
        the sampler's "excluded" label (its last one, weight 0). scdataloader marks only
        the former, and when nothing is held out its last real class gets weight 0: a
        one-cell dummy of the excluded label (never drawn) keeps that class.
        """
        inner = self.inner
        labels = np.asarray(inner.train_labels)
        usable = np.zeros(len(labels), dtype=bool)
        usable[np.asarray(inner.idx_full)] = True
        usable &= self.batches.organism_block[:, 0] >= 0
        excluded = int(labels[usable].max()) + 1 if usable.any() else 0
        labels = np.append(np.where(usable, labels, excluded), excluded)
        weights = None if inner.nnz is None else np.append(np.asarray(inner.nnz), 0.0)
        return self._label_weighted_sampler(labels, weights)

    def _label_weighted_sampler(self, labels, element_weights):
        """scdataloader's LabelWeightedSampler with the data section's settings."""
        inner = self.inner
        return _weighted_sampler()(
            labels=labels,
            num_samples=int(inner.n_samples_per_epoch),
            replacement=inner.replacement,
            weight_scaler=inner.weight_scaler,
            element_weights=element_weights,
            n_workers=inner.sampler_workers,
            chunk_size=inner.sampler_chunk_size,
            store_location=inner.store_location,
            force_recompute_indices=inner.force_recompute_indices,
            curiculum=inner.curiculum,
            restrict_to_subset=inner.restrict_to_subset,
        )

    def scdataloader_train_dataloader(self):
        """scdataloader's own training path (per-cell reads + its Collator): the reference
        the benchmarks and tests compare :mod:`scprint.trainer.batches` with."""
        inner = self.inner
        if not (inner.clss_to_weight and inner.weight_scaler > 0):
            return inner.train_dataloader()
        from torch.utils.data import DataLoader

        sampler = self._label_weighted_sampler(inner.train_labels, inner.nnz)
        return DataLoader(inner.dataset, sampler=sampler, **inner.kwargs)


def _epoch_batches_done(trainer) -> int:
    """The batches of the current epoch Lightning has trained on: where a resumed run
    goes on (ResumableLoader's ``trained``)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class FixedEpochs:
    """Every epoch the same cells in the same order (the training split, weight_scaler=0)."""

    def __init__(self, cells):
        self.cells = np.asarray(cells, dtype=np.int64)

    def __call__(self, epoch: int) -> np.ndarray:
        return self.cells


class WeightedEpochs:
    """An epoch's cells drawn by scdataloader's LabelWeightedSampler under generators
    seeded with (seed, epoch) (scprint.trainer.resume.draw_epoch). Its curriculum exponent
    follows its count of epochs drawn, which it keeps in the process: set to the epoch
    first, so epoch e is drawn as a process that drew every epoch before it would."""

    def __init__(self, sampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def __call__(self, epoch: int) -> np.ndarray:
        from scprint.trainer.resume import draw_epoch

        self.sampler.count = epoch  # __iter__ adds 1 first: epoch 0 draws with count 1
        return draw_epoch(lambda: list(self.sampler), self.seed, epoch)


def _weighted_sampler():
    """scdataloader's LabelWeightedSampler with a base class whose __init__ takes its
    ``None`` argument (torch 2.13's Sampler has no __init__ of its own).

    Built on first use (importing scdataloader imports lamindb, which must wait until the
    instance is connected) and published as a module attribute, so the sampler pickles by
    name into the worker processes it uses to build its index (sampler_workers > 1).
    """
    cls = globals().get("FixedLabelWeightedSampler")
    if cls is not None:
        return cls
    from scdataloader.datamodule import LabelWeightedSampler
    from torch.utils.data import Sampler

    import scprint.adapters.scdataloader  # noqa: F401  (the version check)

    class _TakesDataSource(Sampler):
        def __init__(self, data_source=None):
            pass

    cls = type("FixedLabelWeightedSampler", (LabelWeightedSampler, _TakesDataSource), {})
    cls.__module__ = __name__
    _TakesDataSource.__module__, _TakesDataSource.__qualname__ = __name__, "_TakesDataSource"
    globals().update(FixedLabelWeightedSampler=cls, _TakesDataSource=_TakesDataSource)
    return cls


def __getattr__(name: str):
    """Unpickling in a worker looks the sampler class up here (see _weighted_sampler)."""
    if name in ("FixedLabelWeightedSampler", "_TakesDataSource"):
        _weighted_sampler()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rerank(positions: pd.DataFrame, tolerance: int, path: str) -> pd.DataFrame:
    """Ranks of ``positions`` recomputed per organism with ``tolerance`` (data.
    gene_position_tolerance) from its chrom/start/end columns."""
    from scprint.embeddings.positions import rank_genes

    missing = {"organism", "chrom", "start", "end"} - set(positions.columns)
    if missing:
        raise StageError(
            f"data.gene_position_tolerance={tolerance}: {path} has no {', '.join(sorted(missing))} "
            "column(s) to recompute positions from. Rebuild it with `scprint gene-positions "
            f"--tolerance {tolerance} ...` (workflow: gene_positions.tolerance: {tolerance}) and "
            "set data.gene_position_tolerance: null, or give the file `scprint gene-positions` wrote"
        )
    coords = positions.rename_axis("ensembl_gene_id").reset_index()
    ranked = [
        rank_genes(group.drop(columns="pos", errors="ignore"), tolerance)
        for _, group in coords.groupby("organism", sort=False)
    ]
    return pd.concat(ranked).set_index("ensembl_gene_id")
