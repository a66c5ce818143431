"""Runs INSIDE the upstream venv (.bench-venv-seed: PyPI scprint 2.3.8), never in ours.

    python -I tests/upstream/upstream_tasks.py CKPT H5AD OUT

Loads an exported pipeline checkpoint with upstream's ``scPrint.load_from_checkpoint`` and
runs upstream's own downstream tasks (``scprint.tasks``: Embedder, Denoiser, GNInfer) on a
preprocessed h5ad, as a user of the PyPI package would, then dumps what they returned to
OUT/tasks.npz (arrays) and OUT/tasks.json (names). Run with OUT as the working directory:
upstream writes its intermediate h5ad files to ./data/.

CPU settings (what upstream's defaults assume a GPU for): transformer="normal" (the flash
kernel needs triton/CUDA), dtype float32 (its default float16 autocast is for GPUs),
num_workers 0, doplot False. laminDB: upstream's Collator reads the organism's genes and
its label translation reads the ontologies from bionty, so LAMIN_SETTINGS_DIR must point
at the pipeline's (offline, SQLite) instance. The network guard of the tests is installed
here too, as ``-I`` keeps PYTHONPATH (and so tests/netguard) out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "netguard"))

import sitecustomize  # noqa: E402,F401  (the network guard, when SCPRINT_NETGUARD is set)
from seed_step import shim_torchvision  # noqa: E402

CELL_TYPE = "cell_type_ontology_term_id"


def main(ckpt: Path, h5ad: Path, out: Path) -> None:
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp
    import torch

    shim_torchvision()
    from scdataloader.utils import translate
    from scprint.tasks import Denoiser, Embedder, GNInfer

    from scprint import scPrint

    torch.manual_seed(0)
    np.random.seed(0)  # upstream's Collator samples genes with np.random
    model = scPrint.load_from_checkpoint(ckpt, map_location="cpu", transformer="normal")
    adata = sc.read_h5ad(h5ad)
    common = dict(batch_size=32, num_workers=0, dtype=torch.float32)

    fed = record_inputs(model)  # what the Embedder feeds the model, for the test to rerun
    embedded, metrics = Embedder(
        how="random expr", max_len=64, pred_embedding=[CELL_TYPE], doplot=False, **common
    )(model, adata.copy())
    del model._predict  # back to the class's method for the other tasks

    _, _, denoised = Denoiser(max_len=64, how="random expr", predict_depth_mult=4, **common)(
        model, adata.copy()
    )
    mu = denoised.layers["scprint_mu"]

    grn = GNInfer(
        how="most var within", num_genes=40, preprocess="softmax", head_agg="mean",
        filtration="none", forward_mode="none", **common,
    )(model, adata.copy())  # fmt: skip
    adjacency = grn.varp["GRN"]

    preds = embedded.obs[f"pred_{CELL_TYPE}"].astype(str).tolist()
    np.savez(
        out / "tasks.npz",
        **{f"fed_{k}": torch.cat(v).numpy() for k, v in fed.items()},
        embeddings=embedded.obsm["scprint_emb"],
        denoised=mu.toarray() if sp.issparse(mu) else np.asarray(mu),
        grn=adjacency.toarray() if sp.issparse(adjacency) else np.asarray(adjacency),
    )
    (out / "tasks.json").write_text(
        json.dumps(
            {
                "cells": adata.obs_names.tolist(),
                "pred_cell_type": preds,
                # upstream's ontology id -> name look-up in bionty (the pipeline's laminDB);
                # its own conv_pred_* column applies it with Series.replace(list), a no-op
                # under pandas 2, so it is called here
                "pred_cell_type_name": translate(preds, CELL_TYPE),
                "true_cell_type": embedded.obs[CELL_TYPE].astype(str).tolist(),
                "label_vocabulary": [str(v) for v in model.label_decoders[CELL_TYPE].values()],
                "embedder_metrics": {k: float(v) for k, v in metrics.items()},
                "denoised_genes": denoised.var_names.tolist(),
                "grn_genes": grn.var_names.tolist(),
                "model_genes": list(model.genes),
                "d_model": int(model.d_model),
            }
        )
    )


def record_inputs(model) -> dict[str, list]:
    """Wrap the model's _predict (which every task calls per batch) to keep its inputs."""
    fed = {"genes": [], "x": [], "depth": []}
    predict = model._predict

    def recording(gene_pos, expression, depth, *args, **kwargs):
        for key, value in zip(fed, (gene_pos, expression, depth), strict=True):
            fed[key].append(value.detach().cpu())
        return predict(gene_pos, expression, depth, *args, **kwargs)

    model._predict = recording
    return fed


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
