"""Cutting a repository network into a frozen prefix and a trainable tail.

The short-term training run and the feature scorers share one forward pass of the frozen part:
``tail(prefix(x)) == model.features(x)`` in eval mode, so the prefix activations of the target
sample are computed once and only the tail runs during the short training run.

Stages counted from the output: for EfficientNet-Lite0 stage 1 is the head convolution
(``_conv_head``/``_bn1``), stage k>1 adds the last k-1 MBConv blocks; for the small CNN stage k is
its last k conv-BN-ReLU(-pool) groups. ``unfreeze_last=0`` makes the tail the identity on the
pooled features (a linear head only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlforge.common.errors import ConfigError
from dlforge.vision.networks import Classifier, SmallCNN


@dataclass
class BackboneSplit:
    prefix: nn.Module
    tail: nn.Module
    unfreeze_last: int


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class _EfficientNetPrefix(nn.Module):
    def __init__(self, net: nn.Module, n_blocks: int) -> None:
        super().__init__()
        self.net = net
        self.n_blocks = n_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx in range(self.n_blocks):
            x = net._blocks[idx](x, drop_connect_rate=_drop_rate(net, idx))
        return x


class _EfficientNetTail(nn.Module):
    def __init__(self, net: nn.Module, start_block: int) -> None:
        super().__init__()
        self.net = net
        self.start_block = start_block
        self.pool = _Pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.net
        for idx in range(self.start_block, len(net._blocks)):
            x = net._blocks[idx](x, drop_connect_rate=_drop_rate(net, idx))
        x = net._swish(net._bn1(net._conv_head(x)))
        out: torch.Tensor = self.pool(x)
        return out


def _drop_rate(net: Any, idx: int) -> float:
    # As EfficientNet.extract_features: the drop-connect rate grows with the block index.
    rate = float(net._global_params.drop_connect_rate or 0.0)
    return rate * float(idx) / len(net._blocks) if rate else 0.0


def _small_cnn_stage_starts(body: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(body) if isinstance(m, nn.Conv2d)]


def split_backbone(model: Classifier, *, unfreeze_last: int) -> BackboneSplit:
    """Split ``model.backbone`` so the last ``unfreeze_last`` stages form the tail (see module doc)."""
    if unfreeze_last < 0:
        raise ConfigError(f"unfreeze_last must be >= 0, got {unfreeze_last}")
    bb = model.backbone
    if unfreeze_last == 0:
        return BackboneSplit(prefix=bb, tail=nn.Identity(), unfreeze_last=0)
    if isinstance(bb, SmallCNN):
        starts = _small_cnn_stage_starts(bb.body)
        k = min(unfreeze_last, len(starts))
        cut = starts[len(starts) - k]
        prefix = nn.Sequential(*list(bb.body)[:cut]) if cut > 0 else nn.Identity()
        tail = nn.Sequential(*list(bb.body)[cut:], _Pool())
        return BackboneSplit(prefix=prefix, tail=tail, unfreeze_last=k)
    net: Any = getattr(bb, "net", None)
    if net is not None and hasattr(net, "_blocks") and hasattr(net, "_conv_head"):
        n = len(net._blocks)
        k = min(unfreeze_last, n + 1)
        start = n - (k - 1)
        return BackboneSplit(prefix=_EfficientNetPrefix(net, start), tail=_EfficientNetTail(net, start),
                             unfreeze_last=k)
    raise ConfigError(f"cannot split a {type(bb).__name__} backbone for short-term training")
