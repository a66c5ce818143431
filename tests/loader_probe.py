"""Subprocess side of tests/test_loader.py (laminDB settings are read once per process):
builds ScprintDataModules on the tiny collection and prints one JSON object of facts.

usage: python tests/loader_probe.py WORKDIR   (prints "PROBE {agree, sampling, keys}")
"""

from __future__ import annotations

import json
import pickle
import resource
import sys
from collections import Counter

import numpy as np
import pandas as pd
import torch

from scprint.io import StageError
from scprint.trainer.batches import passthrough
from scprint.trainer.datamodule import ScprintDataModule

CT = "cell_type_ontology_term_id"
BASE = dict(
    collection_name="tiny",
    clss_to_predict=["organism_ontology_term_id", CT, "disease_ontology_term_id"],
    hierarchical_clss=[CT],
    clss_to_weight=[CT],
    weight_scaler=0,
    validation_split=0.2,
    max_len=48,
    batch_size=8,
    num_workers=0,
    sampler_workers=1,
    n_samples_per_epoch=64,
    gene_embeddings="data/main/gene_embeddings.parquet",
)


def dm_of(**kw) -> ScprintDataModule:
    np.random.seed(0)
    dm = ScprintDataModule(**{**BASE, **kw})
    dm.setup("fit")
    return dm


def stock_batch(dm, cells):
    """scdataloader's own reader + Collator for these cells."""
    inner = dm.inner
    return inner.kwargs["collate_fn"]([inner.dataset[int(i)] for i in cells])


def dense_rows(dm, cells) -> np.ndarray:
    """Each cell's counts over the vocabulary, read by scdataloader (the reference)."""
    genes = dm.genes
    table = dm.inner.dataset.genedf.index
    col = table.get_indexer(genes)
    return np.stack([np.asarray(dm.inner.dataset[int(i)]["X"])[col] for i in cells])


def agree() -> dict:
    out = {}
    for how, max_len in [("most expr", 48), ("random expr", 150)]:
        dm = dm_of(how=how, max_len=max_len)
        cells = np.arange(len(dm.batches))
        ours = dm.batches.__getitems__(cells.tolist())
        stock = stock_batch(dm, cells)
        dense = dense_rows(dm, cells)
        rows = []
        for r in range(len(cells)):
            ox, og = ours["x"][r].numpy(), ours["genes"][r].numpy()
            sx, sg = stock["x"][r].numpy(), stock["genes"][r].numpy()
            cut = min(sx[sx > 0].min(initial=np.inf), ox[ox > 0].min(initial=np.inf))
            rows.append(
                {
                    "n_expr": int((dense[r] > 0).sum()),
                    "same_counts": sorted(ox.tolist()) == sorted(sx.tolist()),
                    "same_genes_above_cut": set(og[ox > cut]) == set(sg[sx > cut]),
                    "counts_match_genes": bool(np.all(dense[r][og] == ox)),
                    "distinct": len(set(og)) == len(og),
                    "fill_unexpressed": bool(np.all(dense[r][og[ox == 0]] == 0)),
                    "descending": bool(np.all(np.diff(ox[ox > 0]) <= 0)),
                }
            )
        out[how] = {
            "rows": rows,
            "keys": sorted(ours),
            "dtypes": {k: str(v.dtype) for k, v in ours.items()},
            "stock_dtypes": {k: str(v.dtype) for k, v in stock.items()},
            "shape": list(ours["x"].shape),
            "class_equal": torch.equal(ours["class"], stock["class"]),
            "has_unknown": bool((ours["class"] == -1).any()),
            "depth_equal": torch.allclose(ours["depth"], stock["depth"]),
            "tp_equal": torch.equal(ours["tp"], stock["tp"]),
        }
    return out


def cell_types(dm, loader) -> Counter:
    col = list(dm.classes).index(CT)
    return Counter(int(c) for b in loader for c in b["class"][:, col])


def sampling() -> dict:
    out = {}
    dm = dm_of(weight_scaler=1, n_samples_per_epoch=1600, batch_size=32)
    col = list(dm.classes).index(CT)
    population = Counter(int(c) for c in dm.batches.labels[np.asarray(dm.inner.idx_full), col])
    out["population"] = population
    out["weighted"] = cell_types(dm, dm.train_dataloader())
    by_organism = dm_of(
        clss_to_weight=["organism_ontology_term_id"], weight_scaler=1, n_samples_per_epoch=1600
    )
    out["weighted_by_organism"] = cell_types(by_organism, by_organism.train_dataloader())
    # workers: batches come back through worker processes; the dataset pickles
    loader = torch.utils.data.DataLoader(
        dm.batches,
        sampler=list(range(len(dm.batches))),
        batch_size=16,
        num_workers=2,
        multiprocessing_context="spawn",
        collate_fn=passthrough,
    )
    batches = list(loader)
    out["spawn_workers_cells"] = sum(len(b["x"]) for b in batches)
    dm2 = dm_of(weight_scaler=1, n_samples_per_epoch=1600, batch_size=32, num_workers=2)
    fork = dm2.train_dataloader()
    out["fork_workers"] = fork.num_workers
    out["fork_workers_cells"] = sum(len(b["x"]) for b in fork)
    clone = pickle.loads(pickle.dumps(dm.batches))
    a = dm.batches.__getitems__(list(range(10)))
    np.random.seed(5)  # the global generators play no part
    torch.manual_seed(5)
    b = dm.batches.__getitems__(list(range(10)))
    c = clone.__getitems__(list(range(10)))
    clone.seed += 1
    d = clone.__getitems__(list(range(10)))
    out["seeded_repeatable"] = torch.equal(a["genes"], b["genes"])
    out["pickled_same"] = torch.equal(a["genes"], c["genes"]) and torch.equal(a["x"], c["x"])
    out["other_seed_other_genes"] = not torch.equal(a["genes"], d["genes"])
    return out


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("x", "genes", "class")
    )


def resume() -> dict:
    """The training loader (scprint.trainer.resume.ResumableLoader) on its own: epochs as
    functions of (seed, epoch), the position restored without reading skipped cells,
    ranks' shares, workers."""
    from scprint.trainer.resume import EpochCells

    out = {}
    kw = dict(weight_scaler=5, n_samples_per_epoch=64, batch_size=8)
    loader = dm_of(**kw).train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    out["batches"] = [len(epochs[0]), len(epochs[1]), len(loader)]
    out["epochs_differ"] = not same_batches(epochs[0], epochs[1])
    torch.manual_seed(123)  # other global generator states, a fresh module, 2 workers
    np.random.seed(321)
    torch.rand(100)
    again = dm_of(**kw, num_workers=2).train_dataloader()
    again.set_epoch(1)
    out["epoch_1_again_with_workers"] = same_batches(epochs[1], list(again))

    dm = dm_of(**kw)
    resumed = dm.train_dataloader()
    read = []
    getitems = dm.batches.__getitems__
    dm.batches.__getitems__ = lambda cells: read.append(len(cells)) or getitems(cells)
    state = {"epoch": 1, "batches": 3, "seed": dm.seed, "world_size": 1, "batch_size": 8}
    resumed.load_state_dict(state)
    tail = list(resumed)
    out["resumed_tail"] = same_batches(epochs[1][3:], tail)
    out["cells_read"] = sum(read)
    out["state_after"] = resumed.state_dict()
    resumed.load_state_dict({**state, "world_size": 2})  # another shape: warned, kept
    out["other_world_tail"] = len(list(resumed))

    order = loader.sampler.order
    whole = order(1)
    shares = [EpochCells(order, rank, 2).cells(1) for rank in (0, 1)]
    out["ranks_len"] = [len(whole), *map(len, shares)]
    interleaved = np.empty(len(whole), dtype=np.int64)
    interleaved[0::2], interleaved[1::2] = shares
    out["ranks_partition_the_epoch"] = bool(np.array_equal(interleaved, whole))
    out["ranks_differ"] = not np.array_equal(*shares)
    out["odd_world_pads"] = [len(EpochCells(order, r, 3).cells(1)) for r in range(3)]
    return out


def keys(tmp: str) -> dict:
    """One fact per data.* key, with the key at two values (or its error)."""
    out = {}
    try:
        ScprintDataModule(**{**BASE, "collection_name": "nope"})
    except StageError as err:
        out["collection_name"] = str(err)
    try:
        dm_of(organisms=["NCBITaxon:10090"])
    except StageError as err:
        out["organisms"] = str(err)
    base = dm_of()
    first = next(iter(base.train_dataloader()))
    out["base"] = {
        "n_classes": first["class"].shape[1],
        "batch": list(first["x"].shape),
        "n_genes": len(base.genes),
        "hierarchy": sorted(base.labels_hierarchy),
        "n_train_batches": len(base.train_dataloader()),
        "n_val": len(base.inner.valid_idx),
        "test": len(base.test_dataloader()),
        "gene_pos": base.gene_pos,
        "num_workers": base.train_dataloader().num_workers,
    }
    dm = dm_of(clss_to_predict=["organism_ontology_term_id"], hierarchical_clss=[])
    out["clss_to_predict"] = next(iter(dm.train_dataloader()))["class"].shape[1]
    out["hierarchical_clss"] = sorted(dm_of(hierarchical_clss=[]).labels_hierarchy)
    out["n_samples_per_epoch"] = len(
        dm_of(weight_scaler=5, n_samples_per_epoch=80).train_dataloader()
    )
    out["validation_split"] = len(dm_of(validation_split=0.5).inner.valid_idx)
    out["test_split"] = len(dm_of(test_split=0.3).test_dataloader())
    dm = dm_of(how="most expr", max_len=20, batch_size=5)
    b = next(iter(dm.train_dataloader()))
    out["max_len_batch_size"] = list(b["x"].shape)
    x = b["x"].numpy()
    out["how_most_descending"] = bool(all(np.all(np.diff(r[r > 0]) <= 0) for r in x))
    b = next(iter(dm_of(how="random expr", max_len=20, batch_size=5).train_dataloader()))
    out["how_random_descending"] = bool(all(np.all(np.diff(r[r > 0]) <= 0) for r in b["x"].numpy()))
    out["gene_embeddings"] = len(dm_of(gene_embeddings=None).genes)
    dm = dm_of(gene_positions="data/main/gene_positions.parquet")
    out["gene_positions"] = sorted(set(dm.gene_pos))
    parquet = pd.read_parquet("data/main/gene_positions.parquet")["pos"]
    out["gene_positions_as_is"] = dm.gene_pos == parquet.loc[dm.genes].tolist()
    assay = list(dm.classes)
    dm = dm_of(assays_to_drop=["EFO:0009899"], weight_scaler=5, n_samples_per_epoch=200)
    files = dm.batches.file_of_cell
    out["assays_to_drop_files"] = sorted({int(files[i]) for i in dm.train_dataloader().sampler})
    base_files = sorted({int(files[i]) for i in dm_of(weight_scaler=5).train_dataloader().sampler})
    out["assays_kept_files"] = base_files
    draws = {}
    for replacement in (True, False):
        dm = dm_of(weight_scaler=5, n_samples_per_epoch=300, replacement=replacement)
        idx = list(dm.train_dataloader().sampler)
        draws[str(replacement)] = [len(idx), len(set(idx))]
    out["replacement"] = draws
    out["num_workers"] = dm_of(num_workers=2).train_dataloader().num_workers
    spent = []
    for workers in (1, 2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        dm_of(weight_scaler=5, sampler_workers=workers).train_dataloader()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    out["sampler_workers_child_cpu_s"] = spent
    import os

    store = os.path.join(tmp, "store")
    dm_of(weight_scaler=5, store_location=store).train_dataloader()
    out["store_files"] = sorted(os.listdir(store))
    np.random.seed(123)  # another shuffle would give another split, the store keeps it
    a = dm_of(store_location=store).inner.valid_idx
    b = dm_of().inner.valid_idx
    np.random.seed(7)
    dm = ScprintDataModule(**{**BASE, "store_location": store})
    dm.setup("fit")
    out["store_same_split"] = np.array_equal(np.asarray(dm.inner.valid_idx), np.asarray(a))
    np.random.seed(7)
    dm = ScprintDataModule(**BASE)
    dm.setup("fit")
    out["nostore_same_split"] = np.array_equal(np.asarray(dm.inner.valid_idx), np.asarray(b))
    out["classes_order"] = assay
    return out


if __name__ == "__main__":
    from scprint.data.lamin import connect

    connect()
    data = {
        "agree": agree(),
        "sampling": sampling(),
        "resume": resume(),
        "keys": keys(sys.argv[1]),
    }
    print(
        "PROBE " + json.dumps(data, default=lambda o: dict(o) if isinstance(o, Counter) else str(o))
    )
