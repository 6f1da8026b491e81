"""Compressors: the plug-ins that turn the exported model into deployable variants.

A :class:`Compressor` takes the verified FP32 ONNX model (and the torch model, for compressors that
work on weights, such as pruning or low-rank factorization) plus calibration images and returns a
:class:`Variant`: a model file, the runtime that executes it and how it was made. The optimizer
measures every variant the same way and chooses among them, so a new technique is one new class.

Shipped here:

* :class:`OrtFp32` — ONNX Runtime FP32 with every graph optimization on (Conv+activation fusion,
  constant folding, NCHWc layout).
* :class:`OrtStaticInt8` — static post-training INT8 quantization (QDQ format, per-channel weights,
  uint8 activations x int8 weights: the combination whose kernels use AVX-512 VNNI / AVX-VNNI),
  calibrated on held-out training images with MinMax, Percentile or Entropy ranges.
* :class:`OrtGpuProvider` — the FP32 or INT8 ONNX model on the CUDA or TensorRT execution provider.
* :class:`TensorRTEngine` — a TensorRT FP16 or INT8 engine built from the ONNX model; INT8 uses the
  QDQ model's scales (explicit quantization), so no separate TensorRT calibrator is needed.

GPU compressors import their libraries lazily and say what to install when they are missing.

Each plug-in **declares** what it needs (:class:`Need`: the torch model, labeled training images,
calibration images, the chosen INT8 model, a GPU; :attr:`Compressor.libraries`: modules that must be
importable) and what kind of variant it makes (:class:`VariantKind`). The stage reads those
declarations (:func:`declaration_of`, :func:`missing`, :func:`build_order`) instead of picking
plug-ins by class or by name: one that needs the INT8 model is built after the INT8 candidates are
settled, candidates that declare the same :attr:`Compressor.competes_as` compete and the winner takes
that name, and one whose needs this run or machine cannot meet is reported as skipped, with why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from dlforge.common.backends import optional_import
from dlforge.optimizer.runners import TENSORRT_INSTALL

if TYPE_CHECKING:
    from torch import nn

CalibrationMethodName = Literal["minmax", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[CalibrationMethodName, ...] = ("minmax", "percentile", "entropy")


class Need(StrEnum):
    """Something a compressor needs from the run or the machine."""

    TORCH_MODEL = "torch_model"  # the trained torch module (pruning, low-rank, recovery fine-tune)
    TRAINING_IMAGES = "training_images"  # labeled training images (recovery fine-tune, distillation)
    CALIBRATION_IMAGES = "calibration_images"  # held-out training images, unlabeled (static INT8 ranges)
    INT8_MODEL = "int8_model"  # the chosen INT8 QDQ model (GPU INT8 paths reuse its scales)
    GPU = "gpu"  # an NVIDIA GPU that ONNX Runtime or TensorRT can use


class VariantKind(StrEnum):
    """What kind of variant a compressor makes."""

    FP32 = "fp32"  # the FP32 model on a CPU runtime
    INT8 = "int8"  # an INT8-quantized model on a CPU runtime
    GPU = "gpu"  # a model for a GPU runtime (any precision)
    COMPRESSED_TORCH = "compressed-torch"  # made from a transformed torch model (pruned, factorized), then exported


@dataclass(frozen=True)
class Declaration:
    """A compressor's declared needs and product, as the stage reads them (see :func:`declaration_of`)."""

    name: str
    kind: VariantKind
    needs: frozenset[Need]
    libraries: tuple[str, ...]
    competes_as: str | None
    install: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What this run and machine offer the compressors."""

    torch_model: bool
    training_images: bool
    calibration_images: bool
    gpu: bool
    gpu_reason: str = "no GPU: ONNX Runtime here has no CUDA or TensorRT execution provider"

    @classmethod
    def detect(cls, *, torch_model: bool, training_images: bool, calibration_images: bool,
               gpu_wanted: bool = True) -> Capabilities:
        """The run's inputs as given, and a GPU when ONNX Runtime has a CUDA/TensorRT provider."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        gpu = gpu_wanted and any(p in available for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        reason = ("GPU variants are turned off (optimizer_gpu=false)" if not gpu_wanted else
                  f"no GPU: ONNX Runtime here has no CUDA or TensorRT execution provider (available: "
                  f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU")
        return cls(torch_model=torch_model, training_images=training_images,
                   calibration_images=calibration_images, gpu=gpu, gpu_reason=reason)


def declaration_of(comp: Any) -> Declaration:
    """The declared needs of ``comp``; a plug-in that declares nothing needs nothing and makes FP32."""
    needs = frozenset(Need(n) for n in getattr(comp, "needs", ()))
    return Declaration(name=str(comp.name), kind=VariantKind(getattr(comp, "kind", VariantKind.FP32)), needs=needs,
                       libraries=tuple(getattr(comp, "libraries", ())),
                       competes_as=getattr(comp, "competes_as", None), install=getattr(comp, "install", None))


def missing(decl: Declaration, caps: Capabilities, *, int8_model: bool = True) -> str | None:
    """Why the declared needs cannot be met here (None when they can). ``int8_model``: an INT8 model exists."""
    why: list[str] = []
    if Need.TORCH_MODEL in decl.needs and not caps.torch_model:
        why.append("needs the torch model, which this run does not provide")
    if Need.TRAINING_IMAGES in decl.needs and not caps.training_images:
        why.append("needs labeled training images, which this run does not provide")
    if Need.CALIBRATION_IMAGES in decl.needs and not caps.calibration_images:
        why.append("needs calibration images, which this run does not provide")
    if Need.INT8_MODEL in decl.needs and not int8_model:
        why.append("needs the INT8 model, and no INT8 variant was built")
    if Need.GPU in decl.needs and not caps.gpu:
        why.append(caps.gpu_reason)
    absent = [m for m in decl.libraries if importlib.util.find_spec(m) is None]
    if absent:
        why.append(f"needs the module{'s' if len(absent) > 1 else ''} {', '.join(absent)}, not installed here"
                   + (f": {decl.install}" if decl.install else ""))
    return "; ".join(why) or None


def build_order(compressors: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """(built first, built after the INT8 candidates are settled): by the :attr:`Need.INT8_MODEL` need."""
    first: list[Any] = []
    later: list[Any] = []
    for comp in compressors:
        (later if Need.INT8_MODEL in declaration_of(comp).needs else first).append(comp)
    return first, later


def needs_of(compressors: Sequence[Any]) -> frozenset[Need]:
    """Everything the given compressors need together (e.g. whether to load training images at all)."""
    return frozenset().union(*(declaration_of(c).needs for c in compressors)) if compressors else frozenset()


@dataclass(frozen=True)
class Variant:
    """One deployable form of the model and how to run it."""

    name: str
    runtime: str
    precision: str
    path: Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: tuple[Mapping[str, Any], ...] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class Source:
    """What compressors start from: the verified FP32 ONNX file and, optionally, the torch model."""

    onnx_path: Path
    input_name: str
    input_shape: tuple[int, int, int]
    model: nn.Module | None = None
    int8_onnx_path: Path | None = None
    train_images: np.ndarray | None = None
    """normalized float32 NCHW labeled training images (for :attr:`Need.TRAINING_IMAGES`), else None"""
    train_labels: np.ndarray | None = None
    """their class indices"""


class Compressor(Protocol):
    """Plug-in interface: make one variant of the model.

    ``name`` names the variant it produces, ``kind`` what kind of variant it is, ``needs`` what it
    needs from the run and the machine, ``libraries`` the modules it imports (checked before it runs),
    and ``competes_as`` (None for most) the name of a competition: the stage keeps the candidate of that
    name whose decisions agree best with FP32 on validation and gives it that name (the INT8
    calibrations). Unmet needs are reported as skipped rather than failing the run; :meth:`unavailable`
    is asked after them for anything more specific (a given execution provider). :meth:`compress`
    writes its model file under ``workdir`` and returns the :class:`Variant`; ``calibration`` is a
    float32 NCHW batch of normalized held-out training images.
    """

    name: str
    kind: VariantKind
    needs: frozenset[Need]
    libraries: tuple[str, ...]
    competes_as: str | None

    def unavailable(self) -> str | None:
        """None if this compressor can run here, else the reason (saying what to install)."""
        ...

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        """Build the variant's model file under ``workdir``."""
        ...


class OrtFp32:
    """The exported model as is, run by ONNX Runtime with all graph optimizations (fusion) on."""

    name = "onnx_fp32"
    kind = VariantKind.FP32
    needs: frozenset[Need] = frozenset()
    libraries: tuple[str, ...] = ()
    competes_as: str | None = None

    def unavailable(self) -> str | None:
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        out = workdir / f"{self.name}.onnx"
        if source.onnx_path.resolve() != out.resolve():
            shutil.copyfile(source.onnx_path, out)
        return Variant(self.name, "onnxruntime", "fp32", out,
                       details={"graph_optimization": "ORT_ENABLE_ALL (fusion, constant folding, NCHWc)"})


class _CalibrationReader:
    """ONNX Runtime CalibrationDataReader over a float32 batch, ``batch`` images per step.

    ``__len__``/``set_range`` let ONNX Runtime calibrate one step at a time (``CalibStridedMinMax``):
    the histogram calibrators then merge each step's histograms and drop its activations, instead of
    holding every intermediate tensor of every calibration image at once (gigabytes for a CNN).
    """

    def __init__(self, input_name: str, images: np.ndarray, batch: int) -> None:
        self.input_name = input_name
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch = batch
        self.steps = -(-len(self.images) // batch)
        self._it: Iterator[int] = iter(range(self.steps))

    def __len__(self) -> int:
        return self.steps

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(range(start_index, min(end_index, self.steps)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        step = next(self._it, None)
        if step is None:
            return None
        return {self.input_name: self.images[step * self.batch:(step + 1) * self.batch]}

    def rewind(self) -> None:
        self._it = iter(range(self.steps))


_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid")


def fp32_end_nodes(model: Any) -> list[str]:
    """Names of the nodes kept in FP32 by :class:`OrtStaticInt8` with ``fp32_ends``.

    The stem: the first ``Conv`` fed by the image (else the graph's first ``Conv`` and every node before it),
    and its activation.
    The head: every node after the last ``Conv`` and its activation (global pooling, flatten, the final
    linear layer; with test-time views, the softmax, average and log after it). Together they
    are a few percent of the compute, but they carry most of the quantization error of a classifier:
    the stem sees the raw pixels (and int8 kernels are poor at 3-channel convolutions anyway), and a
    linear head reads small differences between pooled features that uint8 steps erase.
    """
    nodes = list(model.graph.node)
    initializers = {i.name for i in model.graph.initializer}
    image_inputs = {i.name for i in model.graph.input} - initializers
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    keep: list[str] = []
    convs = [n for n in nodes if n.op_type == "Conv"]
    # the image feeds the stem, or (a model averaging over views) its flips and turns do: then the first Conv,
    # and every node before it (the views' Slice, Transpose and Concat) stays FP32 too, so the stem still
    # sees the image's float pixels
    stem = next((n for n in convs if n.input and n.input[0] in image_inputs), convs[0] if convs else None)
    if stem is not None:
        if not (stem.input and stem.input[0] in image_inputs):
            keep += [n.name for n in nodes[:nodes.index(stem)]]
        keep.append(stem.name)
        after = consumers.get(stem.output[0], [])
        if len(after) == 1 and after[0].op_type in _ACTIVATIONS:
            keep.append(after[0].name)
    conv_at = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if conv_at:
        last = nodes[conv_at[-1]]
        skip = {last.name, *(n.name for n in consumers.get(last.output[0], []) if n.op_type in _ACTIVATIONS)}
        keep += [n.name for n in nodes[conv_at[-1] + 1:] if n.name not in skip]
    return list(dict.fromkeys(keep))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's per-tensor warnings, which it logs on the root logger (only those)."""

    def not_quantizer_warning(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(not_quantizer_warning)
    try:
        yield
    finally:
        root.removeFilter(not_quantizer_warning)


def _named(model: Any) -> bool:
    """Give every unnamed node a unique name (exclusions are by name); True if any was renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            changed = True
    return changed


class OrtStaticInt8:
    """Static post-training INT8 quantization with ONNX Runtime (``quantize_static``).

    Defaults are the fast CPU recipe for x86 with VNNI: QDQ format (ONNX Runtime fuses each
    ``DequantizeLinear -> Conv -> QuantizeLinear`` into a ``QLinearConv``), per-channel symmetric int8
    weights, asymmetric uint8 activations (u8 x s8 is the VNNI dot-product form; s8 activations or u8
    weights fall off the fast path), no reduced range (needed only without VNNI). ReLU6/Clip and Relu
    are folded into the preceding Conv's output range, so the network stays in int8 from the first
    QuantizeLinear to the last DequantizeLinear. With ``fp32_ends`` (default) the stem convolution and
    the classifier head stay FP32 (see :func:`fp32_end_nodes`): same speed, far smaller accuracy loss.
    """

    def __init__(
        self,
        *,
        method: CalibrationMethodName = "minmax",
        per_channel: bool = True,
        quant_format: Literal["qdq", "qoperator"] = "qdq",
        activation_type: Literal["uint8", "int8"] = "uint8",
        weight_type: Literal["int8", "uint8"] = "int8",
        reduce_range: bool = False,
        calibration_batch: int = 8,
        percentile: float = 99.999,
        exclude_nodes: tuple[str, ...] = (),
        fp32_ends: bool = True,
        name: str | None = None,
        competes_as: str | None = "onnx_int8",
    ) -> None:
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATION_METHODS)}")
        self.method = method
        self.per_channel = per_channel
        self.quant_format = quant_format
        self.activation_type = activation_type
        self.weight_type = weight_type
        self.reduce_range = reduce_range
        self.calibration_batch = calibration_batch
        self.percentile = percentile
        self.exclude_nodes = exclude_nodes
        self.fp32_ends = fp32_ends
        self.name = name or f"onnx_int8_{method}"
        self.kind = VariantKind.INT8
        self.needs = frozenset({Need.CALIBRATION_IMAGES})
        self.libraries: tuple[str, ...] = ()
        self.competes_as = competes_as

    def unavailable(self) -> str | None:
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if len(calibration) == 0:
            raise ValueError("static INT8 quantization needs calibration images")
        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        extra: dict[str, Any] = {"CalibStridedMinMax": 1}  # one reader step per calibration round
        if self.method == "percentile":
            extra["CalibPercentile"] = self.percentile
        model_path = source.onnx_path
        model = onnx.load(str(model_path))
        if _named(model):
            model_path = workdir / f"{self.name}.named.onnx"
            onnx.save(model, str(model_path))
        exclude = list(dict.fromkeys([*self.exclude_nodes, *(fp32_end_nodes(model) if self.fp32_ends else [])]))
        out = workdir / f"{self.name}.onnx"
        # the histogram calibrators print progress to stdout; keep the service's output clean
        with contextlib.redirect_stdout(io.StringIO()), _quiet_quantizer():
            quantize_static(
                str(model_path), str(out),
                _CalibrationReader(source.input_name, calibration, self.calibration_batch),  # type: ignore[arg-type]
                quant_format=QuantFormat.QDQ if self.quant_format == "qdq" else QuantFormat.QOperator,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                activation_type=QuantType.QUInt8 if self.activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                calibrate_method=methods[self.method],
                nodes_to_exclude=exclude,
                extra_options=extra,
            )
        if model_path != source.onnx_path:
            model_path.unlink(missing_ok=True)
        return Variant(self.name, "onnxruntime", "int8", out, details={
            "calibration": self.method,
            "calibration_images": len(calibration),
            "quant_format": self.quant_format.upper(),
            "per_channel": self.per_channel,
            "activations": self.activation_type,
            "weights": f"{self.weight_type} (symmetric)" if self.weight_type == "int8" else self.weight_type,
            "reduce_range": self.reduce_range,
            **({"percentile": self.percentile} if self.method == "percentile" else {}),
            "fp32_nodes": exclude,
        })


class OrtGpuProvider:
    """The FP32 (or INT8 QDQ) ONNX model on ONNX Runtime's CUDA or TensorRT execution provider."""

    def __init__(self, provider: Literal["CUDAExecutionProvider", "TensorrtExecutionProvider"], *,
                 precision: Literal["fp32", "fp16", "int8"] = "fp32") -> None:
        self.provider = provider
        self.precision = precision
        short = "cuda" if provider == "CUDAExecutionProvider" else "trt_ep"
        self.name = f"onnx_{precision}_{short}"
        self.kind = VariantKind.GPU
        self.needs = frozenset({Need.GPU, *([Need.INT8_MODEL] if precision == "int8" else [])})
        self.libraries: tuple[str, ...] = ()
        self.competes_as: str | None = None

    def unavailable(self) -> str | None:
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return (f"ONNX Runtime here has no {self.provider} (available: {', '.join(ort.get_available_providers())});"
                    " install onnxruntime-gpu on a machine with an NVIDIA GPU")
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        model = source.int8_onnx_path if self.precision == "int8" else source.onnx_path
        if model is None:
            raise ValueError(f"{self.name} needs the INT8 QDQ model; build the INT8 variant first")
        options: dict[str, Any] = {}
        if self.provider == "TensorrtExecutionProvider":
            cache = workdir / "trt_cache"
            cache.mkdir(parents=True, exist_ok=True)
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_fp16_enable": self.precision == "fp16", "trt_int8_enable": self.precision == "int8"}
        out = workdir / f"{self.name}.onnx"
        shutil.copyfile(model, out)
        return Variant(self.name, "onnxruntime", self.precision, out,
                       providers=(self.provider, "CPUExecutionProvider"),
                       provider_options=(options, {}), details={"execution_provider": self.provider})


class TensorRTEngine:
    """A TensorRT engine (FP16, or INT8 from the QDQ model's explicit scales) built from ONNX."""

    def __init__(self, *, precision: Literal["fp16", "int8"] = "fp16", max_batch: int = 32,
                 workspace_bytes: int = 1 << 30) -> None:
        self.precision = precision
        self.max_batch = max_batch
        self.workspace_bytes = workspace_bytes
        self.name = f"trt_{precision}"
        self.kind = VariantKind.GPU
        self.needs = frozenset({Need.GPU, *([Need.INT8_MODEL] if precision == "int8" else [])})
        self.libraries: tuple[str, ...] = ("tensorrt", "pycuda")
        self.install = TENSORRT_INSTALL
        self.competes_as: str | None = None

    def unavailable(self) -> str | None:
        import importlib.util

        missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
        if missing:
            return f"TensorRT engines need {' and '.join(missing)}: {TENSORRT_INSTALL}"
        return None

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        trt = optional_import("tensorrt", install=TENSORRT_INSTALL, purpose=f"the TensorRT {self.precision} engine")
        optional_import("pycuda.autoinit", install=TENSORRT_INSTALL, purpose=f"the TensorRT {self.precision} engine")
        onnx_path = source.int8_onnx_path if self.precision == "int8" else source.onnx_path
        if onnx_path is None:
            raise ValueError("the TensorRT INT8 engine is built from the INT8 QDQ model; build that variant first")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        config.set_flag(trt.BuilderFlag.FP16)  # FP16 for the layers INT8 does not cover, too
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        c, h, w = source.input_shape
        profile = builder.create_optimization_profile()
        profile.set_shape(source.input_name, (1, c, h, w), (1, c, h, w), (self.max_batch, c, h, w))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT failed to build the {self.precision} engine")
        out = workdir / f"{self.name}.plan"
        out.write_bytes(bytes(engine))
        return Variant(self.name, "tensorrt", self.precision, out,
                       details={"max_batch": self.max_batch, "built_from": onnx_path.name,
                                "tensorrt": str(trt.__version__)})


def default_compressors(
    *,
    calibration_methods: tuple[CalibrationMethodName, ...] = ("minmax", "percentile"),
    calibration_batch: int = 8,
) -> tuple[list[Compressor], list[Compressor], list[Compressor]]:
    """(FP32, INT8 candidates — one per calibration method —, GPU) compressors of a standard run."""
    fp32: list[Compressor] = [OrtFp32()]
    int8: list[Compressor] = [OrtStaticInt8(method=m, calibration_batch=calibration_batch)
                              for m in calibration_methods]
    gpu: list[Compressor] = [
        OrtGpuProvider("CUDAExecutionProvider", precision="fp32"),
        OrtGpuProvider("TensorrtExecutionProvider", precision="fp16"),
        TensorRTEngine(precision="fp16"),
        TensorRTEngine(precision="int8"),
    ]
    return fp32, int8, gpu
