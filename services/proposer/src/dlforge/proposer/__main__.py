"""``python -m dlforge.proposer`` serves the proposer; ``... build-repository [--force]`` builds its models."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dlforge.common.app import serve
from dlforge.common.backends import open_docs, open_objects
from dlforge.common.settings import load_settings
from dlforge.proposer.repository import RECIPE_SETS, BuildResult, build_repository, default_sources
from dlforge.proposer.settings import ProposerSettings


async def _build(settings: ProposerSettings, *, force: bool, only: list[str], recipe_set: str | None = None
                 ) -> list[BuildResult]:
    pool = RECIPE_SETS[recipe_set or settings.proposer_repository]
    recipes = [r for r in pool if not only or r.model_id in only]
    unknown = sorted(set(only) - {r.model_id for r in pool})
    if unknown:
        raise SystemExit(f"unknown model id(s) {', '.join(unknown)}; known: "
                         + ", ".join(r.model_id for r in pool))
    docs = open_docs(settings.docs)
    try:
        return await build_repository(
            open_objects(settings.objects), docs, recipes=recipes, force=force,
            sources=default_sources(fashion_mnist_dir=settings.proposer_fashion_mnist_dir,
                                    mnist_path=settings.proposer_mnist_path),
            work_dir=f"{settings.work_dir}/proposer", threads=settings.proposer_torch_threads,
        )
    finally:
        await docs.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlforge.proposer", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the REST API and consume dataset.augmented (the default)")
    build = sub.add_parser("build-repository", help="train/store the repository's candidate models (idempotent)")
    build.add_argument("--force", action="store_true", help="rebuild entries that are already current")
    build.add_argument("--set", dest="recipe_set", choices=sorted(RECIPE_SETS), default=None,
                       help="which Network x Data cells (default: DLFORGE_PROPOSER_REPOSITORY, 'demo')")
    build.add_argument("--only", nargs="*", default=[], metavar="MODEL_ID", help="build only these entries")
    args = parser.parse_args(argv)
    settings = load_settings(ProposerSettings)
    if args.command == "build-repository":
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        results = asyncio.run(_build(settings, force=args.force, only=args.only, recipe_set=args.recipe_set))
        print(f"{'model_id':32} {'action':8} {'seconds':>8}  metrics / error")
        for r in results:
            detail = r.error if r.error else ", ".join(f"{k}={v:.4g}" for k, v in (r.metrics or {}).items())
            print(f"{r.model_id:32} {r.action:8} {r.seconds:8.1f}  {detail}")
        failed = [r for r in results if r.action == "failed"]
        if failed:
            print(f"{len(failed)} model(s) not built; see the messages above for what to install.", file=sys.stderr)
            return 1
        return 0
    from dlforge.proposer.app import create_app

    logging.basicConfig(level=logging.INFO)
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
