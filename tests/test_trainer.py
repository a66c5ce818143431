"""TrainingMode and ScPrintModule under a real Lightning Trainer, on in-memory batches.

Every key of `scprint_training:` and `model:` is shown to change what training does.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from scprint.model.lightning import OptimParams, ScPrintModule
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


def fit(mode: TrainingMode | None, steps=2, model_kw=None, **trainer_kw):
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
    trainer.fit(model, DataLoader(batches(), batch_size=None))
    return model, trainer


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# key -> (base overrides, changed value): the base makes the key matter
TRAINING_KEYS = {
    "lr": ({}, 1e-2),
    "optimizer": ({}, "sgd"),
    "weight_decay": ({"lr": 1e-2}, 0.5),
    "warmup_steps": ({}, 5),
    "scheduler": ({}, "constant"),
    "min_lr_ratio": ({}, 0.9),
    "noise": ({}, [0.2]),
    "mask_ratio": ({}, [0.4]),
    "do_generate": ({}, False),
    "do_cls": ({}, False),
    "do_mvc": ({}, True),
    "do_cce": ({"mask_ratio": [0.3]}, True),
    "do_ecs": ({}, True),
    "denoise_scale": ({}, 3.0),
    "mask_scale": ({"mask_ratio": [0.3]}, 3.0),
    "generate_scale": ({}, 3.0),
    "cls_scale": ({}, 3.0),
    "mvc_scale": ({"do_mvc": True}, 3.0),
    "cce_scale": ({"mask_ratio": [0.3], "do_cce": True}, 3.0),
    "ecs_scale": ({"do_ecs": True}, 3.0),
    "cce_temp": ({"mask_ratio": [0.3], "do_cce": True}, 0.05),
    "ecs_threshold": ({"do_ecs": True}, 0.9),
}


def test_every_training_key_is_covered():
    import inspect

    from scprint.trainer.trainer import UPSTREAM_REFUSED

    keys = set(inspect.signature(TrainingMode.__init__).parameters) - {"self", "name"}
    # `name` is covered in test_fit (logger run name); refused keys below
    assert keys == set(TRAINING_KEYS) | set(UPSTREAM_REFUSED)


@pytest.mark.parametrize("key", ["run_full_forward", "zinb_and_mse", "var_context_length"])
def test_upstream_training_keys_we_lack_are_refused_by_name(key):
    with pytest.raises(ValueError, match=f"scprint_training.{key}=True is not supported"):
        TrainingMode(**{key: True})


@pytest.mark.parametrize("key", sorted(TRAINING_KEYS))
def test_training_key_changes_training(key):
    base, changed = TRAINING_KEYS[key]
    runs = [
        fit(TrainingMode(**base), steps=3),
        fit(TrainingMode(**{**base, key: changed}), steps=3),
    ]
    a, b = (flat_params(m) for m, _ in runs)
    assert not torch.equal(a, b), f"scprint_training.{key} had no effect"


def test_scheduler_steps_once_per_step_with_warmup_then_cosine():
    mode = TrainingMode(lr=1e-3, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.1)
    model, trainer = fit(mode, steps=5)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 5
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    progress = (5 - 2) / (5 - 2)
    expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr == pytest.approx(expected)
    assert OptimParams(lr=1, warmup_steps=4).lr_factor(0, 10) == pytest.approx(0.25)


def test_callback_freezes_unused_modules_and_optimizer_skips_them():
    model, trainer = fit(TrainingMode(do_mvc=False, mask_ratio=[]), steps=1)
    assert not any(p.requires_grad for p in model.net.mvc_decoder.parameters())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not {id(p) for p in model.net.mvc_decoder.parameters()} & in_optimizer
    assert all(id(p) in in_optimizer for p in model.parameters() if p.requires_grad)


def test_weight_decay_only_on_weight_matrices():
    model, trainer = fit(TrainingMode(weight_decay=0.3), steps=1)
    decayed, plain = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert any(p is model.net.class_encoder.embedding.weight for p in plain["params"])


def test_losses_are_logged_by_name():
    _, trainer = fit(TrainingMode(mask_ratio=[0.3], do_mvc=True, do_ecs=True), steps=1)
    logged = set(trainer.callback_metrics)
    for name in ("denoise", "mask", "generate", "cls", "mvc", "ecs", "loss"):
        assert f"train/{name}" in logged
    assert "train/cls/cell_type" in logged


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
