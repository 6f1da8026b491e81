"""Low-rank factorization of the largest pointwise (1x1) convolutions and the linear head.

A 1x1 convolution or a linear layer is a matrix ``W`` (out x in) applied at every pixel. Its
truncated SVD ``W ~ U_r S_r V_r^T`` replaces it by two layers: ``in -> r`` with weight
``sqrt(S_r) V_r^T`` (carrying the original stride) and ``r -> out`` with weight ``U_r sqrt(S_r)`` (and
the original bias). That computes ``r (in + out)`` instead of ``in * out`` multiply-adds per pixel, so
it pays only for ``r < in * out / (in + out)``; layers where the chosen rank does not reach that
break-even are left alone (a 2-class head, for instance, never pays). By Eckart-Young the
per-pixel output error is at most ``s_{r+1} * |x|`` (the largest discarded singular value times the
input's norm), and the weight error's Frobenius norm is the root of the discarded ``s_i^2``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class FactorizedLayer:
    """One factorized layer: its shape, the rank kept and the share of ``sum s_i^2`` kept."""

    name: str
    in_features: int
    out_features: int
    rank: int
    energy_kept: float
    params_before: int
    params_after: int


@dataclass(frozen=True)
class FactorizeReport:
    layers: list[FactorizedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left as it was


def _matrix(module: nn.Module) -> torch.Tensor | None:
    """The (out x in) matrix of a 1x1 ungrouped conv or a linear layer, else None."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.dilation == (1, 1) and module.padding in ((0, 0), "valid")):
        return module.weight.detach()[:, :, 0, 0]
    return None


def choose_rank(singular_values: torch.Tensor, *, rank_fraction: float | None = None,
                energy: float | None = None) -> int:
    """Rank to keep: ``ceil(rank_fraction * full rank)``, or the smallest ``r`` keeping ``energy`` of ``sum s^2``."""
    import math

    import torch

    full = len(singular_values)
    if (rank_fraction is None) == (energy is None):
        raise ValueError("give exactly one of rank_fraction and energy")
    if rank_fraction is not None:
        if not 0.0 < rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction {rank_fraction} is outside (0, 1]")
        return max(1, min(full, math.ceil(rank_fraction * full)))
    assert energy is not None
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy {energy} is outside (0, 1]")
    share = torch.cumsum(singular_values.double() ** 2, 0) / (singular_values.double() ** 2).sum()
    return max(1, min(full, int((share < energy - 1e-12).sum().item()) + 1))


def _factor_pair(module: nn.Module, rank: int, u: torch.Tensor, s: torch.Tensor,
                 vh: torch.Tensor) -> nn.Module:
    import torch
    from torch import nn

    root = torch.sqrt(s[:rank])
    first_w = root[:, None] * vh[:rank]            # r x in
    second_w = u[:, :rank] * root[None, :]         # out x r
    bias = getattr(module, "bias", None)
    first: nn.Linear | nn.Conv2d
    second: nn.Linear | nn.Conv2d
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=bias is not None)
        first.weight.data.copy_(first_w)
        second.weight.data.copy_(second_w)
    else:
        assert isinstance(module, nn.Conv2d)
        sh, sw = module.stride
        first = nn.Conv2d(module.in_channels, rank, 1, stride=(sh, sw), bias=False)
        second = nn.Conv2d(rank, module.out_channels, 1, bias=bias is not None)
        first.weight.data.copy_(first_w[:, :, None, None])
        second.weight.data.copy_(second_w[:, :, None, None])
    if bias is not None and second.bias is not None:
        second.bias.data.copy_(bias.detach())
    pair = nn.Sequential(first, second)
    pair.train(module.training)
    return pair


def factorize(
    model: nn.Module,
    *,
    rank_fraction: float | None = None,
    energy: float | None = None,
    layers: int = 6,
    include_head: bool = True,
    only_if_smaller: bool = True,
) -> tuple[nn.Module, FactorizeReport]:
    """A copy of ``model`` whose ``layers`` largest 1x1 convs (and linear head) are factorized.

    Give the rank as ``rank_fraction`` of each layer's full rank ``min(in, out)``, or as the share
    ``energy`` of its ``sum s_i^2`` to keep. Layers are ranked by weight count; a layer whose rank would
    not reduce its multiply-adds is skipped and named in the report (unless ``only_if_smaller`` is
    False). The original is not changed.
    """
    import torch
    from torch import nn

    out = copy.deepcopy(model)
    candidates: list[tuple[str, nn.Module, torch.Tensor]] = []
    linears = [name for name, m in out.named_modules() if isinstance(m, nn.Linear)]
    for name, module in out.named_modules():
        w = _matrix(module)
        if w is None or (isinstance(module, nn.Linear) and not (include_head and name == linears[-1])):
            continue
        candidates.append((name, module, w))
    convs = sorted((c for c in candidates if isinstance(c[1], nn.Conv2d)), key=lambda c: -c[2].numel())[:layers]
    heads = [c for c in candidates if isinstance(c[1], nn.Linear)]
    report = FactorizeReport()
    for name, module, w in [*convs, *heads]:
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        rank = choose_rank(s, rank_fraction=rank_fraction, energy=energy)
        n_out, n_in = w.shape
        if only_if_smaller and rank * (n_in + n_out) >= n_in * n_out:
            report.skipped[name] = (f"rank {rank} of {n_out}x{n_in} saves nothing "
                                    f"(break-even below {n_in * n_out / (n_in + n_out):.1f})")
            continue
        pair = _factor_pair(module, rank, u.float(), s.float(), vh.float())
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, pair)
        kept = float((s[:rank] ** 2).sum() / (s ** 2).sum())
        report.layers.append(FactorizedLayer(name, n_in, n_out, rank, kept, n_in * n_out, rank * (n_in + n_out)))
    return out, report
