"""Test-time views: the deployed model averages its probabilities over the views it was trained on.

Expectations are computed from numpy's flips and turns of the uint8 images (the vision core's pixel
views), never from the torch views under test.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from optimizer_testdata import CLASSES, FMT, SIZE, SPEC, Trained, separable

from dlforge.common.events import Spec
from dlforge.optimizer.bundle import build_bundle, bundle_variant
from dlforge.optimizer.compressors import fp32_end_nodes
from dlforge.optimizer.evaluation import softmax
from dlforge.optimizer.export import export_onnx
from dlforge.optimizer.handlers import (
    LabeledImages,
    OptimizeInput,
    OptimizeOptions,
    OptimizeResult,
    Prepared,
    averaging_gain,
    optimize,
    views_step,
)
from dlforge.optimizer.preprocess import normalize
from dlforge.optimizer.runners import TorchRunner, open_runner
from dlforge.vision.images import DIHEDRAL_VIEWS, ViewAveraged, tensor_view
from dlforge.vision.networks import load_checkpoint, save_checkpoint

FLIPS = ["identity", "hflip", "vflip", "rot180"]


def _averaged_probs(model: torch.nn.Module, images: np.ndarray, views: list[str]) -> np.ndarray:
    """Mean over ``views`` of softmax(model(image under the view)), the views taken on the uint8 pixels."""
    out = []
    with torch.inference_mode():
        for v in views:
            x = normalize(np.ascontiguousarray(DIHEDRAL_VIEWS[v](images)), FMT)
            out.append(torch.softmax(model(torch.from_numpy(x)), 1).numpy())
    return np.mean(out, axis=0)


def test_tensor_views_are_the_pixel_views() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 7, 7, 2)).astype(np.uint8)
    nchw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    assert len(DIHEDRAL_VIEWS) == 8
    seen = set()
    for name, fn in DIHEDRAL_VIEWS.items():
        got = tensor_view(nchw, name).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, fn(pixels), err_msg=name)
        seen.add(got.tobytes())
    assert len(seen) == 8  # eight different images: no view is another's alias


def test_view_averaged_outputs_log_of_the_mean_probabilities(trained: Trained) -> None:
    x, _ = separable(6, seed=40)
    wrapped = ViewAveraged(trained.model, FLIPS).eval()
    with torch.inference_mode():
        out = wrapped(torch.from_numpy(normalize(x, FMT))).numpy()
    expected = _averaged_probs(trained.model, x, FLIPS)
    np.testing.assert_allclose(np.exp(out), expected, atol=1e-5)
    np.testing.assert_allclose(softmax(out), expected, atol=1e-5)
    with pytest.raises(ValueError):
        ViewAveraged(trained.model, [])
    with pytest.raises(Exception, match="unknown view 'spin'"):
        ViewAveraged(trained.model, ["identity", "spin"])


def _with_views(trained: Trained, tmp: Path, views: list[str]) -> Path:
    model, ckpt = load_checkpoint(str(trained.checkpoint))
    path = tmp / "with-views.pt"
    save_checkpoint(model, arch=str(ckpt["arch"]), classes=CLASSES, path=str(path),
                    extra={"input_size": SIZE, "views": views})
    return path


def _input(checkpoint: Path) -> OptimizeInput:
    cal, _ = separable(24, seed=21)
    vx, vy = separable(80, seed=22)
    tx, ty = separable(80, seed=23)
    people = np.arange(80) % 2 == 0  # half the validation items labeled by people
    return OptimizeInput(checkpoint_path=checkpoint, classes=CLASSES, spec=SPEC, calibration=cal,
                         val=LabeledImages(vx, vy, people), test=LabeledImages(tx, ty), dataset_id="ds", model_id="m1")


OPTIONS = OptimizeOptions(rounds=1, warmup=1, iterations=8, iterations_large_batch=2, batch_sizes=[1, 8],
                          calibration_methods=["minmax"], benchmark_torch=False, test_views="trained")


@pytest.fixture(scope="module")
def averaged_run(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[OptimizeResult, Path]:
    """Forced: the small CNN is right on every validation item with and without the views (a tie, which
    'trained' leaves plain); the torch baseline is benchmarked too. The result and its work folder."""
    checkpoint = _with_views(trained, tmp_path_factory.mktemp("ckpt"), FLIPS)
    work = tmp_path_factory.mktemp("work")
    return optimize(_input(checkpoint), workdir=work,
                    options=OPTIONS.model_copy(update={"test_views": "forced", "benchmark_torch": True})), work


@pytest.fixture(scope="module")
def averaged(averaged_run: tuple[OptimizeResult, Path]) -> OptimizeResult:
    return averaged_run[0]


def test_every_variant_averages_over_the_trained_views(averaged_run: tuple[OptimizeResult, Path],
                                                       trained: Trained) -> None:
    averaged, work = averaged_run
    tv = averaged.report.test_views
    assert tv is not None and tv.used and tv.views == FLIPS and tv.trained_views == FLIPS
    assert tv.val_items == 40  # the people-labeled half of the 80 validation items
    assert tv.val_accuracy_averaged is not None and tv.val_accuracy_plain is not None
    assert tv.val_accuracy_averaged >= 0.9 and tv.val_accuracy_plain >= 0.9
    assert tv.val_accuracy_at_recall_plain is not None and "not checked: test_views=forced" in tv.reason
    # the torch baseline is the averaging model too
    base = averaged.report.variants["torch_fp32"]
    assert "averaged over identity, hflip, vflip, rot180" in base.details["note"]
    bx, _ = separable(6, seed=43)
    np.testing.assert_allclose(softmax(TorchRunner(work / "torch_baseline.pt", threads=1).run(normalize(bx, FMT))),
                               _averaged_probs(trained.model, bx, FLIPS), atol=1e-5)
    # the exported ONNX computes the average itself: one image in, the averaged probabilities out
    tx, _ = separable(16, seed=41)
    runner = open_runner("onnxruntime", averaged.files["onnx_fp32"], threads=1)
    np.testing.assert_allclose(softmax(runner.run(normalize(tx, FMT))), _averaged_probs(trained.model, tx, FLIPS),
                               atol=1e-4)
    assert averaged.report.export.max_abs_diff < 1e-4
    # INT8 of the averaging graph still keeps the stem and the head in FP32
    int8 = onnx.load(str(averaged.files["onnx_int8"]))
    ops = {n.name: n.op_type for n in int8.graph.node}
    kept = averaged.report.variants["onnx_int8"].details["fp32_nodes"]
    kinds = [ops[k] for k in kept]
    stem = kinds.index("Conv")
    assert kinds[stem:stem + 2] == ["Conv", "Relu"] and "Concat" in kinds[:stem] and "Gemm" in kinds[stem:]
    fp32 = onnx.load(str(averaged.files["onnx_fp32"]))
    # every node before the stem (the views' flips and the concatenation) stays FP32 with it
    first_conv = next(i for i, n in enumerate(fp32.graph.node) if n.op_type == "Conv")
    assert fp32_end_nodes(fp32)[:first_conv + 1] == [n.name for n in fp32.graph.node[:first_conv + 1]]
    assert "Concat" in {n.op_type for n in fp32.graph.node[:first_conv]}
    assert averaged.report.variants["onnx_int8"].test_agreement_vs_onnx_fp32 >= 0.95


def test_quarter_turns_export_and_their_transposes_stay_fp32(trained: Trained, tmp_path: Path) -> None:
    views = ["identity", "rot90", "transpose"]
    x, _ = separable(8, seed=44)
    exported = export_onnx(ViewAveraged(trained.model, views).eval(), in_channels=1, input_size=SIZE,
                           path=tmp_path / "turns.onnx", check_inputs=normalize(x, FMT))
    assert exported.max_abs_diff < 1e-4
    model = onnx.load(exported.path)
    first_conv = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Conv")
    before = model.graph.node[:first_conv]
    assert "Transpose" in {n.op_type for n in before}
    assert set(fp32_end_nodes(model)) >= {n.name for n in before}
    np.testing.assert_allclose(softmax(open_runner("onnxruntime", Path(exported.path), threads=1).run(
        normalize(x, FMT))), _averaged_probs(trained.model, x, views), atol=1e-4)


def test_the_bundle_says_the_model_averages(averaged: OptimizeResult, tmp_path: Path) -> None:
    variant, _ = bundle_variant(averaged.report)
    out = tmp_path / "bundle.zip"
    build_bundle(averaged.report, model_path=averaged.files[variant.name], out=out)
    with zipfile.ZipFile(out) as z:
        pre = json.loads(z.read("preprocessing.json"))
    assert pre["test_views"] == FLIPS
    assert "averaged over the views identity, hflip, vflip, rot180" in pre["output"]


def test_no_views_when_off_or_not_trained_on_any(trained: Trained, tmp_path: Path) -> None:
    checkpoint = _with_views(trained, tmp_path, FLIPS)
    assert OptimizeOptions().test_views == "none"  # opt-in
    off = optimize(_input(checkpoint), workdir=tmp_path / "off",
                   options=OPTIONS.model_copy(update={"test_views": "none"})).report.test_views
    assert off is not None and not off.used and off.views == ["identity"] and "test_views=none" in off.reason
    assert off.val_accuracy_plain is None  # nothing was compared
    plain = optimize(_input(trained.checkpoint), workdir=tmp_path / "plain", options=OPTIONS)
    tv = plain.report.test_views
    assert tv is not None and not tv.used and tv.trained_views == ["identity"]
    # the plain export: the ONNX model is the network, its softmax the network's own
    tx, _ = separable(8, seed=42)
    runner = open_runner("onnxruntime", plain.files["onnx_fp32"], threads=1)
    np.testing.assert_allclose(softmax(runner.run(normalize(tx, FMT))),
                               _averaged_probs(trained.model, tx, ["identity"]), atol=1e-4)


class _TopHalfBright(torch.nn.Module):
    """'defect' when the top half is brighter than the bottom half: not symmetric under a vertical flip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2] // 2
        d = 8.0 * (x[:, :, :h].mean(dim=(1, 2, 3)) - x[:, :, h:].mean(dim=(1, 2, 3)))
        return torch.stack([d, -d], dim=1)


class _LeftLeaning(torch.nn.Module):
    """'defect' when the image is bright, but swayed by its left half being brighter than its right: a
    horizontal flip turns the sway around, so the average over both decides by the brightness alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        d = 10.0 * x.mean(dim=(1, 2, 3)) + 6.0 * (x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3)))
        return torch.stack([d, -d], dim=1)


def _prep(model: torch.nn.Module, views: tuple[str, ...], x: np.ndarray) -> Prepared:
    return Prepared(model=model, arch="small_cnn", fmt=FMT, positive=0, calibration=normalize(x[:4], FMT),
                    trained_views=views)


def _val(x: np.ndarray, y: np.ndarray, spec: Spec = SPEC) -> OptimizeInput:
    return OptimizeInput(checkpoint_path=Path("unused"), classes=CLASSES, spec=spec, calibration=x[:4],
                         val=LabeledImages(x, y), test=LabeledImages(x, y))


ON = OptimizeOptions(test_views="trained")


def test_views_that_lower_people_labeled_val_accuracy_are_not_used() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 60, (40, SIZE, SIZE, 1)).astype(np.uint8)
    y = np.arange(40) % 2
    x[y == 0, : SIZE // 2] += 120  # defects: a bright top half
    x[y == 1, SIZE // 2:] += 120
    model = _TopHalfBright()
    out = views_step(_prep(model, ("identity", "vflip"), x), _val(x, y), opts=ON)
    tv = out.test_views
    assert tv is not None and not tv.used and out.model is model
    # plain: every item right; vflip swaps the halves, so the average is 0.5/0.5 and argmax picks class 0
    assert tv.val_accuracy_plain == 1.0 and tv.val_accuracy_averaged == 0.5
    assert "lowers the accuracy on 40 people-labeled validation items 1.000 -> 0.500 at the argmax" in tv.reason
    # a view the model is symmetric under (hflip) changes nothing: a tie keeps the plain network
    tie = views_step(_prep(model, ("identity", "hflip"), x), _val(x, y), opts=ON).test_views
    assert tie is not None and not tie.used and "adds nothing for its 2x inference" in tie.reason
    assert tie.val_accuracy_plain == tie.val_accuracy_averaged == 1.0
    # at the spec's recall 0.9 the highest threshold keeps 18 of the 20 defects (distinct scores): 38 of 40 right
    assert tie.val_accuracy_at_recall_plain == tie.val_accuracy_at_recall_averaged == 38 / 40


def test_the_averaging_gain_needs_one_figure_up_and_none_down() -> None:
    assert averaging_gain((0.80, 0.70), (0.82, 0.70)) == "higher"
    assert averaging_gain((0.80, 0.70), (0.80, 0.75)) == "higher"
    assert averaging_gain((0.80, 0.70), (0.85, 0.65)) == "lower"  # better at the argmax, worse at the recall
    assert averaging_gain((0.80, 0.70), (0.80, 0.70)) == "same"
    assert averaging_gain((0.80, None), (0.85, 0.10)) == "higher"  # a figure only one side has does not count
    assert averaging_gain((0.80, None), (0.79, None)) == "lower"


def test_views_that_help_on_people_labeled_val_items_are_used_unless_too_slow() -> None:
    rng = np.random.default_rng(5)
    y = np.arange(60) % 2
    x = np.where(y[:, None, None, None] == 0, 150, 100) + rng.integers(-5, 6, (60, SIZE, SIZE, 1))
    sway = rng.integers(-40, 41, 60)  # the left half brighter by sway, the right darker: the mean stays
    x[:, :, : SIZE // 2] += sway[:, None, None, None]
    x[:, :, SIZE // 2:] -= sway[:, None, None, None]
    x = np.clip(x, 0, 255).astype(np.uint8)
    model = _LeftLeaning()
    out = views_step(_prep(model, ("identity", "hflip"), x), _val(x, y), opts=ON)
    tv = out.test_views
    assert tv is not None and tv.used and isinstance(out.model, ViewAveraged) and out.model.views == ("identity",
                                                                                                       "hflip")
    # the brightness alone separates the classes: the average is right on all; the sway misleads the plain one
    assert tv.val_accuracy_averaged == 1.0 and tv.val_accuracy_plain is not None and tv.val_accuracy_plain < 0.9
    assert tv.torch_fps_averaged is not None and tv.torch_fps_averaged > SPEC.min_fps
    # a spec asking more speed than the averaging network has in eager PyTorch keeps the plain one
    fast = SPEC.model_copy(update={"min_fps": 1e9})
    slow = views_step(_prep(model, ("identity", "hflip"), x), _val(x, y, fast), opts=ON)
    st = slow.test_views
    assert st is not None and not st.used and slow.model is model and st.val_accuracy_averaged == 1.0
    assert st.torch_fps_averaged is not None and st.torch_fps_averaged < 1e9 and "below the spec's" in st.reason
    # forced: averaged without the check, even where it lowers accuracy
    top = _TopHalfBright()
    forced = views_step(_prep(top, ("identity", "vflip"), x), _val(x, y), opts=OptimizeOptions(test_views="forced"))
    assert forced.test_views is not None and forced.test_views.used and "not checked" in forced.test_views.reason
