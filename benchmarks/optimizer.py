"""Optimizer benchmark: EfficientNet-Lite0 on the ELPV solar-cell defects, structured compression vs ONNX FP32.

The model: EfficientNet-Lite0 with its ImageNet weights, frozen, and a 2-class head ("defect", "good";
defect = defect probability >= 0.5 in ELPV's labels.csv) fitted by logistic regression on the frozen
1280-d features of the training split (the regularization C chosen on validation accuracy; the
feature standardization is folded into the linear head). No fine-tuning: this benchmark is about what
the optimizer does to a model, and a linear probe is the quickest honest model of that architecture.

Splits (stratified, seeded): test 10 %, val 15 % of the rest, train the rest — as the labeler does.
Every label is ELPV's own (people's).

The compression study (always): every config of ``--grid`` (prune ratio of the inner channels, rank
fraction of the largest 1x1 convs, the side the network runs at — a resize inside the model —, INT8
on top or not) is built by :mod:`dlforge.optimizer.compression` exactly as the ``pruned`` plug-in
builds it: prune, factorize, distill from the unpruned model for ``--recovery-seconds`` on training
images, refit the head on the teacher's logits, export, INT8 (MinMax, the optimizer's default recipe).
Accuracy is the argmax on validation and test; speed is batch 1, each variant probed in its own
fresh process (its own peak RSS) and every variant once per round, round after round, the reference
(ONNX Runtime FP32 of the unpruned model) among them; a variant's speedup is the median over rounds
of the per-round ratio. The chosen variant is the fastest whose VALIDATION accuracy drops at most
``--max-drop``; its TEST drop is what is reported.

With ``--stage`` the whole stage also runs: :func:`dlforge.optimizer.handlers.optimize` as the service
runs it (export, FP32, INT8 per calibration method, thresholds, test figures, benchmark rounds); with
``--ablation`` besides, what makes INT8 fast on this CPU (quantization format, per-channel weights,
u8 x s8, reduce_range, FP32 stem/head, the graph optimization level), timed interleaved in one process.

    python benchmarks/optimizer.py [--limit N] [--grid p50-s160-int8,...] [--recovery-seconds S] [--rounds R]
        [--threads 1] [--stage [--ablation]] [--out benchmarks/results/optimizer.json]
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
# Structured compression: prune ratio x rank x resolution x INT8, against ONNX FP32 of the unpruned model
# ------------------------------------------------------------------------------------------------

DEFAULT_GRID = ("p0-int8,p25-int8,p50-int8,p50-fp32,p50-r25-int8,s192-p25-int8,s192-p50-int8,"
                "s160-p0-int8,s160-p25-int8,s160-p50-int8,s160-p50-r25-int8")


def parse_grid(text: str) -> list[Any]:
    """``p50-r25-s160-int8,...`` -> CompressionConfigs (p: prune %, r: rank %, s: side, int8|fp32)."""
    from dlforge.optimizer.compression import CompressionConfig

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        kw: dict[str, Any] = {"int8": False}
        for part in item.split("-"):
            if part in ("int8", "fp32"):
                kw["int8"] = part == "int8"
            elif part[:1] == "p":
                kw["prune_ratio"] = int(part[1:]) / 100
            elif part[:1] == "r":
                kw["rank_fraction"] = int(part[1:]) / 100
            elif part[:1] == "s":
                kw["resolution"] = int(part[1:])
            else:
                raise SystemExit(f"bad grid item {item!r}: parts are pNN, rNN, sNNN, int8|fp32")
        out.append(CompressionConfig(**kw))
    return out


def compression_study(work: Path, ckpt: Path, *, recovery: np.ndarray, refit: np.ndarray, calibration: np.ndarray,
                      val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], grid: list[Any],
                      recovery_seconds: float, rounds: int, iterations: int, threads: int,
                      max_drop: float) -> dict[str, Any]:
    """Build every config, measure accuracy (val, test), speed (interleaved in-process) and memory (probes)."""
    import torch

    from dlforge.optimizer.compression import build_variant, onnx_argmax, time_interleaved
    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.measure import probe
    from dlforge.optimizer.probe import ProbeJob
    from dlforge.optimizer.recovery import TeacherTargets, teacher_targets
    from dlforge.optimizer.runners import OrtRunner
    from dlforge.vision.networks import load_checkpoint, spec_of

    net = spec_of("efficientnet_lite0")
    model, _ = load_checkpoint(str(ckpt))
    model.eval()
    size = net.input_size
    ref = export_onnx(model, in_channels=3, input_size=size, path=work / "reference_fp32.onnx",
                      check_inputs=calibration[:4])
    files: dict[str, Path] = {"onnx_fp32": Path(ref.path)}
    built: dict[str, dict[str, Any]] = {"onnx_fp32": {"prune_ratio": 0.0, "rank_fraction": None,
                                                      "network_input_size": size, "int8": False,
                                                      "build_seconds": 0.0}}
    t0 = time.perf_counter()
    targets = teacher_targets(model, recovery)  # once, shared by every variant
    runner = OrtRunner(ref.path, threads=2)
    refit_logits = np.concatenate([runner.run(refit[i:i + 32]) for i in range(0, len(refit), 32)])
    refit_set = (refit, TeacherTargets(torch.from_numpy(refit_logits), None))
    print(f"teacher outputs on {len(recovery)} recovery images (torch) and {len(refit)} head-refit images "
          f"(ONNX Runtime) in {time.perf_counter() - t0:.0f}s", flush=True)
    for cfg in grid:
        t0 = time.perf_counter()
        v = build_variant(model, cfg, recovery=recovery, calibration=calibration, input_size=size, workdir=work,
                          recovery_seconds=recovery_seconds, targets=targets, refit_set=refit_set)
        files[cfg.name] = v.path
        built[cfg.name] = {**dict(v.details), "build_seconds": time.perf_counter() - t0}
        rec, refit = v.details.get("recovery", {}), v.details.get("head_refit", {})
        print(f"built {cfg.name:<26} in {built[cfg.name]['build_seconds']:5.1f}s"
              f" (distillation: {rec.get('steps', 0)} steps, loss {rec.get('loss_first') or 0:.3f} -> "
              f"{rec.get('loss_last') or 0:.3f}; head refit: held-out agreement "
              f"{refit.get('holdout_agreement_before', 1):.3f} -> {refit.get('holdout_agreement', 1):.3f})",
              flush=True)
    (vx, vy), (tx, ty) = val, test
    preds = {k: (onnx_argmax(p, vx, threads=2), onnx_argmax(p, tx, threads=2)) for k, p in files.items()}
    # speed: every session in this process, taking turns call block by call block, round after round
    p50s = time_interleaved(files, calibration[:1], threads=threads, rounds=rounds, calls=iterations)
    # memory: each variant in its own fresh process (its own peak RSS)
    rss: dict[str, float] = {}
    probe_p50: dict[str, float] = {}
    for name, path in files.items():
        job = ProbeJob(runtime="onnxruntime", path=str(path), threads=threads, in_channels=3, input_size=size,
                       mean=list(net.mean), std=list(net.std), frame_size=256, batches=[1], warmup={1: 5},
                       iterations={1: 20}, pipeline_iterations=5)
        res = probe(job)
        rss[name], probe_p50[name] = res.peak_rss_mb, res.batches["1"].p50_ms
    rows = []
    ref_val = float((preds["onnx_fp32"][0] == vy).mean())
    ref_test = float((preds["onnx_fp32"][1] == ty).mean())
    for name, path in files.items():
        ratios = [a / b for a, b in zip(p50s["onnx_fp32"], p50s[name], strict=True)]
        d = built[name]
        val_acc = float((preds[name][0] == vy).mean())
        test_acc = float((preds[name][1] == ty).mean())
        rows.append({
            "variant": name, "prune_ratio": d.get("prune_ratio"), "rank_fraction": d.get("rank_fraction"),
            "network_input_size": d.get("network_input_size"), "int8": bool(d.get("int8")),
            "p50_ms_median": float(np.median(p50s[name])), "p50_ms_rounds": p50s[name],
            "probe_p50_ms": probe_p50[name],
            "speedup_vs_onnx_fp32": float(np.median(ratios)), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "size_mb": path.stat().st_size / 2**20, "peak_rss_mb": rss[name],
            "val_accuracy": val_acc, "val_accuracy_drop": ref_val - val_acc,
            "test_accuracy": test_acc, "test_accuracy_drop": ref_test - test_acc,
            "test_agreement": float((preds[name][1] == preds["onnx_fp32"][1]).mean()),
            "recovery": d.get("recovery"), "head_refit": d.get("head_refit"),
            "factorized_layers": len(d.get("factorized", [])),
            "build_seconds": d["build_seconds"],
        })
    # the choice is made on validation (people's labels too), the figures reported on test
    ok = [r for r in rows if r["val_accuracy_drop"] <= max_drop + 1e-12]
    chosen = max(ok, key=lambda r: r["speedup_vs_onnx_fp32"])
    within_test = [r for r in rows if r["test_accuracy_drop"] <= max_drop + 1e-12]
    frontier = []
    for r in sorted(rows, key=lambda r: -r["speedup_vs_onnx_fp32"]):
        if not frontier or r["test_accuracy"] > frontier[-1]["test_accuracy"]:
            frontier.append(r)
    return {"rows": rows, "chosen": chosen["variant"], "reference_val_accuracy": ref_val,
            "reference_test_accuracy": ref_test,
            "best_within_bound_on_test": max(within_test, key=lambda r: r["speedup_vs_onnx_fp32"])["variant"],
            "frontier": [r["variant"] for r in frontier]}


def print_study(study: dict[str, Any], n_val: int, n_test: int) -> None:
    print()
    print(f"{'variant':<26} {'prune':>5} {'rank':>5} {'side':>4} {'int8':>4} {'p50 ms':>7} {'x FP32':>7} "
          f"{'(min-max)':>11} {'MB':>6} {'RSS MB':>6} {'val acc':>7} {'test acc':>8} {'drop pt':>7} {'agree':>6}")
    for r in study["rows"]:
        mark = " <- chosen" if r["variant"] == study["chosen"] else ""
        print(f"{r['variant']:<26} {r['prune_ratio']:5.2f} {r['rank_fraction'] or 1:5.2f} "
              f"{r['network_input_size']:>4} {'yes' if r['int8'] else 'no':>4} {r['p50_ms_median']:7.2f} "
              f"{r['speedup_vs_onnx_fp32']:6.2f}x {r['speedup_min']:5.2f}-{r['speedup_max']:<5.2f} "
              f"{r['size_mb']:6.2f} {r['peak_rss_mb']:6.0f} {r['val_accuracy']:7.4f} {r['test_accuracy']:8.4f} "
              f"{r['test_accuracy_drop'] * 100:+7.2f} {r['test_agreement']:6.3f}{mark}")
    print(f"(accuracy at the argmax; val {n_val} and test {n_test} images, all labeled by people; chosen: the "
          "fastest whose validation accuracy drop is <= the bound)")


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="use a random subset of N ELPV images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime")
    ap.add_argument("--iterations", type=int, default=20, help="timed batch-1 calls per variant per round")
    ap.add_argument("--iterations-large-batch", type=int, default=8)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--recovery-images", type=int, default=256, help="training images the recovery distills on")
    ap.add_argument("--refit-images", type=int, default=1024, help="training images the head is refitted on")
    ap.add_argument("--recovery-seconds", type=float, default=45.0, help="recovery budget per compressed variant")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="configs: pNN (prune %%), rNN (rank %%), sNNN (side), "
                                                         "int8|fp32, joined by '-', separated by ','")
    ap.add_argument("--max-drop", type=float, default=0.01, help="accuracy a variant may lose (0.01 = 1 point)")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--min-recall", type=float, default=0.9)
    ap.add_argument("--min-accuracy", type=float, default=0.9)
    ap.add_argument("--min-fps", type=float, default=1.0)
    ap.add_argument("--stage", action="store_true",
                    help="also run the whole optimizer stage (optimize()) as the service does")
    ap.add_argument("--ablation", action="store_true", help="with --stage: time INT8/ORT configurations too")
    ap.add_argument("--out", default="benchmarks/results/optimizer.json")
    args = ap.parse_args()

    import torch
    from machine import cpu_name

    from dlforge.common.events import Spec
    from dlforge.optimizer.handlers import LabeledImages, OptimizeInput, OptimizeOptions, optimize, pick_calibration
    from dlforge.optimizer.preprocess import InputFormat, normalize
    from dlforge.vision.networks import spec_of

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    grid = parse_grid(args.grid)
    paths, labels = load_elpv(args.limit, args.seed)
    parts = split(labels, args.seed)
    print(f"ELPV: {len(paths)} images ({int((labels == 0).sum())} defect), "
          + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f"; CPU {cpu_name()}, {args.threads} thread(s)")
    net = spec_of("efficientnet_lite0")
    fmt = InputFormat(3, net.input_size, net.mean, net.std)
    spec = Spec(positive_class="defect", min_recall=args.min_recall, min_accuracy=args.min_accuracy,
                min_fps=args.min_fps, input_size=256)
    report = None
    abl: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dlforge-optbench-") as tmp:
        work = Path(tmp)
        ckpt, head_info = fit_head(work, paths, labels, parts)
        print(f"head: logistic regression C={head_info['C']}, val accuracy {head_info['val_accuracy_sklearn']:.4f} "
              f"(features in {head_info['feature_seconds']:.0f}s)")
        train_ids = [paths[i].name for i in parts["train"]]
        cal_idx = parts["train"][pick_calibration(train_ids, n=args.calibration_images, seed=args.seed)]
        rec_idx = parts["train"][pick_calibration(train_ids, n=args.recovery_images, seed=args.seed + 1)]
        calibration = load_images([paths[i] for i in cal_idx], net.input_size)
        val = LabeledImages(load_images([paths[i] for i in parts["val"]], net.input_size), labels[parts["val"]])
        test = LabeledImages(load_images([paths[i] for i in parts["test"]], net.input_size), labels[parts["test"]])
        recovery = normalize(load_images([paths[i] for i in rec_idx], net.input_size), fmt)
        refit_idx = parts["train"][pick_calibration(train_ids, n=args.refit_images, seed=args.seed + 2)]
        refit = normalize(load_images([paths[i] for i in refit_idx], net.input_size), fmt)
        (work / "compressed").mkdir()
        study = compression_study(
            work / "compressed", ckpt, recovery=recovery, refit=refit, calibration=normalize(calibration, fmt),
            val=(normalize(val.images, fmt), val.labels), test=(normalize(test.images, fmt), test.labels),
            grid=grid, recovery_seconds=args.recovery_seconds, rounds=args.rounds, iterations=args.iterations,
            threads=args.threads, max_drop=args.max_drop)
        if args.stage:
            options = OptimizeOptions(
                calibration_methods=args.methods.split(","), rounds=args.rounds, iterations=args.iterations,
                iterations_large_batch=args.iterations_large_batch, warmup=10, batch_sizes=[1, 32],
                threads=args.threads)
            result = optimize(OptimizeInput(ckpt, ["defect", "good"], spec, calibration, val, test, "elpv",
                                            "efficientnet_lite0-logreg"), workdir=work / "variants", options=options)
            report = result.report
            if args.ablation:
                abl = ablation(work, result.files["onnx_fp32"], normalize(calibration, fmt),
                               (normalize(val.images, fmt), val.labels), rounds=5, calls=20, threads=args.threads)
                profile = where_time_goes({k: result.files[k] for k in ("onnx_fp32", "onnx_int8")},
                                          normalize(calibration[:1], fmt), threads=args.threads)

    print_study(study, len(parts["val"]), len(parts["test"]))
    chosen = next(r for r in study["rows"] if r["variant"] == study["chosen"])
    print(f"chosen {chosen['variant']}: {chosen['speedup_vs_onnx_fp32']:.2f}x ONNX Runtime FP32 of the unpruned model "
          f"at batch 1 (rounds {chosen['speedup_min']:.2f}-{chosen['speedup_max']:.2f}), test accuracy drop "
          f"{chosen['test_accuracy_drop'] * 100:+.2f} points (validation {chosen['val_accuracy_drop'] * 100:+.2f})")
    print("frontier (fastest first, each more accurate than the faster ones): " + ", ".join(study["frontier"]))
    if report is not None:
        print_stage(report, abl, profile)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "best_speedup_vs_onnx_fp32": chosen["speedup_vs_onnx_fp32"],
        "best_accuracy_drop": chosen["test_accuracy_drop"],
        "best_variant": chosen["variant"],
        "target": {"speedup_vs_onnx_fp32": 4.0, "max_accuracy_drop": args.max_drop,
                   "met": chosen["speedup_vs_onnx_fp32"] >= 4.0 and chosen["test_accuracy_drop"] <= args.max_drop},
        "choice_rule": ("fastest variant whose validation accuracy (argmax) drops at most max_accuracy_drop vs ONNX "
                        "Runtime FP32 of the unpruned model; speed = median over rounds of the per-round ratio of "
                        "batch-1 median latencies, all sessions in one process taking turns each round; peak RSS "
                        "from each variant's own probe process"),
        "variants": study["rows"],
        "frontier": study["frontier"],
        "best_within_bound_on_test": study["best_within_bound_on_test"],
        "reference": {"val_accuracy": study["reference_val_accuracy"],
                      "test_accuracy": study["reference_test_accuracy"]},
        "cpu": cpu_name(),
        "threads": args.threads,
        "rounds": args.rounds,
        "recovery_seconds": args.recovery_seconds,
        "recovery_images": len(rec_idx),
        "refit_images": len(refit_idx),
        "dataset": {"name": "ELPV", "images": len(paths), "defect": int((labels == 0).sum()),
                    "splits": {k: len(v) for k, v in parts.items()}, "seed": args.seed,
                    "labels": "ELPV's own (people's) labels for every split"},
        "model": {"arch": "efficientnet_lite0", "head": "logistic regression on frozen ImageNet features",
                  **head_info},
        "stage_report": report.model_dump(mode="json") if report is not None else None,
        "ablation": abl,
        "kernel_time_ms_by_kind": profile,
        "seconds": time.perf_counter() - started,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }, indent=1))
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f}s)")


def print_stage(report: Any, abl: list[dict[str, Any]], profile: dict[str, Any]) -> None:
    """The whole optimizer stage's table (``--stage``)."""
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


if __name__ == "__main__":
    main()
