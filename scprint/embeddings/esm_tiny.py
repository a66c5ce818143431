"""`scprint tiny-esm`: a tiny ESM2-architecture model with seeded random weights.

Tests and the demo load it through the same `from_pretrained` path as a real ESM2
checkpoint, without downloading anything. Its embeddings carry no biology: random
weights, hidden size 32, 2 layers, 2 heads. The vocabulary is ESM2's own 33 tokens, so any
real ESM2 tokenizer would encode a protein to the same ids. The same seed writes the same
weights, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

# ESM2's alphabet in id order (special tokens, the 20 standard amino acids ordered as ESM
# orders them, ambiguity/rare codes, gap characters, then <null_1> and <mask>).
ESM2_VOCAB = (
    ["<cls>", "<pad>", "<eos>", "<unk>"]
    + list("LAGVSERTIDPKQNFYMHWCXBUZO.-")
    + ["<null_1>", "<mask>"]
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument(
        "--max-positions",
        type=int,
        default=1026,
        help="positions incl. <cls>/<eos> (ESM2: 1026, i.e. 1024 residues)",
    )


def tiny_esm_config(hidden_size=32, layers=2, heads=2, max_positions=1026):
    """An EsmConfig with ESM2's settings, only much smaller."""
    from transformers import EsmConfig

    return EsmConfig(
        vocab_size=len(ESM2_VOCAB),
        pad_token_id=ESM2_VOCAB.index("<pad>"),
        mask_token_id=ESM2_VOCAB.index("<mask>"),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-5,
        architectures=["EsmModel"],
    )


def save_tiny_esm(out: str | Path, seed: int = 0, **sizes) -> Path:
    """Write model + tokenizer to ``out`` (built in a sibling temp dir, then renamed)."""
    import torch
    from transformers import EsmModel, EsmTokenizer

    from scprint.progress import quiet_library_bars

    quiet_library_bars()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        torch.manual_seed(seed)
        model = EsmModel(tiny_esm_config(**sizes), add_pooling_layer=False).eval()
        model.save_pretrained(tmp)
        vocab = tmp / "vocab.txt"
        vocab.write_text("\n".join(ESM2_VOCAB))
        EsmTokenizer(str(vocab)).save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"Tiny ESM2-architecture model with RANDOM weights (seed {seed}), written by "
            "`scprint tiny-esm` for tests and the demo. Its embeddings mean nothing.\n"
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; others share this model
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> None:
    import logging

    out = save_tiny_esm(
        args.out,
        seed=args.seed,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        max_positions=args.max_positions,
    )
    logging.getLogger(__name__).info("wrote a tiny random ESM2 model to %s", out)
