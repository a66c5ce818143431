"""Upstream scPRINT's own downstream tasks run on a checkpoint trained by this pipeline.

The data side is the pipeline's own stages, offline: `scprint lamin-init` (SQLite laminDB),
`scprint ontologies` (human genes and ontologies into bionty), the demo's blood dataset
(100 cells, 300 genes) through `scprint preprocess`. A tiny scPRINT (d_model 32, 2 layers,
cell-type classes with the T-cell parent, label names as the pipeline's data module gives
them) is trained here for a few steps on that file and exported with `scprint convert
export`. In the upstream venv (tests/upstream/upstream_tasks.py) PyPI scprint 2.3.8 loads
it with `scPrint.load_from_checkpoint` and runs `scprint.tasks.Embedder`, `Denoiser` and
`GNInfer` on the preprocessed file, reading genes and ontologies from the same laminDB
instance (LAMIN_SETTINGS_DIR). Skips/fails without the venv as tests/test_upstream_convert
does. ~2.5 min on 2 cores, most of it the ontologies stage and three process starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, run_cli, run_upstream, seed_python

from scprint.data.demo import DATASETS, make_dataset
from scprint.data.demo import demo_genes as demo_gene_table

HELPER = REPO / "tests" / "upstream" / "upstream_tasks.py"
BLOOD = DATASETS[0]  # demo-human-blood: 5 cell types with marker genes
CELL_TYPE = "cell_type_ontology_term_id"
T_CELL, T_CELL_LEAVES = "CL:0000084", ("CL:0000624", "CL:0000625")  # CD4, CD8
CL_NAMES = {
    "CL:0000236": "B cell",
    "CL:0000576": "monocyte",
    "CL:0000623": "natural killer cell",
    "CL:0000624": "CD4-positive, alpha-beta T cell",
    "CL:0000625": "CD8-positive, alpha-beta T cell",
}
N_CELLS, N_GENES, D_MODEL = 100, 300, 32
TOL = 1e-4


def train_checkpoint(h5ad: Path, genes: list[str], path: Path) -> list[str]:
    """A tiny scPRINT trained a few steps with its objectives (denoising, MVC, cell types);
    returns the leaf label names (codes 0..K-1)."""
    from scprint.finetune.data import CellTokens, read_labeled
    from scprint.model.lightning import ScPrintModule
    from scprint.model.objectives import Objectives, compute_losses

    cells = read_labeled([h5ad], CELL_TYPE, genes, set())
    leaves = list(cells.labels)
    parent = len(leaves)
    torch.manual_seed(0)
    module = ScPrintModule(
        genes=genes,
        organisms=[BLOOD.organism],
        classes={CELL_TYPE: len(leaves)},
        labels_hierarchy={CELL_TYPE: {parent: [leaves.index(c) for c in T_CELL_LEAVES]}},
        label_decoders={CELL_TYPE: {**dict(enumerate(leaves)), parent: T_CELL, -1: "unknown"}},
        gene_positions=list(range(len(genes))),
        d_model=D_MODEL,
        nhead=2,
        nlayers=2,
        layers_cls=[16],
        dropout=0.0,
        mvc_decoder="inner product",
    )
    objectives = Objectives(noise=[0.6], do_generate=False, do_cls=True, do_mvc=True)
    tokens = CellTokens(cells, np.arange(len(cells.label)), 64)
    loader = torch.utils.data.DataLoader(tokens, batch_size=25, shuffle=True)
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=3e-3)
    for _ in range(4):  # epochs of 4 steps
        for batch in loader:
            batch["class"] = batch.pop("label")[:, None]
            loss = compute_losses(module.net, batch, objectives, module.label_sets)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return leaves


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    seed_python()  # skip (or fail in CI) before the slow part when the venv is missing
    work = tmp_path_factory.mktemp("upstream-tasks")
    run_cli(["lamin-init", "--storage", "lamin/storage", "--out", "lamin.json"], cwd=work)
    run_cli(["ontologies", "--organism", BLOOD.organism, "--out", "ontologies.json"], cwd=work)
    table = demo_gene_table(BLOOD.organism, N_GENES, 0)
    # the first demo's scattered markers, at baseline in other types: with the demo's
    # silent-elsewhere blocks upstream's GNInfer ("most var within") got no genes
    blood = make_dataset(BLOOD, table, 0, markers="scattered")
    (work / "data" / "raw").mkdir(parents=True)
    blood[:: len(blood) // N_CELLS][:N_CELLS].copy().write_h5ad(work / "data/raw/blood.h5ad")
    run_cli(
        ["preprocess", "--dataset", "blood", "--input", "data/raw/blood.h5ad",
         "--out", "data/processed/blood.h5ad", "--report", "preprocess.json",
         "--min-valid-genes-id", "100", "--min-nnz-genes", "50"],
        cwd=work,
    )  # fmt: skip
    h5ad = work / "data" / "processed" / "blood.h5ad"
    # the checkpoint's vocabulary: the demo's genes, in the gene table's (sorted) order
    genes = sorted(table["gene_id"])
    leaves = train_checkpoint(h5ad, genes, work / "ours.ckpt")
    run_cli(["convert", "export", "ours.ckpt", "upstream.ckpt"], cwd=work)

    out = work / "upstream-run"
    out.mkdir()
    run_upstream(HELPER, work / "upstream.ckpt", h5ad, out, cwd=out, env=cli_env(work))
    return {
        "arrays": dict(np.load(out / "tasks.npz")),
        "names": json.loads((out / "tasks.json").read_text()),
        "leaves": leaves,
        "ours": work / "ours.ckpt",
        "genes": genes,
        "adata": ad.read_h5ad(h5ad),
    }


def our_prediction(tasks) -> tuple[np.ndarray, list[str]]:
    """Our network on the batches upstream's Embedder fed its model (recorded there): the
    cell-type token's state and the predicted cell type, named by our checkpoint's label
    decoders."""
    from scprint.model.lightning import ScPrintModule

    module = ScPrintModule.load(tasks["ours"]).eval()
    fed = {k: torch.from_numpy(tasks["arrays"][f"fed_{k}"]) for k in ("genes", "x", "depth")}
    assert fed["genes"].shape == (N_CELLS, 64)  # upstream's Collator: 64 genes a cell
    with torch.no_grad():
        out = module.net(fed["genes"].long(), fed["x"].float(), fed["depth"].float())
    decoder = module.hparams.label_decoders[CELL_TYPE]
    names = [decoder[int(i)] for i in out[f"cls/{CELL_TYPE}"].argmax(1)]
    return out["cell_embs"][:, 2].numpy(), names  # tokens: [depth, cell, cell type]


def test_embedder_gives_our_cell_embeddings_and_named_cell_types(tasks):
    emb, names = tasks["arrays"]["embeddings"], tasks["names"]
    assert emb.shape == (N_CELLS, D_MODEL)
    assert np.isfinite(emb).all()
    assert emb.std(0).max() > 1e-3  # cells differ
    assert names["cells"] == tasks["adata"].obs_names.tolist()
    # predictions are the checkpoint's label names (ontology ids), not codes ...
    preds = names["pred_cell_type"]
    assert len(preds) == N_CELLS and set(preds) <= set(tasks["leaves"])
    assert T_CELL in names["label_vocabulary"]
    # and upstream translates them to cell-type names from the pipeline's laminDB
    readable = dict(zip(preds, names["pred_cell_type_name"], strict=True))
    assert readable == {p: CL_NAMES[p] for p in readable}
    # ... the same cells as our network embeds and names them: upstream ran our weights
    ours_emb, ours_names = our_prediction(tasks)
    assert np.abs(emb - ours_emb).max() <= TOL
    assert preds == ours_names
    # upstream scores them against the file's own labels (hierarchy-aware)
    assert 0.0 <= names["embedder_metrics"][f"{CELL_TYPE}_accuracy"] <= 1.0


def test_denoiser_gives_finite_expression_over_the_model_genes(tasks):
    mu, names = tasks["arrays"]["denoised"], tasks["names"]
    assert mu.shape == (N_CELLS, len(tasks["genes"]))
    assert names["denoised_genes"] == tasks["genes"]
    assert np.isfinite(mu).all() and (mu >= 0).all()
    # 64 genes per cell are predicted (upstream's max_len), the rest of the row stays 0
    assert ((mu > 0).sum(1) == 64).all()


def test_gninfer_gives_a_finite_gene_by_gene_network(tasks):
    grn, names = tasks["arrays"]["grn"], tasks["names"]
    n = len(names["grn_genes"])
    assert 2 <= n <= 40 and set(names["grn_genes"]) <= set(tasks["genes"])
    assert grn.shape == (n, n)
    assert np.isfinite(grn).all()
    # softmax-normalised attention: non-negative, not all equal
    assert (grn >= 0).all() and grn.std() > 0
