"""`scprint finetune`: LoRA fine-tuning of a pre-trained checkpoint on a labeled h5ad.

    scprint finetune --config config/finetune.yml --name pbmc \\
        --checkpoint checkpoints/demo/last.ckpt --data.h5ad '[data/processed/x.h5ad]' \\
        --data.label_key cell_type_ontology_term_id --lora.r 4 --train.epochs 20

Config files merge in order, dotted flags override them and ``--print_config`` shows the
result, as with `scprint fit` (jsonargparse, the parser under LightningCLI).

What it does: reads the cells (scprint.finetune.data), holds out a stratified share,
scores a linear probe (logistic regression) on the frozen model's cell embedding, adds
peft LoRA adapters + a new head (scprint.finetune.lora), trains them, scores them on the
same held-out cells and writes, only once everything has succeeded:

    <out_dir>/adapter/        peft adapter (LoRA weights + head) + finetune.json (labels)
    <out_dir>/merged.ckpt     base checkpoint with LoRA merged in (ScPrintModule.load)
    <summary>                 accuracy / macro F1 before and after, trainable parameters

Training state is saved atomically after every epoch in ``<out_dir>/state.pt``; a rerun
with the same settings resumes from it (a killed job loses at most one epoch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from scprint.finetune.lora import LoraSettings
from scprint.io import StageError, atomic_path, write_json
from scprint.model import readout
from scprint.model.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class DataSettings:
    """The labeled cells.

    Args:
        h5ad: h5ad files with raw counts and Ensembl gene ids (e.g. the preprocess stage's
            data/processed/<dataset>.h5ad).
        label_key: obs column to classify; its values may be ones the model never saw.
        held_out: share of each label's cells kept for scoring (stratified).
        max_len: gene tokens per cell (its most expressed genes, then unexpressed ones).
        min_cells_per_label: labels with fewer cells are left out (logged).
    """

    h5ad: list[str] = field(default_factory=list)
    label_key: str = "cell_type_ontology_term_id"
    held_out: float = 0.2
    max_len: int = 256
    min_cells_per_label: int = 2


@dataclass
class TrainSettings:
    """The optimisation of the adapters and the head.

    Args:
        epochs: passes over the training cells.
        lr: AdamW learning rate, reached linearly over the first ``warmup_epochs``, then
            constant.
        warmup_epochs: epochs of linear warm-up: the head starts as the linear probe,
            and full-size first steps of the adapters move the standardised embedding
            far from it before the gradients are informative.
        weight_decay: AdamW weight decay.
        batch_size: cells per step.
        device: auto (cuda when there is one), cpu or cuda.
        precision: 32-true, or bf16-mixed (autocast; CUDA only).
        seed: split, shuffling, dropout and head initialisation.
    """

    epochs: int = 10
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    batch_size: int = 32
    device: str = "auto"
    precision: str = "32-true"
    seed: int = 0


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="scprint finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="yaml, repeat to merge in order")
    parser.add_argument("--name", type=str, required=True, help="run name (output folders)")
    parser.add_argument("--checkpoint", type=str, required=True, help="pre-trained checkpoint")
    parser.add_argument(
        "--out_dir", type=str | None, default=None, help="default checkpoints/finetune/<name>"
    )
    parser.add_argument(
        "--summary", type=str | None, default=None, help="default results/finetune/<name>.json"
    )
    parser.add_dataclass_arguments(DataSettings, "data")
    parser.add_dataclass_arguments(LoraSettings, "lora")
    parser.add_dataclass_arguments(TrainSettings, "train")
    return parser


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = build_parser()
    cfg = parser.parse_args(argv)
    try:
        finetune(
            name=cfg.name,
            checkpoint=cfg.checkpoint,
            data=DataSettings(**vars(cfg.data)),
            lora=LoraSettings(**vars(cfg.lora)),
            train=TrainSettings(**vars(cfg.train)),
            out_dir=cfg.out_dir or f"checkpoints/finetune/{cfg.name}",
            summary=cfg.summary or f"results/finetune/{cfg.name}.json",
            config=json.loads(parser.dump(cfg, format="json", skip_none=False)),
        )
    except StageError as err:
        print(f"scprint finetune: error: {err}", file=sys.stderr)
        return 1
    return 0


def _device(train: TrainSettings) -> str:
    if train.precision not in PRECISIONS:
        raise StageError(f"train.precision={train.precision!r}: use one of {PRECISIONS}")
    if train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if train.device == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device=cuda but torch sees no GPU: use auto or cpu")
    return train.device


def _loader(dataset, batch_size: int, shuffle_seed: int | None = None):
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator
    )


def _autocast(device: str, precision: str):
    enabled = precision == "bf16-mixed" and device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict(model, loader, device: str, precision: str, embed: bool = False) -> np.ndarray:
    """Logits (or, with ``embed``, cell embeddings) of every cell of ``loader``, in order."""
    model.eval()
    out = []
    for batch in loader:
        args = (batch["genes"].to(device), batch["x"].to(device), batch["depth"].to(device))
        with _autocast(device, precision):
            y = model.embed(*args) if embed else model(*args)
        out.append(y.float().cpu().numpy())
    return np.concatenate(out)


def scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, average="macro")),
    }


def linear_probe(train_emb, train_y, seed: int):
    """Logistic regression on the frozen model's standardised cell embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return probe.fit(train_emb, train_y)


def adapters_train(model: torch.nn.Module) -> None:
    """Train mode with only the adapters' dropout on: the network keeps its own dropout
    off, so the head sees the embedding its probe was fit on; with it on, the
    standardised embedding's noise was ~200x the between-cell spread on the demo (a
    barely trained model) and training collapsed to one label."""
    readout.train_without_dropout(model)
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.train()


def train_epochs(model, dataset, train: TrainSettings, device: str, state_path: Path, key: dict):
    """AdamW on the trainable parameters; resumes from ``state_path`` when its ``key``
    (the settings) matches. Epoch e shuffles and draws dropout from seed + e, so a resumed
    run takes the steps an uninterrupted one would."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=train.lr, weight_decay=train.weight_decay)
    start, losses = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["key"] == key:
            model.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            start, losses = state["epoch"], state["losses"]
            log.info("resuming from %s after epoch %d", state_path, start)
        else:
            log.warning("%s was saved with other settings: starting over", state_path)
    steps_per_epoch = -(-len(dataset) // train.batch_size)
    warmup = max(1.0, train.warmup_epochs * steps_per_epoch)
    for epoch in range(start, train.epochs):
        torch.manual_seed(train.seed + 1 + epoch)
        adapters_train(model)
        total, n = 0.0, 0
        loader = _loader(dataset, train.batch_size, shuffle_seed=train.seed + epoch)
        for step, batch in enumerate(loader, start=epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = train.lr * min(1.0, (step + 1) / warmup)
            with _autocast(device, train.precision):
                logits = model(
                    batch["genes"].to(device), batch["x"].to(device), batch["depth"].to(device)
                )
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() * len(logits), n + len(logits)
        losses.append(total / max(n, 1))
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, train.epochs, losses[-1])
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "key": key,
                    "epoch": epoch + 1,
                    "losses": losses,
                    "trainable": {k: p.detach() for k, p in params.items()},
                    "optimizer": optimizer.state_dict(),
                },
                tmp,
            )
    return losses


def _publish_dir(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``tmp`` (renames, so never half-written)."""
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def finetune(
    name: str,
    checkpoint: str,
    data: DataSettings,
    lora: LoraSettings,
    train: TrainSettings,
    out_dir: str,
    summary: str,
    config: dict | None = None,
) -> dict:
    from scprint.finetune.data import CellTokens, read_labeled, split, vocabulary_organisms
    from scprint.finetune.lora import Classifier, add_lora, count_params, save_merged

    if not data.h5ad:
        raise StageError("data.h5ad is empty: give the labeled h5ad files to fine-tune on")
    if not Path(checkpoint).exists():
        raise StageError(f"checkpoint {checkpoint} does not exist: train one (`scprint fit`)")
    device = _device(train)
    module = load_checkpoint(checkpoint, device)
    genes = list(module.hparams.genes)  # in the order of the network's gene indices
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    saved = saved.get("scprint") or {}
    trained_on = ((saved.get("config") or {}).get("data") or {}).get("organisms")
    cells = read_labeled(
        data.h5ad,
        data.label_key,
        genes,
        vocabulary_organisms(genes, trained_on),
        data.min_cells_per_label,
    )
    train_idx, test_idx = split(cells.label, data.held_out, train.seed)
    train_set = CellTokens(cells, train_idx, data.max_len, train.seed)
    test_set = CellTokens(cells, test_idx, data.max_len, train.seed)
    log.info(
        "%d labels, %d training and %d held-out cells",
        len(cells.labels), len(train_idx), len(test_idx),
    )  # fmt: skip

    torch.manual_seed(train.seed)
    model = Classifier.of(module, len(cells.labels)).to(device)
    test_y = cells.label[test_idx]
    started = time.perf_counter()
    probe = linear_probe(
        predict(model, _loader(train_set, train.batch_size), device, train.precision, embed=True),
        cells.label[train_idx],
        train.seed,
    )
    test_emb = predict(
        model, _loader(test_set, train.batch_size), device, train.precision, embed=True
    )
    before = scores(test_y, probe.predict(test_emb))
    model.head.start_from(probe)
    log.info("frozen model + linear probe on held-out cells: %s", before)
    model_params = count_params(model.net)
    try:
        peft_model = add_lora(model, lora)
    except ValueError as err:
        raise StageError(str(err)) from err
    trainable = count_params(peft_model, trainable_only=True)
    log.info("trainable parameters: %d (%.3f%% of the model's %d)",
             trainable, 100 * trainable / model_params, model_params)  # fmt: skip

    out = Path(out_dir)
    # the base checkpoint's size and mtime too: a retrained base under the same path must
    # not resume the adapters fitted to the old one
    stat = Path(checkpoint).stat()
    key = {"checkpoint": str(checkpoint), "checkpoint_stat": [stat.st_size, stat.st_mtime_ns],
           "data": asdict(data), "lora": asdict(lora), "train": asdict(train),
           "labels": cells.labels}  # fmt: skip
    losses = train_epochs(peft_model, train_set, train, device, out / "state.pt", key)
    logits = predict(peft_model, _loader(test_set, train.batch_size), device, train.precision)
    after = scores(test_y, logits.argmax(1))
    log.info("fine-tuned on held-out cells: %s", after)

    info = {
        "name": name,
        "base_checkpoint": str(checkpoint),
        "label_key": data.label_key,
        "labels": cells.labels,
        "lora": asdict(lora),
    }
    tmp = out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    (tmp / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")
    adapter_bytes = sum(p.stat().st_size for p in tmp.iterdir())
    save_merged(peft_model, checkpoint, out / "merged.ckpt", info)
    _publish_dir(tmp, out / "adapter")
    result = {
        **info,
        "data": cells.report,
        "n_train": len(train_idx),
        "n_held_out": len(test_idx),
        "before": {"method": "frozen model + linear probe on the cell embedding", **before},
        "after": {"method": "LoRA + new head", **after},
        "trainable_params": trainable,
        "model_params": model_params,
        "trainable_share": trainable / model_params,
        "train_losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
        "device": device,
        "adapter": str(out / "adapter"),
        "adapter_bytes": adapter_bytes,
        "merged_checkpoint": str(out / "merged.ckpt"),
        "config": config,
    }
    write_json(summary, result)
    return result
