"""Cutting a network at the freeze boundary keeps its function."""

from __future__ import annotations

import pytest
import torch

from dlforge.common.errors import InvalidInput
from dlforge.trainer.stages import staged
from dlforge.vision.networks import build_network, trainable_blocks


@pytest.mark.parametrize(("arch", "size", "channels"), [("small_cnn", 32, 1), ("efficientnet_lite0", 64, 3)])
def test_prefix_then_tail_equals_the_model(arch: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build_network(arch, 3, pretrained=False).eval()
    net = staged(model)
    assert net.max_unfreeze == len(trainable_blocks(model))
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        expected = model(x)
        for unfreeze in (0, 1, 2, 3):
            b = net.boundary(unfreeze)
            tail = net.tail(unfreeze).eval()
            assert torch.allclose(tail(net.span(0, b)(x)), expected, atol=1e-5)
            # exactly the last `unfreeze` blocks (and the head) train
            trained = {id(p) for p in model.parameters() if p.requires_grad}
            want = {id(p) for blk in trainable_blocks(model)[len(trainable_blocks(model)) - unfreeze:]
                    for p in blk.parameters()} if unfreeze else set()
            assert trained == want | {id(p) for p in model.head.parameters()}
            assert {id(p) for p in tail.parameters()} >= trained


def test_boundaries_move_towards_the_input_and_are_bounded() -> None:
    net = staged(build_network("small_cnn", 2, pretrained=False))
    bounds = [net.boundary(u) for u in range(net.max_unfreeze + 1)]
    assert bounds == sorted(bounds, reverse=True) and bounds[0] == len(net.stages) and bounds[-1] == 0
    with pytest.raises(InvalidInput, match="out of range"):
        net.boundary(net.max_unfreeze + 1)
