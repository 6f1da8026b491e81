"""ONNX export fidelity, INT8 quantization on a small CNN, the GPU compressors' missing-library messages."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from optimizer_testdata import SIZE, Trained, separable

from dlforge.common.errors import ConfigError
from dlforge.optimizer.compressors import (
    OrtFp32,
    OrtGpuProvider,
    OrtStaticInt8,
    Source,
    TensorRTEngine,
    fp32_end_nodes,
)
from dlforge.optimizer.evaluation import decide, softmax
from dlforge.optimizer.export import ExportMismatch, export_onnx
from dlforge.optimizer.preprocess import InputFormat, frame_to_input, normalize
from dlforge.optimizer.runners import OrtRunner, open_runner, predict_logits
from dlforge.vision.images import to_array, to_tensor
from dlforge.vision.networks import NetworkSpec, spec_of

FMT = InputFormat(1, SIZE, (0.5,), (0.5,))


@pytest.fixture(scope="module")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _ = separable(16, seed=7)
    result = export_onnx(trained.model, in_channels=1, input_size=SIZE,
                         path=tmp_path_factory.mktemp("export") / "m.onnx", check_inputs=normalize(x, FMT))
    return Path(result.path)


def test_export_matches_torch_with_a_dynamic_batch(trained: Trained, tmp_path: Path) -> None:
    x, _ = separable(12, seed=3)
    inputs = normalize(x, FMT)
    result = export_onnx(trained.model, in_channels=1, input_size=SIZE, path=tmp_path / "m.onnx",
                         check_inputs=inputs, opset=17)
    assert result.max_abs_diff < 1e-4
    assert result.checked_batch_sizes == [1, 8] and result.checked_images == 13
    model = onnx.load(result.path)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, SIZE, SIZE]
    # a batch size never seen at export time, compared with torch independently of export_onnx
    with torch.inference_mode():
        ref = trained.model(torch.from_numpy(inputs[:5])).numpy()
    out = OrtRunner(result.path).run(inputs[:5])
    assert out.shape == (5, 2)
    assert np.abs(out - ref).max() < 1e-4


def test_export_refuses_a_mismatch_beyond_the_tolerance(trained: Trained, tmp_path: Path) -> None:
    x, _ = separable(4, seed=5)
    result = export_onnx(trained.model, in_channels=1, input_size=SIZE, path=tmp_path / "a.onnx",
                         check_inputs=normalize(x, FMT))
    if result.max_abs_diff == 0.0:
        pytest.skip("the export is bit-exact here: no tolerance can fail")
    with pytest.raises(ExportMismatch, match="differs from torch"):
        export_onnx(trained.model, in_channels=1, input_size=SIZE, path=tmp_path / "b.onnx",
                    check_inputs=normalize(x, FMT), tolerance=result.max_abs_diff / 2)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(trained.model, in_channels=1, input_size=SIZE, path=tmp_path / "c.onnx",
                    check_inputs=normalize(x, FMT), opset=13)


def test_preprocessing_matches_training(trained: Trained) -> None:
    """The deployed (torch-free) preprocessing gives the tensors training used."""
    from PIL import Image

    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 1), dtype=np.uint8)
    ours = frame_to_input(frame, FMT)
    net = spec_of("small_cnn")
    theirs = to_tensor(to_array(Image.fromarray(frame[:, :, 0]), size=SIZE, channels=1)[None],
                       NetworkSpec(net.arch, 1, SIZE, net.feature_dim, net.mean, net.std)).numpy()
    assert ours.shape == (1, 1, SIZE, SIZE) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-6


def test_int8_static_quantization_keeps_accuracy_on_a_separable_task(exported: Path, tmp_path: Path) -> None:
    cal, _ = separable(32, seed=11)
    test_x, test_y = separable(200, seed=12)
    source = Source(exported, "input", (1, SIZE, SIZE))
    fp32 = OrtFp32().compress(source, normalize(cal, FMT), tmp_path)
    int8 = OrtStaticInt8(method="minmax").compress(source, normalize(cal, FMT), tmp_path)
    assert int8.precision == "int8" and int8.details["quant_format"] == "QDQ" and int8.details["per_channel"]
    # int8 weights: about a quarter of the FP32 file
    assert int8.size_bytes < 0.4 * fp32.size_bytes
    ops = Counter(n.op_type for n in onnx.load(str(int8.path)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["Conv"] == 4
    # the quantized activations are uint8 and the weights int8 (the VNNI u8 x s8 form)
    q = onnx.load(str(int8.path))
    zero_points = {i.name: i.data_type for i in q.graph.initializer if i.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT8 in zero_points.values() and onnx.TensorProto.INT8 in zero_points.values()

    x = normalize(test_x, FMT)
    acc = {}
    for v in (fp32, int8):
        probs = softmax(predict_logits(open_runner(v.runtime, v.path), x))
        acc[v.name] = float((decide(probs) == test_y).mean())
    assert acc["onnx_fp32"] >= 0.95
    assert acc["onnx_int8_minmax"] >= acc["onnx_fp32"] - 0.01


def test_stem_and_head_stay_fp32(exported: Path, tmp_path: Path) -> None:
    model = onnx.load(str(exported))
    kept = fp32_end_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops[k] for k in kept] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    cal, _ = separable(16, seed=15)
    v = OrtStaticInt8().compress(Source(exported, "input", (1, SIZE, SIZE)), normalize(cal, FMT), tmp_path)
    assert v.details["fp32_nodes"] == kept
    q = onnx.load(str(v.path))
    # the image goes straight into the FP32 stem; the logits come straight out of the FP32 Gemm
    first = next(n for n in q.graph.node if "input" in n.input)
    assert first.op_type == "Conv" and first.name == kept[0]
    last = next(n for n in q.graph.node if q.graph.output[0].name in n.output)
    assert last.op_type == "Gemm" and not any(i.endswith("_quantized") for i in last.input)
    everything = OrtStaticInt8(fp32_ends=False, name="all").compress(
        Source(exported, "input", (1, SIZE, SIZE)), normalize(cal, FMT), tmp_path)
    assert everything.details["fp32_nodes"] == []
    q_all = onnx.load(str(everything.path))
    assert next(n for n in q_all.graph.node if "input" in n.input).op_type == "QuantizeLinear"


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibrations_run(exported: Path, tmp_path: Path, method: str) -> None:
    cal, _ = separable(16, seed=13)
    v = OrtStaticInt8(method=method, calibration_batch=4).compress(  # type: ignore[arg-type]
        Source(exported, "input", (1, SIZE, SIZE)), normalize(cal, FMT), tmp_path)
    assert v.name == f"onnx_int8_{method}" and v.details["calibration"] == method
    test_x, test_y = separable(100, seed=14)
    probs = softmax(predict_logits(open_runner(v.runtime, v.path), normalize(test_x, FMT)))
    assert (decide(probs) == test_y).mean() >= 0.9


def test_tensorrt_compressor_says_what_to_install(exported: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    comp = TensorRTEngine(precision="fp16")
    reason = comp.unavailable()
    assert reason is not None and "pip install tensorrt pycuda" in reason
    with pytest.raises(ConfigError) as err:
        comp.compress(Source(exported, "input", (1, SIZE, SIZE)), np.zeros((1, 1, SIZE, SIZE), np.float32), tmp_path)
    message = str(err.value)
    assert "the TensorRT fp16 engine needs the 'tensorrt' module" in message
    assert "pip install tensorrt pycuda" in message and "NVIDIA GPU" in message
    with pytest.raises(ConfigError, match="pip install tensorrt pycuda"):
        open_runner("tensorrt", tmp_path / "engine.plan")


def test_ort_gpu_provider_is_skipped_without_a_gpu(exported: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA build of ONNX Runtime is installed here")
    comp = OrtGpuProvider("CUDAExecutionProvider")
    reason = comp.unavailable()
    assert reason is not None and "onnxruntime-gpu" in reason
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        comp.compress(Source(exported, "input", (1, SIZE, SIZE)), np.zeros((1, 1, SIZE, SIZE), np.float32), tmp_path)
