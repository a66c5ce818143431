"""Our network IS upstream scPRINT 2.3.8's: proven against the real PyPI package.

In the upstream venv (.bench-venv-seed, `make bench-seed-venv`; tests/upstream/
upstream_model.py runs there) a tiny upstream model with perturbed random weights is
saved as a .ckpt and run on a fixed batch. `scprint convert import` turns the .ckpt into
ours; our forward on the same batch must give the same cell embeddings, ZINB
mean/dispersion/zero logits, class logits and MVC outputs (max abs diff <= 1e-4, fp32,
CPU). `scprint convert export` writes it back; upstream's own
`scPrint.load_from_checkpoint` loads it and must give the same outputs again.

Without the venv the tests skip with the reason; with SCPRINT_REQUIRE_UPSTREAM=1 (CI,
set by .ci/run) they fail instead. ~1.5 min on 2 cores (two upstream processes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_upstream

from scprint.cli import main as scprint_main
from scprint.model.lightning import ScPrintModule

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "upstream" / "upstream_model.py"
TOL = 1e-4
# our output -> upstream's forward output
OURS_TO_UPSTREAM = {
    "cell_emb": "cell_emb",
    "cell_embs": "cell_embs",
    "mean": "mean",
    "theta": "disp",
    "pi_logit": "zero_logits",
    "mvc_mean": "mvc_mean",
    "mvc_theta": "mvc_disp",
    "mvc_pi_logit": "mvc_zero_logits",
}


def upstream(*args: str) -> None:
    run_upstream(HELPER, *args)


def build(tmp_path_factory, variant: str) -> Path:
    """DIR with upstream.ckpt, batch.npz and upstream.npz (upstream's outputs)."""
    out = tmp_path_factory.mktemp(f"upstream-{variant}")
    upstream("build", str(out), variant)
    return out


@pytest.fixture(scope="module")
def upstream_model(tmp_path_factory):
    return build(tmp_path_factory, "docs")


def our_outputs(ckpt: Path, batch: Path) -> dict[str, np.ndarray]:
    module = ScPrintModule.load(ckpt).eval()
    data = np.load(batch)
    with torch.no_grad():
        out = module.net(
            torch.from_numpy(data["genes"]).long(),
            torch.from_numpy(data["x"]),
            torch.from_numpy(data["depth"]),
        )
    return {k: v.numpy() for k, v in out.items()}


def assert_same(ours: dict, ref: np.lib.npyio.NpzFile) -> None:
    pairs = {k: v for k, v in OURS_TO_UPSTREAM.items() if v in ref}
    assert ("mvc_mean" in ref) == ("mvc_mean" in ours)
    pairs.update({f"cls/{name}": f"cls_output_{name}" for name in ref["classes"]})
    diffs = {}
    for mine, theirs in pairs.items():
        assert ours[mine].shape == ref[theirs].shape, mine
        diffs[mine] = float(np.abs(ours[mine] - ref[theirs]).max())
    assert max(diffs.values()) <= TOL, diffs
    # the comparison is not vacuous: outputs differ between cells and are not trivial
    assert np.abs(ref["cell_emb"][0] - ref["cell_emb"][1]).max() > 1e-2


def test_upstream_checkpoint_imports_with_the_same_outputs(upstream_model, tmp_path):
    ours = tmp_path / "ours.ckpt"
    assert (
        scprint_main(["convert", "import", str(upstream_model / "upstream.ckpt"), str(ours)]) == 0
    )
    module = ScPrintModule.load(ours)
    n_ours = sum(p.numel() for p in module.net.parameters())
    ref = np.load(upstream_model / "upstream.npz")
    assert n_ours == int(ref["n_parameters"])  # same modules, nothing extra or missing
    assert module.hparams.label_decoders["organism_ontology_term_id"][1].endswith(":1")
    assert module.hparams.organisms == ["NCBITaxon:9606", "NCBITaxon:10090"]
    assert_same(our_outputs(ours, upstream_model / "batch.npz"), ref)


def test_log_normalization_and_grouped_query_attention_import_too(tmp_path_factory, tmp_path):
    """upstream's other input normalisation (log2(1 + x)) and num_heads_kv 2 of 4 heads."""
    up = build(tmp_path_factory, "log-gqa")
    ours = tmp_path / "ours.ckpt"
    assert scprint_main(["convert", "import", str(up / "upstream.ckpt"), str(ours)]) == 0
    module = ScPrintModule.load(ours)
    assert module.net.cfg.normalization == "log" and module.net.cfg.kv_heads == 2
    assert_same(our_outputs(ours, up / "batch.npz"), np.load(up / "upstream.npz"))


def test_our_checkpoint_exports_to_upstream_with_the_same_outputs(upstream_model, tmp_path):
    ours, back = tmp_path / "ours.ckpt", tmp_path / "back.ckpt"
    assert (
        scprint_main(["convert", "import", str(upstream_model / "upstream.ckpt"), str(ours)]) == 0
    )
    # train one step here so the exported weights are ours, not the imported ones
    module = ScPrintModule.load(ours)
    with torch.no_grad():
        module.net.transformer.blocks[0].mixer.out_proj.weight.mul_(1.5)
    state = torch.load(ours, weights_only=True)
    state["state_dict"] = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    torch.save(state, ours)
    mine = our_outputs(ours, upstream_model / "batch.npz")

    assert scprint_main(["convert", "export", str(ours), str(back)]) == 0
    upstream("forward", str(back), str(upstream_model / "batch.npz"), str(tmp_path / "back.npz"))
    ref = np.load(tmp_path / "back.npz")
    assert_same(mine, ref)
    # and the change made here is visible upstream
    first = np.load(upstream_model / "upstream.npz")
    assert np.abs(ref["cell_emb"] - first["cell_emb"]).max() > 1e-3


def test_convert_refuses_what_it_cannot_map(upstream_model, tmp_path, capsys):
    ckpt = torch.load(upstream_model / "upstream.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["cell_specific_blocks"] = True
    bad = tmp_path / "v2.ckpt"
    torch.save(ckpt, bad)
    code = scprint_main(["convert", "import", str(bad), str(tmp_path / "out.ckpt")])
    assert code == 1
    assert "cell_specific_blocks=True" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()
