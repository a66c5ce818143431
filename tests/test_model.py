"""The pure network and its objectives, on tiny synthetic cells (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from scprint.model import losses
from scprint.model.model import ScPrint, ScPrintConfig
from scprint.model.objectives import Objectives, compute_losses, set_trainable

torch.set_num_threads(1)  # the CI machine has 2 shared cores: threads only contend

CLASSES = {"organism": 2, "cell_type": 3}
HIERARCHY = {"cell_type": {3: [0, 1]}}  # code 3 is a parent of leaves 0 and 1


def tiny_net(attention="sdpa", dropout=0.0, **kw) -> ScPrint:
    cfg = ScPrintConfig(
        n_genes=40,
        classes=CLASSES,
        d_model=32,
        nhead=4,
        nlayers=2,
        attention=attention,
        dropout=dropout,
        **{"mvc_decoder": "inner product", "layers_cls": [16], **kw},
    )
    torch.manual_seed(0)
    return ScPrint(cfg, torch.randn(40, 48), 1 + torch.arange(40) // 3)


def tiny_batch(B=8, L=20, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    genes = torch.stack([torch.randperm(40, generator=g)[:L] for _ in range(B)]).int()
    x = torch.poisson(torch.rand(B, L, generator=g) * 6)
    cls = torch.tensor([[i % 2, [0, 1, 2, 3, -1][i % 5]] for i in range(B)], dtype=torch.int32)
    return {"x": x, "genes": genes, "class": cls, "depth": x.sum(1) * 3, "tp": torch.zeros(B)}


def sets():
    return {k: losses.label_sets(n, HIERARCHY.get(k)) for k, n in CLASSES.items()}


def test_attention_backends_agree_on_the_same_weights():
    batch = tiny_batch()
    ref = tiny_net("normal")
    outs = {}
    for backend in ("normal", "sdpa"):
        net = tiny_net(backend)
        net.load_state_dict(ref.state_dict())
        cell, genes = net.encode(batch["genes"].long(), batch["x"], batch["depth"])
        outs[backend] = torch.cat([cell, genes], 1)
        # gradients agree too, not only the forward pass
        outs[backend].square().mean().backward()
        outs[backend + "_grad"] = net.transformer.blocks[0].mixer.Wqkv.weight.grad.clone()
    torch.testing.assert_close(outs["sdpa"], outs["normal"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["sdpa_grad"], outs["normal_grad"], atol=1e-5, rtol=1e-4)


def test_flash_backend_refuses_cpu_clearly():
    try:
        net = tiny_net("flash")
    except RuntimeError as err:  # flash-attn not installed: the error says what to do
        assert "flash-attn" in str(err) and "sdpa" in str(err)
        return
    batch = tiny_batch()
    with pytest.raises(RuntimeError, match="CUDA with fp16/bf16"):
        net.encode(batch["genes"].long(), batch["x"], batch["depth"])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention='xformers' is not supported"):
        tiny_net("xformers")


@pytest.mark.parametrize(
    "objectives",
    [
        Objectives(),
        Objectives(do_denoise=False, mask_ratio=[0.3], do_generate=False, do_cls=False),
        Objectives(
            noise=[0.5],
            mask_ratio=[0.3, "TF"],
            do_mvc=True,
            do_cce=True,
            do_ecs=True,
            do_adv_cls=True,
            run_full_forward=True,
        ),  # fmt: skip
        Objectives(do_denoise=False, run_full_forward=True, do_generate=False, do_cls=True),
        Objectives(
            do_denoise=False, run_full_forward=True, do_generate=False, do_cls=False, do_ecs=True
        ),  # fmt: skip
    ],
    ids=["default", "mask-only", "everything", "cls-only", "ecs-only"],
)
def test_every_trainable_parameter_gets_a_gradient(objectives):
    """What plain DDP needs: no trainable parameter is left out of the graph."""
    net = tiny_net()
    set_trainable(net, objectives)
    out = compute_losses(net, tiny_batch(), objectives, sets())
    out["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    names = " ".join(out)
    assert ("_cls" in names) == objectives.do_cls
    assert ("expr_mvc" in names) == objectives.do_mvc
    assert ("gen_" in names) == objectives.do_generate
    assert ("_ecs" in names) == objectives.do_ecs


def test_passes_are_upstreams_order_and_names():
    obj = Objectives(noise=[0.3, 0.6], mask_ratio=[0.15, "TF"], run_full_forward=True)
    assert obj.passes() == [
        ("full", None), ("mask", 0.15), ("mask", "TF"), ("denoise", 0.3), ("denoise", 0.6)
    ]  # fmt: skip
    out = compute_losses(tiny_net(), tiny_batch(), obj, sets())
    assert {"full_forward_cls", "mask_15%_expr", "mask_TF_expr", "denoise_30%_expr",
            "denoise_60%_expr", "gen_expr"} <= set(out)  # fmt: skip
    assert "mask_15%_cls" not in out  # classification on the first pass only
    with pytest.raises(ValueError, match="no pass sees the cells"):
        Objectives(do_denoise=False)


def test_frozen_embeddings_stay_fixed_learned_ones_move():
    for freeze in (True, False):
        net = tiny_net(freeze_embeddings=freeze)
        obj = Objectives()
        set_trainable(net, obj)
        table = net.gene_encoder.embeddings.weight
        before = table.detach().clone()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
        compute_losses(net, tiny_batch(), obj, sets())["loss"].backward()
        opt.step()
        assert torch.equal(before, table) == freeze


def test_zinb_nll_matches_a_negative_binomial_when_not_zero_inflated():
    mean, theta = torch.tensor([2.0, 5.0]), torch.tensor([1.5, 3.0])
    x = torch.tensor([0.0, 4.0])
    nb = torch.distributions.NegativeBinomial(total_count=theta, probs=mean / (mean + theta))
    got = losses.zinb_nll(x, mean, theta, torch.full_like(x, -30.0))
    torch.testing.assert_close(got, -nb.log_prob(x), atol=1e-4, rtol=1e-4)


def test_parent_labels_are_right_when_any_leaf_is():
    s = losses.label_sets(3, {3: [0, 2]})
    # a parent label is satisfied by a high logit on any of its leaves
    good = losses.classification(torch.tensor([[5.0, -5.0, -5.0]]), torch.tensor([3]), s)
    also = losses.classification(torch.tensor([[-5.0, -5.0, 5.0]]), torch.tensor([3]), s)
    bad = losses.classification(torch.tensor([[-5.0, 5.0, -5.0]]), torch.tensor([3]), s)
    assert good < 0.1 < bad and also < 0.1
    # unknown labels (-1) count in the mean with weight 0
    logits = torch.tensor([[0.1, 2.0, -1.0], [1.0, -1.0, 0.0]])
    one = losses.classification(logits[1:], torch.tensor([0]), s)
    both = losses.classification(logits, torch.tensor([-1, 0]), s)
    torch.testing.assert_close(both, one / 2)


def test_tiny_model_overfits_a_tiny_problem():
    """Loss on one fixed batch must halve in 300 Adam steps (the ZINB terms have a floor:
    counts are noisy, so only the classification term can reach ~0)."""
    torch.manual_seed(0)
    net = tiny_net()
    obj = Objectives(noise=[0.3])
    set_trainable(net, obj)
    batch = tiny_batch(B=8, L=16)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(300):
        torch.manual_seed(1)  # same downsampling every step: a fixed problem to memorise
        out = compute_losses(net, batch, obj, sets())
        first = out["loss"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < first / 2, (first, out["loss"].item())
    assert out["denoise_30%_cls"].item() < 0.2  # labels are memorised


def test_token_order_and_the_depth_token():
    """[depth, cell, classes...] as upstream; the depth token carries log2(1 + depth)."""
    net = tiny_net()
    assert net.cfg.n_cell_tokens == 2 + len(CLASSES)
    batch = tiny_batch()
    a, _ = net.encode(batch["genes"].long(), batch["x"], batch["depth"])
    assert a.shape == (8, 4, 32)
    b, _ = net.encode(batch["genes"].long(), batch["x"], batch["depth"] * 10)
    assert not torch.allclose(a, b)
    logits = net.classify(a)
    torch.testing.assert_close(logits["cell_type"], net.cls_decoders["cell_type"](a[:, 3]))


def test_positions_are_interleaved_sin_cos_of_rank_minus_one():
    net = tiny_net()
    pe = net.pos_encoder.pe  # (n_genes, 1, D): upstream's buffer
    assert pe.shape == (40, 1, 32)
    rank = 1 + 7 // 3  # gene 7's rank
    div = torch.exp(torch.arange(0, 32, 2) * (-torch.log(torch.tensor(10_000.0)) / 32))
    torch.testing.assert_close(pe[7, 0, 0::2], torch.sin((rank - 1) * div))
    torch.testing.assert_close(pe[7, 0, 1::2], torch.cos((rank - 1) * div))


def test_grouped_query_attention_is_attention_with_repeated_kv_heads():
    """num_heads_kv=2 of 4 heads: the same as plain attention whose K/V weights repeat
    each K/V head for its 2 query heads (what upstream's GQA does)."""
    batch = tiny_batch()
    gqa = tiny_net(num_heads_kv=2)
    plain = tiny_net()
    state = gqa.state_dict()
    Dh, H, Hkv = 8, 4, 2
    for name in [k for k in state if k.endswith("Wqkv.weight") or k.endswith("Wqkv.bias")]:
        w = state[name]
        q, kv = w[: H * Dh], w[H * Dh :].reshape(2, Hkv, Dh, *w.shape[1:])
        state[name] = torch.cat([q, kv.repeat_interleave(H // Hkv, dim=1).flatten(0, 2)])
    plain.load_state_dict(state)
    args = batch["genes"].long(), batch["x"], batch["depth"]
    torch.testing.assert_close(gqa.encode(*args)[0], plain.encode(*args)[0])
    assert gqa.transformer.blocks[0].mixer.Wqkv.weight.shape == (32 + 2 * 16, 32)


def test_gene_identity_over_distinct_genes_equals_per_token():
    """The step looks each distinct gene up once and gathers; values and gradients are those
    of looking every token up."""
    net = tiny_net(freeze_embeddings=False)
    genes = tiny_batch()["genes"].long()  # genes repeat across cells
    emb, ident = net.gene_identity(genes)
    (emb.square().sum() + ident.square().sum()).backward()
    table = net.gene_encoder.embeddings.weight
    grad = table.grad.clone()
    net.zero_grad()
    want = net.gene_encoder(genes)
    (want.square().sum() + (want + net.pos_encoder(genes)).square().sum()).backward()
    torch.testing.assert_close(emb, want)
    torch.testing.assert_close(ident, want + net.pos_encoder(genes))
    torch.testing.assert_close(grad, table.grad)


def saved_bytes(fn, *args):
    """(bytes of the tensors autograd keeps for backward while ``fn(*args)`` runs, its result)"""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return total, out


def test_checkpoint_activations_same_gradients_less_saved_memory():
    """checkpoint_activations changes what is kept for backward, never what is computed:
    with dropout on (the recomputed blocks must draw the same masks) every gradient and
    the loss match, while the tensors kept for backward shrink: by one (B, T, hidden)
    tensor a block pass with "mlp", to the blocks' inputs with true."""
    obj = Objectives(noise=[0.5], mask_ratio=[0.3], do_mvc=True, do_cce=True, do_ecs=True)
    batch, grads, kept, loss = tiny_batch(B=8, L=30), {}, {}, {}
    settings = (False, "mlp", True)
    for recompute in settings:
        net = tiny_net(dropout=0.2, checkpoint_activations=recompute)
        set_trainable(net, obj)
        torch.manual_seed(7)
        kept[recompute], out = saved_bytes(compute_losses, net, batch, obj, sets())
        out["loss"].backward()
        loss[recompute] = out["loss"].detach()
        grads[recompute] = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    for recompute in ("mlp", True):
        torch.testing.assert_close(loss[recompute], loss[False], rtol=0, atol=0)
        assert grads[recompute].keys() == grads[False].keys()
        for name, g in grads[False].items():
            torch.testing.assert_close(grads[recompute][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert kept[True] < 0.5 * kept[False], kept
    # "mlp" drops at least every GELU output: count them in a training pass
    net, gelu_output_bytes = tiny_net(dropout=0.2), []
    for block in net.transformer.blocks:
        block.mlp.activation.register_forward_hook(
            lambda mod, inp, out: gelu_output_bytes.append(out.numel() * out.element_size())
        )
    set_trainable(net, obj)
    compute_losses(net, batch, obj, sets())
    assert len(gelu_output_bytes) >= 3 * net.cfg.nlayers  # denoise, mask, generate (+ MVC)
    assert kept[False] - kept["mlp"] >= sum(gelu_output_bytes), kept
    assert kept[True] < kept["mlp"] < kept[False]
    # outside training the option does nothing: the same tensors are kept as without it
    kept_eval = []
    for recompute in settings:
        net = tiny_net(checkpoint_activations=recompute).eval()
        args = batch["genes"].long(), batch["x"], batch["depth"]
        kept_eval.append(saved_bytes(net.encode, *args)[0])
    assert kept_eval[0] == kept_eval[1] == kept_eval[2] > 0
    with pytest.raises(ValueError, match="checkpoint_activations='blocks' is not supported"):
        tiny_net(checkpoint_activations="blocks")
