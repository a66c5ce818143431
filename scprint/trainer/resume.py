"""Training that goes on after a restart exactly as if it had never stopped.

A run killed at any point (``kill -9``, a node lost, a Slurm requeue) and started again
from its last checkpoint must train on the same batches with the same noise as the run
that was never interrupted. Lightning restores the weights, the optimizer, the scheduler
and its loop counters. Two things it does not restore are handled here:

1. **Where the training loader was in its epoch.** Lightning restarts a plain DataLoader
   at the epoch's first batch (and ends that epoch early, having counted the batches it
   already trained on), and scdataloader's weighted sampler draws an epoch's cells from
   torch's global generator, whose state is whatever the process did before.
   :class:`ResumableLoader` fixes both: the epoch's cell order is a pure function of
   (run seed, epoch) (the sampler draws under a generator seeded with them, see
   :func:`draw_epoch`), each rank takes its share of it, and the number of batches
   trained in the epoch is saved in the checkpoint (Lightning's ``state_dict`` protocol
   for loaders) and skipped on resume without reading their cells.

2. **The random draws of a step**: which expressed genes a cell shows (``how: random
   expr``), the Corruption's downsampling and masks, dropout. They came from generators
   seeded once per process and advanced by everything the process did since (the sanity
   check's validation, the sampler's epoch draws, DataLoader workers' seeds), so a
   restarted process was at another point of those streams. Now every draw is seeded
   from (run seed, epoch, rank, batch index): the loader hands each batch its seed
   (:class:`SeededBatch`) and the LightningModule runs each step with torch's generator
   seeded for it (:func:`scprint.seeds.seeded_torch`).

Why seeds derived per batch, and not generator states saved in the checkpoint: a state
saved with the checkpoint is the state after the last *trained* step, but batches are
built ahead of the step that uses them (DataLoader workers build ``num_workers x
prefetch_factor`` batches ahead, in processes whose generators the checkpoint never
sees; Lightning's fetcher prefetches from loaders without a length), and the two runs do
different things between steps (a restarted run runs the sanity-check validation again,
draws the epoch's order again). Restoring states would therefore have to replay exactly
what each worker had drawn. A seed that is a function of the batch's identity does not
care who builds the batch, when, or what came before: the same batch gets the same cells,
genes and noise in the run that never stopped, in the restarted one, with any number of
DataLoader workers (tests/test_loader.py compares 0 and 2).

Held-out batches (validation, test) reach the dataset as plain lists of cells (Lightning
gives their DataLoader a distributed sampler), so their genes are seeded by their content
(the run seed and the batch's cell indices), their step's noise by (rank, loader, batch
index): every validation loop sees the same genes and noise for the same cells, which
also makes validation losses comparable from loop to loop.

The seed is Lightning's (``seed_everything``, exported as ``PL_GLOBAL_SEED``; 0 when
none is set); a resumed run keeps the seed its checkpoint was written with.

How far it holds, and the limits (measured: docs/training.md "Resuming"): on CPU with
``trainer.deterministic`` the weights and optimizer state of a run killed mid-epoch and
rerun are bitwise those of the uninterrupted run, on one node and on two; a resumed run
with another number of ranks or batch size goes on after as many batches as Lightning
counted, but they are other cells than the interrupted run's (a warning says so);
``SCPRINT_RESUME_POSITION=0`` restarts the interrupted epoch from its first batch as
Lightning does with a plain DataLoader (to compare).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from scprint.seeds import EPOCH_ORDER, HELD_OUT_BATCH, TRAIN_BATCH, derive_seed, seeded_numpy

log = logging.getLogger(__name__)


def draw_epoch(sample: Callable[[], object], seed: int, epoch: int) -> np.ndarray:
    """``sample()`` (e.g. ``list(sampler)``) run under torch and numpy generators seeded
    with (seed, epoch), the caller's generator states left as they were: the epoch's cells
    as an int64 array, the same in every process and after every restart."""
    s = derive_seed(seed, EPOCH_ORDER, epoch)
    with torch.random.fork_rng(devices=[]), seeded_numpy(s):
        torch.manual_seed(s)
        cells = sample()
    return np.asarray(list(cells) if not isinstance(cells, np.ndarray) else cells, np.int64)


class SeededBatch(list):
    """A batch's cell indices plus ``seed``, the seed of the random draws made while
    building it (what a dataset's ``__getitems__`` receives from a batch sampler)."""

    def __init__(self, cells, seed: int):
        super().__init__(cells)
        self.seed = int(seed)

    def __reduce__(self):  # pickles (into DataLoader workers) with its seed
        return (SeededBatch, (list(self), self.seed))


def batch_seed(seed: int, batch) -> int:
    """The seed of a batch's draws: its own (SeededBatch), else one keyed by its cells."""
    own = getattr(batch, "seed", None)
    if own is not None:
        return own
    return derive_seed(seed, HELD_OUT_BATCH, *(int(i) for i in batch))


class EpochCells:
    """This rank's cells of an epoch: ``order(epoch)`` (all ranks' cells, the same on
    every rank) padded by wrapping around to a multiple of ``world_size`` (as torch's
    DistributedSampler does: every rank gets as many), then every world_size-th from
    ``rank``. Lightning calls ``set_epoch``."""

    def __init__(self, order: Callable[[int], np.ndarray], rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.order, self.rank, self.world_size = order, rank, world_size
        self.epoch = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def cells(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cached is None or self._cached[0] != epoch:
            every = np.asarray(self.order(epoch), dtype=np.int64)
            if len(every) % self.world_size:
                pad = self.world_size - len(every) % self.world_size
                every = np.concatenate([every, np.resize(every, pad)])
            self._cached = (epoch, every[self.rank :: self.world_size])
        return self._cached[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.cells().tolist())

    def __len__(self) -> int:
        return len(self.cells())


class _BatchPlan:
    """The batches of an epoch from batch ``start`` on, as SeededBatch (a DataLoader's
    ``batch_sampler``): batch b holds cells [b B, (b + 1) B) of the rank's share, its
    seed keyed by (seed, epoch, rank, b)."""

    def __init__(self, cells: np.ndarray, batch_size: int, start: int, seed: int, epoch: int,
                 rank: int):  # fmt: skip
        self.cells, self.batch_size, self.start = cells, batch_size, start
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return max(0, -(-len(self.cells) // self.batch_size) - self.start)

    def __iter__(self) -> Iterator[SeededBatch]:
        B = self.batch_size
        for b in range(self.start, self.start + len(self)):
            key = derive_seed(self.seed, TRAIN_BATCH, self.epoch, self.rank, b)
            yield SeededBatch(self.cells[b * B : (b + 1) * B].tolist(), key)


class ResumableLoader:
    """The training loader: epochs of ``order`` split over ranks (:class:`EpochCells`),
    read in batches by a DataLoader over ``dataset`` (whose ``__getitems__`` gets
    :class:`SeededBatch` es), able to resume in the middle of an epoch.

    Lightning treats it as a stateful loader (``state_dict`` / ``load_state_dict``): the
    fit loop saves its state in every checkpoint (``loops.fit_loop.state_dict.
    combined_loader``: epoch, batches handed out in it, seed, ranks, batch size) and hands
    it back before the resumed run's first ``iter``. Lightning's fetcher takes a batch
    only when a step starts for a loader that has a length (it prefetches one only from
    loaders without one), so at a checkpoint written between steps the batches handed out
    are the batches trained on.

    Where the epoch goes on is, with ``trained`` (the datamodule passes Lightning's count
    of the epoch's batches, ``fit_loop.epoch_loop.batch_progress.current.ready``, read at
    the pass's first ``next``), the batch Lightning itself goes on with: its ``batch_idx``
    (which seeds the step's noise) and the batch read are then the same by construction,
    also for a checkpoint written in the middle of a step (Lightning's SIGUSR1 handler
    saves wherever the step is; it then redoes that batch). Without ``trained``, the
    saved position. ``SCPRINT_RESUME_POSITION=0`` starts the interrupted epoch again at its
    first batch, as Lightning does with a plain DataLoader (to compare).

    It is not a DataLoader, so Lightning does not replace its sampler with a
    DistributedSampler: the ranks' shares are :class:`EpochCells`'. ``iter()`` is lazy:
    the epoch (``set_epoch``, which Lightning may call after ``iter``) and the position
    are read at the first ``next``.
    """

    def __init__(
        self,
        dataset,
        order: Callable[[int], np.ndarray],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        trained: Callable[[], int] | None = None,
    ):
        self.dataset = dataset
        self.trained = trained
        self.sampler = EpochCells(order, rank, world_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers else None
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint
        self._position = (0, 0)  # (epoch, batches handed out in it)

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches of the current epoch, the ones already trained on included (what
        Lightning counts an epoch in)."""
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator:
        return self._epoch()

    def _epoch(self) -> Iterator:
        from torch.utils.data import DataLoader

        epoch, start = self.sampler.epoch, 0
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == epoch:  # (an epoch that moved on: from 0)
            start = resume[1]
        if self.trained is not None and os.environ.get("SCPRINT_RESUME_POSITION") != "0":
            done = int(self.trained())
            if done != start:
                log.info(
                    "epoch %d: Lightning goes on after batch %d, the loader had handed out "
                    "%d (a checkpoint written in the middle of a step): from batch %d",
                    epoch, done, start, done,
                )  # fmt: skip
            start = done
        if start:
            log.info("resuming epoch %d at batch %d of %d", epoch, start, len(self))
        plan = _BatchPlan(
            self.sampler.cells(epoch), self.batch_size, start, self.seed, epoch, self.rank
        )
        self._position = (epoch, start)
        if not len(plan):
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=plan,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        for batch in loader:
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def state_dict(self) -> dict:
        epoch, batches = self._position
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if state.get("seed", self.seed) != self.seed:  # the datamodule restores the seed first
            log.warning(
                "the checkpoint's loader was seeded with %s, this one with %d: other cells and "
                "draws than the interrupted run's", state.get("seed"), self.seed,
            )  # fmt: skip
        self.set_epoch(epoch)
        if os.environ.get("SCPRINT_RESUME_POSITION") == "0":
            log.warning("SCPRINT_RESUME_POSITION=0: epoch %d restarts at its first batch", epoch)
            return
        saved = (state.get("world_size"), state.get("batch_size"))
        if saved != (self.world_size, self.batch_size):
            log.warning(
                "the checkpoint was written by %s ranks with batches of %s, this run has %d "
                "ranks with batches of %d: epoch %d goes on after its first %d batches, but "
                "these are other cells than the interrupted run trained on (the epoch's "
                "cells are shared out by rank and batch)",
                *saved, self.world_size, self.batch_size, epoch, batches,
            )  # fmt: skip
        self._resume = (epoch, batches)


class SeededItems(torch.utils.data.Dataset):
    """A per-cell dataset (scdataloader's MappedCollection) read a batch at a time, the
    batch's seed passed along to :class:`SeededCollate` (scdataloader's path, used when
    the collection's files are not local)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, batch) -> tuple[int, list]:
        return batch_seed(self.seed, batch), [self.dataset[int(i)] for i in batch]


class SeededCollate:
    """scdataloader's Collator run with numpy's global generator seeded by the batch's
    seed (the Collator draws its random genes from ``np.random``), the caller's numpy
    state restored afterwards."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, seeded: tuple[int, list]):
        seed, items = seeded
        with seeded_numpy(seed):
            return self.collate(items)
