"""The model bundle: one zip that carries an optimized model to an inspection PC.

A bundle holds everything needed to make the platform's decisions without the platform:

=====================  ==========================================================================
``model.onnx``         the chosen variant (an ONNX Runtime CPU model; see :func:`bundle_variant`)
``preprocessing.json`` colour mode, input size, resize method, scale, per-channel mean and std, layout
``classes.json``       the class names, in the order of the model's outputs
``decision.json``      the positive class, the decision threshold and the rule that applies it
``spec.json``          the spec the run was asked to meet
``spec_check.json``    the variant's spec check: the figures, their 95 % intervals and the verdict
``manifest.json``      format and version, what produced it, and the sha256 and size of every other file
=====================  ==========================================================================

:func:`build_bundle` writes one from an optimizer report and the variant's model file;
:func:`verify_bundle` refuses one whose format version is not :data:`FORMAT_VERSION`, whose files
differ from the manifest's checksums, or that holds files the manifest does not list.
The format's reader is ``dlforge-edge``'s (``libs/edge``, which imports nothing of dlforge): its constants
and :class:`BundleError` are the ones used here, and :func:`verify_bundle` is its ``load_bundle``, so the
platform accepts exactly the bundles an inspection PC accepts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from dlforge_edge.bundle import FORMAT, FORMAT_VERSION, MANIFEST, MODEL, BundleError, load_bundle
from pydantic import BaseModel, ConfigDict, Field

from dlforge.optimizer.handlers import OptimizationReport, VariantReport

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL", "BundleError", "BundleManifest", "FileEntry",
           "build_bundle", "bundle_variant", "producer_versions", "verify_bundle"]

DECISION_RULE = (
    "probabilities = softmax(logits) over the classes in classes.json order; with a positive class, the "
    "decision is the positive class when its probability >= threshold, otherwise the most probable other "
    "class; without one, the most probable class")
RESIZE = "PIL Image.resize to input_size x input_size with Image.Resampling.BILINEAR, after convert(colour_mode)"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BundleManifest(BaseModel):
    """``manifest.json``: what the bundle is, what made it, and the checksum of every other file."""

    model_config = ConfigDict(extra="forbid")

    format: str
    format_version: int
    created_at: str
    dataset_id: str
    model_id: str
    variant: str
    variant_note: str | None = Field(default=None, description="why another variant than the chosen one")
    producer: dict[str, Any] = Field(description="dlforge, onnx_opset, onnxruntime, onnx, python versions")
    files: dict[str, FileEntry]


def bundle_variant(report: OptimizationReport) -> tuple[VariantReport, str | None]:
    """The variant a bundle carries and, when it is not the chosen one, why.

    The chosen variant when it is an ONNX model ONNX Runtime runs on the CPU; otherwise (a GPU variant
    was chosen) the CPU ONNX variant that meets the spec, then is fastest.
    """
    def portable(v: VariantReport) -> bool:
        return (v.deployable and v.runtime == "onnxruntime" and v.providers == ["CPUExecutionProvider"]
                and v.file_name.endswith(".onnx"))

    chosen = report.variants[report.chosen_variant]
    if portable(chosen):
        return chosen, None
    cpu = [v for v in report.variants.values() if portable(v)]
    if not cpu:
        raise BundleError(f"no variant of model {report.model_id!r} is an ONNX model for the CPU: nothing to bundle")
    best = max(cpu, key=lambda v: (v.spec_check.met, v.fps))
    return best, (f"the chosen variant {chosen.name!r} runs on {chosen.runtime} {', '.join(chosen.providers)}; the "
                  f"bundle carries {best.name!r}, the CPU ONNX variant that meets the spec, then is fastest")


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _onnx_opset(model: Path) -> int:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise BundleError(f"{model.name} declares no default-domain ONNX opset")
    return int(opsets[0])


def producer_versions(model: Path) -> dict[str, Any]:
    """What produced a bundle of ``model``: dlforge, the model's ONNX opset, onnxruntime, onnx, Python."""
    import onnx
    import onnxruntime

    try:
        dlforge = metadata.version("dlforge-optimizer")
    except metadata.PackageNotFoundError:
        dlforge = "unknown"
    return {"dlforge": dlforge, "onnx_opset": _onnx_opset(model), "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def bundle_files(report: OptimizationReport, variant: VariantReport) -> dict[str, bytes]:
    """The JSON files of a bundle of ``variant`` of ``report`` (everything but the model and the manifest)."""
    inp = report.input
    channels = int(inp["in_channels"])
    size = int(variant.details.get("input_size") or inp["input_size"])  # a compressor may shrink the input
    positive = report.positive_class
    preprocessing = {
        "colour_mode": "L" if channels == 1 else "RGB", "in_channels": channels, "input_size": size,
        "resize": "bilinear", "resize_detail": RESIZE, "divide_by": 255.0, "mean": list(inp["mean"]),
        "std": list(inp["std"]), "layout": "NCHW", "dtype": "float32",
        "formula": "x = (pixel / divide_by - mean[c]) / std[c] in float32, pixel in 0..255",
        "input_name": report.export.input_name, "output": "logits (N, classes)",
    }
    tv = report.test_views
    if tv is not None and tv.used:  # the model runs the views itself: the caller feeds one image as always
        preprocessing["output"] = ("log of the class probabilities averaged over the views " + ", ".join(tv.views)
                                   + " inside the model (N, classes); a softmax gives the probabilities back")
        preprocessing["test_views"] = list(tv.views)
    threshold = variant.threshold.threshold if positive is not None else None
    decision = {"positive_class": positive, "threshold": threshold, "rule": DECISION_RULE,
                "threshold_choice": variant.threshold.model_dump(mode="json")}
    spec_check = {
        "variant": variant.name, "chosen_variant": report.chosen_variant, "spec_met": variant.spec_check.met,
        "spec_check": variant.spec_check.model_dump(mode="json"),
        "verdict": variant.verdict.model_dump(mode="json") if variant.verdict else None,
        "test_accuracy": variant.test_accuracy, "test_positive_recall": variant.test_positive_recall,
        "test_accuracy_argmax": variant.test_argmax.accuracy,
        "test_figures": variant.test_figures.model_dump(mode="json") if variant.test_figures else None,
        "test_split": report.test_split,
        "speed": {"fps": variant.fps, "latency_b1_p50_ms": variant.latency_b1_p50_ms,
                  "latency_b1_p99_ms": variant.latency_b1_p99_ms, "peak_rss_mb": variant.peak_rss_mb,
                  "pipeline": report.pipeline},
        "environment": report.environment, "choice": report.choice.model_dump(mode="json"),
    }
    return {"preprocessing.json": _json(preprocessing), "classes.json": _json(list(report.classes)),
            "decision.json": _json(decision), "spec.json": _json(report.spec.model_dump(mode="json")),
            "spec_check.json": _json(spec_check)}


def build_bundle(report: OptimizationReport, *, model_path: Path, out: Path, variant: str | None = None,
                 created_at: datetime | None = None) -> BundleManifest:
    """Write the bundle of ``variant`` (default: :func:`bundle_variant`) of ``report`` to ``out``.

    ``model_path`` is that variant's ONNX file. The zip is written beside ``out`` and renamed into place,
    so ``out`` is either the whole bundle or absent.
    """
    if variant is None:
        chosen, note = bundle_variant(report)
    else:
        if variant not in report.variants:
            raise BundleError(f"model {report.model_id!r} has no variant {variant!r}")
        chosen, note = report.variants[variant], None
    if not model_path.is_file():
        raise BundleError(f"the model file {model_path} of variant {chosen.name!r} does not exist")
    payloads = bundle_files(report, chosen)
    digest = hashlib.sha256()
    with model_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    files = {MODEL: FileEntry(sha256=digest.hexdigest(), bytes=model_path.stat().st_size)}
    files.update({name: FileEntry(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
                  for name, data in payloads.items()})
    manifest = BundleManifest(
        format=FORMAT, format_version=FORMAT_VERSION,
        created_at=(created_at or datetime.now(UTC)).isoformat(), dataset_id=report.dataset_id,
        model_id=report.model_id, variant=chosen.name, variant_note=note, producer=producer_versions(model_path),
        files=files)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(MANIFEST, _json(manifest.model_dump(mode="json")))
        z.write(model_path, MODEL)
        for name, data in payloads.items():
            z.writestr(name, data)
    partial.replace(out)
    return manifest


def verify_bundle(path: Path) -> BundleManifest:
    """The manifest of the bundle at ``path`` once dlforge-edge accepts it: its format, every file's checksum and
    its contents (preprocessing, classes, decision) checked by the reader inspection PCs run; BundleError says
    what does not fit."""
    bundle = load_bundle(path)
    try:
        return BundleManifest.model_validate(bundle.manifest)
    except ValueError as exc:
        raise BundleError(f"{path}: {MANIFEST} is malformed: {exc}") from exc
