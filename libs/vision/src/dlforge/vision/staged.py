"""A network as a sequence of named units: the one definition of stages and freeze boundaries.

Units are the granularity at which a network is frozen or trained (the blocks of
:func:`dlforge.vision.networks.trainable_blocks`). For EfficientNet-Lite0 they are ``stem``,
``block00`` .. ``block15`` and ``head`` (18 units); the named *stages* are the last unit of each
output width (``c16`` .. ``c320``, plus ``stem`` and ``head``; Lite1 and Lite2 have 23 units, and
Lite2's widths are ``c16`` .. ``c352``). For the small CNN the
units are each conv (``conv0`` ..) and its BN-ReLU(-pool) (``bn0`` ..); its stages ``group0`` ..
``group3`` end at the ``bn`` units.

A *boundary* ``b`` is a number of units: the activation at ``b`` is the output of the first ``b``
units (``b = 0``: the network input). Training the last ``u`` units (``unfreeze = u``) puts the
boundary at ``len(units) - u``: everything before is frozen, so its output for an image never
changes and can be stored (:mod:`dlforge.vision.trunk`). ``GAP(run(x)) == model.features(x)``
in eval mode; the units share the Classifier's modules, so training a tail trains the model.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.vision.networks import Classifier, SmallCNN, _EfficientNetFeatures, build_network

EFFICIENTNET_LITE0_STAGES: dict[str, str] = {
    "stem": "stem", "c16": "block00", "c24": "block02", "c40": "block04", "c80": "block07",
    "c112": "block10", "c192": "block14", "c320": "block15", "head": "head",
}
SHARED_UNFREEZE = 3
"""Trunk passes from pixels keep the activation at ``boundary(SHARED_UNFREEZE)``: the deepest
freeze boundary the tuner searches (unfreeze 0..3), from which every shallower cut and every later
stage's pooled features are derived without running the trunk from pixels again."""


class _Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.bn(self.conv(x)))
        return out


class _Block(nn.Module):
    """One MBConv block with its depth-scaled drop-connect rate, as ``extract_features`` runs it."""

    def __init__(self, block: nn.Module, drop_connect_rate: float | None) -> None:
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x, drop_connect_rate=self.drop_connect_rate)
        return out


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to N x C (a no-op on pooled features)."""
    return x.mean((2, 3)) if x.dim() == 4 else torch.flatten(x, 1)


def units_of(model: Classifier) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The named units of ``model.backbone`` (sharing its modules) and its named stages."""
    bb = model.backbone
    if isinstance(bb, _EfficientNetFeatures):
        net: Any = bb.net
        rate = net._global_params.drop_connect_rate
        n = len(net._blocks)
        units: list[tuple[str, nn.Module]] = [("stem", _Stem(net._conv_stem, net._bn0, net._swish))]
        for idx, block in enumerate(net._blocks):
            units.append((f"block{idx:02d}", _Block(block, rate * float(idx) / n if rate else None)))
        units.append(("head", _Stem(net._conv_head, net._bn1, net._swish)))
        # a stage ends at the last block of each output width (Lite1 and Lite2 have more blocks per stage,
        # and Lite2 other widths: c48 .. c352); for Lite0 this is EFFICIENTNET_LITE0_STAGES
        stages = {"stem": "stem"}
        for idx, block in enumerate(net._blocks):
            stages[f"c{block._project_conv.out_channels}"] = f"block{idx:02d}"
        stages["head"] = "head"
        return units, stages
    if isinstance(bb, SmallCNN):
        # each conv, then its BN with the ReLU (and max pool) after it: the trainable blocks the tuner's
        # "unfreeze" has always counted for this network
        groups: list[tuple[str, list[nn.Module]]] = []
        for m in bb.body:
            if isinstance(m, nn.Conv2d):
                groups.append((f"conv{len(groups) // 2}", [m]))
            elif isinstance(m, nn.BatchNorm2d):
                groups.append((f"bn{len(groups) // 2}", [m]))
            else:
                groups[-1][1].append(m)
        units = [(name, g[0] if len(g) == 1 else nn.Sequential(*g)) for name, g in groups]
        return units, {f"group{i}": f"bn{i}" for i in range(len(groups) // 2)}
    raise ConfigError(f"no stages are defined for a {type(bb).__name__} backbone")


class StagedNetwork(nn.Module):
    """A Classifier's backbone as named units (see the module docstring)."""

    def __init__(self, model: Classifier, *, arch: str) -> None:
        super().__init__()
        units, stages = units_of(model)
        self.model = model
        self.arch = arch
        self.names = [name for name, _ in units]
        self.units = nn.ModuleList([m for _, m in units])
        self.stages = stages
        self.onnx_sessions: dict[tuple[Any, ...], Any] = {}

    def __len__(self) -> int:
        return len(self.units)

    def index(self, name: str) -> int:
        """The unit index of a unit name (``block14``) or a stage name (``c192``)."""
        unit = self.stages.get(name, name)
        try:
            return self.names.index(unit)
        except ValueError as exc:
            raise InvalidInput(f"{self.arch} has no stage or unit {name!r}; stages: {', '.join(self.stages)}") from exc

    def boundary(self, unfreeze: int) -> int:
        """The freeze boundary when the last ``unfreeze`` units train (``len(self)`` when none do)."""
        if not 0 <= unfreeze <= len(self):
            raise InvalidInput(f"unfreeze={unfreeze} is out of range: {self.arch} has {len(self)} units")
        return len(self) - unfreeze

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The activation at boundary ``stop`` from the activation at ``start``."""
        for unit in self.units[start:len(self) if stop is None else stop]:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the last unit (equals ``model.features(x)`` in eval mode)."""
        return gap(self.run(x))

    def outputs(
        self, x: torch.Tensor, *, start: int = 0, pooled: Sequence[int] = (), boundaries: Sequence[int] = ()
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """From the activation at ``start``: GAP of unit ``u``'s output for ``u in pooled`` and the
        activations at ``boundaries`` (each > ``start``), in one pass up to the deepest one."""
        want = [u + 1 for u in pooled] + list(boundaries)
        if any(b <= start or b > len(self) for b in want):
            raise InvalidInput(f"outputs must lie after boundary {start} and within {len(self)} units")
        stop = max(want, default=start)
        acts: dict[int, torch.Tensor] = {}
        h = x
        for b in range(start + 1, stop + 1):
            h = self.units[b - 1](h)
            acts[b] = h
        return [gap(acts[u + 1]) for u in pooled], [acts[b] for b in boundaries]

    def prefix(self, boundary: int) -> nn.Module:
        """The frozen part: units before ``boundary`` (identity at 0)."""
        return nn.Sequential(*self.units[:boundary])

    def tail(self, boundary: int) -> nn.Module:
        """The units from ``boundary`` on, then GAP: ``tail(b)(prefix(b)(x)) == self(x)``."""
        return _Tail(list(self.units[boundary:]))

    def digest(self, stop: int) -> str:
        """sha256 of the weights (parameters and buffers) of units before ``stop``: what decides the
        activation at ``stop``. Two models whose first ``stop`` units agree have the same digest."""
        h = hashlib.sha256(f"{self.arch}:{stop}".encode())
        for n, unit in enumerate(self.units[:stop]):
            for name, t in sorted(unit.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{n}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return h.hexdigest()

    def export_prefix_onnx(self, boundary: int, *, size: int, channels: int = 3) -> bytes:
        """The frozen prefix (input -> activation at ``boundary``) as ONNX bytes, batch size dynamic."""
        return export_onnx(self.prefix(boundary).eval(), torch.zeros(1, channels, size, size))


class _Tail(nn.Module):
    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gap(self.body(x))


def export_onnx(module: nn.Module, example: torch.Tensor, *, outputs: int = 1) -> bytes:
    """``module`` as ONNX (opset 17, dynamic batch), inputs ``x`` and outputs ``y0``..``y{outputs-1}``."""
    buf = io.BytesIO()
    names = [f"y{i}" for i in range(outputs)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, input_names=["x"], output_names=names,  # type: ignore[arg-type]
                          dynamic_axes={"x": {0: "n"}, **{n: {0: "n"} for n in names}}, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def imagenet_trunk() -> StagedNetwork:
    """EfficientNet-Lite0 with the bundled ImageNet weights as a StagedNetwork (eval; one per process)."""
    return StagedNetwork(build_network("efficientnet_lite0", 1, pretrained=True), arch="efficientnet_lite0").eval()
