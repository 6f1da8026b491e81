"""INT8 vs FP32 speed of EfficientNet-Lite0 on ONNX Runtime, by intra-op threads, robust to a noisy machine.

The optimizer reports one INT8/FP32 ratio per run; on a shared 2-core machine that ratio swings with
whatever else runs (a busy core stalls FP32's two-thread convolutions more than INT8's). This benchmark
measures the ratio carefully: every configuration is timed in its own fresh process (the optimizer's
probe child), configurations take turns round after round, and the table gives each one's best and
median batch-1 p50 over the rounds. Ratios are FP32 / INT8 at the same thread count.

The model: EfficientNet-Lite0 with its ImageNet weights and a 2-class head (speed does not depend on
the head's values), exported as the optimizer exports it; INT8 is the optimizer's default static QDQ
recipe (per-channel symmetric int8 weights, uint8 activations, MinMax calibration on ELPV images), with
the stem and head kept FP32 (the default) and with every layer INT8.

    python benchmarks/int8_speed.py [--rounds 5] [--sizes 224] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_name


def build_models(work: Path, size: int) -> dict[str, Path]:
    """FP32 ONNX, INT8 (stem and head FP32) and INT8 (every layer) at ``size``."""
    from optimizer import load_elpv, load_images  # the optimizer benchmark beside this file

    from dlforge.optimizer.compressors import OrtStaticInt8, Source
    from dlforge.optimizer.export import export_onnx
    from dlforge.optimizer.preprocess import InputFormat, normalize
    from dlforge.vision.networks import build_network, spec_of

    net = spec_of("efficientnet_lite0")
    fmt = InputFormat(3, size, net.mean, net.std)
    paths, _ = load_elpv(None, 0)
    images = normalize(load_images(paths[:72], size), fmt)
    model = build_network("efficientnet_lite0", 2, pretrained=True).eval()
    exported = export_onnx(model, in_channels=3, input_size=size, path=work / f"fp32_{size}.onnx",
                           check_inputs=images[:4])
    source = Source(Path(exported.path), exported.input_name, (3, size, size))
    calibration = images[8:72]
    int8 = OrtStaticInt8(method="minmax", name=f"int8_{size}").compress(source, calibration, work)
    every = OrtStaticInt8(method="minmax", fp32_ends=False, name=f"int8_all_{size}").compress(source, calibration, work)
    return {"onnx_fp32": Path(exported.path), "onnx_int8": int8.path, "onnx_int8_every_layer": every.path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=100, help="timed batch-1 calls per probe")
    ap.add_argument("--sizes", default="224", help="input sides, comma-separated")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    ap.add_argument("--out", default="benchmarks/results/int8_speed.json")
    args = ap.parse_args()

    from dlforge.optimizer.measure import probe
    from dlforge.optimizer.probe import ProbeJob
    from dlforge.vision.networks import spec_of

    net = spec_of("efficientnet_lite0")
    sizes = [int(s) for s in args.sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    started, load_at_start = time.perf_counter(), os.getloadavg()
    p50s: dict[tuple[int, int, str], list[float]] = {}
    sizes_mb: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="dlforge-int8speed-") as tmp:
        models = {size: build_models(Path(tmp), size) for size in sizes}
        for size, files in models.items():
            for name, path in files.items():
                sizes_mb[(size, name)] = path.stat().st_size / 2**20
        for r in range(args.rounds):
            for size, files in models.items():
                for threads in thread_counts:
                    for name, path in files.items():
                        job = ProbeJob(runtime="onnxruntime", path=str(path), threads=threads, in_channels=3,
                                       input_size=size, mean=list(net.mean), std=list(net.std), frame_size=size,
                                       batches=[1], warmup={1: 10}, iterations={1: args.iterations},
                                       pipeline_iterations=2)
                        p50s.setdefault((size, threads, name), []).append(probe(job).batches["1"].p50_ms)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows: list[dict[str, Any]] = []
    for (size, threads, name), values in p50s.items():
        ref = p50s[(size, threads, "onnx_fp32")]
        rows.append({
            "input_size": size, "threads": threads, "variant": name, "size_mb": sizes_mb[(size, name)],
            "p50_ms_best": min(values), "p50_ms_median": statistics.median(values), "p50_ms_rounds": values,
            "speedup_vs_fp32_best": min(ref) / min(values),
            "speedup_vs_fp32_median": statistics.median(ref) / statistics.median(values),
        })
    print()
    print(f"{'size':>4} {'thr':>3} {'variant':<22} {'best p50 ms':>11} {'median p50':>10} "
          f"{'x FP32 (best)':>13} {'x FP32 (median)':>15} {'MB':>6}")
    for row in rows:
        print(f"{row['input_size']:>4} {row['threads']:>3} {row['variant']:<22} {row['p50_ms_best']:11.2f} "
              f"{row['p50_ms_median']:10.2f} {row['speedup_vs_fp32_best']:13.2f} "
              f"{row['speedup_vs_fp32_median']:15.2f} {row['size_mb']:6.2f}")
    cpu = cpu_name()
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    import onnxruntime

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "rows": rows, "rounds": args.rounds, "iterations": args.iterations,
        "cpu": cpu, "avx512_vnni": " avx512_vnni" in flags, "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }, indent=1))
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
