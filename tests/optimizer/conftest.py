"""Fixtures for the optimizer tests: a small CNN trained on a separable synthetic task."""

from __future__ import annotations

import asyncio

import pytest
import torch
from optimizer_testdata import CLASSES, SIZE, Optimized, Trained, separable, store_dataset

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


@pytest.fixture(scope="session")
def optimized(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Optimized:
    """The tiny CNN through ``model.trained`` -> ``model.optimized`` (few timing calls, one calibration)."""
    from dlforge.common.bus import Delivery
    from dlforge.common.events import Event, ModelOptimized, Topic, decode, encode
    from dlforge.common.runs import RUNS, apply
    from dlforge.common.runtime import Backends, Outcome, Worker
    from dlforge.optimizer.worker import build_deps, bundle_key, service

    root = tmp_path_factory.mktemp("optimized")
    shell = Optimized(root, "run-bundle", "ds1", "m1", "", "", "")
    settings = shell.settings(retry_attempts=1, optimizer_rounds=1, optimizer_warmup=1, optimizer_iterations=5,
                              optimizer_iterations_large_batch=2, optimizer_batch_sizes=[1, 8],
                              optimizer_calibration_images=16, optimizer_calibration_methods=["minmax"],
                              optimizer_benchmark_torch=False)

    async def run() -> ModelOptimized:
        backends = Backends.from_settings(settings)
        await backends.start()
        try:
            trained_event = Event.new(store_dataset(backends.objects, trained), run_id=shell.run_id)
            deps = await build_deps(settings, backends)
            delivery = Delivery(topic=trained_event.event_type.value, key=trained_event.run_id,
                                value=encode(trained_event))
            assert await Worker(service, backends, deps=deps).process(delivery) == Outcome.HANDLED
            sub = await backends.bus.subscribe(group="test-reader", topics=[Topic.MODEL_OPTIMIZED])
            got = await sub.get(timeout=5)
            assert got is not None, "no model.optimized event"
            optimized_event = decode(got.value)
            await sub.close()
            view = apply(apply(None, trained_event), optimized_event)  # what the runs service folds
            await backends.docs.upsert(RUNS, view)
            assert isinstance(optimized_event.payload, ModelOptimized)
            assert backends.objects.exists(bundle_key("ds1", "m1"))
            return optimized_event.payload
        finally:
            await backends.stop()

    payload = asyncio.run(run())
    return Optimized(root, shell.run_id, payload.dataset_id, payload.model_id, payload.report_key,
                     f"optimizer/{payload.dataset_id}/{payload.model_id}/bundle.zip", payload.chosen_variant)
