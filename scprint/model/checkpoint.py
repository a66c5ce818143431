"""Open a trained checkpoint for inference (prediction, fine-tuning), wherever it runs.

Apart from scprint.model.readout, which scprint.model.lightning imports: a loader of the
LightningModule there would make the two modules import each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from scprint.model.lightning import ScPrintModule

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """The ScPrintModule of a checkpoint, on ``device``, in eval mode. A model trained
    with transformer='flash' runs with 'sdpa' (same weights) where flash cannot run."""
    overrides = {}
    # only the hyperparameters: mmap leaves the weights on disk until the real load below
    hparams = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get(
        "hyper_parameters", {}
    )
    if hparams.get("transformer") == "flash" and not str(device).startswith("cuda"):
        log.info("checkpoint uses transformer='flash', which needs CUDA: running with 'sdpa'")
        overrides["transformer"] = "sdpa"
    return ScPrintModule.load(path, map_location=device, **overrides).eval()
