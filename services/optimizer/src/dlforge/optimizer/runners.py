"""Runners: one way to execute a model file, whatever produced it.

A :class:`Runner` maps a normalized float32 ``(N, C, H, W)`` batch to logits ``(N, classes)``. The
benchmark child process, the evaluation and the :class:`~dlforge.optimizer.predictor.Predictor` all go
through :func:`open_runner`, so what is measured is what is deployed.

This module imports nothing heavy at import time: an ONNX Runtime benchmark must not pay for
importing torch, and TensorRT/pycuda exist only on GPU machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dlforge.common.backends import optional_import

RUNTIMES = ("onnxruntime", "tensorrt", "torch")

TENSORRT_INSTALL = "pip install tensorrt pycuda (needs an NVIDIA GPU with the CUDA driver)"


class Runner(Protocol):
    """Executes one model: normalized float32 NCHW batch in, logits out."""

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` for the float32 batch ``x`` ``(N, C, H, W)``."""
        ...


def ort_session_options(threads: int) -> Any:
    """ONNX Runtime session options used for every measured ORT variant.

    All graph optimizations on (constant folding, Conv+activation fusion, the NCHWc layout for FP32,
    QDQ -> QLinearConv fusion for INT8), sequential execution, ``threads`` intra-op threads and one
    inter-op thread, so that variants compete on equal terms.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OrtRunner:
    """An ONNX Runtime session over an ``.onnx`` file with the given execution providers."""

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        threads: int = 2,
    ) -> None:
        import onnxruntime as ort

        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(f"ONNX Runtime here lacks the execution providers {missing} "
                               f"(available: {ort.get_available_providers()})")
        opts = [dict(o) for o in provider_options] if provider_options is not None else None
        self.session = ort.InferenceSession(str(path), ort_session_options(threads), providers=list(providers),
                                            provider_options=opts)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out


AVERAGED_VIEWS = "test_time_views"  # checkpoint extra: the views a TorchRunner averages the model over


def averaging_checkpoint(source: str | Path, out: str | Path, views: list[str]) -> None:
    """``source`` checkpoint copied to ``out`` with ``views`` for :class:`TorchRunner` to average over."""
    import torch

    ckpt = torch.load(str(source), map_location="cpu", weights_only=False)
    ckpt["extra"] = {**(ckpt.get("extra") or {}), AVERAGED_VIEWS: list(views)}
    torch.save(ckpt, str(out))


class TorchRunner:
    """PyTorch eager FP32 from a dlforge checkpoint: the baseline every variant is compared with."""

    def __init__(self, path: str | Path, *, threads: int = 2) -> None:
        import torch

        from dlforge.vision.networks import load_checkpoint

        torch.set_num_threads(threads)
        self._torch = torch
        model, ckpt = load_checkpoint(str(path))
        extra = ckpt.get("extra")
        views = extra.get(AVERAGED_VIEWS) if isinstance(extra, dict) else None
        if views:  # written by averaging_checkpoint: the model averages over these views
            from dlforge.vision.images import ViewAveraged

            self.model: Any = ViewAveraged(model, list(views))
        else:
            self.model = model
        self.model.eval()

    @classmethod
    def of(cls, model: Any) -> TorchRunner:
        """A runner of an in-memory model (threads left as they are)."""
        import torch

        runner = cls.__new__(cls)
        runner._torch, runner.model = torch, model.eval()
        return runner

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out: np.ndarray = self.model(self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        return out


class TensorRTRunner:
    """A serialized TensorRT engine (``.plan``) executed with pycuda (TensorRT >= 10 tensor API)."""

    def __init__(self, path: str | Path) -> None:
        trt = optional_import("tensorrt", install=TENSORRT_INSTALL, purpose="running a TensorRT engine")
        optional_import("pycuda.autoinit", install=TENSORRT_INSTALL, purpose="running a TensorRT engine")
        self._cuda = optional_import("pycuda.driver", install=TENSORRT_INSTALL, purpose="running a TensorRT engine")
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine (built for another GPU/version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = self._cuda.Stream()

    def run(self, x: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=np.float32)
        d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(out.nbytes)
        try:
            cuda.memcpy_htod_async(d_in, x, self.stream)
            self.context.set_tensor_address(self.input_name, int(d_in))
            self.context.set_tensor_address(self.output_name, int(d_out))
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execution failed")
            cuda.memcpy_dtoh_async(out, d_out, self.stream)
            self.stream.synchronize()
        finally:
            d_in.free()
            d_out.free()
        return out


def open_runner(
    runtime: str,
    path: str | Path,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    provider_options: Sequence[Mapping[str, Any]] | None = None,
    threads: int = 2,
) -> Runner:
    """The runner for a model file of ``runtime`` (one of :data:`RUNTIMES`)."""
    if runtime == "onnxruntime":
        return OrtRunner(path, providers=providers, provider_options=provider_options, threads=threads)
    if runtime == "torch":
        return TorchRunner(path, threads=threads)
    if runtime == "tensorrt":
        return TensorRTRunner(path)
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def predict_logits(runner: Runner, x: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """Logits of a large float batch, run ``batch`` images at a time."""
    outs = [runner.run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)
