"""A Classifier as a sequence of stages, cut at the freeze boundary.

Stage ``i`` maps the output of stage ``i - 1`` to its own; the last stage yields the pooled features
the head takes. ``trainable[j]`` is the stage that holds the ``j``-th block of
:func:`dlforge.vision.networks.trainable_blocks`, so "unfreeze the last ``u`` blocks" becomes "train the
stages from ``boundary(u)`` on". Everything before the boundary is frozen, so its output for an image
never changes and is computed once (the activation cache); an epoch only runs the tail.

The stage modules wrap (share) the Classifier's own submodules: training the tail trains the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.vision.networks import Classifier, freeze_backbone
from dlforge.vision.staged import units_of


class GlobalPool(nn.Module):
    """Global average pooling and flattening (a no-op on already pooled features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        return torch.flatten(x, 1)


class Tail(nn.Module):
    """The trained part: the stages after the boundary, dropout and the head."""

    def __init__(self, stages: list[nn.Module], dropout: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*stages)
        self.dropout = dropout
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dropout(self.body(x)))
        return out


@dataclass
class StagedNetwork:
    """``model`` cut into ``stages``; ``trainable[j]`` is the stage index of trainable block ``j``."""

    model: Classifier
    stages: list[nn.Module]
    trainable: list[int]

    @property
    def max_unfreeze(self) -> int:
        return len(self.trainable)

    def boundary(self, unfreeze: int) -> int:
        """Index of the first trained stage when the last ``unfreeze`` blocks train (``len(stages)``: none)."""
        if unfreeze < 0 or unfreeze > self.max_unfreeze:
            raise InvalidInput(
                f"unfreeze={unfreeze} is out of range: this network has {self.max_unfreeze} trainable blocks"
            )
        if unfreeze == 0:
            return len(self.stages)
        return self.trainable[self.max_unfreeze - unfreeze]

    def span(self, start: int, stop: int) -> nn.Sequential:
        """Stages ``start`` (inclusive) to ``stop`` (exclusive) as one module."""
        return nn.Sequential(*self.stages[start:stop])

    def tail(self, unfreeze: int) -> Tail:
        """The trainable tail for ``unfreeze``; also sets ``requires_grad`` on the model accordingly."""
        freeze_backbone(self.model, unfreeze_last=unfreeze)
        return Tail(self.stages[self.boundary(unfreeze):], self.model.dropout, self.model.head)


def staged(model: Classifier) -> StagedNetwork:
    """Cut a Classifier built by :func:`dlforge.vision.networks.build_network` into stages.

    The stages are the vision core's units (:func:`dlforge.vision.staged.units_of`, the one
    definition of freeze boundaries the proposer and the feature store use too), then GAP.
    """
    try:
        units, _ = units_of(model)
    except ConfigError:  # an unknown backbone is one block: frozen or trained as a whole
        return StagedNetwork(model, [model.backbone], [0])
    return StagedNetwork(model, [*(m for _, m in units), GlobalPool()], list(range(len(units))))
