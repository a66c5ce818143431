"""wandb private API that scprint relies on (tested: wandb 0.31): ``TorchGraph`` from
``wandb.integration.torch.wandb_torch`` and its ``_graph_hooks`` set, which
scprint.trainer.watch fills itself because our model never calls ``forward()`` (see there).
"""

from __future__ import annotations

from scprint.adapters import check_version

TESTED = ">=0.17,<0.32"  # pyproject.toml's bound
check_version("wandb", TESTED)


def leaf_graph(module, hooks: list):
    """A TorchGraph recording the leaf modules of ``module`` that run; their forward hooks
    are appended to ``hooks`` (remove them, then call `drop_unrun`, after one step)."""
    from wandb.integration.torch.wandb_torch import TorchGraph

    graph = TorchGraph()
    for name, leaf in module.named_modules():
        if name and not any(leaf.children()):  # leaves: what actually computes
            graph._graph_hooks.add(id(leaf))
            hooks.append(leaf.register_forward_hook(graph.create_forward_hook(name, 0)))
    return graph


def drop_unrun(graph) -> None:
    """Forget the modules this configuration never ran (else W&B waits for them)."""
    graph._graph_hooks.clear()
