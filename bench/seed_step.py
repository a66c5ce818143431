"""One configuration of the seed's model (PyPI ``scprint`` 2.3.8), timed like ours.

Runs inside ``.bench-venv-seed`` as ``python -I bench/seed_step.py ...`` (isolated: our
package of the same name must not be importable); bench/model.py calls it and explains
how its switches are matched to ours. Self-contained on purpose: it imports nothing from
this repository.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shim_torchvision() -> None:
    """The seed's transformer (simpler-flash) imports ``torchvision.ops.StochasticDepth``, and
    PyPI's torchvision wheels do not load beside the CPU torch. With drop_path_rate 0 (the
    seed's setting) stochastic depth is the identity; this stands in for it."""
    import sys
    import types

    import torch

    class StochasticDepth(torch.nn.Module):
        def __init__(self, p: float, mode: str = "row"):
            super().__init__()
            self.p, self.mode = p, mode

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
            keep = x.new_empty(shape).bernoulli_(1 - self.p) / (1 - self.p)
            return x * keep

    try:
        import torchvision.ops  # noqa: F401

        return
    except Exception:
        pass
    # lightning and torchmetrics look torchvision up when imported: let them find none
    import lightning  # noqa: F401
    import torchmetrics  # noqa: F401

    ops = types.ModuleType("torchvision.ops")
    ops.StochasticDepth = StochasticDepth
    package = types.ModuleType("torchvision")
    package.ops = ops
    sys.modules.update({"torchvision": package, "torchvision.ops": ops})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--objectives", required=True, help="JSON: our Objectives keys")
    parser.add_argument("--shape", required=True, help="JSON: d_model, nhead, nlayers, dropout")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    obj, shape = json.loads(args.objectives), json.loads(args.shape)

    import torch

    shim_torchvision()
    from scprint import scPrint

    data = torch.load(args.inputs)
    torch.manual_seed(0)
    model = scPrint(
        genes=data["genes"],
        precpt_gene_emb=data["gene_emb"],
        gene_pos_enc=data["positions"],
        classes=data["classes"],
        labels_hierarchy={},
        transformer="normal",
        depth_atinput=True,
        freeze_embeddings=True,
        mvc_decoder="inner product" if obj.get("do_mvc") else "None",
        **shape,
    )
    # the seed's training switches, matched to our Objectives
    model.run_full_forward = False
    model.do_denoise = bool(obj["noise"])
    model.noise = obj["noise"]
    model.mask_ratio = obj["mask_ratio"]
    model.do_generate = obj.get("do_generate", False)
    model.do_cls = obj.get("do_cls", False)
    model.do_mvc = obj.get("do_mvc", False)
    model.do_cce = obj.get("do_cce", False)
    model.do_ecs = obj.get("do_ecs", False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = data["batch"]

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model._full_training(
            batch=batch,
            do_denoise=model.do_denoise,
            noise=model.noise,
            do_cce=model.do_cce,
            cce_temp=model.cce_temp,
            do_ecs=model.do_ecs,
            do_mvc=model.do_mvc,
            do_cls=model.do_cls,
            do_generate=model.do_generate,
            run_full_forward=model.run_full_forward,
            mask_ratio=model.mask_ratio,
        )
        loss.backward()
        opt.step()
        return float(loss)

    rss_before = peak_rss_mb()
    times, loss = [], None
    for i in range(args.steps + 1):
        start = time.perf_counter()
        loss = step()
        if i:
            times.append(time.perf_counter() - start)
    result = {
        "ms": [t * 1000 for t in times],
        "rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "loss": loss,
        "torch": torch.__version__,
    }
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
