"""`init_from`: start pre-training from the weights of a checkpoint (ours, or upstream
scPRINT's through scprint.model.convert), on this run's collection.

It is not a resume: the optimizer, scheduler and step start fresh (that is ckpt_path).
The model is first built for the collection (its genes, gene embeddings, classes), then:
- genes in both keep the checkpoint's gene-table rows; genes the checkpoint lacks keep
  the collection's embeddings (the parquet's rows, pooled to d_model when the network was
  built); genes of the checkpoint the collection lacks are dropped, and listed in the log;
- a class head whose label set (leaf names, in order) changed keeps its fresh
  initialisation, and the log says so; a class token of a class in both is kept;
- everything else (the transformer, encoders, decoders) is copied and must have the same
  shape: a checkpoint of another size is refused, naming the key.
Genomic positions stay the collection's (the pos_encoder.pe buffer is built from its
positions parquet, one row per gene of the collection).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from scprint.io import StageError
from scprint.model import convert

log = logging.getLogger(__name__)

# The network's layout, in one place (adapt here when the network changes):
GENE_TABLE = "net.gene_encoder.embeddings.weight"  # (n_genes, D): a row per hparams.genes
COLLECTION_OWN = ("net.pos_encoder.pe",)  # (n_genes, 1, D): the collection's, never copied
CLASS_HEAD = "net.cls_decoders.{}."  # prefix of a class head's parameters
CELL_TOKENS = "net.class_encoder.embedding.weight"  # (1 + classes, D): [cell, class i...]
TRUNK = "net.transformer."  # same keys on both sides (nlayers), compared before copying


def init_from_checkpoint(module: nn.Module, path: str | Path) -> dict:
    """Load the weights of checkpoint ``path`` into ``module`` (a ScPrintModule built for
    this run's collection), reconciling genes and classes. Returns what was done."""
    source = read_checkpoint(path)
    target = module.state_dict()
    hp = module.hparams
    _check_layout(path, source, target, hp)
    genes, report = _gene_rows(source, list(hp.genes))
    new_state = {}
    if genes is not None:
        shared, src_rows, dst_rows = genes
        table = target[GENE_TABLE].clone()
        src_table = source["state_dict"][GENE_TABLE]
        if src_table.shape[1] != table.shape[1]:  # the table is pooled to d_model
            _refuse(path, GENE_TABLE, src_table, table)
        table[dst_rows] = src_table[src_rows].to(table.dtype)
        new_state[GENE_TABLE] = table
    kept, fresh = _class_heads(source, dict(hp.classes or {}), hp.get("label_decoders") or {})
    report["classes"] = {"kept": kept, "reinitialised": fresh}
    for key, value in source["state_dict"].items():
        if key not in target or key in new_state or key.startswith(COLLECTION_OWN):
            continue
        if any(key.startswith(CLASS_HEAD.format(name)) for name in fresh):
            continue
        if key == CELL_TOKENS:
            value = _cell_tokens(value, target[key], list(source["classes"]), list(hp.classes))
        if value.shape != target[key].shape:
            _refuse(path, key, value, target[key])
        new_state[key] = value.to(target[key].dtype)
    missing = sorted(
        k for k in target if k not in source["state_dict"] and not k.startswith(COLLECTION_OWN)
    )
    module.load_state_dict({**target, **new_state})
    report.update(source=str(path), format=source["format"], not_in_checkpoint=missing)
    _log(report)
    return report


def _refuse(path, key: str, theirs: torch.Tensor, ours: torch.Tensor):
    raise StageError(
        f"init_from {path}: {key} is {tuple(theirs.shape)} in the checkpoint but "
        f"{tuple(ours.shape)} here: the checkpoint's network has another shape; set the "
        "model section (d_model, nlayers, nhead, ...) to the checkpoint's, see its "
        "hyper_parameters"
    )


def _check_layout(path, source: dict, target: dict, hp) -> None:
    """Same transformer: the same blocks (nlayers) and heads. Shapes alone miss these: a
    block the other lacks has no shape to compare, and nhead splits the same Wqkv."""
    theirs, ours = ({k for k in sd if k.startswith(TRUNK)} for sd in (source["state_dict"], target))
    if theirs != ours:
        key = sorted(theirs ^ ours)[0]
        where = "the checkpoint" if key in theirs else "this model"
        raise StageError(
            f"init_from {path}: {key} is only in {where}: the checkpoint's transformer has "
            "another number of layers (or layout); set model.nlayers to the checkpoint's, "
            "see its hyper_parameters"
        )
    for name in ("nhead", "num_heads_kv"):
        if name in source["hparams"] and source["hparams"][name] != hp.get(name):
            raise StageError(
                f"init_from {path}: the checkpoint has {name}={source['hparams'][name]!r}, "
                f"this model {hp.get(name)!r}: set model.{name} to the checkpoint's"
            )


def read_checkpoint(path: str | Path) -> dict:
    """state_dict, genes, classes and label_decoders of a checkpoint of ours, or of an
    upstream scPRINT .ckpt imported by scprint.model.convert.import_upstream."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"init_from {path}: no such checkpoint file; fix init_from")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    fmt = "scprint-pipeline"
    if "scprint" not in ckpt:
        if "state_dict" not in ckpt or "genes" not in ckpt.get("hyper_parameters", {}):
            raise StageError(
                f"init_from {path}: neither a checkpoint of this pipeline (no 'scprint' "
                "entry) nor an upstream scPRINT one (no hyper_parameters.genes)"
            )
        ckpt, fmt = _import_upstream(path), "upstream scPRINT"
    # a trained checkpoint keeps these in "scprint", an imported one in its hyper_parameters
    meta = {**ckpt.get("hyper_parameters", {}), **ckpt["scprint"]}
    if not meta.get("genes"):
        raise StageError(f"init_from {path}: the checkpoint lists no genes (hyper_parameters)")
    return {
        "state_dict": ckpt["state_dict"],
        "genes": list(meta["genes"]),
        "classes": dict(meta.get("classes") or {}),
        "label_decoders": meta.get("label_decoders") or {},
        "format": fmt,
        "hparams": meta,
    }


def _import_upstream(path: Path) -> dict:
    """Our checkpoint dict for an upstream .ckpt: scprint convert's importer writes it to a
    temporary file (removed after reading), as `scprint convert import` would."""
    with tempfile.TemporaryDirectory(prefix="scprint-init-from-") as tmp:
        dst = Path(tmp, "imported.ckpt")
        convert.import_upstream(path, dst)
        return torch.load(dst, map_location="cpu", weights_only=False)


def _gene_rows(source: dict, genes: list[str]):
    """(shared gene ids, their source rows, their target rows) and the gene report."""
    src_index = {g: i for i, g in enumerate(source["genes"])}
    here = set(genes)
    dst_rows = [i for i, g in enumerate(genes) if g in src_index]
    shared = [genes[i] for i in dst_rows]
    dropped = [g for g in source["genes"] if g not in here]
    report = {
        "genes": {
            "shared": len(shared),
            "new": len(genes) - len(shared),
            "dropped": len(dropped),
            "dropped_first": dropped[:10],
        }
    }
    if not shared:
        raise StageError(
            "init_from: the checkpoint shares no gene with this collection's gene list "
            f"(checkpoint e.g. {source['genes'][:3]}, collection e.g. {genes[:3]}): another "
            "organism or gene id scheme"
        )
    if GENE_TABLE not in source["state_dict"]:
        return None, report
    src_rows = [src_index[g] for g in shared]
    return (shared, torch.tensor(src_rows), torch.tensor(dst_rows)), report


def _leaves(decoders: dict, name: str, n_leaves: int) -> list[str] | None:
    decoder = {int(k): v for k, v in (decoders.get(name) or {}).items()}
    names = [decoder.get(i) for i in range(n_leaves)]
    return None if None in names else names


def _class_heads(source: dict, classes: dict, decoders: dict) -> tuple[list, dict]:
    """Classes whose head is copied, and those left fresh with the reason."""
    kept, fresh = [], {}
    for name, n_leaves in classes.items():
        if name not in source["classes"]:
            fresh[name] = "not in the checkpoint"
            continue
        n_src = source["classes"][name]
        mine, theirs = (
            _leaves(decoders, name, n_leaves),
            _leaves(source["label_decoders"], name, n_src),
        )
        if n_src != n_leaves:
            fresh[name] = f"{n_src} leaf labels in the checkpoint, {n_leaves} here"
        elif mine is not None and theirs is not None and mine != theirs:
            diff = sorted(set(mine) ^ set(theirs))
            fresh[name] = f"other leaf labels or order ({len(diff)} differ, e.g. {diff[:3]})"
        else:
            kept.append(name)
    return kept, fresh


def _cell_tokens(src: torch.Tensor, dst: torch.Tensor, src_classes, dst_classes) -> torch.Tensor:
    """Rows [cell, class 0, class 1...] (the depth token has its own encoder, copied as
    the rest): the cell token and the tokens of classes in both come from the checkpoint;
    tokens of new classes stay fresh."""
    if src.shape[1] != dst.shape[1]:
        return src  # a width mismatch: the caller's shape check names it
    out = dst.clone()
    out[0] = src[0]
    for i, name in enumerate(dst_classes):
        if name in src_classes:
            out[1 + i] = src[1 + src_classes.index(name)]
    return out


def _log(report: dict) -> None:
    g = report["genes"]
    log.info(
        "init_from %s (%s): %d genes keep the checkpoint's rows, %d new genes take the "
        "collection's embeddings, %d of the checkpoint's genes are not in this collection%s",
        report["source"],
        report["format"],
        g["shared"],
        g["new"],
        g["dropped"],
        f" (first: {', '.join(g['dropped_first'])})" if g["dropped"] else "",
    )
    for name, why in report["classes"]["reinitialised"].items():
        log.warning("init_from: class head %s re-initialised: %s", name, why)
    if report["not_in_checkpoint"]:
        log.warning("init_from: not in the checkpoint, left fresh: %s", report["not_in_checkpoint"])
