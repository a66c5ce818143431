"""Build a tiny real laminDB collection for the training tests (run as a subprocess; no
tests in here, pytest only imports it).

usage: python tests/tiny_collection.py WORKDIR KEY N_GENES

Creates the bionty records scdataloader's DataModule reads (one organism, its genes, cell
types / tissues / diseases / assays with parents, the "unknown" terms), writes two small
h5ad files in scdataloader's preprocessed layout (raw counts in X, var = the organism's
full gene list in gene-table order, the obs columns it needs) and registers them as one
collection. Prints a JSON line like results/collection.json.
"""

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scprint.data.lamin import connect

HUMAN = "NCBITaxon:9606"
# (registry, ontology_id, name, parent ontology_id or None)
TERMS = [
    ("CellType", "CL:0000000", "cell", None),
    ("CellType", "CL:0000084", "T cell", "CL:0000000"),
    ("CellType", "CL:0000624", "CD4-positive, alpha-beta T cell", "CL:0000084"),
    ("CellType", "CL:0000625", "CD8-positive, alpha-beta T cell", "CL:0000084"),
    ("CellType", "CL:0000236", "B cell", "CL:0000000"),
    ("Tissue", "UBERON:0000062", "organ", None),
    ("Tissue", "UBERON:0002048", "lung", "UBERON:0000062"),
    ("Tissue", "UBERON:0000178", "blood", "UBERON:0000062"),
    ("Disease", "PATO:0000461", "normal", None),
    ("Disease", "MONDO:0000001", "disease", None),
    ("Disease", "MONDO:0005015", "diabetes mellitus", "MONDO:0000001"),
    ("ExperimentalFactor", "EFO:0010183", "single cell library construction", None),
    ("ExperimentalFactor", "EFO:0009922", "10x 3' v3", "EFO:0010183"),
    ("ExperimentalFactor", "EFO:0009899", "10x 3' v2", "EFO:0010183"),
    ("Ethnicity", "HANCESTRO:0005", "European", None),
    ("Ethnicity", "multiethnic", "multiethnic", None),
    ("DevelopmentalStage", "HsapDv:0000087", "human adult stage", None),
    ("Phenotype", "PATO:0000383", "female", None),
    ("Phenotype", "PATO:0000384", "male", None),
]
REGISTRIES = sorted({t[0] for t in TERMS})
LEAF_TYPES = ["CL:0000624", "CL:0000625", "CL:0000236"]


def populate(ln, bt, gene_ids: list[str]) -> None:
    organisms = [
        bt.Organism(
            ontology_id=HUMAN, name="human", scientific_name="homo_sapiens", _skip_validation=True
        ),
        bt.Organism(ontology_id="unknown", name="unknown", _skip_validation=True),
    ]
    ln.save(organisms)
    human = bt.Organism.get(ontology_id=HUMAN)
    genes = [
        bt.Gene(ensembl_gene_id=g, symbol=f"GENE{i}", organism=human, _skip_validation=True)
        for i, g in enumerate(gene_ids)
    ]
    ln.save(genes)
    records = {}
    for registry, oid, name, _ in TERMS + [(r, "unknown", "unknown", None) for r in REGISTRIES]:
        records[(registry, oid)] = getattr(bt, registry)(
            ontology_id=oid, name=name, _skip_validation=True
        )
    ln.save(list(records.values()))
    for registry, oid, _, parent in TERMS:
        if parent is not None:
            records[(registry, oid)].parents.add(records[(registry, parent)])


def tiny_h5ad(path: Path, gene_ids: list[str], n_cells: int, seed: int) -> None:
    """Raw counts where each cell type has its own set of highly expressed genes."""
    rng = np.random.default_rng(seed)
    types = rng.choice(len(LEAF_TYPES), n_cells)
    profile = rng.gamma(0.3, 2.0, (len(LEAF_TYPES), len(gene_ids)))
    counts = rng.poisson(profile[types] * rng.uniform(0.5, 2.0, (n_cells, 1)))
    obs = pd.DataFrame(
        {
            "organism_ontology_term_id": HUMAN,
            "cell_type_ontology_term_id": [
                LEAF_TYPES[t] if i % 7 else "CL:0000084" for i, t in enumerate(types)
            ],
            "tissue_ontology_term_id": rng.choice(["UBERON:0002048", "UBERON:0000178"], n_cells),
            "disease_ontology_term_id": rng.choice(
                ["PATO:0000461", "MONDO:0005015", "unknown"], n_cells
            ),
            "assay_ontology_term_id": ["EFO:0009922", "EFO:0009899"][seed % 2],
            "sex_ontology_term_id": rng.choice(["PATO:0000383", "PATO:0000384"], n_cells),
            "self_reported_ethnicity_ontology_term_id": "HANCESTRO:0005",
            "development_stage_ontology_term_id": "HsapDv:0000087",
            "nnz": (counts > 0).sum(1),
        },
        index=[f"cell{seed}_{i}" for i in range(n_cells)],
    )
    for col in obs.columns[:-1]:
        obs[col] = obs[col].astype("category")
    adata = ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=gene_ids)
    )
    adata.write_h5ad(path)


def main(workdir: str, key: str, n_genes: int) -> None:
    ln = connect()
    import bionty as bt

    gene_ids = sorted(f"ENSG{90000000000 + 7 * i:011d}" for i in range(n_genes))
    populate(ln, bt, gene_ids)
    folder = Path(workdir) / "processed"
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for seed, n_cells in [(0, 60), (1, 50)]:
        path = folder / f"tiny{seed}.h5ad"
        tiny_h5ad(path, gene_ids, n_cells, seed)
        artifacts.append(ln.Artifact(str(path), key=f"processed/tiny{seed}.h5ad").save())
    collection = ln.Collection(artifacts, key=key).save()
    print(
        json.dumps(
            {
                "key": key,
                "uid": collection.uid,
                "n_cells": 110,
                "n_datasets": 2,
                "organisms": [HUMAN],
                "genes": gene_ids,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
