"""Export a torch Classifier to ONNX and prove the export computes what torch computes."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.errors import DlforgeError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportMismatch(DlforgeError):
    """The ONNX model's outputs differ from torch's beyond the tolerance."""


class ExportResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    opset: int
    input_name: str
    output_name: str
    input_shape: list[int | str] = Field(description="['batch', C, S, S]: the batch axis is dynamic")
    max_abs_diff: float = Field(description="max |onnxruntime - torch| over the checked logits")
    checked_images: int
    checked_batch_sizes: list[int]
    tolerance: float
    ops: dict[str, int] = Field(description="operator histogram of the exported graph")


def export_onnx(
    model: object,
    *,
    in_channels: int,
    input_size: int,
    path: str | Path,
    check_inputs: np.ndarray,
    opset: int = 17,
    tolerance: float = 1e-3,
) -> ExportResult:
    """Write ``model`` as ONNX (dynamic batch axis) to ``path`` and verify it against torch.

    The raw export is cleaned by ONNX Runtime's quantization pre-processing (symbolic shape inference
    and constant folding: the TF-style "same" padding turns into constant ``Pad`` inputs), which is the
    graph every variant starts from. The verification runs ``check_inputs`` (float32 NCHW, normalized)
    through torch and ONNX Runtime at batch sizes 1 and up to 8 and raises :class:`ExportMismatch` when
    the largest absolute logit difference exceeds ``tolerance``.
    """
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from dlforge.optimizer.runners import OrtRunner

    if opset < 17:
        raise ValueError(f"opset {opset} < 17: the optimizer exports with opset >= 17")
    if len(check_inputs) == 0:
        raise ValueError("export verification needs at least one input image")
    path = Path(path)
    raw = path.with_name(path.stem + ".raw.onnx")
    module: torch.nn.Module = model  # type: ignore[assignment]
    module.eval()
    dummy = torch.zeros(1, in_channels, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(raw), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    quant_pre_process(str(raw), str(path), skip_symbolic_shape=False)
    raw.unlink(missing_ok=True)

    import onnx

    graph = onnx.load(str(path)).graph
    ops = dict(Counter(n.op_type for n in graph.node))
    runner = OrtRunner(path, threads=2)
    x = np.ascontiguousarray(check_inputs, dtype=np.float32)
    sizes = [1, min(8, len(x))] if len(x) > 1 else [1]
    diff = 0.0
    checked = 0
    with torch.inference_mode():
        for bs in sizes:
            for start in range(0, len(x) if bs > 1 else 1, bs):
                chunk = x[start:start + bs]
                ref = module(torch.from_numpy(chunk)).numpy()
                out = runner.run(chunk)
                if out.shape != ref.shape:
                    raise ExportMismatch(f"ONNX output shape {out.shape} != torch {ref.shape} at batch {len(chunk)}")
                diff = max(diff, float(np.abs(out - ref).max()))
                checked += len(chunk)
    result = ExportResult(
        path=str(path), opset=opset, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        input_shape=["batch", in_channels, input_size, input_size], max_abs_diff=diff, checked_images=checked,
        checked_batch_sizes=sizes, tolerance=tolerance, ops=ops,
    )
    if not diff <= tolerance:
        raise ExportMismatch(f"ONNX export differs from torch by {diff:.3g} (> tolerance {tolerance:g})")
    log.info("exported %s: opset %d, max |onnx - torch| = %.3g over %d images", path.name, opset, diff, checked)
    return result
