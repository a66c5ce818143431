"""`scprint convert`: checkpoints between upstream scPRINT 2.3.8 (PyPI `scprint`) and ours.

The network is upstream's module for module with the same state_dict keys and shapes, so
the weights map one to one; only the hyperparameters are renamed. Upstream features this
network does not implement (cell_specific_blocks, depth in the decoder, metacell token,
FSQ class compression, non-ZINB decoders, the adversarial batch discriminator's use) are
refused by name on import. ``grad_reverse_discriminator_loss.*`` (upstream's optional
batch discriminator) is dropped on import and a placeholder bias is written on export,
because upstream's ``on_load_checkpoint`` reads that key unconditionally.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning
import torch

from scprint.io import StageError

log = logging.getLogger(__name__)
DISCRIMINATOR = "grad_reverse_discriminator_loss."
# upstream hyperparameter -> (value this network needs, what it is)
UPSTREAM_REFUSED = {
    "cell_specific_blocks": (False, "cross-attention cell transformer (v2)"),
    "depth_atinput": (True, "depth fed to the expression decoder (v2)"),
    "use_metacell_token": (False, "metacell token (v2)"),
    "compress_class_dim": (None, "FSQ class compression (v2)"),
    "zinb": (True, "non-ZINB expression decoder"),
    "attn_bias": ("none", "attention bias"),
    "expr_emb_style": ("continuous", "binned expression encoding"),
}
# upstream keys copied as is into ours (same name, same meaning)
SHARED_KEYS = (
    "d_model", "nhead", "nlayers", "num_heads_kv", "dropout", "normalization",
    "expr_encoder_layers", "layers_cls", "mvc_decoder", "pred_embedding",
    "freeze_embeddings", "labels_hierarchy", "label_decoders", "organisms", "genes",
)  # fmt: skip


def _load(path: Path) -> dict:
    if not path.exists():
        raise StageError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle of non-plain objects: refuse rather than run code
        raise StageError(
            f"{path} cannot be read as a plain checkpoint (torch.load weights_only=True: "
            f"{err}); is it a Lightning .ckpt of scPRINT?"
        ) from err


def _save(ckpt: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def upstream_to_ours(hp: dict, state: dict) -> tuple[dict, dict]:
    """Upstream (hyper_parameters, state_dict) -> ours. Raises StageError on what we lack."""
    for key, (needed, what) in UPSTREAM_REFUSED.items():
        if key in hp and hp[key] != needed and not (needed is None and not hp[key]):
            raise StageError(
                f"the upstream checkpoint has {key}={hp[key]!r}: this pipeline's network does "
                f"not implement the {what}; only checkpoints with {key}={needed!r} convert"
            )
    if hp.get("mvc_decoder", "None") not in ("None", "inner product"):
        raise StageError(
            f"the upstream checkpoint has mvc_decoder={hp['mvc_decoder']!r}: only 'None' and "
            "'inner product' convert"
        )
    ours = {k: hp[k] for k in SHARED_KEYS if k in hp}
    # upstream overwrites hparams["classes"] with the list of names; the counts are here
    counts = hp.get("label_counts") or hp.get("classes") or {}
    if not isinstance(counts, dict):
        raise StageError("the upstream checkpoint has no label_counts (class name -> size)")
    ours["classes"] = {str(k): int(v) for k, v in counts.items()}
    ours["gene_positions"] = hp.get("gene_pos_enc")
    # upstream freezes the gene table only when it came from precpt_gene_emb; a table it
    # started at random is learned whatever freeze_embeddings says
    if hp.get("precpt_gene_emb") is None:
        ours["freeze_embeddings"] = False
    # upstream's "flash" is its triton kernel (CPU: falls back to plain attention); the
    # same maths here is sdpa, which runs anywhere
    ours["transformer"] = "normal" if hp.get("transformer") == "normal" else "sdpa"
    ours["residual_in_fp32"] = bool(hp.get("residual_in_fp32"))  # upstream None = off
    if "mlp_ratio" in hp:
        ours["mlp_ratio"] = hp["mlp_ratio"]
    dropped = [k for k in state if k.startswith(DISCRIMINATOR)]
    if dropped:
        log.info("dropping upstream's batch discriminator (%s): not part of this network", dropped)
    return ours, {k: v for k, v in state.items() if not k.startswith(DISCRIMINATOR)}


def ours_to_upstream(hp: dict, state: dict) -> tuple[dict, dict]:
    """Our (hyper_parameters, state_dict) -> what upstream's scPrint.load_from_checkpoint takes."""
    classes = dict(hp.get("classes") or {})
    up = {
        "genes": list(hp["genes"]),
        "organisms": list(hp.get("organisms") or ["NCBITaxon:9606"]),
        "d_model": hp["d_model"],
        "nhead": hp["nhead"],
        "nlayers": hp["nlayers"],
        "num_heads_kv": hp.get("num_heads_kv"),
        "dropout": hp["dropout"],
        "precpt_gene_emb": None,  # the table is in the state_dict
        "gene_pos_enc": hp.get("gene_positions"),
        "normalization": hp.get("normalization", "sum"),
        "expr_encoder_layers": hp.get("expr_encoder_layers", 2),
        "transformer": "normal" if hp.get("transformer") == "normal" else "flash",
        "mvc_decoder": hp.get("mvc_decoder", "None"),
        "pred_embedding": list(hp.get("pred_embedding") or []),
        "layers_cls": list(hp.get("layers_cls") or []),
        "classes": classes,
        "label_counts": classes,
        "labels_hierarchy": hp.get("labels_hierarchy") or {},
        "label_decoders": hp.get("label_decoders") or {},
        "freeze_embeddings": hp.get("freeze_embeddings", True),
        "residual_in_fp32": hp.get("residual_in_fp32", True),
        "depth_atinput": True,
        "cell_specific_blocks": False,
        "use_metacell_token": False,
        "zinb": True,
    }
    if hp.get("mlp_ratio", 4.0) != 4.0:
        up["mlp_ratio"] = hp["mlp_ratio"]
    state = dict(state)
    # upstream's on_load_checkpoint reads this key unconditionally, then drops it when the
    # model has no discriminator (num_batch_labels 0)
    state[DISCRIMINATOR + "out_layer.bias"] = torch.zeros(1)
    return up, state


def import_upstream(src: Path, dst: Path) -> None:
    """An upstream .ckpt -> a checkpoint ScPrintModule.load reads."""
    from scprint.model.lightning import ScPrintModule

    ckpt = _load(src)
    hp, state = upstream_to_ours(ckpt.get("hyper_parameters", {}), ckpt["state_dict"])
    if not hp.get("genes"):
        raise StageError(f"{src} has no genes in its hyper_parameters: not an scPRINT checkpoint")
    module = ScPrintModule(**hp)  # checks every key; random weights replaced below
    _load_strict(module.net, state, src)
    out = {
        "state_dict": {f"net.{k}": v for k, v in module.net.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "scprint": {"imported_from": str(src)},
    }
    _save(out, dst)
    log.info("imported upstream checkpoint %s -> %s", src, dst)


def export_upstream(src: Path, dst: Path) -> None:
    """Our checkpoint -> a .ckpt upstream's scPrint.load_from_checkpoint loads."""
    ckpt = _load(src)
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise StageError(f"{src} has no net.* weights: not a checkpoint of this pipeline")
    hp, state = ours_to_upstream(ckpt["hyper_parameters"], state)
    out = {
        "state_dict": state,
        "hyper_parameters": hp,
        "pytorch-lightning_version": lightning.__version__,
    }
    _save(out, dst)
    log.info("exported %s -> upstream checkpoint %s", src, dst)


def _load_strict(net: torch.nn.Module, state: dict, src: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise StageError(
            f"{src} does not map onto this network: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:5]}"
        )
    net.load_state_dict(state)


def add_arguments(parser) -> None:
    parser.add_argument("direction", choices=("import", "export"),
                        help="import: upstream .ckpt -> ours; export: ours -> upstream .ckpt")  # fmt: skip
    parser.add_argument("src", type=Path, help="checkpoint to read")
    parser.add_argument("dst", type=Path, help="checkpoint to write (atomically)")


def run(args) -> None:
    (import_upstream if args.direction == "import" else export_upstream)(args.src, args.dst)
