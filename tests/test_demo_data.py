"""The demo datasets: valid CELLxGENE files, raw counts where promised, deterministic."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scprint.data import demo

VALIDATOR = Path(sys.executable).with_name("cellxgene-schema")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo.write_demo(out, n_genes=1200, seed=0)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_every_demo_file_passes_cellxgene_schema_validate(demo_dir):
    files = sorted((demo_dir / "datasets").glob("*.h5ad"))
    assert [f.stem for f in files] == sorted(d.dataset_id for d in demo.DATASETS)
    procs = [
        subprocess.Popen(
            [str(VALIDATOR), "validate", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for f in files
    ]
    for f, proc in zip(files, procs, strict=True):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "is_valid=True" in out, f"{f.name}:\n{out[-3000:]}"


def test_counts_are_raw_integers_and_normalized_dataset_keeps_them_in_raw(demo_dir):
    for spec in demo.DATASETS:
        adata = ad.read_h5ad(demo_dir / "datasets" / f"{spec.dataset_id}.h5ad")
        assert adata.uns["organism_ontology_term_id"] == spec.organism
        counts = (adata.raw.X if spec.normalized_x else adata.X).toarray()
        assert np.all(counts == np.round(counts)) and counts.min() >= 0
        assert (counts > 0).sum(axis=1).min() >= 200, "cells must pass min_nnz_genes=200"
        if spec.normalized_x:
            assert not np.allclose(adata.X.toarray(), np.round(adata.X.toarray()))
            assert adata.raw.shape == adata.shape
        else:
            assert adata.raw is None


def test_cell_types_are_learnable_from_a_short_context_of_expressed_genes(demo_dir):
    """What the demo's training sees of a cell (data.max_len 128 of its expressed genes)
    names its type: a 5-NN on those genes' normalised counts gets >= 90% of the cells
    right in every dataset (the first demo's markers, also expressed elsewhere: ~2 in 3)."""
    rng = np.random.default_rng(0)
    for spec in demo.DATASETS:
        adata = ad.read_h5ad(demo_dir / "datasets" / f"{spec.dataset_id}.h5ad")
        counts = (adata.raw.X if spec.normalized_x else adata.X).toarray()
        seen = np.zeros_like(counts)
        for i, row in enumerate(counts):
            genes = rng.choice(np.flatnonzero(row), size=128, replace=False)
            seen[i, genes] = row[genes]
        features = np.log1p(seen / seen.sum(axis=1, keepdims=True) * 1e4)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        similarity = features @ features.T
        np.fill_diagonal(similarity, -np.inf)  # leave one out
        labels = adata.obs["cell_type_ontology_term_id"].cat.codes.to_numpy()
        neighbours = labels[np.argsort(-similarity, axis=1)[:, :5]]
        votes = np.apply_along_axis(np.bincount, 1, neighbours, minlength=labels.max() + 1)
        accuracy = (votes.argmax(axis=1) == labels).mean()
        assert accuracy >= 0.9, f"{spec.dataset_id}: 5-NN accuracy {accuracy:.2f}"


def test_each_cell_types_markers_are_one_block_of_neighbouring_genes(demo_dir):
    """A type's markers (8x above the other types) are consecutive genes in genome order,
    an eighth of the genes, nearly silent in the other types: the demo's model finds them
    through the gene position encoding (docs/report.md)."""
    for spec in demo.DATASETS:
        adata = ad.read_h5ad(demo_dir / "datasets" / f"{spec.dataset_id}.h5ad")
        counts = (adata.raw.X if spec.normalized_x else adata.X).toarray()
        genes = demo.demo_genes(spec.organism, 1200, seed=0).set_index("gene_id")
        place = np.argsort(demo.genome_order(genes.loc[adata.var_names].reset_index()))
        labels = adata.obs["cell_type_ontology_term_id"].to_numpy()
        for cell_type in spec.cell_types:
            inside = counts[labels == cell_type].mean(axis=0)
            outside = counts[labels != cell_type].mean(axis=0)
            markers = np.flatnonzero(inside > 8 * outside + 1)
            where = np.sort(place[markers])
            assert len(markers) == 1200 // demo.MARKER_BLOCKS, (spec.dataset_id, cell_type)
            assert where[-1] - where[0] == len(where) - 1, f"{cell_type}: not one block"
            others = counts[labels != cell_type][:, markers].mean()
            assert others < 0.2 * inside[markers].mean() / 8, (cell_type, others)


def test_gene_ids_are_real_gencode_ids_of_the_organism(demo_dir):
    from scprint.data.organisms import gene_table

    for organism in (demo.HUMAN, demo.MOUSE):
        table = gene_table(organism)
        known = dict(zip(table.ensembl_gene_id, table.biotype, strict=True))
        spec = next(d for d in demo.DATASETS if d.organism == organism)
        ids = ad.read_h5ad(demo_dir / "datasets" / f"{spec.dataset_id}.h5ad").var_names
        assert all(known.get(g) == "protein_coding" for g in ids)


def test_fasta_has_ensembl_style_headers_for_every_demo_gene(demo_dir):
    spec = next(d for d in demo.DATASETS if d.organism == demo.HUMAN)
    genes = set(ad.read_h5ad(demo_dir / "datasets" / f"{spec.dataset_id}.h5ad").var_names)
    text = gzip.decompress((demo_dir / "proteins" / "homo_sapiens.pep.fa.gz").read_bytes())
    headers = [line for line in text.decode().splitlines() if line.startswith(">")]
    in_fasta = {h.split(" gene:")[1].split(".")[0] for h in headers}
    assert in_fasta == genes
    assert all(
        " pep chromosome:GRCh38:" in h and "gene_biotype:protein_coding" in h for h in headers
    )


def test_same_seed_same_bytes_other_seed_other_data(demo_dir, tmp_path):
    demo.write_demo(tmp_path / "again", n_genes=1200, seed=0)
    assert _digests(tmp_path / "again") == _digests(demo_dir)
    demo.write_demo(tmp_path / "other", n_genes=1200, seed=1)
    assert (
        _digests(tmp_path / "other")["datasets/demo-human-blood.h5ad"]
        != _digests(demo_dir)["datasets/demo-human-blood.h5ad"]
    )
