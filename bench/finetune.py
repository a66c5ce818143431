"""Fine-tuning step: LoRA (peft, `scprint finetune`) vs full fine-tuning, same model.

The small size (config/pretrain_small.yml: d_model 128, 4 layers, 2 heads) and the medium
one (config/pretrain_medium.yml: d_model 256, 8 layers, 4 heads) with a frozen
20,000 x 1,280 gene table (ESM2-650M width, pooled to d_model when the network is built,
as upstream does), a new 20-label head on the class token (the prediction embedding), B cells x L tokens,
fp32 (CPU) or bf16 autocast (CUDA). Each configuration runs in its own process so its
peak memory is its own: step time (forward + backward + AdamW) and peak memory of the steps
(optimizer state included; CPU: peak RSS reset once the model is built, CUDA: allocated
bytes), and how much of it the steps add on top of the loaded model.
Full fine-tuning (every weight but the frozen gene table trains) is the baseline.

Workers run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_): with its default
(dynamic) threshold, freed activation buffers stay in the heap and peak RSS measured the
allocation pattern (LoRA read 1.27x full fine-tuning) rather than the bytes alive at once.
What LoRA can save is the trainable weights' gradients and AdamW state (12 bytes per
weight); the activations kept for backward are the same (the adapters of block 1 need
the gradient through every later block), so LoRA saves memory where the weights, not the
activations, dominate: larger models, fewer tokens per step.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import Row, section_parser, write_section

SHAPES = {
    "small": dict(d_model=128, nhead=2, nlayers=4),
    "medium": dict(d_model=256, nhead=4, nlayers=8),
}
N_GENES, D_GENE, N_LABELS = 20_000, 1_280, 20
IMPLS = {  # name -> (row label, LoRA dropout or None for full fine-tuning)
    "full": ("full fine-tuning", None),
    "lora": ("LoRA r=4 (peft), dropout 0 (default)", 0.0),
    "lora-dropout": ("LoRA r=4 (peft), dropout 0.05", 0.05),
}


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so building the model is not counted."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def worker(impl: str, size: str, B: int, L: int, steps: int) -> dict:
    import peft  # noqa: F401  (in every worker: its imports, ~100 MB RSS, count alike)

    from scprint.finetune.lora import Classifier, LoraSettings, add_lora, count_params
    from scprint.model.model import ScPrint, ScPrintConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = ScPrintConfig(n_genes=N_GENES, classes={"organism": 2}, **SHAPES[size])
    net = ScPrint(cfg, torch.randn(N_GENES, D_GENE))  # the table is pooled to d_model
    model = Classifier(net, N_LABELS, lambda cell_states: cell_states[:, 2])  # class token
    total = count_params(model.net)
    dropout = IMPLS[impl][1]
    if dropout is not None:  # peft keeps a dropped-out copy of each adapted layer's input
        model = add_lora(model, LoraSettings(r=4, alpha=16, dropout=dropout))
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    genes = torch.randint(0, N_GENES, (B, L), device=device)
    x = torch.poisson(torch.rand(B, L, device=device) * 4)
    depth = x.sum(1) * 3
    y = torch.randint(0, N_LABELS, (B,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(genes, x, depth)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak()
        loaded = _status_mb("VmRSS")
    step()  # warm-up; AdamW allocates its state here
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _status_mb("VmHWM")
    return {
        "ms": ms,
        "peak_mb": peak,
        "added_mb": peak - loaded,
        "trainable": sum(p.numel() for p in params),
        "total": total,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    parser = section_parser(__doc__.split("\n")[0])
    args = parser.parse_args(argv)
    runs = [("small", 8, 256, 3)] if args.quick else [("small", 16, 1024, 5), ("medium", 4, 512, 3)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    rows = []
    for (size, B, L, steps), (impl, (label, _)) in itertools.product(runs, IMPLS.items()):
        proc = subprocess.run(
            [sys.executable, "-c", f"import json,bench.finetune as f; print(json.dumps("
             f"f.worker({impl!r}, {size!r}, {B}, {L}, {steps})))"],
            capture_output=True, text=True, timeout=1800, env=env,
        )  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        figure = f"fine-tuning step, {size}, {B} cells x {L} tokens, {r['device']}"
        base = impl == "full"
        note = f"{r['trainable']:,} of {r['total']:,} parameters train"
        rows += [
            Row(figure, label, r["ms"], "ms/step", base, False, note),
            Row(figure + ", peak memory", label, r["peak_mb"], "MB", base, False),
            Row(figure + ", memory added by training", label, r["added_mb"], "MB", base, False),
        ]
        print(f"{label}: {r}", flush=True)
    write_section(args.json, "finetune", rows, shapes=SHAPES, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
