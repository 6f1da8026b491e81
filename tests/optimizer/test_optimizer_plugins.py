"""Compressor plug-ins are used by what they declare (needs, kind, competition), never by class or name."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from optimizer_testdata import CLASSES, SIZE, Trained, separable

from dlforge.common.events import Spec
from dlforge.optimizer.compressors import (
    Capabilities,
    Need,
    OrtFp32,
    OrtGpuProvider,
    OrtStaticInt8,
    Source,
    TensorRTEngine,
    Variant,
    VariantKind,
    build_order,
    declaration_of,
    missing,
    needs_of,
)
from dlforge.optimizer.handlers import LabeledImages, OptimizeInput, OptimizeOptions, optimize

ALL = Capabilities(torch_model=True, training_images=True, calibration_images=True, gpu=True)


class Declared:
    """A plug-in that copies a model file; what it declares is set per test."""

    def __init__(self, name: str, *, kind: VariantKind = VariantKind.FP32, needs: frozenset[Need] = frozenset(),
                 libraries: tuple[str, ...] = (), competes_as: str | None = None, precision: str = "fp32") -> None:
        self.name, self.kind, self.needs, self.libraries, self.competes_as = name, kind, needs, libraries, competes_as
        self.precision = precision
        self.seen: Source | None = None

    def unavailable(self) -> str | None:
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        self.seen = source
        model = source.int8_onnx_path if Need.INT8_MODEL in self.needs else source.onnx_path
        assert model is not None
        out = workdir / f"{self.name}.onnx"
        shutil.copyfile(model, out)
        return Variant(self.name, "onnxruntime", self.precision, out, details={"from": model.name})


def test_the_shipped_plug_ins_declare_what_they_need_and_make() -> None:
    d = declaration_of(OrtFp32())
    assert (d.kind, d.needs, d.competes_as) == (VariantKind.FP32, frozenset(), None)
    d = declaration_of(OrtStaticInt8(method="entropy"))
    assert (d.kind, d.needs, d.competes_as) == (VariantKind.INT8, {Need.CALIBRATION_IMAGES}, "onnx_int8")
    assert declaration_of(OrtGpuProvider("CUDAExecutionProvider")).needs == {Need.GPU}
    d = declaration_of(TensorRTEngine(precision="int8"))
    assert d.kind == VariantKind.GPU and d.needs == {Need.GPU, Need.INT8_MODEL}
    assert d.libraries == ("tensorrt", "pycuda")
    assert declaration_of(TensorRTEngine(precision="fp16")).needs == {Need.GPU}


def test_unmet_needs_say_why() -> None:
    pruner = declaration_of(Declared("pruned", kind=VariantKind.COMPRESSED_TORCH,
                                     needs=frozenset({Need.TORCH_MODEL, Need.TRAINING_IMAGES})))
    assert missing(pruner, ALL) is None
    no_train = Capabilities(torch_model=True, training_images=False, calibration_images=True, gpu=False)
    assert missing(pruner, no_train) == "needs labeled training images, which this run does not provide"
    no_torch = Capabilities(torch_model=False, training_images=False, calibration_images=True, gpu=False)
    reason = missing(pruner, no_torch)
    assert reason is not None and "torch model" in reason and "training images" in reason
    gpu = declaration_of(Declared("g", needs=frozenset({Need.GPU})))
    assert missing(gpu, no_train) == no_train.gpu_reason and missing(gpu, ALL) is None
    lib = declaration_of(Declared("l", libraries=("json", "dlforge_no_such_module")))
    assert missing(lib, ALL) == "needs the module dlforge_no_such_module, not installed here"
    after = declaration_of(Declared("after", needs=frozenset({Need.INT8_MODEL})))
    assert missing(after, ALL, int8_model=False) == "needs the INT8 model, and no INT8 variant was built"
    assert missing(after, ALL, int8_model=True) is None
    trt = missing(declaration_of(TensorRTEngine()), ALL)
    if trt is not None:  # TensorRT not installed here: the reason says what to install
        assert "pip install tensorrt pycuda" in trt


def test_build_order_follows_the_int8_model_need_not_the_class() -> None:
    a = Declared("a")
    b = Declared("b_needs_int8", needs=frozenset({Need.INT8_MODEL}))
    c = OrtStaticInt8()
    d = TensorRTEngine(precision="int8")
    first, later = build_order([b, a, d, c])
    assert first == [a, c] and later == [b, d]
    assert needs_of([a, b, c]) == {Need.INT8_MODEL, Need.CALIBRATION_IMAGES} and needs_of([]) == frozenset()


def _input(trained: Trained, *, train: bool) -> OptimizeInput:
    cal, _ = separable(24, seed=31)
    vx, vy = separable(60, seed=32)
    tx, ty = separable(60, seed=33)
    rx, ry = separable(40, seed=34)
    return OptimizeInput(checkpoint_path=trained.checkpoint, classes=CLASSES,
                         spec=Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0,
                                   input_size=64),
                         calibration=cal, val=LabeledImages(vx, vy), test=LabeledImages(tx, ty),
                         train=LabeledImages(rx, ry) if train else None)


OPTIONS = OptimizeOptions(rounds=1, warmup=1, iterations=3, iterations_large_batch=2, batch_sizes=[1],
                          benchmark_torch=False, calibration_stop_agreement=0.5)


def test_the_stage_selects_plug_ins_by_their_declarations(trained: Trained, tmp_path: Path) -> None:
    # needs the INT8 model: built after the INT8 competition, from the winner, though listed first
    from_int8 = Declared("int8_copy", kind=VariantKind.INT8, needs=frozenset({Need.INT8_MODEL}), precision="int8")
    # needs labeled training images: this run has none -> skipped, saying why
    pruner = Declared("pruned", kind=VariantKind.COMPRESSED_TORCH,
                      needs=frozenset({Need.TORCH_MODEL, Need.TRAINING_IMAGES}))
    # a name that looks like an INT8 calibration candidate but declares no competition: a variant of its own
    lookalike = Declared("onnx_int8_lookalike")
    # a competition of its own: the winner takes the group's name
    x1 = Declared("cand_a", competes_as="copies")
    x2 = Declared("cand_b", competes_as="copies")
    # a library that is not installed
    absent = Declared("needs_lib", libraries=("dlforge_no_such_module",))
    minmax, entropy = OrtStaticInt8(method="minmax"), OrtStaticInt8(method="entropy")
    comps = [from_int8, OrtFp32(), pruner, lookalike, minmax, entropy, x1, x2, absent]
    r = optimize(_input(trained, train=False), workdir=tmp_path, options=OPTIONS,
                 compressors=comps).report  # type: ignore[arg-type]
    assert set(r.variants) == {"onnx_fp32", "onnx_int8", "onnx_int8_lookalike", "copies", "int8_copy"}
    assert r.skipped == {"pruned": "needs labeled training images, which this run does not provide",
                         "needs_lib": "needs the module dlforge_no_such_module, not installed here"}
    assert from_int8.seen is not None and from_int8.seen.int8_onnx_path == tmp_path / "onnx_int8.onnx"
    assert r.variants["int8_copy"].details == {"from": "onnx_int8.onnx"}
    assert pruner.seen is None
    # each competition's tries stop once a candidate agrees with FP32 on >= 50 % of validation images:
    # minmax and cand_a (tried first) do, so entropy and cand_b are never built
    assert [c.method for c in r.calibration.candidates] == ["minmax", "cand_a"]
    assert r.calibration.untried == ["onnx_int8_entropy", "cand_b"] and r.calibration.chosen == "minmax"
    assert r.calibration.candidates[1].val_agreement == 1.0  # a copy of FP32 decides every image as FP32 does
    assert "stop once one agrees on >= 50.0 %" in r.calibration.rule
    assert x1.seen is not None and x2.seen is None and r.variants["copies"].file_name == "copies.onnx"


def test_a_plug_in_needing_training_images_gets_them_normalized(trained: Trained, tmp_path: Path) -> None:
    pruner = Declared("pruned", kind=VariantKind.COMPRESSED_TORCH,
                      needs=frozenset({Need.TORCH_MODEL, Need.TRAINING_IMAGES}))
    inp = _input(trained, train=True)
    r = optimize(inp, workdir=tmp_path, options=OPTIONS,
                 compressors=[OrtFp32(), pruner]).report  # type: ignore[list-item]
    assert "pruned" in r.variants and r.skipped == {}
    seen = pruner.seen
    assert seen is not None and seen.model is not None and seen.train_images is not None
    assert inp.train is not None and seen.train_labels is not None
    assert seen.train_images.shape == (40, 1, SIZE, SIZE) and seen.train_images.dtype == np.float32
    expected = (inp.train.images[:, :, :, 0].astype(np.float32) / 255.0 - 0.5) / 0.5  # small_cnn: mean 0.5, std 0.5
    assert np.abs(seen.train_images[:, 0] - expected).max() < 1e-6
    assert list(seen.train_labels) == list(inp.train.labels)


def test_gpu_plug_ins_are_skipped_without_a_gpu(trained: Trained, tmp_path: Path) -> None:
    import onnxruntime as ort

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("a GPU build of ONNX Runtime is installed here")
    gpu = Declared("gpu_thing", kind=VariantKind.GPU, needs=frozenset({Need.GPU}))
    r = optimize(_input(trained, train=False), workdir=tmp_path, options=OPTIONS,
                 compressors=[OrtFp32(), gpu]).report  # type: ignore[list-item]
    assert "onnxruntime-gpu" in r.skipped["gpu_thing"] and gpu.seen is None
