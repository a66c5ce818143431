"""Model step on a CUDA GPU: ms/step, tokens/s, model FLOPs utilisation, peak memory.

For the small, medium and large sizes (config/pretrain_*.yml) at B=64 cells (halved until
it fits; the row says so) x L=2,200 gene tokens, bf16 autocast, the default objectives of
config/base.yml (denoising, generation, classification: two transformer passes a step),
attention ``sdpa`` and ``flash`` (only where flash-attn imports), each with
``checkpoint_activations`` false, mlp and true. Needs only torch and ``scprint.model`` (no
data stack). Without CUDA it writes rows saying so and exits 0.

MFU = model FLOPs / step time / the GPU's dense bf16 peak. Model FLOPs are counted
analytically: every matmul of forward (2 FLOPs a multiply-add) times 3 for forward +
backward, attention scores and mixing included, the recomputation of flash attention or of
checkpointed blocks not (it is work the hardware does, not work the model needs).
"""

from __future__ import annotations

import math
import statistics
import time

from bench.common import Row, section_parser, write_section

SIZES = {  # config/pretrain_{small,medium,large}.yml
    "small": dict(d_model=128, nhead=2, nlayers=4, layers_cls=[128]),
    "medium": dict(d_model=256, nhead=4, nlayers=8, layers_cls=[256]),
    "large": dict(d_model=512, nhead=8, nlayers=16, layers_cls=[512]),
}
N_GENES, D_GENE_EMB = 20_000, 1280
CLASSES = {"organism": 2, "cell_type": 500, "tissue": 200, "disease": 100, "assay": 20, "sex": 3}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the device (H100 SXM: 989 TFLOP/s); None when unknown."""
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None


def step_flops(shape: dict, B: int, L: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one training step with the default objectives (forward + backward)."""
    D, layers = shape["d_model"], shape["nlayers"]
    T = L + 1 + len(CLASSES) + 1  # gene tokens + cell, class and depth tokens
    per_token_layer = 2 * (4 + 2 * mlp_ratio) * D * D + 4 * T * D  # qkv,proj,mlp + QK^T,AV
    transformer = layers * B * T * per_token_layer
    zinb_head = 2 * B * L * (2 * D * D + 3 * D)  # upstream's ExprDecoder: 2 D x D + D x 3
    expr_encoder = 2 * B * L * (D + D * D)
    # the gene table is pooled to D once at build: a lookup per step, no matmul
    denoise_pass = expr_encoder + transformer + zinb_head
    generate_pass = transformer + zinb_head
    return 3 * (denoise_pass + generate_pass)


def make_batch(B: int, L: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    genes = torch.stack([torch.randperm(N_GENES, generator=g)[:L] for _ in range(B)])
    x = torch.poisson(torch.rand(B, L, generator=g) ** 4 * 20)
    cls = torch.stack([torch.randint(0, n, (B,), generator=g) for n in CLASSES.values()], 1)
    batch = {"x": x, "genes": genes.int(), "class": cls.int(), "depth": x.sum(1) * 3}
    return {k: v.to(device) for k, v in batch.items()}


def train_step(net, opt, batch, obj, sets) -> None:
    import torch

    from scprint.model.objectives import compute_losses

    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compute_losses(net, batch, obj, sets)
    out["loss"].backward()
    opt.step()


def run_config(size: str, attention: str, checkpoint: bool | str, B: int, L: int, steps: int):
    """(result dict) for the largest B <= the given one that fits; raises on other errors."""
    import torch

    from scprint.model import losses
    from scprint.model.model import ScPrint, ScPrintConfig
    from scprint.model.objectives import Objectives, set_trainable

    device = torch.device("cuda")
    tried = []
    while B >= 1:
        net = opt = batch = None
        try:
            torch.manual_seed(0)
            cfg = ScPrintConfig(
                n_genes=N_GENES,
                classes=CLASSES,
                attention=attention,
                checkpoint_activations=checkpoint,
                **SIZES[size],
            )
            net = ScPrint(cfg, torch.randn(N_GENES, D_GENE_EMB), torch.arange(N_GENES) // 4)
            net = net.to(device)
            obj = Objectives()
            set_trainable(net, obj)
            sets = {k: losses.label_sets(n, None).to(device) for k, n in CLASSES.items()}
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            batch = make_batch(B, L, device)
            torch.cuda.reset_peak_memory_stats()

            args = (net, opt, batch, obj, sets)

            for _ in range(2):  # warm-up: kernels chosen, memory pools filled
                train_step(*args)
            torch.cuda.synchronize()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                train_step(*args)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return {
                "B": B,
                "seconds": statistics.median(times),
                "peak_bytes": torch.cuda.max_memory_allocated(),
                "flops": step_flops(SIZES[size], B, L),
                "tried": tried,
            }
        except torch.OutOfMemoryError:
            tried.append(B)
            B //= 2
        finally:
            del net, opt, batch
            torch.cuda.empty_cache()
    return {"B": 0, "tried": tried}


def main(argv: list[str] | None = None) -> int:
    parser = section_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated sizes")
    args = parser.parse_args(argv)
    B, L, steps = (8, 512, 2) if args.quick else (64, 2200, 5)
    rows: list[Row] = []

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        for size in args.sizes.split(","):
            rows.append(
                Row(f"{size}, train step", "ours", math.nan, "ms/step", note="skipped: no CUDA")
            )
        write_section(args.json, "gpu", rows)
        print("  skipped: no CUDA device")
        return 0

    torch.backends.cuda.matmul.allow_tf32 = True  # base.yml: set_float32_matmul_precision
    device_name = torch.cuda.get_device_name()
    peak = peak_flops(device_name)
    try:
        import flash_attn  # noqa: F401

        backends = ["sdpa", "flash"]
    except ImportError:
        backends = ["sdpa"]

    for size in args.sizes.split(","):
        for attention in ("sdpa", "flash"):
            for checkpoint in (False, "mlp", True):
                impl = f"ours {attention}" + (
                    f", checkpoint_activations {str(checkpoint).lower()}" if checkpoint else ""
                )
                figure = f"{size}, L={L}, bf16"
                if attention not in backends:
                    if not checkpoint:
                        note = "flash-attn does not import here (pip install flash-attn)"
                        rows.append(Row(figure, impl, math.nan, "ms/step", note=note))
                    continue
                print(f"  {size} {impl} ...", flush=True)
                try:
                    res = run_config(size, attention, checkpoint, B, L, steps)
                except Exception as err:  # one broken configuration must not end the section
                    note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    rows.append(Row(figure, impl, math.nan, "ms/step", note=note))
                    print(f"    {note}", flush=True)
                    continue
                if not res["B"]:
                    note = f"out of memory at every B down to 1 (tried {res['tried']})"
                    rows.append(Row(figure, impl, math.nan, "ms/step", note=note))
                    continue
                note = f"B={res['B']}" + (
                    f" (B={res['tried']} out of memory)" if res["tried"] else ""
                )
                tokens = res["B"] * L / res["seconds"]
                mfu = 100 * res["flops"] / res["seconds"] / peak if peak else math.nan
                extra = {**res, "device": device_name, "peak_flops": peak}
                baseline = attention == "sdpa" and not checkpoint
                for value, unit, better in (
                    (res["seconds"] * 1000, "ms/step", False),
                    (tokens, "tokens/s", True),
                    (mfu, "MFU %", True),
                    (res["peak_bytes"] / 2**30, "GB (max allocated)", False),
                ):
                    rows.append(
                        Row(
                            f"{figure}, {unit.split()[0]}",
                            impl,
                            value,
                            unit,
                            baseline=baseline,
                            higher_is_better=better,
                            note=note,
                            extra=extra if unit == "ms/step" else {},
                        )
                    )
                print(
                    f"    {note}: {res['seconds'] * 1000:,.0f} ms/step, {tokens:,.0f} tokens/s, "
                    f"MFU {mfu:.1f}%, {res['peak_bytes'] / 2**30:.1f} GB",
                    flush=True,
                )
    write_section(args.json, "gpu", rows, device=device_name, peak_flops=peak, B=B, L=L)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
