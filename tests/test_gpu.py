"""The GPU paths: flash-attn, bf16 training under Lightning, ESM embeddings on CUDA.

They need a CUDA GPU (and flash-attn for the flash tests) and are skipped, saying so, on
machines without one, such as CI. Run them where a GPU exists:
``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from scprint.model import losses
from scprint.model.lightning import ScPrintModule
from scprint.model.model import ScPrint, ScPrintConfig
from scprint.model.objectives import Objectives, compute_losses
from scprint.trainer.trainer import TrainingMode

CUDA = torch.cuda.is_available()
FLASH = CUDA and importlib.util.find_spec("flash_attn") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_flash = pytest.mark.skipif(not FLASH, reason="needs a CUDA GPU with flash-attn installed")

N_GENES = 600
CLASSES = {"organism": 2, "cell_type": 5}
HIERARCHY = {"cell_type": {5: [0, 1], 6: [2, 3, 4]}}
ALL_OBJECTIVES = Objectives(
    noise=[0.5], mask_ratio=[0.3], do_generate=True, do_cls=True, do_mvc=True, do_cce=True,
    do_ecs=True,
)  # fmt: skip


def cells(B=8, L=256, seed=0, device="cpu") -> dict:
    """Synthetic cells: two cell types with distinct expression programs, so there is
    something to learn."""
    g = torch.Generator().manual_seed(seed)
    genes = torch.stack([torch.randperm(N_GENES, generator=g)[:L] for _ in range(B)])
    cell_type = torch.randint(0, 5, (B,), generator=g)
    rate = torch.rand(B, L, generator=g) * 2 + (genes % 5 == cell_type[:, None]) * 8
    x = torch.poisson(rate)
    cls = torch.stack([cell_type % 2, cell_type], 1).int()
    batch = {"x": x, "genes": genes.int(), "class": cls, "depth": x.sum(1) * 2}
    return {k: v.to(device) for k, v in batch.items()}


def net(attention: str, d_model=64, nhead=2) -> ScPrint:
    cfg = ScPrintConfig(
        n_genes=N_GENES, classes=CLASSES, d_model=d_model, nhead=nhead,
        nlayers=2, attention=attention, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return ScPrint(cfg, torch.randn(N_GENES, 48), torch.arange(N_GENES) // 4)


@needs_flash
@pytest.mark.parametrize("d_model,nhead", [(64, 2), (256, 4)])  # head dims 32 and 64
def test_flash_and_sdpa_give_the_same_losses_and_gradients_in_bf16(d_model, nhead):
    sets = {k: losses.label_sets(n, HIERARCHY.get(k)).cuda() for k, n in CLASSES.items()}
    batch = cells(device="cuda")
    results = {}
    for attention in ("sdpa", "flash"):
        model = net(attention, d_model, nhead).cuda()
        model.load_state_dict(net("sdpa", d_model, nhead).state_dict())
        torch.manual_seed(1)  # the same downsampling and masks for both
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compute_losses(model, batch, ALL_OBJECTIVES, sets)
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[attention] = ({k: v.item() for k, v in out.items()}, grads.float())
    (sdpa_terms, sdpa_grad), (flash_terms, flash_grad) = results["sdpa"], results["flash"]
    assert sdpa_terms.keys() == flash_terms.keys()
    for name, value in sdpa_terms.items():
        assert flash_terms[name] == pytest.approx(value, rel=2e-2, abs=2e-3), name
    cos = torch.nn.functional.cosine_similarity(sdpa_grad, flash_grad, dim=0).item()
    assert cos > 0.99


@needs_flash
def test_flash_refuses_float32_clearly():
    model = net("flash").cuda()
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        batch = cells(device="cuda")
        model.encode(batch["genes"].long(), batch["x"], batch["depth"])


class LossLog(L.Callback):
    def __init__(self):
        self.losses: list[float] = []
        self.denoise: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.denoise.append(float(trainer.callback_metrics["train/denoise"]))


@needs_flash
def test_bf16_lightning_training_with_flash_learns_and_reloads_on_cpu(tmp_path):
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    torch.manual_seed(0)
    module = ScPrintModule(
        genes=genes, classes=CLASSES, labels_hierarchy=HIERARCHY,
        gene_positions=list(range(N_GENES)), d_model=64, nhead=2, nlayers=2,
        dropout=0.0, transformer="flash",
    )  # fmt: skip
    data = [cells(B=16, seed=s) for s in range(4)]
    log = LossLog()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=400,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrainingMode(lr=3e-3, warmup_duration=10, lr_reduce_monitor=None), log],
    )
    trainer.fit(module, DataLoader(data * 100, batch_size=None))
    assert all(torch.isfinite(torch.tensor(log.losses)))
    # fp32 sdpa on CPU, same 400 steps, seeds 0-2: loss 5.9 -> 4.7-5.0, denoise 2.24 -> 1.51.
    # (the class terms learn too, but how fast varies too much from seed to seed to assert)
    for values, factor in ((log.losses, 0.9), (log.denoise, 0.8)):
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < factor * first, (first, last)

    path = tmp_path / "bf16-flash.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ScPrintModule.load(path, transformer="sdpa")  # CPU, fp32, no flash-attn needed
    batch = cells(B=16, seed=0)
    with torch.no_grad():
        cpu_emb = reloaded.predict_step(batch, 0)["cell_emb"]
        module.cuda().eval()  # Lightning moves the module back to the CPU after fit
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_emb = module.predict_step({k: v.cuda() for k, v in batch.items()}, 0)["cell_emb"]
    cos = torch.nn.functional.cosine_similarity(cpu_emb, gpu_emb.float().cpu(), dim=1)
    assert cos.min() > 0.98


@needs_cuda
def test_esm_embeddings_on_cuda_bf16_match_cpu_fp32(tmp_path):
    from transformers import EsmModel

    from scprint.embeddings import esm, esm_tiny

    out = tmp_path / "esm"
    esm_tiny.save_tiny_esm(out, seed=0, hidden_size=64, layers=2, heads=4)
    tokenizer, model = esm.load_model(str(out))
    assert isinstance(model, EsmModel)
    g = torch.Generator().manual_seed(0)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    sequences = [
        "".join(letters[i] for i in torch.randint(0, 20, (int(n),), generator=g))
        for n in torch.randint(20, 1200, (40,), generator=g)
    ]
    cpu = esm.embed_sequences(sequences, tokenizer, model, 4096, torch.device("cpu"), torch.float32)
    gpu = esm.embed_sequences(
        sequences, tokenizer, model, 4096, *esm.pick_device("cuda")
    )  # bf16 on the GPU
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(cpu), torch.from_numpy(gpu))
    assert cos.min() > 0.99
