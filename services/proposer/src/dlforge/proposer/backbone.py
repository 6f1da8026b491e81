"""Cutting a repository network into a frozen prefix and a trainable tail.

The short-term training run and the feature scorers share one forward pass of the frozen part:
``tail(prefix(x)) == model.features(x)`` in eval mode, so the prefix activations of the target
sample are computed once and only the tail runs during the short training run.

The cut is the one every stage uses, :class:`dlforge.vision.staged.StagedNetwork`: training the
last ``k`` units (EfficientNet-Lite0: ``head``, then the MBConv blocks from the last; the small
CNN: its conv groups from the last) puts the boundary at ``boundary(k)``. ``unfreeze_last=0`` makes
the tail the identity on the pooled features (a linear head only).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dlforge.common.errors import ConfigError
from dlforge.vision.networks import Classifier, SmallCNN, _EfficientNetFeatures
from dlforge.vision.staged import StagedNetwork


@dataclass
class BackboneSplit:
    prefix: nn.Module
    tail: nn.Module
    unfreeze_last: int
    boundary: int | None = None
    """Units in the prefix (None when the prefix is the whole pooled backbone)."""


def staged_of(model: Classifier) -> StagedNetwork:
    bb = model.backbone
    if isinstance(bb, _EfficientNetFeatures):
        return StagedNetwork(model, arch="efficientnet_lite0")
    if isinstance(bb, SmallCNN):
        return StagedNetwork(model, arch="small_cnn")
    raise ConfigError(f"cannot split a {type(bb).__name__} backbone for short-term training")


def split_backbone(model: Classifier, *, unfreeze_last: int) -> BackboneSplit:
    """Split ``model.backbone`` so the last ``unfreeze_last`` units form the tail (see module doc)."""
    if unfreeze_last < 0:
        raise ConfigError(f"unfreeze_last must be >= 0, got {unfreeze_last}")
    if unfreeze_last == 0:
        return BackboneSplit(prefix=model.backbone, tail=nn.Identity(), unfreeze_last=0)
    net = staged_of(model)
    k = min(unfreeze_last, len(net))
    b = net.boundary(k)
    return BackboneSplit(prefix=net.prefix(b), tail=net.tail(b), unfreeze_last=k, boundary=b)
