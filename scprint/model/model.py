"""The scPRINT network (upstream scPRINT 2.3.8's, module for module) as a plain ``nn.Module``.

Read top to bottom: config -> attention -> block -> transformer -> encoders -> decoders ->
ScPrint. Every submodule carries upstream's attribute name, so a state_dict maps one to
one onto upstream's (``scprint.model.convert`` only adds/drops the few keys that differ).
Shapes in comments use B (cells), L (gene tokens), C (cell tokens = depth, cell, one per
class), T = C + L, D (d_model), H (heads), Hkv (key/value heads), Dh (head width), K
(leaf labels of a class).

What stays ours (same outputs): one attention class with sdpa (default), flash-attn and
a plain "normal" path; recomputation in backward (checkpoint_activations); the gene
table looked up once per step over the batch's distinct genes; bool dropout masks.

Training logic (objectives, losses, optimizers) lives in ``scprint.model.objectives`` and
``scprint.model.lightning``; this file only maps cells to token states and decoder outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_BACKENDS = ("flash", "sdpa", "normal")
NORMALIZATIONS = ("sum", "log")
MVC_DECODERS = ("None", "inner product")
LN_EPS = 1e-6  # the transformer's LayerNorms (upstream's blocks and final norm)


@dataclass
class ScPrintConfig:
    """Everything that fixes the network's shape; training switches live elsewhere."""

    n_genes: int
    classes: dict[str, int] = field(default_factory=dict)  # class name -> number of leaves
    d_model: int = 128
    nhead: int = 4
    nlayers: int = 4
    num_heads_kv: int | None = None  # grouped-query attention: K/V heads (None: nhead)
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attention: str = "sdpa"  # upstream's `transformer` key: flash | sdpa | normal
    residual_in_fp32: bool = True  # keep the residual stream in fp32 under half precision
    normalization: str = "sum"  # expression input: x / sum(x) ("sum") or log2(1 + x) ("log")
    expr_encoder_layers: int = 2
    layers_cls: list[int] = field(default_factory=list)  # hidden widths of the class heads
    mvc_decoder: str = "None"  # "inner product" adds upstream's MVC decoder
    use_positions: bool = True
    freeze_embeddings: bool = True
    # recompute in backward instead of keeping for it: False (nothing), "mlp" (each MLP's
    # GELU + output projection: one (B, T, 4D) tensor less per block), True (whole blocks)
    checkpoint_activations: bool | str = False

    def __post_init__(self):
        checks = {
            "attention": (self.attention, ATTENTION_BACKENDS),
            "normalization": (self.normalization, NORMALIZATIONS),
            "mvc_decoder": (self.mvc_decoder, MVC_DECODERS),
            "checkpoint_activations": (self.checkpoint_activations, (False, True, "mlp")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(
                    f"{key}={value!r} is not supported: choose one of "
                    f"{', '.join(repr(a) for a in allowed)}"
                )
        if self.d_model % self.nhead:
            raise ValueError(f"d_model={self.d_model} is not divisible by nhead={self.nhead}")
        if self.nhead % self.kv_heads:
            raise ValueError(f"nhead={self.nhead} is not divisible by num_heads_kv={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads_kv or self.nhead

    @property
    def n_cell_tokens(self) -> int:
        """Upstream's cell_embs_count: the depth token, the cell token, one per class."""
        return 2 + len(self.classes)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError(
            "transformer='flash' needs the flash-attn package (pip install "
            "'scprint-pipeline[cuda]' on a CUDA machine); use transformer='sdpa' on CPU or "
            "where flash-attn is missing"
        ) from err
    return flash_attn_func


class Dropout(nn.Dropout):
    """nn.Dropout that keeps a bool mask for backward: on CPU torch's dropout keeps a float
    one, 4x the bytes, for each of the two residual branches of every block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class MHA(nn.Module):
    """Multi-head (or grouped-query) self-attention; the backend changes only the line that
    mixes tokens. Wqkv's output is [q (H*Dh), k (Hkv*Dh), v (Hkv*Dh)] as upstream's; with
    Hkv < H each K/V head serves H/Hkv consecutive query heads (exactly a repeat)."""

    def __init__(self, d_model: int, nhead: int, nhead_kv: int, backend: str, dropout: float):
        super().__init__()
        self.nhead, self.nhead_kv, self.backend = nhead, nhead_kv, backend
        self.head_dim = d_model // nhead
        self.Wqkv = nn.Linear(d_model, self.head_dim * (nhead + 2 * nhead_kv))
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout  # upstream drops attention weights on its "normal" path only
        self._flash = _flash_attn_func() if backend == "flash" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, Hkv, Dh = self.nhead, self.nhead_kv, self.head_dim
        qkv = self.Wqkv(x)  # (B, T, (H + 2 Hkv) Dh)
        q = qkv[..., : H * Dh].view(B, T, H, Dh)
        k, v = qkv[..., H * Dh :].view(B, T, 2, Hkv, Dh).unbind(2)  # (B, T, Hkv, Dh)
        if self.backend == "flash":
            if not x.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(
                    f"transformer='flash' runs only on CUDA with fp16/bf16 tensors, got "
                    f"{q.dtype} on {q.device}: train with --trainer.precision 16-mixed (or "
                    "bf16-mixed) on a GPU, or use transformer='sdpa'"
                )
            y = self._flash(q, k, v)  # (B, T, H, Dh), GQA native
        else:
            if Hkv != H:  # (B, T, Hkv, Dh) -> (B, T, H, Dh)
                k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
            if self.backend == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)  # fused; no (B,H,T,T) kept
            else:  # scale k, not the (B, H, T, T) scores, as upstream's
                att = q @ (k * (1.0 / math.sqrt(Dh))).transpose(-2, -1)  # (B, H, T, T)
                att = att.softmax(dim=-1)
                if self.training and self.attn_dropout > 0:
                    att = F.dropout(att, self.attn_dropout)
                y = att @ v
            y = y.transpose(1, 2)  # (B, T, H, Dh)
        return self.out_proj(y.reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (D -> hidden -> D). With ``recompute``, training keeps only the
    GELU's input for backward and reruns GELU + fc2 there: the GELU output, the largest
    tensor a block keeps (B, T, hidden), is never stored."""

    def __init__(self, d_model: int, hidden: int, recompute: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        h = self.fc1(x)  # (B, T, hidden)
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(lambda t: self.fc2(self.activation(t)), h, use_reentrant=False)
        return self.fc2(self.activation(h))


class Block(nn.Module):
    """Pre-norm block: x + drop(mixer(norm1(x))), then x + drop(mlp(norm2(x)))."""

    def __init__(self, cfg: ScPrintConfig):
        super().__init__()
        D = cfg.d_model
        self.norm1 = nn.LayerNorm(D, eps=LN_EPS)
        self.mixer = MHA(D, cfg.nhead, cfg.kv_heads, cfg.attention, cfg.dropout)
        self.dropout1 = Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(D, eps=LN_EPS)
        self.mlp = Mlp(D, int(cfg.mlp_ratio * D), recompute=cfg.checkpoint_activations == "mlp")
        self.dropout2 = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D), the residual stream
        dtype = self.norm1.weight.dtype
        x = x + self.dropout1(self.mixer(self.norm1(x.to(dtype))))
        return x + self.dropout2(self.mlp(self.norm2(x.to(dtype))))


class Transformer(nn.Module):
    """Upstream's FlashTransformer: dropout on the input tokens, blocks, final LayerNorm."""

    def __init__(self, cfg: ScPrintConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.nlayers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        x = self.dropout(x)
        if self.cfg.residual_in_fp32:
            x = x.float()  # fp32 + half branch outputs stay fp32
        recompute = (
            self.cfg.checkpoint_activations is True and self.training and torch.is_grad_enabled()
        )
        for block in self.blocks:
            # checkpointing keeps only each block's input for backward and reruns the block
            # there (same dropout masks: the RNG state is replayed), trading ~1/3 more
            # compute for a block's activations (~15 (B, T, D) tensors) per layer
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm(x.to(self.norm.weight.dtype))


# ---- encoders ---------------------------------------------------------------------------
class GeneEncoder(nn.Module):
    """Gene index -> its row of the (n_genes, D) table (ESM2 vectors pooled to D)."""

    def __init__(self, table: torch.Tensor, freeze: bool):
        super().__init__()
        self.embeddings = nn.Embedding.from_pretrained(table, freeze=freeze)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.embeddings(genes)


class PositionalEncoding(nn.Module):
    """Fixed sin/cos (interleaved: even dims sin, odd dims cos) of each gene's genomic rank,
    one row per gene. As upstream: row = rank - 1 of a table of max(rank) positions (a rank
    of 0 wraps to the last row); ``pe`` is (n_genes, 1, D), upstream's buffer shape."""

    def __init__(self, d_model: int, ranks: torch.Tensor, maxval: float = 10_000.0):
        super().__init__()
        n_pos = max(int(ranks.max()), 1) if ranks.numel() else 1
        position = torch.arange(n_pos).unsqueeze(1)  # (P, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(maxval) / d_model))
        table = torch.zeros(n_pos, 1, d_model)
        table[:, 0, 0::2] = torch.sin(position * div_term)
        table[:, 0, 1::2] = torch.cos(position * div_term)
        rows = (ranks.long() - 1) % n_pos  # python's pe[rank - 1]
        self.register_buffer("pe", table[rows].clone())  # (n_genes, 1, D)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., D)
        return self.pe[genes, 0]


class ContinuousValueEncoder(nn.Module):
    """A scalar per token -> a D-vector: Linear(1, D), then (layers - 1) x [LN, ReLU,
    Dropout, Linear(D, D)]. Masked positions output 0 (upstream's masking)."""

    def __init__(self, d_model: int, dropout: float, layers: int = 2, max_value=100_000):
        super().__init__()
        self.max_value = max_value
        mods: list[nn.Module] = [nn.Linear(1, d_model)]
        for _ in range(layers - 1):
            mods += [
                nn.LayerNorm(d_model),
                nn.ReLU(),
                Dropout(dropout),
                nn.Linear(d_model, d_model),
            ]
        self.encoder = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x.unsqueeze(-1).clamp(0, self.max_value))  # (..., D)
        if mask is not None:
            h = h.masked_fill(mask.unsqueeze(-1), 0.0)
        return h


class CategoryValueEncoder(nn.Module):
    """Learned start vectors of the cell token and of each class token: (C - 1, D)."""

    def __init__(self, n: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d_model)


# ---- decoders ---------------------------------------------------------------------------
def _zinb(pred: torch.Tensor, var: torch.Tensor, zero: torch.Tensor, library: torch.Tensor):
    """(B, L) raw outputs -> ZINB parameters: mean = softmax over the cell's genes times its
    library size, dispersion = exp(clamp(., max 15)), zero-inflation logit."""
    mean = pred.float().softmax(dim=-1) * library[:, None]
    return {"mean": mean, "theta": torch.exp(var.float().clamp(max=15)), "pi_logit": zero.float()}


class ExprDecoder(nn.Module):
    """Gene token states -> ZINB parameters per gene: 2 x [Linear, LN, LeakyReLU] (dropout
    after the first), then Linear(D, 3)."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LayerNorm(d_model), nn.LeakyReLU(), Dropout(dropout),
            nn.Linear(d_model, d_model), nn.LayerNorm(d_model), nn.LeakyReLU(),
        )  # fmt: skip
        self.pred_var_zero = nn.Linear(d_model, 3)

    def forward(self, h: torch.Tensor, library: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, var, zero = self.pred_var_zero(self.fc(h)).unbind(-1)  # each (B, L)
        return _zinb(pred, var, zero, library)


class MVCDecoder(nn.Module):
    """Upstream's "inner product" MVC: a query per gene from its table vector (no position,
    no expression), three (D)-vectors per gene dotted with the cell embedding."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.query_activation = nn.Sigmoid()
        self.pred_var_zero = nn.Linear(d_model, 3 * d_model, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_emb: torch.Tensor, library: torch.Tensor):
        # cell_emb (B, D), gene_emb (B, L, D) -> ZINB parameters (B, L)
        query = self.query_activation(self.norm(self.gene2query(gene_emb)))  # (B, L, D)
        parts = self.pred_var_zero(query).split(cell_emb.shape[-1], dim=-1)  # 3 x (B, L, D)
        pred, var, zero = (torch.bmm(p, cell_emb.unsqueeze(2)).squeeze(2) for p in parts)
        return _zinb(pred, var, zero, library)


class ClsDecoder(nn.Module):
    """A class token's state -> leaf logits: [Linear, LN, ReLU, Dropout] per hidden width of
    ``layers``, then out_layer (bias starts at -0.13, as upstream's)."""

    def __init__(self, d_model: int, n_cls: int, layers: list[int], dropout: float):
        super().__init__()
        widths = [d_model, *layers]
        self.decoder = nn.Sequential()
        for d_in, d_out in pairwise(widths):
            self.decoder.extend(
                [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(), Dropout(dropout)]
            )
        self.out_layer = nn.Linear(widths[-1], n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.out_layer(self.decoder(x))


# ---- the network ------------------------------------------------------------------------
class ScPrint(nn.Module):
    """Cells in, token states and decoded expression out.

    Sequence (T = C + L): [depth, cell, one token per class] + L gene tokens. A gene token
    is table vector + genomic position + expression encoding; the depth token encodes
    log2(1 + total counts); cell/class tokens start from learned vectors.
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
            gene_embeddings = torch.randn(cfg.n_genes, D)
        if gene_embeddings.ndim != 2 or gene_embeddings.shape[0] != cfg.n_genes:
            raise ValueError(
                f"gene embeddings have shape {tuple(gene_embeddings.shape)}, expected "
                f"({cfg.n_genes}, E)"
            )
        table = nn.AdaptiveAvgPool1d(D)(gene_embeddings.float())  # (n_genes, E) -> (n_genes, D)
        self.gene_encoder = GeneEncoder(table, freeze=cfg.freeze_embeddings)
        if cfg.use_positions:
            if gene_positions is None:
                gene_positions = torch.ones(cfg.n_genes, dtype=torch.long)
            self.pos_encoder = PositionalEncoding(D, gene_positions)
        self.expr_encoder = ContinuousValueEncoder(D, cfg.dropout, cfg.expr_encoder_layers)
        self.class_encoder = CategoryValueEncoder(1 + len(cfg.classes), D)
        self.depth_encoder = ContinuousValueEncoder(D, cfg.dropout, cfg.expr_encoder_layers)
        self.transformer = Transformer(cfg)
        self.expr_decoder = ExprDecoder(D, cfg.dropout)
        self.cls_decoders = nn.ModuleDict(
            {
                name: ClsDecoder(D, n, list(cfg.layers_cls), cfg.dropout)
                for name, n in cfg.classes.items()
            }
        )
        self.mvc_decoder = MVCDecoder(D) if cfg.mvc_decoder == "inner product" else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream's: Linear N(0, 0.02) with zero bias; residual projections (out_proj, fc2)
        N(0, 0.02 / sqrt(2 nlayers)); class heads' output bias -0.13."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02
                if name.endswith(("mixer.out_proj", "mlp.fc2")):
                    std /= math.sqrt(2 * self.cfg.nlayers)
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for head in self.cls_decoders.values():
            nn.init.constant_(head.out_layer.bias, -0.13)

    # ---- encoders -----------------------------------------------------------------------
    def gene_identity(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) gene indices -> (table vectors, table vectors + positions), each (B, L, D).

        Computed for the batch's distinct genes only, then gathered: cells share most of
        their genes. The training step computes it once and passes it to every pass that
        needs it (encoder views, generation, MVC, which takes the vectors without position).
        """
        unique, inverse = torch.unique(genes, return_inverse=True)  # (U,), (B, L)
        emb = self.gene_encoder(unique)  # (U, D)
        if not self.cfg.use_positions:
            emb = emb[inverse]
            return emb, emb
        return emb[inverse], (emb + self.pos_encoder(unique))[inverse]

    def normalize(self, expression: torch.Tensor) -> torch.Tensor:
        """The expression encoder's input: x / sum(x) over the cell's tokens, or log2(1 + x)."""
        x = expression.float()
        if self.cfg.normalization == "sum":
            return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        return torch.log2(1 + x)

    def cell_prefix(self, B: int, depth: torch.Tensor) -> torch.Tensor:
        """(B, C, D): [depth token, cell token, class tokens]."""
        start = self.class_encoder.embedding.weight.expand(B, -1, -1)  # (B, C - 1, D)
        depth_tok = self.depth_encoder(torch.log2(1 + depth.float()))  # (B, D)
        return torch.cat([depth_tok[:, None].to(start.dtype), start], dim=1)

    # ---- forward passes -----------------------------------------------------------------
    def encode(
        self,
        genes: torch.Tensor,  # (B, L) int
        expression: torch.Tensor,  # (B, L) counts the model sees
        depth: torch.Tensor | None = None,  # (B,) total counts of the cell (None: sum of x)
        mask: torch.Tensor | None = None,  # (B, L) bool, True = expression hidden
        identity: tuple[torch.Tensor, torch.Tensor] | None = None,  # gene_identity(genes)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cell token states (B, C, D), gene token states (B, L, D))."""
        B = genes.shape[0]
        _, ident = self.gene_identity(genes) if identity is None else identity
        depth = expression.float().sum(-1) if depth is None else depth
        expr_tok = self.expr_encoder(self.normalize(expression), mask)  # (B, L, D)
        tokens = torch.cat([self.cell_prefix(B, depth), ident + expr_tok], 1)  # (B, T, D)
        h = self.transformer(tokens)
        C = self.cfg.n_cell_tokens
        return h[:, :C], h[:, C:]

    def generate(
        self,
        genes: torch.Tensor,
        cell_states: torch.Tensor,  # (B, C, D) from encode
        identity: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's _generate: cell token states + gene tokens WITHOUT expression through
        the transformer again -> (cell token states (B, C, D), gene token states (B, L, D))."""
        _, ident = self.gene_identity(genes) if identity is None else identity
        tokens = torch.cat([cell_states.to(ident.dtype), ident], dim=1)  # (B, T, D)
        h = self.transformer(tokens)
        C = cell_states.shape[1]
        return h[:, :C], h[:, C:]

    def decode_expression(self, gene_states: torch.Tensor, library: torch.Tensor) -> dict:
        """(B, L, D) -> mean, theta (dispersion), pi_logit: each (B, L)."""
        return self.expr_decoder(gene_states, library)

    def decode_mvc(
        self,
        genes: torch.Tensor,
        cell_emb: torch.Tensor,
        library: torch.Tensor,
        identity: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict:
        """(B, L) genes and (B, D) cell embedding -> ZINB parameters (B, L)."""
        if self.mvc_decoder is None:
            raise ValueError("do_mvc needs model.mvc_decoder: 'inner product'")
        emb, _ = self.gene_identity(genes) if identity is None else identity
        return self.mvc_decoder(cell_emb, emb, library)

    def classify(self, cell_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class token i (token 2 + i) -> leaf logits (B, K_i) for class i."""
        return {
            name: head(cell_states[:, 2 + i])
            for i, (name, head) in enumerate(self.cls_decoders.items())
        }

    @staticmethod
    def cell_embedding(cell_states: torch.Tensor) -> torch.Tensor:
        """Upstream's cell_emb: the mean of all cell token states (depth included), (B, D)."""
        return cell_states.mean(dim=1)

    def forward(
        self,
        genes: torch.Tensor,
        expression: torch.Tensor,
        depth: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Upstream's forward(do_class, do_mvc): every output of one pass, for tests and
        inference. ``library`` scales the means (upstream's depth_mult; default sum of x)."""
        library = expression.float().sum(-1) if library is None else library
        identity = self.gene_identity(genes)
        cell_states, gene_states = self.encode(genes, expression, depth, mask, identity)
        cell_emb = self.cell_embedding(cell_states)
        out = {"cell_embs": cell_states, "cell_emb": cell_emb}
        out.update(self.decode_expression(gene_states, library))
        out.update({f"cls/{k}": v for k, v in self.classify(cell_states).items()})
        if self.mvc_decoder is not None:
            mvc = self.decode_mvc(genes, cell_emb, library, identity)
            out.update({f"mvc_{k}": v for k, v in mvc.items()})
        return out
