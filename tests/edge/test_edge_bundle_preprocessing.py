"""dlforge-edge refuses, at load, a bundle whose preprocessing cannot make a sound network input: a std of 0, below
0 or not finite (every pixel divided by it), an input size that is not a whole number of pixels above 0, a mean
or std of the wrong length or not numbers. Refused as the other bad contents are: one line, exit status 2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from dlforge_edge.bundle import BundleError, load_bundle
from dlforge_edge.cli import main
from edge_testdata import GOOD_PREPROCESSING, handmade_bundle
from PIL import Image


def grey_png(path: Path, value: int) -> Path:
    Image.new("L", (20, 20), value).save(path)
    return path


def test_the_handmade_bundle_is_accepted_and_decides_by_the_closed_form(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = handmade_bundle(tmp_path / "good.zip")
    image = grey_png(tmp_path / "grey.png", 51)
    assert main(["predict", str(bundle), str(image), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"][0]
    x = (51 / 255 - 0.5) / 0.25  # -1.2: logits [x, -x], so p(bright) = 1 / (1 + e^(2 * 1.2))
    assert got["label"] == "dark"
    assert got["probabilities"]["bright"] == pytest.approx(1 / (1 + math.exp(-2 * x)), abs=1e-6)


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "std_zero": ({"std": [0.0]}, "std [0.0]"),
    "std_negative": ({"std": [-0.25]}, "std [-0.25]"),
    "std_nan": ({"std": [float("nan")]}, "std [nan]"),
    "std_infinite": ({"std": [float("inf")]}, "std [inf]"),
    "std_huge": ({"std": [10**400]}, "std [1000000000"),  # an integer no float can hold
    "std_text": ({"std": ["0.25"]}, "std ['0.25']"),
    "mean_nan": ({"mean": [float("nan")]}, "mean [nan]"),
    "mean_text": ({"mean": "5"}, "mean '5'"),
    "mean_long": ({"mean": [0.5, 0.5, 0.5]}, "3 means and 1 stds for 1 channel(s)"),
    "std_short": ({"colour_mode": "RGB", "in_channels": 3, "mean": [0.5] * 3}, "3 means and 1 stds for 3 channel(s)"),
    "size_zero": ({"input_size": 0}, "input_size 0"),
    "size_negative": ({"input_size": -16}, "input_size -16"),
    "size_fraction": ({"input_size": 16.5}, "input_size 16.5"),
    "size_text": ({"input_size": "16"}, "input_size '16'"),
    "size_bool": ({"input_size": True}, "input_size True"),
    "size_huge": ({"input_size": 1_000_000}, "input_size 1000000 is not a whole number of pixels from 1 to 4096"),
    "divide_by_zero": ({"divide_by": 0}, "divide_by 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bundle_with_unsound_preprocessing_is_refused_at_load(case: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    change, says = BAD[case]
    bundle = handmade_bundle(tmp_path / f"{case}.zip", preprocessing={**GOOD_PREPROCESSING, **change})
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle)
    assert str(refused.value).startswith(f"{bundle}: preprocessing.json"), refused.value
    assert says in str(refused.value), refused.value
    image = grey_png(tmp_path / "grey.png", 51)
    assert main(["predict", str(bundle), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"dlforge-edge: refused: {refused.value}"]


@pytest.mark.parametrize(("shape", "says"), [
    (("N", 1, 32, 32), "model.onnx takes 32 x 32 images, but preprocessing.json's input_size makes 16 x 16"),
    (("N", 1, 16, 24), "model.onnx takes 16 x 24 images"),
    (("N", 3, "S", "S"), "model.onnx takes 3-channel images, but preprocessing.json's colour mode L makes 1"),
])
def test_a_model_whose_input_the_preprocessing_cannot_fill_is_refused_at_load(
        shape: tuple[int | str, ...], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the bundle loaded and every image was then a 500 (serve) or a traceback (predict)."""
    from edge_testdata import mean_model

    bundle = handmade_bundle(tmp_path / "mismatch.zip", model=mean_model(shape))
    image = grey_png(tmp_path / "grey.png", 51)
    assert main(["predict", str(bundle), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"dlforge-edge: refused: {bundle}: ") and says in line, line


@pytest.mark.parametrize("shape", [("N", 1, 16, 16), (1, 1, 16, 16), ("N", 1, "H", "W")])
def test_a_model_whose_input_matches_or_is_symbolic_is_accepted(shape: tuple[int | str, ...], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edge_testdata import mean_model

    bundle = handmade_bundle(tmp_path / "ok.zip", model=mean_model(shape))
    assert main(["predict", str(bundle), str(grey_png(tmp_path / "grey.png", 204)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] == "bright"
