"""Hand-made bundles for the dlforge-edge tests: a one-weight ONNX model and the files the format names, written
here from the format's description (not by dlforge's optimizer), so any field can be set to what a hand would."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

CLASSES = ["bright", "dark"]
GOOD_PREPROCESSING: dict[str, Any] = {"colour_mode": "L", "in_channels": 1, "input_size": 16, "resize": "bilinear",
                                      "divide_by": 255.0, "mean": [0.5], "std": [0.25]}


def mean_model(input_shape: tuple[int | str, ...] = ("N", 1, "S", "S")) -> bytes:
    """Logits ``[m, -m]`` where ``m`` is the sum over channels of the mean of the normalized input (by default
    ``N x 1 x S x S``: grey images of any size)."""
    channels = input_shape[1] if isinstance(input_shape[1], int) else 1
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "mean_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [channels, 2], [1.0, -1.0] * channels)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def handmade_bundle(path: Path, *, preprocessing: dict[str, Any] | None = None, model: bytes | None = None) -> Path:
    """A bundle with ``preprocessing`` (the good one by default) and ``model`` (:func:`mean_model` by default)
    whose manifest lists every file's checksum."""
    pre = GOOD_PREPROCESSING if preprocessing is None else preprocessing
    files = {"model.onnx": mean_model() if model is None else model,
             "preprocessing.json": json.dumps(pre).encode(),  # NaN and Infinity as Python's json writes them
             "classes.json": json.dumps(CLASSES).encode(),
             "decision.json": json.dumps({"positive_class": None, "threshold": None, "rule": "argmax"}).encode(),
             "spec.json": json.dumps({"input_size": 16}).encode(),
             "spec_check.json": json.dumps({"spec_met": True}).encode()}
    manifest = {"format": "dlforge-bundle", "format_version": 1, "model_id": "hand", "variant": "onnx_fp32",
                "producer": {}, "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                                          for n, d in files.items()}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        for name, data in files.items():
            z.writestr(name, data)
    return path
