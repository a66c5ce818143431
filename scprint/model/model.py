"""The scPRINT network as a plain ``nn.Module``: encoders, transformer, decoders.

Read top to bottom: config -> attention -> block -> encoders -> decoders -> ScPrint.
Shapes in comments use B (cells), L (gene tokens), C (cell tokens), T = C + L, D
(d_model), H (heads), E (width of the gene-embedding table), K (leaf labels of a class).

Training logic (which objectives run, losses, optimizers) lives in
``scprint.model.objectives`` and ``scprint.model.lightning``; this file only maps a
batch of cells to token states and decoder outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("flash", "sdpa", "normal")


@dataclass
class ScPrintConfig:
    """Everything that fixes the network's shape; training switches live elsewhere."""

    n_genes: int
    d_gene_emb: int  # width E of the gene-embedding table (ESM2 width, or d_model if learned)
    classes: dict[str, int] = field(default_factory=dict)  # class name -> number of leaves
    d_model: int = 128
    nhead: int = 4
    nlayers: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # on residual branches and the MLP, never inside attention
    attention: str = "sdpa"
    use_depth_token: bool = True
    use_positions: bool = True
    freeze_embeddings: bool = True
    # recompute in backward instead of keeping for it: False (nothing), "mlp" (each MLP's
    # GELU + output projection: one (B, T, 4D) tensor less per block), True (whole blocks)
    checkpoint_activations: bool | str = False

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.checkpoint_activations not in (False, True, "mlp"):
            raise ValueError(
                f"checkpoint_activations={self.checkpoint_activations!r}: choose false, 'mlp' "
                "or true"
            )
        if self.d_model % self.nhead:
            raise ValueError(f"d_model={self.d_model} is not divisible by nhead={self.nhead}")

    @property
    def n_cell_tokens(self) -> int:
        """The cell token, one token per predicted class, and the optional depth token."""
        return 1 + len(self.classes) + int(self.use_depth_token)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError(
            "attention='flash' needs the flash-attn package (pip install 'scprint-pipeline[cuda]' "
            "on a CUDA machine); use attention='sdpa' on CPU or where flash-attn is missing"
        ) from err
    return flash_attn_func


class SelfAttention(nn.Module):
    """Multi-head self-attention; the backend changes only the line that mixes tokens."""

    def __init__(self, d_model: int, nhead: int, backend: str):
        super().__init__()
        self.nhead, self.backend = nhead, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self._flash = _flash_attn_func() if backend == "flash" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nhead, D // self.nhead).unbind(2)  # (B,T,H,Dh)
        if self.backend == "flash":
            if not x.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(
                    f"attention='flash' runs only on CUDA with fp16/bf16 tensors, got "
                    f"{q.dtype} on {q.device}: train with --trainer.precision 16-mixed (or "
                    "bf16-mixed) on a GPU, or use attention='sdpa'"
                )
            y = self._flash(q, k, v)  # (B, T, H, Dh)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
            if self.backend == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)  # fused; no (B,H,T,T) kept
            else:  # scale q, not the (B, H, T, T) scores: one T x T tensor less
                att = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (B,H,T,T)
                y = att.softmax(dim=-1) @ v
            y = y.transpose(1, 2)  # (B, T, H, Dh)
        return self.proj(y.reshape(B, T, D))


class Dropout(nn.Dropout):
    """nn.Dropout that keeps a bool mask for backward: on CPU torch's dropout keeps a float
    one, 4x the bytes, for each of the two residual branches of every block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class MLP(nn.Sequential):
    """Linear -> GELU -> Linear (D -> hidden -> D). With ``recompute``, training keeps only
    the GELU's input for backward and reruns GELU + the output projection there: the GELU
    output, the largest tensor a block keeps (B, T, hidden), is never stored."""

    def __init__(self, d_model: int, hidden: int, recompute: bool = False):
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        up, act, down = self
        h = up(x)  # (B, T, hidden)
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(lambda t: down(act(t)), h, use_reentrant=False)
        return down(act(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ScPrintConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.nhead, cfg.attention)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, hidden, recompute=cfg.checkpoint_activations == "mlp")
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos encoding of integer genomic ranks: (...,) -> (..., dim). No parameters."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10_000.0)
        * torch.arange(half, device=positions.device, dtype=torch.float32)
        / half
    )
    angles = positions.float()[..., None] * freqs  # (..., half)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class ScalarEncoder(nn.Module):
    """A continuous value (log1p expression or depth) -> a D-vector: (...,) -> (..., D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(value[..., None]))


class ZinbHead(nn.Module):
    """Token states -> zero-inflated negative binomial parameters per gene token.

    The mean is a share of the library size (softmax over the cell's tokens times the
    library), so the decoder learns composition and the depth comes from the data.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 3))

    def forward(self, h: torch.Tensor, library: torch.Tensor) -> dict[str, torch.Tensor]:
        # h: (B, L, D), library: (B,) -> mean, theta, zero-inflation logit: each (B, L)
        mu_logit, theta_raw, pi_logit = self.net(h).float().unbind(-1)
        mean = mu_logit.softmax(dim=-1) * library[:, None]
        return {"mean": mean, "theta": F.softplus(theta_raw) + 1e-4, "pi_logit": pi_logit}


class ScPrint(nn.Module):
    """Cells in, token states and decoded expression out.

    Sequence layout (T = C + L): [cell, one token per class, (depth)] + L gene tokens.
    A gene token is gene identity (projected embedding) + genomic position + expression.
    """

    def __init__(
        self,
        cfg: ScPrintConfig,
        gene_embeddings: torch.Tensor | None = None,  # (n_genes, E) or None for random init
        gene_positions: torch.Tensor | None = None,  # (n_genes,) int genomic rank
    ):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        if gene_embeddings is None:
            gene_embeddings = torch.randn(cfg.n_genes, cfg.d_gene_emb) * 0.02
        if gene_embeddings.shape != (cfg.n_genes, cfg.d_gene_emb):
            raise ValueError(
                f"gene embeddings have shape {tuple(gene_embeddings.shape)}, expected "
                f"({cfg.n_genes}, {cfg.d_gene_emb})"
            )
        self.gene_table = nn.Embedding.from_pretrained(
            gene_embeddings.float(), freeze=cfg.freeze_embeddings
        )
        self.gene_proj = nn.Linear(cfg.d_gene_emb, D)  # pools E -> D
        if cfg.use_positions:
            if gene_positions is None:
                gene_positions = torch.zeros(cfg.n_genes, dtype=torch.long)
            self.register_buffer("gene_pos", gene_positions.long(), persistent=True)
        self.expr_encoder = ScalarEncoder(D)
        self.mask_embedding = nn.Parameter(torch.zeros(D))  # replaces a masked expression
        self.cell_tokens = nn.Parameter(torch.randn(cfg.n_cell_tokens, D) * 0.02)
        self.depth_encoder = ScalarEncoder(D) if cfg.use_depth_token else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.nlayers))
        self.ln_f = nn.LayerNorm(D)
        self.expr_decoder = ZinbHead(D)
        # MVC: expression of gene g from (cell embedding, identity of g) alone
        self.mvc_query = nn.Sequential(nn.Linear(D, D), nn.GELU())
        self.mvc_decoder = ZinbHead(D)
        self.classifiers = nn.ModuleDict(
            {
                name: nn.Sequential(nn.LayerNorm(D), nn.Linear(D, n))
                for name, n in cfg.classes.items()
            }
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    # ---- encoders -----------------------------------------------------------------------
    def gene_identity(self, genes: torch.Tensor) -> torch.Tensor:
        """(B, L) gene indices -> (B, L, D): who the gene is and where it sits.

        Computed for the batch's distinct genes only, then gathered: cells share most of
        their genes, and the (tokens, E) embedding rows are the largest tensor of a step.
        The training step computes it once and passes it to every pass that needs it.
        """
        unique, inverse = torch.unique(genes, return_inverse=True)  # (U,), (B, L)
        tok = self.gene_proj(self.gene_table(unique))  # (U, D)
        if self.cfg.use_positions:
            tok = tok + sinusoid(self.gene_pos[unique], self.cfg.d_model).to(tok.dtype)
        return tok[inverse]

    def cell_prefix(self, B: int, depth: torch.Tensor | None) -> torch.Tensor:
        """(B, C, D): learned cell/class tokens, the depth token carries log1p(depth)."""
        prefix = self.cell_tokens.expand(B, -1, -1)
        if self.depth_encoder is not None:
            if depth is None:
                raise ValueError("this model has a depth token: pass depth (B,)")
            depth_tok = prefix[:, -1] + self.depth_encoder(torch.log1p(depth.float()))
            prefix = torch.cat([prefix[:, :-1], depth_tok[:, None]], dim=1)
        return prefix

    def transformer(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        recompute = (
            self.cfg.checkpoint_activations is True and self.training and torch.is_grad_enabled()
        )
        for block in self.blocks:
            # checkpointing keeps only each block's input for backward and reruns the block
            # there (same dropout masks: the RNG state is replayed), trading ~1/3 more
            # compute for a block's activations (~15 (B, T, D) tensors) per layer
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.ln_f(x)

    # ---- forward passes -----------------------------------------------------------------
    def encode(
        self,
        genes: torch.Tensor,  # (B, L) int
        expression: torch.Tensor,  # (B, L) counts the model sees
        depth: torch.Tensor | None = None,  # (B,) total counts of the cell
        mask: torch.Tensor | None = None,  # (B, L) bool, True = expression hidden
        identity: torch.Tensor | None = None,  # (B, L, D) gene_identity(genes), if at hand
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cell token states (B, C, D), gene token states (B, L, D))."""
        B = genes.shape[0]
        identity = self.gene_identity(genes) if identity is None else identity
        expr_tok = self.expr_encoder(torch.log1p(expression.float()))  # (B, L, D)
        if mask is not None:
            expr_tok = torch.where(
                mask[..., None], self.mask_embedding.to(expr_tok.dtype), expr_tok
            )
        tokens = torch.cat([self.cell_prefix(B, depth), identity + expr_tok], 1)
        h = self.transformer(tokens)  # (B, T, D)
        C = self.cfg.n_cell_tokens
        return h[:, :C], h[:, C:]

    def generate(
        self,
        genes: torch.Tensor,
        cell_states: torch.Tensor,
        identity: torch.Tensor | None = None,  # (B, L, D) gene_identity(genes), if at hand
    ) -> torch.Tensor:
        """Bottleneck pass: gene tokens WITHOUT expression + cell token states -> (B, L, D)."""
        identity = self.gene_identity(genes) if identity is None else identity
        tokens = torch.cat([cell_states, identity], dim=1)  # (B, T, D)
        return self.transformer(tokens)[:, cell_states.shape[1] :]

    def decode_expression(self, gene_states: torch.Tensor, library: torch.Tensor) -> dict:
        return self.expr_decoder(gene_states, library)

    def decode_mvc(
        self,
        genes: torch.Tensor,
        cell_emb: torch.Tensor,
        library: torch.Tensor,
        identity: torch.Tensor | None = None,  # (B, L, D) gene_identity(genes), if at hand
    ):
        """(B, L) genes and (B, D) cell embedding -> ZINB parameters (B, L)."""
        identity = self.gene_identity(genes) if identity is None else identity
        query = self.mvc_query(identity)  # (B, L, D)
        return self.mvc_decoder(query * cell_emb[:, None, :], library)

    def classify(self, cell_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class token i (token 1 + i) -> leaf logits (B, K_i) for class i."""
        return {
            name: head(cell_states[:, 1 + i])
            for i, (name, head) in enumerate(self.classifiers.items())
        }

    @staticmethod
    def cell_embedding(cell_states: torch.Tensor) -> torch.Tensor:
        """The cell token's state, (B, D): what MVC, CCE and ECS act on."""
        return cell_states[:, 0]
