"""Our training step IS upstream scPRINT 2.3.8's: loss for loss, gradient for gradient.

In the upstream venv (tests/upstream/upstream_losses.py) a tiny upstream model (dropout 0)
runs its own ``_full_training`` in training mode for each scenario, configured by its own
TrainingMode; every random draw it makes (downsampled counts, masks, the TF masker's
draw, the context length) is recorded with the loss terms and every parameter's gradient.
Here the same weights (``scprint convert import``) and batch go through our
``compute_losses``, configured by our TrainingMode with the same keys, with upstream's
draws replayed through ``Corruption``: the same terms (names and values within 1e-5,
relative for the large ones) and gradients (within 1e-4 of each parameter's largest).
The batch has unknown labels and labels that are hierarchy parents. Our noise model and
TF masker are also checked draw for draw against upstream's under the same seeds.

Without the venv the tests skip with the reason; with SCPRINT_REQUIRE_UPSTREAM=1 (CI) they
fail instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_upstream

from scprint.cli import main as scprint_main
from scprint.model.lightning import ScPrintModule
from scprint.model.objectives import Corruption, compute_losses, downsample
from scprint.trainer.trainer import TrainingMode

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "upstream" / "upstream_losses.py"
TERM_TOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upstream-losses")
    run_upstream(HELPER, "run", out)
    code = scprint_main(["convert", "import", str(out / "upstream.ckpt"), str(out / "ours.ckpt")])
    assert code == 0
    return out


class Replay(Corruption):
    """Upstream's recorded draws, handed out in the order our step asks for them."""

    def __init__(self, ref):
        def series(kind):
            keys = sorted((k for k in ref.files if k.startswith(f"draw/{kind}/")),
                          key=lambda k: int(k.rsplit("/", 1)[1]))  # fmt: skip
            return [torch.from_numpy(ref[k]) for k in keys]

        self.downsampled, self.masks = series("downsample"), series("mask")

    def downsample(self, x, noise, randsamp=False):
        out = self.downsampled.pop(0)
        assert out.shape == x.shape
        return out.to(x.dtype)

    def mask(self, shape, ratio, device):
        out = self.masks.pop(0)
        assert out.shape == shape
        return out.to(device)

    def tf_mask(self, weights, ratio):
        out = self.masks.pop(0)
        assert out.shape == weights.shape and int(out[0].sum()) == int(weights.shape[1] * ratio)
        return out

    def context_length(self, length):
        return int(self.downsampled[0].shape[1])


def our_step(ckpt: Path, batch: dict, keys: dict, replay: Replay):
    module = ScPrintModule.load(ckpt).train()
    mode = TrainingMode(**keys)  # upstream's keys, through our TrainingMode
    module.configure_training(mode.objectives, mode.optim, torch.ones(len(module.hparams.genes)))
    out = compute_losses(
        module.net, batch, mode.objectives, module.label_sets, step=0, corruption=replay,
        tf_weights=module.tf_weights,
    )  # fmt: skip
    out["loss"].backward()
    grads = {k: p.grad for k, p in module.net.named_parameters() if p.grad is not None}
    assert not replay.downsampled and not replay.masks, "a recorded draw was not used"
    return out, grads


@pytest.mark.parametrize(
    "scenario",
    ["defaults", "mvc", "ecs", "mask-cce", "tf-mask", "full-forward", "zinb-mse", "adv-cls",
     "no-denoise", "context"],
)  # fmt: skip
def test_every_loss_term_and_gradient_matches_upstream(upstream_run, scenario):
    keys = json.loads((upstream_run / "scenarios.json").read_text())[scenario]
    ref = np.load(upstream_run / f"{scenario}.npz")
    data = np.load(upstream_run / "batch.npz")
    prefix = "long_" if keys.get("var_context_length") else ""
    batch = {
        "x": torch.from_numpy(data[f"{prefix}x"]),
        "genes": torch.from_numpy(data[f"{prefix}genes"]),
        "depth": torch.from_numpy(data[f"{prefix}depth"]),
        "class": torch.from_numpy(data["class"]),
    }
    out, grads = our_step(upstream_run / "ours.ckpt", batch, keys, Replay(ref))

    theirs = {k.removeprefix("term/"): float(ref[k]) for k in ref.files if k.startswith("term/")}
    mine = {k: float(v) for k, v in out.items() if k != "loss"}
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    theirs["loss"], mine["loss"] = float(ref["total"]), float(out["loss"])
    for name, value in theirs.items():
        assert abs(mine[name] - value) <= TERM_TOL * max(1.0, abs(value)), (name, mine[name], value)

    up_grads = {k.removeprefix("grad/"): ref[k] for k in ref.files if k.startswith("grad/")}
    assert set(grads) == set(up_grads), set(grads) ^ set(up_grads)
    for name, g in up_grads.items():
        scale = float(np.abs(g).max())
        diff = float((grads[name] - torch.from_numpy(g)).abs().max())
        assert diff <= GRAD_RTOL * max(scale, 1e-6), (name, diff, scale)
    # not vacuous: the step moves the transformer and every active objective's terms exist
    assert float(np.abs(up_grads["transformer.blocks.0.mlp.fc1.weight"]).max()) > 1e-6


def test_noise_model_and_tf_masker_draw_as_upstream(tmp_path):
    run_upstream(HELPER, "noise", tmp_path)
    ref = np.load(tmp_path / "noise.npz")
    x = torch.from_numpy(ref["x"])
    torch.manual_seed(7)
    assert torch.equal(downsample(x, 0.6), torch.from_numpy(ref["down_60"]))
    torch.manual_seed(8)
    assert torch.equal(downsample(x, 0.5, randsamp=True), torch.from_numpy(ref["down_rand_50"]))
    weights = torch.from_numpy(ref["tf_weights"])[torch.from_numpy(ref["genes"]).long()]
    torch.manual_seed(9)
    assert torch.equal(Corruption().tf_mask(weights.float(), 0.3), torch.from_numpy(ref["tf_mask"]))
    # upstream's noise at 0.6 zeroes about a third of the genes, high counts included
    down = torch.from_numpy(ref["down_60"])
    high = x >= 20
    assert 0.2 < float((down[high] == 0).float().mean()) < 0.5
