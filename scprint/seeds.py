"""Seeds derived from the run's seed, for draws that must not depend on what the process
did before (scprint.trainer.resume explains why; the LightningModule seeds its steps with
them). Here, outside scprint.model and scprint.trainer, because both use it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# what a derived seed is for: its first key after the run seed
EPOCH_ORDER = 1  # an epoch's cell order (the sampler's draws)
TRAIN_BATCH = 2  # the genes a training batch shows
TRAIN_STEP = 3  # a training step's noise and dropout
HELD_OUT_BATCH = 4  # the genes a validation/test batch shows (keyed by its cells)
HELD_OUT_STEP = 5  # a validation/test step's noise


def run_seed() -> int:
    """The run's seed: Lightning's ``seed_everything`` (PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(seed: int, *keys: int) -> int:
    """A seed in [0, 2**63) that is a pure function of (seed, keys): numpy's SeedSequence
    hashes them (the same on every machine and process; nearby keys give unrelated seeds)."""
    entropy = [int(seed) % 2**64, *(int(k) for k in keys)]
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, np.uint32).tolist()
    return ((hi << 32) | lo) >> 1


@contextmanager
def seeded_torch(device: torch.device, seed: int, *keys: int) -> Iterator[None]:
    """Inside: torch's CPU generator, and ``device``'s when it is a GPU, seeded with
    derive_seed(seed, keys), so what a step draws (dropout, Corruption) depends on the step
    alone; after: both as they were (``torch.random.fork_rng``), so the process's own
    stream, ``torch.initial_seed()`` included, is not touched. Activation checkpointing
    replays a block's dropout in backward from the state it saved in forward."""
    s = derive_seed(seed, *keys)
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):
        torch.default_generator.manual_seed(s)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(s)
        yield


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Inside: numpy's global generator seeded with ``seed`` (for code that draws from
    ``np.random``: scdataloader's sampler and Collator); after: its state as it was."""
    state = np.random.get_state()
    np.random.seed(int(seed) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)
