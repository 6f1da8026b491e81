"""GPU check: one command for a person with an NVIDIA GPU; what dlforge's GPU paths do on it.

    python benchmarks/gpu_check.py               # a few minutes on a GPU
    python benchmarks/gpu_check.py --rows 512    # quicker

1. devices: torch and its CUDA build, every GPU (name, memory, compute capability), NCCL, the CPU;
2. training on 1 GPU through the trainer's loop (:func:`dlforge.trainer.training.fit`): the tail of
   EfficientNet-Lite0 (2 stages unfrozen) on synthetic activations, float32 and mixed precision (float16
   autocast + GradScaler, what ``DLFORGE_TRAINER_DEVICE=cuda`` trains with), against the same run on the CPU;
3. DDP over every GPU (the trainer's ``ddp`` engine: one process per GPU, NCCL), when there are 2 or more;
4. a TensorRT FP16 engine built from the ONNX export of EfficientNet-Lite0 by the optimizer's TensorRT
   plug-in (:class:`dlforge.optimizer.compressors.TensorRTEngine`), run with its TensorRT runner and
   compared with ONNX Runtime on the CPU (largest logit difference, ms per batch).

Prints a table and writes benchmarks/results/gpu_check.json. Without a CUDA device it says so, runs the
CPU part, reports what the GPU steps need, and exits 0. Synthetic activations measure speed, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_name

from dlforge.trainer.engines import DdpEngine, FitJob
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.stages import staged
from dlforge.trainer.training import FitResult, TrainData, fit
from dlforge.vision.networks import build_network

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = "efficientnet_lite0"
UNFREEZE = 2


class _Quiet:
    def on_step(self, step: int, loss: float) -> None:
        """Not reported."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Not kept."""


def devices() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cpu": cpu_name(),
                           "cpus": os.cpu_count(), "python": platform.python_version(),
                           "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
        out["cudnn"] = torch.backends.cudnn.version()
        import torch.distributed as dist

        version = torch.cuda.nccl.version() if dist.is_nccl_available() else None  # a tuple (an int in old torch)
        out["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    return out


def workload(rows: int, *, seed: int = 0) -> tuple[torch.nn.Module, TrainData]:
    """The tail of EfficientNet-Lite0 past the freeze boundary, and synthetic activations at that boundary."""
    net = staged(build_network(ARCH, 2, pretrained=False))
    boundary = net.boundary(UNFREEZE)
    with torch.inference_mode():
        shape = tuple(net.span(0, boundary).eval()(torch.zeros(1, 3, 224, 224)).shape[1:])
    rng = np.random.default_rng(seed)
    n_val = max(16, rows // 8)
    y = rng.integers(0, 2, size=rows + n_val)
    x = rng.normal(size=(rows + n_val, *shape)).astype(np.float16)
    x[y == 1] += np.float16(0.1)  # something to learn
    data = TrainData(x[:rows], y[:rows], x[rows:], y[rows:], ["a", "b"])
    return net.tail(UNFREEZE), data


def _row(name: str, device: str, precision: str, workers: int, result: FitResult | None, *, status: str = "ok",
         rows: int = 0) -> dict[str, Any]:
    last = result.epochs[-1] if result and result.epochs else None
    return {"step": name, "device": device, "precision": precision, "workers": workers, "rows": rows,
            "images_per_second": round(last.images_per_second, 1) if last else None,
            "epoch_seconds": round(last.seconds, 3) if last else None,
            "train_loss": round(last.train_loss, 4) if last else None, "status": status}


def train_runs(rows: int, cpu_rows: int, epochs: int, batch: int, work: Path) -> list[dict[str, Any]]:
    hp = TrainParams(lr=1e-3, batch_size=batch, epochs=epochs, unfreeze=UNFREEZE, class_weighting="none", seed=0)
    out = []
    tail, data = workload(cpu_rows)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    res = fit(tail, data, hp, listener=_Quiet(), device=torch.device("cpu"))
    out.append(_row("train, CPU reference", "cpu", "fp32", 1, res, rows=cpu_rows))
    if not torch.cuda.is_available():
        return out
    tail, data = workload(rows)
    initial = {k: v.clone() for k, v in tail.state_dict().items()}
    for amp in (False, True):
        tail.load_state_dict(initial)
        torch.cuda.synchronize()
        res = fit(tail, data, hp, listener=_Quiet(), device=torch.device("cuda", 0), amp=amp)
        torch.cuda.synchronize()
        out.append(_row(f"train, 1 GPU{' (AMP)' if amp else ''}", "cuda:0", "fp16 autocast" if amp else "fp32", 1,
                        res, rows=rows))
        tail.cpu()
    n = torch.cuda.device_count()
    if n < 2:
        out.append(_row("DDP over all GPUs", "cuda", "fp16 autocast", n, None, status="skipped: 1 GPU", rows=rows))
        return out
    tail.load_state_dict(initial)
    try:
        res = DdpEngine().run(FitJob(tail=tail, data=data, hparams=hp, no_of_workers=n, device="cuda",
                                     work_dir=work), _Quiet())
        out.append(_row(f"DDP over {n} GPUs (NCCL)", "cuda", "fp16 autocast", n, res, rows=rows))
    except Exception as exc:  # a check reports what failed and goes on
        traceback.print_exc()
        out.append(_row(f"DDP over {n} GPUs (NCCL)", "cuda", "fp16 autocast", n, None,
                        status=f"failed: {type(exc).__name__}: {exc}", rows=rows))
    return out


def tensorrt_run(work: Path, batch: int) -> dict[str, Any]:
    """Build the FP16 engine with the optimizer's plug-in; run it against ONNX Runtime on the CPU."""
    from dlforge.optimizer.compressors import Source, TensorRTEngine

    engine = TensorRTEngine(precision="fp16", max_batch=batch)
    missing = engine.unavailable()
    if missing is not None:
        return {"step": "TensorRT FP16 engine", "status": f"skipped: {missing}"}
    if not torch.cuda.is_available():
        return {"step": "TensorRT FP16 engine", "status": "skipped: no CUDA device"}
    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.runners import OrtRunner, TensorRTRunner

    torch.manual_seed(0)
    model = build_network(ARCH, 2, pretrained=False).eval()
    x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    exported = export_onnx(model, in_channels=3, input_size=224, path=work / "model.onnx", check_inputs=x[:4])
    t0 = time.perf_counter()
    variant = engine.compress(Source(onnx_path=Path(exported.path), input_name=exported.input_name,
                                     input_shape=(3, 224, 224)), x[:8], work)
    build_seconds = time.perf_counter() - t0
    trt, ort = TensorRTRunner(variant.path), OrtRunner(exported.path, threads=os.cpu_count() or 1)
    ref = ort.run(x)
    got = trt.run(x)
    trt.run(x)  # warm
    t0 = time.perf_counter()
    for _ in range(20):
        trt.run(x)
    trt_ms = (time.perf_counter() - t0) / 20 * 1000
    t0 = time.perf_counter()
    for _ in range(3):
        ort.run(x)
    ort_ms = (time.perf_counter() - t0) / 3 * 1000
    return {"step": "TensorRT FP16 engine", "status": "ok", "build_seconds": round(build_seconds, 1),
            "engine_mb": round(variant.path.stat().st_size / 2**20, 1), "batch": batch,
            "ms_per_batch_tensorrt": round(trt_ms, 2), "ms_per_batch_onnxruntime_cpu": round(ort_ms, 1),
            "max_abs_logit_diff_vs_onnxruntime_fp32": round(float(np.abs(got - ref).max()), 4),
            "tensorrt": variant.details.get("tensorrt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="synthetic activation rows trained on the GPU")
    parser.add_argument("--cpu-rows", type=int, default=256, help="rows of the CPU reference run")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch's speed is reported (the first warms)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()

    dev = devices()
    print(f"torch {dev['torch']} (CUDA build: {dev['cuda_build'] or 'none'}); CPU: {dev['cpu']} x {dev['cpus']}")
    if not dev["cuda_available"]:
        print("no CUDA device: torch.cuda.is_available() is False -- the GPU steps are skipped; the CPU part runs")
    for g in dev["gpus"]:
        print(f"GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}")
    if dev["gpus"]:
        print(f"cuDNN {dev['cudnn']}, NCCL {dev['nccl']}, bf16 supported: {dev['bf16_supported']}")

    with tempfile.TemporaryDirectory(prefix="dlforge-gpu-check-") as tmp:
        work = Path(tmp)
        runs = train_runs(args.rows, args.cpu_rows, args.epochs, args.batch, work)
        try:
            trt = tensorrt_run(work, min(args.batch, 32))
        except Exception as exc:  # a check reports what failed
            traceback.print_exc()
            trt = {"step": "TensorRT FP16 engine", "status": f"failed: {type(exc).__name__}: {exc}"}

    skipped = [] if dev["cuda_available"] else [
        {"step": s, "status": "skipped: no CUDA device"}
        for s in ("train, 1 GPU", "train, 1 GPU (AMP)", "DDP over all GPUs")]
    result = {"devices": dev, "settings": vars(args) | {"out": str(args.out)}, "training": runs,
              "skipped_training": skipped, "tensorrt": trt}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print()
    head = f"{'step':<28} {'device':<7} {'precision':<14} {'workers':>7} {'rows':>6} {'img/s':>9} {'loss':>7}  status"
    print(head)
    print("-" * len(head))
    for r in runs:
        ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] is not None else "-"
        loss = f"{r['train_loss']:.3f}" if r["train_loss"] is not None else "-"
        print(f"{r['step']:<28} {r['device']:<7} {r['precision']:<14} {r['workers']:>7} {r['rows']:>6} {ips:>9} "
              f"{loss:>7}  {r['status']}")
    for r in result["skipped_training"]:
        print(f"{r['step']:<28} {'-':<7} {'-':<14} {'-':>7} {'-':>6} {'-':>9} {'-':>7}  {r['status']}")
    one = next((r for r in runs if r["step"] == "train, 1 GPU"), None)
    amp = next((r for r in runs if r["step"] == "train, 1 GPU (AMP)"), None)
    ddp = next((r for r in runs if r["step"].startswith("DDP") and r["images_per_second"]), None)
    if one and amp:
        print(f"AMP / fp32 on 1 GPU: {amp['images_per_second'] / one['images_per_second']:.2f}x")
    if amp and ddp:
        print(f"DDP over {ddp['workers']} GPUs / 1 GPU (both AMP): "
              f"{ddp['images_per_second'] / amp['images_per_second']:.2f}x")
    if trt["status"] == "ok":
        print(f"TensorRT FP16 engine: built in {trt['build_seconds']} s ({trt['engine_mb']} MB); batch {trt['batch']}: "
              f"{trt['ms_per_batch_tensorrt']} ms vs ONNX Runtime CPU {trt['ms_per_batch_onnxruntime_cpu']} ms; "
              f"max |logit diff| {trt['max_abs_logit_diff_vs_onnxruntime_fp32']}")
    else:
        print(f"TensorRT FP16 engine: {trt['status']}")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
