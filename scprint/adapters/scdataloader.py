"""scdataloader internals that scprint relies on (tested: scdataloader 2.1.3): the
DataModule's ``dataset.mapped_dataset`` (a lamindb MappedCollection), its
``kwargs["collate_fn"]`` and ``dataset.encoder`` (label -> code per class), read by the
batch reader (scprint.trainer.batches) so its codes equal the Collator's. The
LabelWeightedSampler fix for torch 2.13 lives in scprint.trainer.datamodule (it must
pickle by that module's name) and is covered by this version check too.
"""

from __future__ import annotations

from scprint.adapters import check_version

check_version("scdataloader", "==2.1.3")


def mapped_dataset(inner):
    """The lamindb MappedCollection under scdataloader's DataModule ``inner``."""
    return inner.dataset.mapped_dataset


def collate_fn(inner):
    """The Collator ``inner`` gives its DataLoaders."""
    return inner.kwargs["collate_fn"]


def label_encoders(inner) -> dict[str, dict]:
    """Class name -> {label: code}, the codes the Collator emits."""
    return inner.dataset.encoder
