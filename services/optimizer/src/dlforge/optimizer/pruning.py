"""Structured channel pruning of a torch model, built on torch-pruning's dependency graph.

:func:`prune_channels` removes whole channels (a conv's output filters together with every tensor
that depends on them: its BatchNorm, the next depthwise conv, the next conv's input slices), so the
pruned model is a smaller dense model that any runtime runs faster, not a sparse one.

Which channels go is decided per dependency group by importance (L2 norm of the group's weights, or
the BatchNorm scale), the same ratio in every pruned group. ``scope="inner"`` (default) prunes only
the groups that contain a depthwise convolution: the expanded channels inside inverted-residual
blocks (expand 1x1 -> depthwise -> project 1x1), which carry most of the compute of a MobileNet /
EfficientNet, while the residual streams between blocks and the features the head reads keep their
width (pruning those destroys far more accuracy per saved multiply-add). ``scope="all"`` prunes every
group but the classifier's outputs; ``scope="auto"`` (default) is "inner" for a network with depthwise
convolutions and "all" for one without (a plain CNN has no inner channels).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

ImportanceName = Literal["l2", "bn_scale"]
Scope = Literal["auto", "inner", "all"]


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune_channels` did: parameters before/after and each pruned layer's output channels."""

    ratio: float
    scope: str
    importance: str
    params_before: int
    params_after: int
    groups_pruned: int
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # conv name -> (out before, out after)


def _is_depthwise(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the logits: the last Linear (or the last conv when there is none)."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [convs[-1]] if convs else []


def out_channels(model: nn.Module) -> dict[str, int]:
    """Output channels (features for Linear) of every conv and linear layer, by module name."""
    from torch import nn

    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def prune_channels(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor,
    *,
    scope: Scope = "auto",
    importance: ImportanceName = "l2",
    round_to: int | None = 8,
) -> tuple[nn.Module, PruneReport]:
    """A pruned copy of ``model`` with ``ratio`` of the channels of each pruned group removed.

    ``example_input`` (e.g. ``torch.zeros(1, C, S, S)``) is traced to find the dependency groups.
    ``round_to`` keeps channel counts multiples of it (SIMD-friendly for the runtimes). The original
    model is not changed. Raises ValueError for a ratio outside [0, 1).
    """
    import torch
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio {ratio} is outside [0, 1)")
    pruned = copy.deepcopy(model).eval()
    if scope == "auto":
        scope = "inner" if any(_is_depthwise(m) for m in pruned.modules()) else "all"
    before = out_channels(pruned)
    params_before = sum(p.numel() for p in pruned.parameters())
    if ratio == 0.0:
        return pruned, PruneReport(ratio, scope, importance, params_before, params_before, 0, {})
    imp = tp.importance.BNScaleImportance() if importance == "bn_scale" else tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(pruned, example_input, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=_classifier_layers(pruned), round_to=round_to)
    groups = 0
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            modules = [dep.target.module for dep, _ in group]
            if scope == "inner" and not any(_is_depthwise(m) for m in modules):
                continue
            group.prune()
            groups += 1
    after = out_channels(pruned)
    changed = {name: (before[name], after[name]) for name in after if name in before and after[name] != before[name]}
    return pruned, PruneReport(ratio, scope, importance, params_before,
                               sum(p.numel() for p in pruned.parameters()), groups, changed)
