"""Gene embeddings: proteins/s of our ESM stage vs the usual notebook loop, same model.

Ours: ``scprint.embeddings.esm.embed_sequences`` (byte-table tokenization, token-budget
batches longest first, no attention mask when nothing is padded, bf16 on CUDA). Baseline:
what a notebook does, the tokenizer on fixed batches of 8 in input order, padded, mean
pooled with the mask, same dtype and device. Both on the same random-length proteins
(human-like lengths, log-normal around 415 residues) and the same model: ESM2's
650M architecture on a GPU, its 8M architecture on CPU, random weights (the timing does
not depend on the weights; nothing here downloads).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from bench.common import Row, peak_rss_mb, section_parser, write_section

SHAPES = {  # ESM2 checkpoints' architectures: hidden size, layers, heads
    "esm2_t6_8M": (320, 6, 20),
    "esm2_t33_650M": (1280, 33, 20),
}


def proteins(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(415), 0.7, n).astype(int), 30, 5000)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    return [rng.choice(letters, n_res).tobytes().decode() for n_res in lengths]


def notebook_loop(sequences, tokenizer, model, device, dtype, batch_size=8):
    import torch

    model = model.to(device=device, dtype=dtype)
    out = []
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            enc = tokenizer(
                sequences[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=model.config.max_position_embeddings - 2,
            ).to(device)
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = section_parser(__doc__)
    args = parser.parse_args()
    import torch

    from scprint.embeddings import esm, esm_tiny

    cuda = torch.cuda.is_available()
    name = "esm2_t33_650M" if cuda else "esm2_t6_8M"
    n = (300 if args.quick else 2000) if cuda else (12 if args.quick else 24)
    hidden, layers, heads = SHAPES[name]
    sequences = proteins(n)
    residues = sum(min(len(s), 1022) for s in sequences)
    device, dtype = esm.pick_device("auto")
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        path = esm_tiny.save_tiny_esm(
            f"{tmp}/model", seed=0, hidden_size=hidden, layers=layers, heads=heads
        )
        tokenizer, model = esm.load_model(str(path))

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        return result, took, mem

    budget = 32_768 if cuda else 8_192
    warm = sequences[:16]
    esm.embed_sequences(warm, tokenizer, model, budget, device, dtype)  # warm-up, both paths
    notebook_loop(warm, tokenizer, model, device, dtype)
    ours, ours_s, ours_mem = timed(
        lambda: esm.embed_sequences(sequences, tokenizer, model, budget, device, dtype)
    )
    base, base_s, base_mem = timed(
        lambda: notebook_loop(sequences, tokenizer, model, device, dtype)
    )
    agree = float(
        torch.nn.functional.cosine_similarity(torch.from_numpy(ours), torch.from_numpy(base))
        .min()
        .item()
    )
    where = f"{name} ({'bf16, ' + torch.cuda.get_device_name() if cuda else 'fp32, CPU'})"
    figure = f"ESM embeddings, {n} proteins, {where}"
    unit_mem = "MB GPU peak" if cuda else "MB RSS peak"
    note = f"{residues / ours_s:,.0f} residues/s; min cosine to the baseline {agree:.4f}"
    rows = [
        Row(figure, "scprint gene-embeddings", n / ours_s, "proteins/s", note=note),
        Row(figure, "notebook loop (batch 8)", n / base_s, "proteins/s", baseline=True),
        Row(figure, "scprint gene-embeddings", ours_mem, unit_mem, higher_is_better=False),
        Row(figure, "notebook loop (batch 8)", base_mem, unit_mem, baseline=True,
            higher_is_better=False),
    ]  # fmt: skip
    write_section(args.json, "embeddings", rows, model=name, proteins=n, residues=residues)


if __name__ == "__main__":
    main()
