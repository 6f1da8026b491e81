"""``dlforge-edge``: run a dlforge model bundle where the platform is not.

- ``dlforge-edge predict BUNDLE IMAGE... [--json]``: the decision for each image.
- ``dlforge-edge bench BUNDLE [--size 256]``: FPS, p50/p99 latency, peak memory, and whether the
  spec's FPS is met on this machine.
- ``dlforge-edge serve BUNDLE [--host 127.0.0.1] [--port 8080]``: ``POST /predict`` with an image.

A bundle whose format version is not the one this release reads, or whose files do not match the
checksums of its manifest, is refused (exit status 2) with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from dlforge_edge.bundle import Bundle, BundleError, load_bundle
from dlforge_edge.model import EdgeModel, ImageRejected, decode
from dlforge_edge.serve import TIMEOUT_SECONDS


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _open(path: str, threads: int) -> EdgeModel:
    import onnxruntime

    bundle: Bundle = load_bundle(path)
    made_with = str((bundle.manifest.get("producer") or {}).get("onnxruntime", ""))
    if made_with and _version_tuple(onnxruntime.__version__) < _version_tuple(made_with):
        print(f"dlforge-edge: note: the bundle was made with onnxruntime {made_with}, this is "
              f"{onnxruntime.__version__}; if the model does not load, install onnxruntime>={made_with}",
              file=sys.stderr)
    return EdgeModel(bundle, threads=threads)


def cmd_predict(args: argparse.Namespace) -> int:
    model = _open(args.bundle, args.threads)
    results = []
    failed = 0
    for name in args.images:
        try:
            data = Path(name).read_bytes()
            decision = model.predict_images([decode(data, name=name)])[0]
            results.append({"image": name, **decision.as_dict()})
        except (OSError, ImageRejected) as exc:
            failed += 1
            results.append({"image": name, "error": str(exc)})
    if args.json:
        print(json.dumps({"model_id": model.bundle.model_id, "variant": model.bundle.variant,
                          "predictions": results}, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: ERROR {r['error']}")
                continue
            extra = (f"; p({r['positive_class']}) = {r['positive_probability']:.4f} vs threshold {r['threshold']:.4f}"
                     if r["positive_class"] is not None else "")
            print(f"{r['image']}: {r['label']} (p = {r['probability']:.4f}{extra})")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dlforge_edge.bench import bench

    model = _open(args.bundle, args.threads)
    size = args.size or int(model.bundle.spec.get("input_size") or 256)
    result = bench(model, size=size, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    threads = f"{args.threads} intra-op threads" if args.threads else "onnxruntime's default threads"
    peak = f"{result.peak_rss_mb:.0f} MiB" if result.peak_rss_mb is not None else "unknown here"
    if result.spec_fps_met is None:
        verdict = "the spec sets no FPS"
    else:
        verdict = (f"spec FPS {result.spec_min_fps:g}: {'MET' if result.spec_fps_met else 'NOT MET'} on this "
                   "machine")
    print(f"{model.bundle.model_id} ({model.bundle.variant}): {size}x{size} frame -> {result.input_size}x"
          f"{result.input_size} input, batch 1, {threads}, {result.iterations} calls")
    print(f"  FPS          {result.fps:10.1f}")
    print(f"  latency p50  {result.latency_p50_ms:10.2f} ms")
    print(f"  latency p99  {result.latency_p99_ms:10.2f} ms")
    print(f"  peak memory  {peak:>10}")
    print(f"  {verdict}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dlforge_edge.serve import make_server

    model = _open(args.bundle, args.threads)
    server = make_server(model, host=args.host, port=args.port, timeout=args.timeout)
    host, port = server.server_address[:2]
    print(f"dlforge-edge: serving {model.bundle.model_id} ({model.bundle.variant}) at http://{host}:{port}/predict "
          "(POST an image's bytes; Ctrl-C stops)", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it: a normal exit
        server.serve_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlforge-edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("bundle", help="the bundle zip (dlforge bundle RUN_ID -o FILE)")
        p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")

    predict = sub.add_parser("predict", help="classify images")
    common(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="FPS, p50/p99 latency, peak memory; is the spec's FPS met here?")
    common(bench)
    bench.add_argument("--size", type=int, default=None,
                       help="side of the square frame fed to the pipeline (default: the spec's frame size)")
    bench.add_argument("--iterations", type=int, default=100)
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="a small HTTP endpoint: POST /predict with an image's bytes")
    common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8080, help="port (0: a free one)")
    serve.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS,
                       help=f"seconds a connection may stay silent before it is closed (default {TIMEOUT_SECONDS:g})")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DLFORGE_EDGE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0) < 0:
        print("dlforge-edge: --threads must be 0 or more", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except BundleError as exc:
        print(f"dlforge-edge: refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"dlforge-edge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
