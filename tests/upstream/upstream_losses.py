"""Runs INSIDE the upstream venv (.bench-venv-seed: PyPI scprint 2.3.8), never in ours.

    python -I tests/upstream/upstream_losses.py run DIR

Builds a tiny upstream scPrint (dropout 0, so a training-mode step is deterministic once
its noise and masks are fixed), saves it (DIR/upstream.ckpt) and two fixed batches
(DIR/batch.npz: labels with unknowns and hierarchy parents; a 420-token one for
var_context_length). For each scenario of SCENARIOS it applies upstream's own
TrainingMode to the model, runs upstream's ``_full_training`` in training mode, records
every random draw it made (downsample_profile outputs, simple_masker and the TF masker's
masks, hence the context length) and dumps the loss terms, the total and every
parameter's gradient (DIR/<scenario>.npz). tests/test_upstream_losses.py replays the
draws through our step and compares term by term. ``noise`` dumps upstream's
downsample_profile and WeightedMasker under fixed seeds (DIR/noise.npz), for our
functions to match draw for draw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "netguard"))
sys.path.insert(0, str(REPO / "tests" / "upstream"))  # -I leaves the script's folder out

import sitecustomize  # noqa: E402,F401  (the network guard, when SCPRINT_NETGUARD is set)
from record_steps import RecordSteps  # noqa: E402
from seed_step import shim_torchvision  # noqa: E402
from upstream_model import tiny_scprint  # noqa: E402

N_GENES, B, L, L_LONG = 450, 6, 24, 420
# cell type: leaves, unknown (-1) and both parents; organism: leaves and an unknown
LABELS = [[0, 0], [5, 1], [-1, 1], [3, -1], [6, 0], [1, 1]]
# scenario -> upstream TrainingMode keys (the rest at upstream's defaults)
SCENARIOS = {
    "defaults": {},
    "mvc": {"do_mvc": True},
    "ecs": {"do_ecs": True},
    "mask-cce": {"mask_ratio": [0.3], "do_cce": True},
    "tf-mask": {"mask_ratio": ["TF"], "do_cce": True},
    "full-forward": {"run_full_forward": True, "do_mvc": True, "do_ecs": True},
    "zinb-mse": {"zinb_and_mse": True, "mask_ratio": [0.25]},
    "adv-cls": {"do_adv_cls": True, "noise": [0.3, 0.7]},
    "no-denoise": {"do_denoise": False, "mask_ratio": [0.4], "do_generate": True},
    "context": {"var_context_length": True},
}


def build_model():
    """dropout 0: a training-mode step is deterministic once its noise and masks are fixed"""
    return tiny_scprint(N_GENES, dropout=0.0, mvc_decoder="inner product")


def batches():
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for name, length in (("", L), ("long_", L_LONG)):
        genes = np.stack([rng.permutation(N_GENES)[:length] for _ in range(B)])
        expr = rng.poisson(rng.gamma(0.5, 8.0, size=(B, length))).astype(np.float32)
        expr[:, 0] += 5  # no cell with zero counts
        out[f"{name}genes"] = genes
        out[f"{name}x"] = expr
        out[f"{name}depth"] = (expr.sum(1) * 2 + 10).astype(np.float32)
    out["class"] = np.array(LABELS, dtype=np.int64)
    return out


def run(out: Path) -> None:
    import lightning as L_
    import numpy as np
    import torch

    shim_torchvision()
    import scprint.model.utils as upstream_utils

    import scprint.model.model as upstream_model
    from scprint.trainer import TrainingMode

    model = build_model()
    trainer = L_.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(out / "upstream.ckpt")
    model.trainer = trainer  # var_context_length reads trainer.global_step (0)
    data = batches()
    np.savez(out / "batch.npz", **data)

    downsample, masker = upstream_utils.downsample_profile, upstream_model.simple_masker
    tf_masker = model.tf_masker
    draws: dict[str, list] = {"downsample": [], "mask": []}

    def record_downsample(*args, **kwargs):
        res = downsample(*args, **kwargs)
        draws["downsample"].append(res.detach().clone())
        return res

    def record_mask(*args, **kwargs):
        res = masker(*args, **kwargs)
        draws["mask"].append(res.clone())
        return res

    def record_tf(*args, **kwargs):
        res = tf_masker(*args, **kwargs)
        draws["mask"].append(res.clone())
        return res

    for name, keys in SCENARIOS.items():
        for recorded in draws.values():
            recorded.clear()
        upstream_utils.downsample_profile = record_downsample
        upstream_model.simple_masker = record_mask
        model.tf_masker = record_tf
        TrainingMode(**keys).setup(trainer, model)
        prefix = "long_" if keys.get("var_context_length") else ""
        batch = {
            "x": torch.from_numpy(data[f"{prefix}x"]),
            "genes": torch.from_numpy(data[f"{prefix}genes"]),
            "depth": torch.from_numpy(data[f"{prefix}depth"]),
            "class": torch.from_numpy(data["class"]),
        }
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        total, terms = model._full_training(  # as upstream's training_step calls it
            batch=batch,
            do_denoise=model.do_denoise,
            noise=model.noise,
            do_next_tp=model.do_next_tp,
            do_cce=model.do_cce,
            cce_temp=model.cce_temp,
            do_ecs=model.do_ecs,
            do_mvc=model.do_mvc,
            do_adv_cls=model.do_adv_cls,
            do_adv_batch=model.do_adv_batch,
            do_cls=model.do_cls,
            do_generate=model.do_generate,
            run_full_forward=model.run_full_forward,
            mask_ratio=model.mask_ratio,
        )
        total.backward()
        upstream_utils.downsample_profile, upstream_model.simple_masker = downsample, masker
        model.tf_masker = tf_masker
        arrays = {"total": total.detach().numpy()}
        arrays.update(
            {f"term/{k}": v.detach().numpy() for k, v in terms.items() if torch.is_tensor(v)}
        )
        arrays.update(
            {f"grad/{k}": p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
        )
        for kind, values in draws.items():
            arrays.update({f"draw/{kind}/{i}": v.numpy() for i, v in enumerate(values)})
        np.savez(out / f"{name}.npz", **arrays)
    (out / "scenarios.json").write_text(json.dumps(SCENARIOS))


def noise(out: Path) -> None:
    """Upstream's noise and TF masker under fixed seeds (ours must draw the same)."""
    import numpy as np
    import torch

    shim_torchvision()
    from scprint.model.utils import WeightedMasker, downsample_profile

    data = batches()
    x = torch.from_numpy(data["x"])
    arrays = {"x": x.numpy()}
    torch.manual_seed(7)
    arrays["down_60"] = downsample_profile(x, dropout=0.6).numpy()
    torch.manual_seed(8)
    arrays["down_rand_50"] = downsample_profile(x, dropout=0.5, randsamp=True).numpy()
    # gene names of upstream's own TF list next to others: a non-uniform draw
    genes = ["Mtf1", "Klf9", "Zic5", "Bcl6b"] + [f"NOTATF{i}" for i in range(N_GENES - 4)]
    masker = WeightedMasker(genes, inv_weight=0.05)
    ids = torch.from_numpy(data["genes"])
    torch.manual_seed(9)
    arrays["tf_mask"] = masker(ids=ids, mask_ratio=0.3).numpy()
    arrays["tf_weights"] = masker.weights.numpy()
    arrays["genes"] = ids.numpy()
    np.savez(out / "noise.npz", **arrays)


# schedule: upstream's TrainingMode for a few steps under a Lightning Trainer
SCHEDULE = {"lr": 3e-3, "warmup_duration": 3, "weight_decay": 0.01, "lr_reduce_patience": 0,
            "lr_reduce_factor": 0.5, "test_every": 1000}  # fmt: skip
SCHEDULE_TRAINER = {"max_epochs": 2, "limit_train_batches": 3, "val_check_interval": 1,
                    "num_sanity_val_steps": 0}  # fmt: skip


def schedule(out: Path) -> None:
    """Upstream's optimizer, warm-up and ReduceLROnPlateau over 6 steps (2 epochs of 3,
    validating after each step) from the weights of ``run``; three runs:
    ``as-is``: upstream unchanged except model.lr = scprint_training.lr (its optimizer and
    warm-up read model.lr) and no log_adata plots at validation end;
    ``once``: also Lightning's own epoch-end step of the plateau scheduler left out (upstream
    steps it by hand after every validation loop, and Lightning again at each epoch's end);
    ``model-lr``: as-is with scprint_training.lr 10x model.lr, to show which one it uses.
    Dumps the lr after every step, each validation loss, the final weights and the draws."""
    import lightning as L_
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    shim_torchvision()
    import scprint.model.utils as upstream_utils

    import scprint.model.model as upstream_model
    from scprint.trainer import TrainingMode

    class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        """upstream passes verbose=True, which torch 2.13 no longer takes (it printed)"""

        def __init__(self, *args, verbose=None, **kwargs):
            super().__init__(*args, **kwargs)

    torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
    data = batches()
    cells = [
        {"x": torch.from_numpy(data["x"][i::2]), "genes": torch.from_numpy(data["genes"][i::2]),
         "depth": torch.from_numpy(data["depth"][i::2]),
         "class": torch.from_numpy(data["class"][i::2])}
        for i in range(2)
    ]  # fmt: skip
    train, val = [cells[0], cells[1], cells[0]], [cells[1]]
    downsample, masker = upstream_utils.downsample_profile, upstream_model.simple_masker
    draws: list = []

    def record_downsample(*args, **kwargs):
        res = downsample(*args, **kwargs)
        draws.append(res.detach().clone())
        return res

    for variant in ("as-is", "once", "model-lr"):
        draws.clear()
        upstream_utils.downsample_profile = record_downsample
        model = build_model()
        model.log_adata = lambda *args, **kwargs: None  # plots (scanpy, matplotlib) only
        keys = dict(SCHEDULE)
        model.hparams.lr = keys["lr"]
        if variant == "model-lr":
            keys["lr"] = keys["lr"] * 10
        if variant == "once":
            model.lr_scheduler_step = lambda scheduler, metric: None
        record = RecordSteps()
        trainer = L_.Trainer(
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu",
            callbacks=[TrainingMode(**keys), record], **SCHEDULE_TRAINER,
        )  # fmt: skip
        torch.manual_seed(2)
        trainer.fit(model, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
        upstream_utils.downsample_profile = downsample
        arrays = {"lr": np.array(record.lr), "val_loss": np.array(record.val_loss)}
        arrays.update({f"weight/{k}": v.detach().numpy() for k, v in model.state_dict().items()})
        arrays.update({f"draw/downsample/{i}": v.numpy() for i, v in enumerate(draws)})
        np.savez(out / f"schedule-{variant}.npz", **arrays)
    assert masker is upstream_model.simple_masker
    (out / "schedule.json").write_text(json.dumps({"keys": SCHEDULE, "trainer": SCHEDULE_TRAINER}))


if __name__ == "__main__":
    commands = {"run": run, "noise": noise, "schedule": schedule}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit("usage: upstream_losses.py run|noise|schedule DIR")
    commands[sys.argv[1]](Path(sys.argv[2]))
