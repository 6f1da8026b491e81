"""Fixtures for the optimizer tests: a small CNN trained on a separable synthetic task."""

from __future__ import annotations

import pytest
import torch
from optimizer_testdata import CLASSES, SIZE, Trained, separable

from dlforge.optimizer.handlers import OptimizeOptions
from dlforge.vision.images import to_tensor
from dlforge.vision.networks import NetworkSpec, build_network, save_checkpoint, spec_of


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """small_cnn trained a few epochs at 32 px on :func:`separable` (test accuracy ~1.0)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    x, y = separable(320, seed=1)
    model = build_network("small_cnn", len(CLASSES))
    net = spec_of("small_cnn")
    xt = to_tensor(x, NetworkSpec(net.arch, net.in_channels, SIZE, net.feature_dim, net.mean, net.std))
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(5):
        model.train()
        for i in range(0, len(x), 32):
            loss = torch.nn.functional.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "small_cnn.pt"
    save_checkpoint(model, arch="small_cnn", classes=CLASSES, path=str(path), extra={"input_size": SIZE})
    return Trained(path, model)


@pytest.fixture
def fast_options() -> OptimizeOptions:
    """Few timing iterations: the tests check the logic and the numbers' sanity, not the speed."""
    return OptimizeOptions(rounds=1, warmup=1, iterations=5, iterations_large_batch=2, batch_sizes=[1, 8],
                           calibration_methods=["minmax", "entropy"], gpu=True)
