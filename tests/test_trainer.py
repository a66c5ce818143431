"""TrainingMode and ScPrintModule under a real Lightning Trainer, on in-memory batches.

Every key of `scprint_training:` and `model:` is shown to change what training does.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from scprint.model.lightning import Optimization, ScPrintModule
from scprint.trainer.trainer import TrainingMode

torch.set_num_threads(1)
GENES = [f"G{i}" for i in range(30)]
CLASSES = {"organism": 2, "cell_type": 3}
HIERARCHY = {"cell_type": {3: [0, 1]}}


def batches(n=4, B=6, L_=12, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        genes = torch.stack([torch.randperm(30, generator=g)[:L_] for _ in range(B)]).int()
        x = torch.poisson(torch.rand(B, L_, generator=g) * 5)
        cls = torch.randint(-1, 3, (B, 2), generator=g).int().clamp(max=1) * torch.tensor([1, 1])
        cls[:, 1] = torch.randint(-1, 4, (B,), generator=g)
        out.append({"x": x, "genes": genes, "class": cls, "depth": x.sum(1) + 10})
    return out


def module(**kw) -> ScPrintModule:
    torch.manual_seed(0)
    args = dict(
        genes=GENES, classes=CLASSES, labels_hierarchy=HIERARCHY, gene_positions=list(range(30)),
        d_model=16, nhead=2, nlayers=1, dropout=0.0, mvc_decoder="inner product",
    )  # fmt: skip
    return ScPrintModule(**{**args, **kw})


def fit(mode: TrainingMode | None, steps=2, model_kw=None, val_dataloaders=None, **trainer_kw):
    model = module(**(model_kw or {}))
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[mode] if mode else [],
        **trainer_kw,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(model, DataLoader(batches(), batch_size=None), val_dataloaders)
    return model, trainer


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# key -> (base overrides, changed value): the base makes the key matter
MASK = {"mask_ratio": [0.3]}
TRAINING_KEYS = {
    "lr": ({}, 1e-2),
    "optim": ({}, "adam"),
    "weight_decay": ({"lr": 1e-2}, 0.5),
    "warmup_duration": ({}, 1),
    "noise": ({}, [0.2]),
    "do_denoise": (MASK, False),
    "mask_ratio": ({}, [0.4]),
    "run_full_forward": ({}, True),
    "do_generate": ({}, False),
    "do_cls": ({}, False),
    "class_scale": ({}, 3.0),
    "class_embd_diss_scale": ({}, 3.0),
    "do_adv_cls": ({}, True),
    "adv_class_scale": ({"do_adv_cls": True}, 3.0),
    "do_mvc": ({}, True),
    "mvc_scale": ({"do_mvc": True}, 3.0),
    "do_cce": (MASK, True),
    "cce_scale": ({**MASK, "do_cce": True}, 3.0),
    "cce_temp": ({**MASK, "do_cce": True}, 0.05),
    "do_ecs": ({}, True),
    "ecs_scale": ({"do_ecs": True}, 3.0),
    "ecs_threshold": ({"do_ecs": True}, 0.9),
    "zinb_and_mse": ({}, True),
    "dropout": ({}, 0.5),
    "lr_schedule": ({"warmup_duration": 1}, "cosine"),
    "min_lr_ratio": ({"warmup_duration": 1, "lr_schedule": "cosine"}, 0.9),
    "decay_matrices_only": ({"lr": 1e-2, "weight_decay": 0.5}, True),
}
# covered elsewhere: name (test_fit: logger run name); var_context_length (acts above 400
# tokens: test_upstream_losses "context"); the plateau keys, fused_adam, tf_list and the
# refused and recorded-only keys below
OTHER_KEYS = {
    "name", "var_context_length", "lr_reduce_patience", "lr_reduce_factor",
    "lr_reduce_monitor", "fused_adam", "tf_list", "do_next_tp", "do_adv_batch",
    "test_every", "set_step",
}  # fmt: skip


def test_every_training_key_is_covered():
    import inspect

    keys = set(inspect.signature(TrainingMode.__init__).parameters) - {"self"}
    assert keys == set(TRAINING_KEYS) | OTHER_KEYS, keys ^ (set(TRAINING_KEYS) | OTHER_KEYS)


@pytest.mark.parametrize("key", ["do_next_tp", "do_adv_batch"])
def test_upstream_keys_that_cannot_act_are_refused_by_name(key):
    with pytest.raises(ValueError, match=f"scprint_training.{key}=true: upstream scPRINT 2.3.8"):
        TrainingMode(**{key: True})


def test_recorded_keys_are_kept_in_the_callback_state():
    state = TrainingMode(test_every=3, set_step=7, name="run").state_dict()
    assert (state["test_every"], state["set_step"], state["name"]) == (3, 7, "run")


@pytest.mark.parametrize("key", sorted(TRAINING_KEYS))
def test_training_key_changes_training(key):
    base, changed = TRAINING_KEYS[key]
    runs = [
        fit(TrainingMode(**base), steps=3),
        fit(TrainingMode(**{**base, key: changed}), steps=3),
    ]
    a, b = (flat_params(m) for m, _ in runs)
    assert not torch.equal(a, b), f"scprint_training.{key} had no effect"


def test_warmup_is_upstreams_then_the_lr_holds():
    """lr x (step + 1) / warmup_duration on the first steps, then lr (upstream's
    optimizer_step), with no scheduler step in between (no validation ran)."""
    model, trainer = fit(TrainingMode(lr=1e-3, warmup_duration=4), steps=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)
    model, trainer = fit(TrainingMode(lr=1e-3, warmup_duration=2), steps=5)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)


class RecordValidation(L.Callback):
    """val_loss and the lr after each validation loop (after the module's own hook)."""

    def __init__(self):
        self.val_loss, self.lr = [], []

    def on_validation_end(self, trainer, pl_module):
        self.val_loss.append(float(trainer.callback_metrics["val_loss"]))
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_plateau_steps_once_per_validation_on_val_loss():
    """ReduceLROnPlateau (patience 0, factor 0.5) on val_loss, validating after every
    step: the lr after each loop is what one scheduler step per loop gives on the logged
    val_loss (Lightning's own epoch-end step would be a second one)."""
    mode = TrainingMode(lr=0.1, warmup_duration=0, lr_reduce_patience=0, lr_reduce_factor=0.5)
    record = RecordValidation()
    val = DataLoader(batches(1, seed=5), batch_size=None)
    model = module()
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[mode, record], val_check_interval=1,
        num_sanity_val_steps=0, limit_train_batches=3,
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    trainer.fit(model, DataLoader(batches(), batch_size=None), val)
    assert isinstance(
        trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
    )
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, patience=0, factor=0.5)
    expected = []
    for value in record.val_loss:
        plateau.step(value)
        expected.append(reference.param_groups[0]["lr"])
    assert len(record.lr) == 6  # two epochs of 3 steps: Lightning's epoch end steps nothing
    assert record.lr == pytest.approx(expected)
    assert min(record.lr) < 0.1, record.val_loss  # the schedule acted


def test_no_monitor_means_constant_lr_after_warmup():
    model, trainer = fit(TrainingMode(lr_reduce_monitor=None, warmup_duration=0), steps=2)
    assert not trainer.lr_scheduler_configs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_cosine_schedule_steps_once_per_step_after_warmup():
    mode = TrainingMode(lr=1e-3, warmup_duration=2, lr_schedule="cosine", min_lr_ratio=0.1)
    model, trainer = fit(mode, steps=5)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 5
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1.0)))
    assert lr == pytest.approx(expected)
    assert Optimization(lr=1, warmup_duration=4).warmup_factor(0) == pytest.approx(0.25)


def test_fused_adam_reaches_the_optimizer():
    _, trainer = fit(TrainingMode(fused_adam=True), steps=1)
    assert trainer.optimizers[0].defaults["fused"] is True


def test_tf_list_weights_tfs_for_tf_masking(tmp_path):
    (tmp_path / "tfs.txt").write_text("G3\nG7\n")
    model, _ = fit(TrainingMode(mask_ratio=["TF"], tf_list=str(tmp_path / "tfs.txt")), steps=1)
    weights = model.tf_weights.cpu()
    assert weights[3] == weights[7] == 1.0 and weights[0] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="none of its 1 ids is a gene of the model"):
        (tmp_path / "bad.txt").write_text("Klf9\n")
        fit(TrainingMode(mask_ratio=["TF"], tf_list=str(tmp_path / "bad.txt")), steps=1)


def test_callback_freezes_unused_modules_and_optimizer_skips_them():
    model, trainer = fit(TrainingMode(do_mvc=False, mask_ratio=[]), steps=1)
    assert not any(p.requires_grad for p in model.net.mvc_decoder.parameters())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not {id(p) for p in model.net.mvc_decoder.parameters()} & in_optimizer
    assert all(id(p) in in_optimizer for p in model.parameters() if p.requires_grad)


def test_weight_decay_on_every_parameter_as_upstream_or_matrices_only():
    model, trainer = fit(TrainingMode(weight_decay=0.3), steps=1)
    (group,) = trainer.optimizers[0].param_groups
    assert group["weight_decay"] == 0.3
    assert any(p is model.net.class_encoder.embedding.weight for p in group["params"])
    model, trainer = fit(TrainingMode(weight_decay=0.3, decay_matrices_only=True), steps=1)
    decayed, plain = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])


def test_losses_are_logged_by_upstreams_names():
    mode = TrainingMode(mask_ratio=[0.3], do_mvc=True, do_ecs=True, do_cce=True)
    _, trainer = fit(mode, steps=1)
    logged = set(trainer.callback_metrics)
    for name in ("mask_30%_expr", "mask_30%_cls", "mask_30%_expr_mvc", "denoise_60%_expr",
                 "denoise_60%_ecs", "gen_expr", "gen_emb_independence", "cce", "loss"):  # fmt: skip
        assert f"train/{name}" in logged, sorted(logged)


# model key -> changed value; each changes the parameters' shapes or the outputs
MODEL_KEYS = {
    "d_model": 32,
    "nhead": 4,
    "nlayers": 2,
    "num_heads_kv": 1,
    "mlp_ratio": 2.0,
    "dropout": 0.5,
    "transformer": "normal",
    "residual_in_fp32": False,
    "normalization": "log",
    "expr_encoder_layers": 3,
    "layers_cls": [8],
    "mvc_decoder": "None",
    "pred_embedding": ["cell_type"],
    "freeze_embeddings": False,
    "gene_positions": None,
    "classes": {"organism": 2},
    "labels_hierarchy": {},
}
# keys that describe the data, not the network: kept in checkpoints (export, readable
# predictions), tested in test_upstream_convert.py / test_fit.py
DATA_KEYS = {"genes", "organisms", "label_decoders", "gene_embeddings"}
# recomputation: same outputs by design, see test_checkpoint_activations_key_reaches_the_network
RECOMPUTE_KEYS = {"checkpoint_activations", "checkpointing"}


def test_every_model_key_is_covered():
    import inspect

    from scprint.model.lightning import UNSUPPORTED

    params = set(inspect.signature(ScPrintModule.__init__).parameters) - {"self"}
    covered = set(MODEL_KEYS) | DATA_KEYS | RECOMPUTE_KEYS | set(UNSUPPORTED)
    assert params == covered, params ^ covered


@pytest.mark.parametrize("key", ["cell_specific_blocks", "compress_class_dim", "depth_atinput"])
def test_upstream_v2_keys_are_refused_by_name(key):
    value = {"cell_specific_blocks": True, "compress_class_dim": {"cell_type": 4}}.get(key, False)
    with pytest.raises(ValueError, match=f"model.{key}=.* is not supported"):
        module(**{key: value})


def test_pred_embedding_must_name_a_class():
    with pytest.raises(ValueError, match="pred_embedding names 'tissue'"):
        module(pred_embedding=["tissue"])


def model_fingerprint(model: ScPrintModule, train: bool) -> torch.Tensor:
    b = batches(1)[0]
    model.train(train)
    torch.manual_seed(3)
    out = model.predict_step(b, 0)
    from scprint.model.objectives import Objectives, compute_losses

    torch.manual_seed(3)
    loss = compute_losses(model.net, b, Objectives(), model.label_sets)["loss"]
    return torch.cat([out["cell_emb"].flatten(), loss.reshape(1)])


@pytest.mark.parametrize("key", sorted(MODEL_KEYS))
def test_model_key_changes_the_model(key):
    ref, changed = module(), module(**{key: MODEL_KEYS[key]})
    if key == "freeze_embeddings":
        ref.setup("fit"), changed.setup("fit")
        assert (
            ref.net.gene_encoder.embeddings.weight.requires_grad
            != changed.net.gene_encoder.embeddings.weight.requires_grad
        )
        return
    shapes = [p.shape for p in ref.parameters()], [p.shape for p in changed.parameters()]
    if shapes[0] != shapes[1]:
        return
    if key == "transformer":  # same weights, same maths: the point is the kernel it uses
        assert changed.net.transformer.blocks[0].mixer.backend == "normal"
        return
    if key == "residual_in_fp32":  # acts in half precision only: the stream's dtype
        x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
        for m, want in ((ref, torch.float32), (changed, torch.bfloat16)):
            m.net.transformer.to(torch.bfloat16)
            m.net.transformer.blocks[0].register_forward_hook(
                lambda mod, inp, out, want=want: assert_dtype(out, want)
            )
            m.net.transformer(x)
        return
    changed.load_state_dict(ref.state_dict(), strict=False)  # gene_pos buffer may be absent
    a, b = model_fingerprint(ref, train=True), model_fingerprint(changed, train=True)
    assert not torch.allclose(a, b), f"model.{key} had no effect"


def assert_dtype(t: torch.Tensor, want: torch.dtype) -> None:
    assert t.dtype == want


def test_gene_embeddings_parquet_fills_the_table(tmp_path):
    import numpy as np
    import pandas as pd

    table = np.random.default_rng(0).normal(size=(30, 32)).astype(np.float32)
    index = pd.Index(GENES[::-1], name="ensembl_gene_id")  # other order than the vocabulary
    pd.DataFrame(table, index=index, columns=[str(i) for i in range(32)]).to_parquet(
        tmp_path / "emb.parquet"
    )
    model = module(gene_embeddings=str(tmp_path / "emb.parquet"))
    # width 32 pooled to d_model 16 as upstream (AdaptiveAvgPool1d): means of pairs
    pooled = torch.from_numpy(table[-1]).reshape(16, 2).mean(1)
    torch.testing.assert_close(model.net.gene_encoder.embeddings.weight[0], pooled)
    with pytest.raises(Exception, match="have no row"):
        module(genes=[*GENES, "EXTRA"], gene_embeddings=str(tmp_path / "emb.parquet"))


def test_checkpoint_activations_key_reaches_the_network():
    """model.checkpoint_activations (config/base.yml) switches recomputation on; what it
    changes (memory kept, not results) is tested in test_model.py."""
    assert module().net.cfg.checkpoint_activations is False
    assert module(checkpoint_activations=True).net.cfg.checkpoint_activations is True
    net = module(checkpoint_activations="mlp").net
    assert all(block.mlp.recompute for block in net.transformer.blocks)
    # upstream's checkpointing key recomputes too (whole blocks here)
    assert module(checkpointing=True).net.cfg.checkpoint_activations is True


def test_resume_refuses_a_checkpoint_whose_gene_order_differs():
    """ckpt_path onto a model built from the data: a gene vocabulary in another order would
    give every per-gene row to another gene; the resume stops instead."""
    model = module()
    model.on_load_checkpoint({"scprint": {"genes": list(GENES)}})  # same order: fine
    with pytest.raises(ValueError, match="same genes, another order"):
        model.on_load_checkpoint({"scprint": {"genes": GENES[::-1]}})
    with pytest.raises(ValueError, match="31 vs 30 genes"):
        model.on_load_checkpoint({"scprint": {"genes": [*GENES, "G99"]}})
