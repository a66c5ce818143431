"""Runs INSIDE the upstream venv (.bench-venv-seed: PyPI scprint 2.3.8), never in ours.

    python -I tests/upstream/upstream_model.py build DIR [VARIANT]
    python -I tests/upstream/upstream_model.py forward CKPT BATCH OUT.npz

``build`` makes a tiny upstream scPrint (VARIANT: see VARIANTS) with every parameter perturbed (so no weight is
left at a trivial init), saves it with a Lightning Trainer (DIR/upstream.ckpt), writes a
fixed batch (DIR/batch.npz) and the model's eval-mode outputs on it (DIR/upstream.npz).
``forward`` loads a .ckpt with upstream's ``scPrint.load_from_checkpoint`` (as users do)
and dumps the same outputs. (Upstream 2.3.8 cannot reload the checkpoint its own trainer
wrote without a discriminator: hparams "classes" is saved as a list and
on_load_checkpoint reads grad_reverse_discriminator_loss.out_layer.bias; hence the
reference outputs come from the model in memory.) Imports nothing of this repository's package
(the names clash); the torchvision stand-in comes from bench/seed_step.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "netguard"))

import sitecustomize  # noqa: E402,F401  (the network guard, when SCPRINT_NETGUARD is set)
from seed_step import shim_torchvision  # noqa: E402

N_GENES, B, L = 60, 4, 24
CLASSES = {"cell_type_ontology_term_id": 5, "organism_ontology_term_id": 2}
HIERARCHY = {"cell_type_ontology_term_id": {5: [0, 1], 6: [2, 3, 4]}}
# the docs' family ("sum" input, positions, MVC) and the other input normalisation with
# grouped-query attention (2 K/V heads for 4 query heads) and no MVC decoder
VARIANTS = {
    "docs": dict(normalization="sum", mvc_decoder="inner product", num_heads_kv=None),
    "log-gqa": dict(normalization="log", mvc_decoder="None", num_heads_kv=2),
}


def tiny_scprint(n_genes: int, **overrides):
    """The tiny upstream scPrint the upstream tests compare with (2 layers, d_model 32,
    gene positions in threes), every weight moved off its trivial init (LN = 1, biases = 0);
    ``overrides`` replace constructor arguments (dropout, MVC decoder, ...)."""
    import torch

    shim_torchvision()
    from scprint import scPrint

    torch.manual_seed(0)
    arguments = dict(
        genes=[f"ENSG{i:011d}" for i in range(n_genes)],
        organisms=["NCBITaxon:9606", "NCBITaxon:10090"],
        d_model=32,
        nhead=4,
        nlayers=2,
        gene_pos_enc=[1 + i // 3 for i in range(n_genes)],
        transformer="normal",
        layers_cls=[16],
        classes=CLASSES,
        labels_hierarchy=HIERARCHY,
        label_decoders={k: {i: f"{k}:{i}" for i in range(n)} for k, n in CLASSES.items()},
        residual_in_fp32=True,
        dropout=0.1,
    )
    model = scPrint(**(arguments | overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def build(out: Path, variant: str = "docs") -> None:
    import lightning as L_
    import numpy as np

    model = tiny_scprint(N_GENES, **VARIANTS[variant])
    trainer = L_.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(out / "upstream.ckpt")

    rng = np.random.default_rng(0)
    genes_idx = np.stack([rng.permutation(N_GENES)[:L] for _ in range(B)])
    expr = rng.poisson(rng.gamma(0.5, 4.0, size=(B, L))).astype(np.float32)
    expr[:, 0] += 1  # no cell with zero counts
    depth = expr.sum(1) * 3 + 10
    np.savez(out / "batch.npz", genes=genes_idx, x=expr, depth=depth.astype(np.float32))
    dump(model, out / "batch.npz", out / "upstream.npz")


def forward(ckpt: Path, batch: Path, out: Path) -> None:

    shim_torchvision()
    from scprint import scPrint

    model = scPrint.load_from_checkpoint(ckpt, map_location="cpu", transformer="normal")
    dump(model, batch, out)


def dump(model, batch: Path, out: Path) -> None:
    import numpy as np
    import torch

    model.eval()
    data = np.load(batch)
    with torch.no_grad():
        res = model(
            torch.from_numpy(data["genes"]).long(),
            torch.from_numpy(data["x"]),
            req_depth=torch.from_numpy(data["depth"]),
            do_class=True,
            do_mvc=model.mvc_decoder is not None,
        )
    arrays = {k: v.numpy() for k, v in res.items() if torch.is_tensor(v)}
    arrays["classes"] = np.array(list(model.label_counts))
    arrays["n_parameters"] = np.array(sum(p.numel() for p in model.parameters()))
    np.savez(out, **arrays)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), *sys.argv[3:])
    elif sys.argv[1] == "forward":
        forward(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}: build DIR | forward CKPT BATCH OUT")
