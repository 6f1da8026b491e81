"""Optimizer benchmark: EfficientNet-Lite0 on the ELPV solar-cell defects, FP32 vs INT8 vs PyTorch eager.

The model: EfficientNet-Lite0 with its ImageNet weights, frozen, and a 2-class head ("defect", "good";
defect = defect probability >= 0.5 in ELPV's labels.csv) fitted by logistic regression on the frozen
1280-d features of the training split (the regularization C chosen on validation accuracy; the
feature standardization is folded into the linear head). No fine-tuning: this benchmark is about what
the optimizer does to a model, and a linear probe is the quickest honest model of that architecture.

Splits (stratified, seeded): test 10 %, val 15 % of the rest, train the rest — as the labeler does.
Then :func:`dlforge.optimizer.handlers.optimize` runs exactly as the service does: ONNX export and
verification, ONNX Runtime FP32, INT8 static QDQ per-channel with every calibration method tried on
the training images (best on validation accuracy kept), the recall-first threshold on validation,
test metrics, and each variant benchmarked in its own process (batch 1 and 32, the 256x256-frame
pipeline, peak RSS).

With ``--ablation`` it also measures what makes INT8 fast on this CPU: quantization format
(QDQ/QOperator), per-channel vs per-tensor weights, u8 x s8 vs s8 x s8 vs u8 x u8, reduce_range,
stem and head kept in FP32 or not, and the ONNX Runtime graph optimization level of FP32 — all
timed interleaved in one process at batch 1, so that a busy machine slows every configuration alike.

    python benchmarks/optimizer.py [--limit N] [--rounds R] [--ablation] [--out benchmarks/results/optimizer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def load_elpv(limit: int | None, seed: int) -> tuple[list[Path], np.ndarray]:
    """Image paths and labels (0 = defect: probability >= 0.5, 1 = good)."""
    from dlforge.labeler.demo_data import DEFECT, elpv_cells, elpv_root

    root, cells = elpv_root(), elpv_cells()
    paths = [root / c.name for c in cells]
    labels = np.array([0 if c.label == DEFECT else 1 for c in cells], dtype=np.int64)
    if limit is not None and limit < len(paths):
        idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
        paths, labels = [paths[i] for i in idx], labels[idx]
    return paths, labels


def split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified: test 10 %, val 15 % of the rest, train the rest."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(0.10 * len(idx))
        n_val = round(0.15 * (len(idx) - n_test))
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {k: np.sort(np.array(v, dtype=np.int64)) for k, v in out.items()}


def load_images(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    from dlforge.vision.images import to_array

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            out[i] = to_array(img, size=size, channels=3)
    return out


def fit_head(work: Path, paths: list[Path], labels: np.ndarray, parts: dict[str, np.ndarray]) -> tuple[Path, dict]:
    """EfficientNet-Lite0 (ImageNet) + a logistic-regression head on frozen features -> checkpoint."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.preprocess import InputFormat, normalize
    from dlforge.optimizer.runners import OrtRunner, predict_logits
    from dlforge.vision.networks import build_network, save_checkpoint, spec_of

    net = spec_of("efficientnet_lite0")
    fmt = InputFormat(3, net.input_size, net.mean, net.std)
    model = build_network("efficientnet_lite0", 2, pretrained=True).eval()
    head = model.head
    model.head = torch.nn.Identity()  # type: ignore[assignment]
    sample = normalize(load_images([paths[i] for i in parts["train"][:4]], net.input_size), fmt)
    features_onnx = export_onnx(model, in_channels=3, input_size=net.input_size, path=work / "features.onnx",
                                check_inputs=sample)
    runner = OrtRunner(features_onnx.path, threads=2)
    feats: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for name in ("train", "val"):
        idx = parts[name]
        chunks = []
        for s in range(0, len(idx), 64):
            imgs = load_images([paths[i] for i in idx[s:s + 64]], net.input_size)
            chunks.append(predict_logits(runner, normalize(imgs, fmt), batch=32))
        feats[name] = np.concatenate(chunks)
    feature_seconds = time.perf_counter() - started
    scaler = StandardScaler().fit(feats["train"])
    best: tuple[float, float, Any] = (-1.0, 0.0, None)
    for c in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        lr = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        lr.fit(scaler.transform(feats["train"]), labels[parts["train"]])
        acc = float(lr.score(scaler.transform(feats["val"]), labels[parts["val"]]))
        if acc > best[0]:
            best = (acc, c, lr)
    val_acc, c, lr = best
    # p(good) = sigmoid(w . (x - mu) / sigma + b): fold the scaling into the linear head, split +-z/2
    w = lr.coef_[0] / scaler.scale_
    b = float(lr.intercept_[0] - np.dot(lr.coef_[0], scaler.mean_ / scaler.scale_))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.stack([-w / 2, w / 2])).float())
        head.bias.copy_(torch.tensor([-b / 2, b / 2]))
    model.head = head
    ckpt = work / "efficientnet_lite0_elpv.pt"
    save_checkpoint(model, arch="efficientnet_lite0", classes=["defect", "good"], path=str(ckpt),
                    extra={"input_size": net.input_size, "head": "logistic regression on frozen ImageNet features"})
    return ckpt, {"C": c, "val_accuracy_sklearn": val_acc, "feature_seconds": feature_seconds}


# ------------------------------------------------------------------------------------------------
# What makes INT8 fast: interleaved in-process timing of quantization and session configurations
# ------------------------------------------------------------------------------------------------


def ablation(work: Path, onnx_fp32: Path, calibration: np.ndarray, val: tuple[np.ndarray, np.ndarray],
             *, rounds: int, calls: int, threads: int = 2) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from dlforge.optimizer.compressors import OrtStaticInt8, Source
    from dlforge.optimizer.evaluation import decide, softmax
    from dlforge.optimizer.runners import ort_session_options

    src = Source(onnx_fp32, "input", tuple(calibration.shape[1:]))  # type: ignore[arg-type]
    configs: dict[str, dict[str, Any]] = {
        "int8 QDQ per-channel u8s8 (default)": {},
        "int8 ... every layer int8 (stem, head too)": {"fp32_ends": False},
        "int8 QDQ per-tensor u8s8": {"per_channel": False},
        "int8 QOperator per-channel u8s8": {"quant_format": "qoperator"},
        "int8 QDQ per-channel s8s8": {"activation_type": "int8"},
        "int8 QDQ per-channel u8u8": {"weight_type": "uint8"},
        "int8 QDQ per-channel u8s8 reduce_range": {"reduce_range": True},
    }
    sessions: dict[str, tuple[Any, str]] = {}
    levels = {"DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    for lname, level in levels.items():
        so = ort_session_options(threads)
        so.graph_optimization_level = level
        sessions[f"fp32 graph optimization {lname}"] = (
            ort.InferenceSession(str(onnx_fp32), so, providers=["CPUExecutionProvider"]), str(onnx_fp32))
    for name, kw in configs.items():
        v = OrtStaticInt8(method="minmax", name=f"abl{len(sessions)}", **kw).compress(src, calibration, work)
        sessions[name] = (ort.InferenceSession(str(v.path), ort_session_options(threads),
                                               providers=["CPUExecutionProvider"]), str(v.path))
    x1 = calibration[:1]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s, _ in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x1})
    for _ in range(rounds):
        for name, (s, _) in sessions.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, {"input": x1})
                times[name].append(time.perf_counter() - t0)
    ref = float(np.median(times["fp32 graph optimization ALL"]))
    vx, vy = val
    rows = []
    for name, (s, path) in sessions.items():
        probs = softmax(np.concatenate([s.run(None, {"input": vx[i:i + 32]})[0] for i in range(0, len(vx), 32)]))
        p50 = float(np.median(times[name]))
        rows.append({"config": name, "p50_ms": p50 * 1e3, "speedup_vs_fp32_all": ref / p50,
                     "val_accuracy": float((decide(probs) == vy).mean()),
                     "size_mb": os.path.getsize(path) / 2**20})
    return rows


def where_time_goes(paths: dict[str, Path], x: np.ndarray, *, threads: int = 2, calls: int = 30) -> dict[str, Any]:
    """Per-operator-kind kernel time (ONNX Runtime profiler, median per node) of each model at batch 1.

    Nodes are classified from the optimized graph ONNX Runtime actually runs (NCHWc convolutions for
    FP32, QLinearConv for INT8): stem (first convolution), depthwise (group > 1), pointwise (1x1),
    other convolutions, residual adds, and everything else.
    """
    import onnx
    import onnxruntime as ort

    from dlforge.optimizer.runners import ort_session_options

    out: dict[str, Any] = {}
    for name, path in paths.items():
        with tempfile.TemporaryDirectory() as tmp:
            so = ort_session_options(threads)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "prof")
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for _ in range(calls):
                sess.run(None, {"input": x})
            events = json.loads(Path(sess.end_profiling()).read_text())
            graph = onnx.load(so.optimized_model_filepath).graph
        kinds: dict[str, str] = {}
        first_conv = True
        for n in graph.node:
            attrs = {a.name: a for a in n.attribute}
            if n.op_type in ("Conv", "QLinearConv", "FusedConv"):
                group = attrs["group"].i if "group" in attrs else 1
                kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
                if first_conv:
                    kinds[n.name], first_conv = "stem conv", False
                elif group > 1:
                    kinds[n.name] = "depthwise conv"
                elif kernel == [1, 1]:
                    kinds[n.name] = "pointwise 1x1 conv"
                else:
                    kinds[n.name] = "other conv"
            elif n.op_type in ("Add", "QLinearAdd", "Sum"):
                kinds[n.name] = "residual add"
        per_node: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
        totals: dict[str, float] = {}
        for node, durs in per_node.items():
            kind = kinds.get(node, "other")
            totals[kind] = totals.get(kind, 0.0) + float(np.median(durs))
        out[name] = totals
    return out


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use a random subset of N ELPV images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="benchmark rounds per variant (fastest kept)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    ap.add_argument("--iterations", type=int, default=100, help="timed calls at batch 1 and for the pipeline")
    ap.add_argument("--iterations-large-batch", type=int, default=8)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--min-recall", type=float, default=0.9)
    ap.add_argument("--min-accuracy", type=float, default=0.9)
    ap.add_argument("--min-fps", type=float, default=1.0)
    ap.add_argument("--ablation", action="store_true", help="also time INT8/ORT configurations (see docstring)")
    ap.add_argument("--out", default="benchmarks/results/optimizer.json")
    args = ap.parse_args()

    import torch

    from dlforge.common.events import Spec
    from dlforge.optimizer.handlers import LabeledImages, OptimizeInput, OptimizeOptions, optimize, pick_calibration
    from dlforge.optimizer.preprocess import InputFormat, normalize
    from dlforge.vision.networks import spec_of

    torch.set_num_threads(2)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    paths, labels = load_elpv(args.limit, args.seed)
    parts = split(labels, args.seed)
    print(f"ELPV: {len(paths)} images ({int((labels == 0).sum())} defect), "
          + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    net = spec_of("efficientnet_lite0")
    spec = Spec(positive_class="defect", min_recall=args.min_recall, min_accuracy=args.min_accuracy,
                min_fps=args.min_fps, input_size=256)
    with tempfile.TemporaryDirectory(prefix="dlforge-optbench-") as tmp:
        work = Path(tmp)
        ckpt, head_info = fit_head(work, paths, labels, parts)
        print(f"head: logistic regression C={head_info['C']}, val accuracy {head_info['val_accuracy_sklearn']:.4f} "
              f"(features in {head_info['feature_seconds']:.0f}s)")
        train_ids = [paths[i].name for i in parts["train"]]
        cal_idx = parts["train"][pick_calibration(train_ids, n=args.calibration_images, seed=args.seed)]
        calibration = load_images([paths[i] for i in cal_idx], net.input_size)
        val = LabeledImages(load_images([paths[i] for i in parts["val"]], net.input_size), labels[parts["val"]])
        test = LabeledImages(load_images([paths[i] for i in parts["test"]], net.input_size), labels[parts["test"]])
        options = OptimizeOptions(
            calibration_methods=args.methods.split(","), rounds=args.rounds, iterations=args.iterations,
            iterations_large_batch=args.iterations_large_batch, warmup=10, batch_sizes=[1, 32], threads=args.threads,
        )
        result = optimize(OptimizeInput(ckpt, ["defect", "good"], spec, calibration, val, test, "elpv",
                                        "efficientnet_lite0-logreg"), workdir=work / "variants", options=options)
        report = result.report
        abl: list[dict[str, Any]] = []
        profile: dict[str, Any] = {}
        if args.ablation:
            fmt = InputFormat(3, net.input_size, net.mean, net.std)
            abl = ablation(work, result.files["onnx_fp32"], normalize(calibration, fmt),
                           (normalize(val.images, fmt), val.labels), rounds=5, calls=20, threads=args.threads)
            profile = where_time_goes({k: result.files[k] for k in ("onnx_fp32", "onnx_int8")},
                                      normalize(calibration[:1], fmt), threads=args.threads)

    print()
    print(f"{'variant':<12} {'b1 img/s':>9} {'b1 p50':>8} {'b1 p99':>8} {'b32 img/s':>9} {'b32 p50':>9} "
          f"{'b32 p99':>9} {'FPS@256':>8} {'RSS MB':>7} {'size MB':>8} {'acc':>6} {'acc@t':>6} {'recall@t':>8} "
          f"{'thresh':>7}")
    for v in report.variants.values():
        b1, b32 = v.speed.batches["1"], v.speed.batches["32"]
        print(f"{v.name:<12} {b1.throughput_ips:9.1f} {b1.p50_ms:8.2f} {b1.p99_ms:8.2f} {b32.throughput_ips:9.1f} "
              f"{b32.p50_ms:9.1f} {b32.p99_ms:9.1f} {v.fps:8.1f} {v.peak_rss_mb:7.0f} {v.size_mb:8.2f} "
              f"{v.test_argmax.accuracy:6.3f} {v.test_accuracy:6.3f} {v.test_positive_recall or 0:8.3f} "
              f"{v.threshold.threshold:7.4f}")
    print()
    print("calibration (val accuracy / agreement with FP32 / mean |dp|): " + ", ".join(
        f"{c.method} {c.val_accuracy:.4f}/{c.val_agreement:.4f}/{c.val_mean_abs_diff:.4f} ({c.seconds:.0f}s)"
        for c in report.calibration.candidates) + f" -> {report.calibration.chosen}")
    print(f"INT8 vs ONNX FP32 at batch 1: {report.int8_speedup_vs_onnx_fp32:.2f}x; vs PyTorch eager: "
          f"{report.int8_speedup_vs_torch_eager:.2f}x; at batch 32: {report.int8_speedup_vs_onnx_fp32_batch32:.2f}x "
          f"/ {report.int8_speedup_vs_torch_eager_batch32:.2f}x; size {report.int8_size_ratio:.2f}x smaller")
    print(f"INT8 test accuracy drop: {report.int8_accuracy_drop * 100:+.2f} points at the argmax, "
          f"{report.int8_accuracy_drop_at_threshold * 100:+.2f} at the recall-first thresholds; INT8 decides "
          f"{report.int8_test_agreement * 100:.1f} % of the test images as FP32 does")
    print(f"chosen: {report.chosen_variant} (spec met: {report.spec_met}) — {report.choice.why}")
    if abl:
        print()
        print(f"{'configuration (batch 1, interleaved)':<44} {'p50 ms':>7} {'vs FP32':>8} {'val acc':>8} {'MB':>6}")
        for row in abl:
            print(f"{row['config']:<44} {row['p50_ms']:7.2f} {row['speedup_vs_fp32_all']:7.2f}x "
                  f"{row['val_accuracy']:8.4f} {row['size_mb']:6.2f}")
    if profile:
        print()
        kinds = sorted({k for t in profile.values() for k in t}, key=lambda k: -profile["onnx_fp32"].get(k, 0))
        print(f"{'kernel time per kind (ms, batch 1)':<36} {'FP32':>7} {'INT8':>7} {'speedup':>8}")
        for k in [*kinds, "total"]:
            a = sum(profile["onnx_fp32"].values()) if k == "total" else profile["onnx_fp32"].get(k, 0.0)
            b = sum(profile["onnx_int8"].values()) if k == "total" else profile["onnx_int8"].get(k, 0.0)
            print(f"{k:<36} {a:7.2f} {b:7.2f} {a / b if b else float('nan'):7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "dataset": {"name": "ELPV", "images": len(paths), "defect": int((labels == 0).sum()),
                    "splits": {k: len(v) for k, v in parts.items()}, "seed": args.seed},
        "model": {"arch": "efficientnet_lite0", "head": "logistic regression on frozen ImageNet features",
                  **head_info},
        "report": report.model_dump(mode="json"),
        "ablation": abl,
        "kernel_time_ms_by_kind": profile,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }, indent=1))
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
