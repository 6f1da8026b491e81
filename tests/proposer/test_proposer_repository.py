"""Building the model repository: records, weights, idempotence, failures, the CLI."""

from __future__ import annotations

import io
import multiprocessing
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from proposer_testdata import bars, blobs, synthetic_source

from dlforge.common.runtime import Backends
from dlforge.proposer import __main__ as cli
from dlforge.proposer.repository import (
    MODELS,
    CellFailed,
    EntryMaker,
    ModelRecipe,
    SourceProvider,
    build_repository,
    list_models,
    load_entry,
    source_sample_key,
    weights_key,
)
from dlforge.proposer.sources import FASHION_MNIST_DIR, load_fashion_mnist
from dlforge.vision.images import to_tensor
from dlforge.vision.networks import load_checkpoint, spec_of

RECIPES = (
    ModelRecipe(model_id="small_cnn-synth_bars", arch="small_cnn", source="synth_bars", epochs=2, train_items=96,
                test_items=48, batch_size=16, input_size=32, source_sample_items=24),
    ModelRecipe(model_id="small_cnn-synth_blobs", arch="small_cnn", source="synth_blobs", epochs=1, train_items=64,
                test_items=48, batch_size=16, input_size=32, source_sample_items=24),
)


def sources() -> dict[str, SourceProvider]:
    return {"synth_bars": synthetic_source("synth_bars", bars), "synth_blobs": lambda: synthetic_source("b", blobs)}


async def test_build_records_weights_and_is_idempotent(backends: Backends, tmp_path: Path) -> None:
    objects, docs = backends.objects, backends.docs
    first = await build_repository(objects, docs, recipes=RECIPES, sources=sources(), work_dir=tmp_path)
    assert [r.action for r in first] == ["built", "built"]
    records = await list_models(docs)
    assert [r["model_id"] for r in records] == ["small_cnn-synth_bars", "small_cnn-synth_blobs"]
    rec = await docs.get(MODELS, "small_cnn-synth_bars")
    assert rec is not None
    assert rec["arch"] == "small_cnn" and rec["source_dataset"] == "synth_bars"
    assert rec["num_classes"] == 2 and rec["classes"] == ["a", "b"]
    assert rec["input_size"] == 32 and rec["in_channels"] == 1
    assert rec["weights_key"] == weights_key("small_cnn-synth_bars") == "proposer/models/small_cnn-synth_bars.pt"
    assert rec["source_sample_key"] == source_sample_key("small_cnn-synth_bars")
    assert rec["recipe_hash"] == RECIPES[0].recipe_hash() and rec["created_at"]
    # the bars are easy: two epochs on 96 images learn them, and the record says how well
    assert rec["metrics"]["source_test_accuracy"] >= 0.9
    assert rec["metrics"]["source_test_items"] == 48

    # the checkpoint is a dlforge checkpoint that predicts what the record claims
    model, sample = load_entry(objects, rec, work_dir=tmp_path)
    assert sample is not None and sample.shape == (24, 28, 28, 1)
    x, y = bars(48, seed=2)
    spec = replace(spec_of("small_cnn"), input_size=32)
    with torch.inference_mode():
        pred = model.eval()(to_tensor(x[..., None], spec)).argmax(1).numpy()
    assert float(np.mean(pred == y)) >= 0.9
    ckpt_path = tmp_path / "c.pt"
    objects.get_file(rec["weights_key"], ckpt_path)
    _, ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt["arch"] == "small_cnn" and ckpt["classes"] == ["a", "b"]
    assert ckpt["extra"]["model_id"] == "small_cnn-synth_bars"  # type: ignore[index]

    # a second build skips both; the records are untouched
    again = await build_repository(objects, docs, recipes=RECIPES, sources={}, work_dir=tmp_path)
    assert [r.action for r in again] == ["skipped", "skipped"]
    assert (await docs.get(MODELS, "small_cnn-synth_bars"))["_version"] == rec["_version"]  # type: ignore[index]

    # force rebuilds; a changed recipe rebuilds only that entry; lost weights are rebuilt
    forced = await build_repository(objects, docs, recipes=RECIPES[:1], sources=sources(), force=True,
                                    work_dir=tmp_path)
    assert [r.action for r in forced] == ["built"]
    changed = (replace(RECIPES[0], epochs=1), RECIPES[1])
    out = await build_repository(objects, docs, recipes=changed, sources=sources(), work_dir=tmp_path)
    assert [r.action for r in out] == ["built", "skipped"]
    assert (await docs.get(MODELS, "small_cnn-synth_bars"))["recipe"]["epochs"] == 1  # type: ignore[index]
    objects.delete(weights_key("small_cnn-synth_blobs"))
    out = await build_repository(objects, docs, recipes=changed, sources=sources(), work_dir=tmp_path)
    assert [r.action for r in out] == ["skipped", "built"]


async def test_a_trained_entry_is_the_same_network_whatever_else_runs_in_the_process(
        backends: Backends, tmp_path: Path) -> None:
    """In ``make demo`` the repository builds while other services train in the same process: they draw
    from torch's global random generator and set its thread count. Trained in the caller's process, the
    same recipe then came out as another network (the small CNN cells' sub-scores moved between demo
    runs); it must be the network it is when built alone."""
    objects, docs = backends.objects, backends.docs

    async def weights() -> list[torch.Tensor]:
        rec = await docs.get(MODELS, RECIPES[0].model_id)
        assert rec is not None
        model, _ = load_entry(objects, rec, work_dir=tmp_path)
        return [t.detach().clone() for t in model.state_dict().values()]

    await build_repository(objects, docs, recipes=RECIPES[:1], sources=sources(), work_dir=tmp_path)
    alone = await weights()
    threads = torch.get_num_threads()
    stop = threading.Event()

    def other_service() -> None:
        while not stop.is_set():
            torch.rand(16)
            torch.set_num_threads(1 + int(torch.randint(0, 3, (1,))))

    beside = threading.Thread(target=other_service)
    beside.start()
    try:
        out = await build_repository(objects, docs, recipes=RECIPES[:1], sources=sources(), force=True,
                                     work_dir=tmp_path)
    finally:
        stop.set()
        beside.join()
        torch.set_num_threads(threads)
    assert [r.action for r in out] == ["built"]
    again = await weights()
    assert len(again) == len(alone)
    for a, b in zip(alone, again, strict=True):
        assert torch.equal(a, b)


def test_a_training_that_fails_in_the_builder_process_says_which_and_why() -> None:
    broken = synthetic_source("synth_bars", bars)
    broken.train_x = broken.train_x[:, :, :, None, None]  # five dimensions: not an image batch
    maker = EntryMaker(threads=1)
    try:
        with pytest.raises(CellFailed, match=r"small_cnn-synth_bars: training failed: \w+Error"):
            maker.make(RECIPES[0], broken)
        # the process survives a failed training and makes the next entry; a source of the same name that
        # is another data set is sent again, not mistaken for the one the process holds
        entry = maker.make(RECIPES[0], synthetic_source("synth_bars", bars))
        assert entry.classes == ["a", "b"] and entry.metrics["source_test_accuracy"] >= 0.9
        # when it dies (killed, out of memory) the entry fails with what happened, and the next one gets a new process
        builders = [c for c in multiprocessing.active_children() if c.name == "dlforge-repository-builder"]
        assert builders
        for child in builders:
            child.kill()
        with pytest.raises(CellFailed, match="small_cnn-synth_blobs: the repository builder's process ended"):
            maker.make(RECIPES[1], synthetic_source("b", blobs))
        again = maker.make(RECIPES[1], synthetic_source("b", blobs))
        assert again.classes == ["a", "b"]
    finally:
        maker.close()
    assert not [c for c in multiprocessing.active_children() if c.name == "dlforge-repository-builder"]


async def test_a_cell_whose_training_refuses_its_recipe_fails_alone(backends: Backends, tmp_path: Path) -> None:
    unknown = ModelRecipe(model_id="nope-synth_bars", arch="nope", source="synth_bars", epochs=1, train_items=32,
                          test_items=16, batch_size=16, input_size=32, source_sample_items=8)
    out = await build_repository(backends.objects, backends.docs, recipes=(unknown, RECIPES[1]), sources=sources(),
                                 work_dir=tmp_path)
    assert [r.action for r in out] == ["failed", "built"]
    assert "nope-synth_bars: training failed: ConfigError: " in (out[0].error or "")
    assert "'nope'" in (out[0].error or "") and await backends.docs.get(MODELS, "nope-synth_bars") is None


async def test_missing_source_fails_that_entry_only(backends: Backends, tmp_path: Path) -> None:
    recipes = (
        ModelRecipe(model_id="small_cnn-fashion_mnist", arch="small_cnn", source="fashion_mnist"),
        RECIPES[1],
    )
    out = await build_repository(
        backends.objects, backends.docs, recipes=recipes, work_dir=tmp_path,
        sources={"fashion_mnist": lambda: load_fashion_mnist(tmp_path / "nowhere"), **sources()},
    )
    assert [r.action for r in out] == ["failed", "built"]
    assert "apt-get install -y dataset-fashion-mnist" in (out[0].error or "")
    assert await backends.docs.get(MODELS, "small_cnn-fashion_mnist") is None
    assert not backends.objects.exists(weights_key("small_cnn-fashion_mnist"))


def test_cli_build_fails_with_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DLFORGE_OBJECTS", f"file://{tmp_path}/o")
    monkeypatch.setenv("DLFORGE_DOCS", f"sqlite:///{tmp_path}/d.db")
    monkeypatch.setenv("DLFORGE_WORK_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("DLFORGE_PROPOSER_FASHION_MNIST_DIR", str(tmp_path / "missing"))
    assert cli.main(["build-repository", "--only", "small_cnn-fashion_mnist"]) == 1
    out = capsys.readouterr()
    assert "small_cnn-fashion_mnist" in out.out and "failed" in out.out
    assert "apt-get install -y dataset-fashion-mnist" in out.out
    assert "what to install" in out.err


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
async def test_build_from_the_real_fashion_mnist(backends: Backends, tmp_path: Path) -> None:
    recipe = ModelRecipe(model_id="small_cnn-fashion_mnist", arch="small_cnn", source="fashion_mnist", epochs=1,
                         train_items=400, test_items=200, batch_size=32, input_size=28, source_sample_items=16)
    out = await build_repository(backends.objects, backends.docs, recipes=[recipe], work_dir=tmp_path,
                                 sources={"fashion_mnist": load_fashion_mnist})
    assert [r.action for r in out] == ["built"]
    rec = await backends.docs.get(MODELS, "small_cnn-fashion_mnist")
    assert rec is not None and rec["num_classes"] == 10 and rec["classes"][9] == "ankle boot"
    # one epoch on 400 images: far from the 90 % of a full run, far above the 10 % of chance
    assert 0.3 < rec["metrics"]["source_test_accuracy"] < 0.95
    with np.load(io.BytesIO(backends.objects.get_bytes(rec["source_sample_key"]))) as npz:
        assert npz["images"].shape == (16, 28, 28, 1)
