"""The activation cache: the frozen prefix's output for every labeled image, computed once.

An entry is keyed by (manifest content, arch, weights content, input size) and a freeze boundary::

    trainer/cache/<arch>-<size>/<manifest digest>-<weights digest>/b<boundary>/{train,val,test}.npy
                                                                            /index.json  (written last)

Arrays are float16 (half the bytes; the tail trains in float32). Images go through the network once:
the first request computes the boundary of ``from_unfreeze`` (the deepest the tuner usually asks for),
and every shallower boundary is derived from the nearest cached one by running only the stages in
between — cheap, since those stages work on 7x7 maps.

Augmentation survives the cache as *views* (:mod:`dlforge.trainer.views`): a label-preserving
symmetry applied to the image before the prefix. Each requested view other than the identity has its
own entry ``b<boundary>/views/<view>/{train,val,test}.npy`` + ``index.json``, computed in the same pass
over the decoded images and derived to shallower boundaries like the identity's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from dlforge.common.backends import optional_import
from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.common.objects import ObjectStore
from dlforge.trainer.stages import StagedNetwork
from dlforge.trainer.views import IDENTITY, apply_view
from dlforge.vision.images import to_tensor
from dlforge.vision.manifest import Item, Manifest, load_arrays
from dlforge.vision.networks import NetworkSpec

log = logging.getLogger(__name__)

SPLITS: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")
CACHE_PREFIX = "trainer/cache"

ArrayFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Prefix runners: what pushes images through the frozen prefix
# --------------------------------------------------------------------------------------------


class PrefixRunner(ABC):
    """Plug-in: compiles a frozen module into a batch function float32 NCHW -> float32 activations."""

    name: str = "?"

    @abstractmethod
    def compile(self, module: nn.Module, example: torch.Tensor) -> ArrayFn:
        """A function computing ``module(x)`` for numpy batches shaped like ``example`` (any batch size)."""


class TorchPrefixRunner(PrefixRunner):
    """PyTorch eager in channels-last layout (about 2x faster than NCHW on CPU for depthwise convs)."""

    name = "torch"

    def compile(self, module: nn.Module, example: torch.Tensor) -> ArrayFn:
        module = module.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(x)
                if t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                return module(t).contiguous().numpy()

        return run


class OnnxPrefixRunner(PrefixRunner):
    """ONNX Runtime on the exported prefix: about 3-7x faster than PyTorch eager for EfficientNet on CPU."""

    name = "onnxruntime"

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads

    def compile(self, module: nn.Module, example: torch.Tensor) -> ArrayFn:
        ort = optional_import("onnxruntime", install="pip install onnxruntime", purpose="the onnxruntime cache runner")
        import io

        module = module.eval()
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, input_names=["x"], output_names=["y"],  # type: ignore[arg-type]
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

        def run(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
            return out

        return run


def prefix_runner(name: str, *, threads: int = 2) -> PrefixRunner:
    """The runner called ``name``; onnxruntime falls back to torch when it is not installed."""
    if name == "torch":
        return TorchPrefixRunner()
    if name == "onnxruntime":
        try:
            optional_import("onnxruntime", install="pip install onnxruntime", purpose="the onnxruntime cache runner")
            optional_import("onnx", install="pip install onnx", purpose="exporting the prefix to ONNX")
        except ConfigError as exc:
            log.warning("%s; computing the activation cache with torch instead", exc)
            return TorchPrefixRunner()
        return OnnxPrefixRunner(threads)
    raise ConfigError(f"DLFORGE_TRAINER_PREFIX_RUNNER: unknown runner {name!r}; known: onnxruntime, torch")


# --------------------------------------------------------------------------------------------
# Cached splits
# --------------------------------------------------------------------------------------------


@dataclass
class SplitArrays:
    """Activations of one split with the item ids and labels of their rows."""

    x: np.ndarray
    labels: list[str]
    item_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CachedActivations:
    boundary: int
    splits: dict[str, SplitArrays]
    source: Literal["hit", "derived", "computed"]
    seconds: float
    images_computed: int = 0
    keys: list[str] = field(default_factory=list)
    views: dict[str, dict[str, SplitArrays]] = field(default_factory=dict)  # other views than the identity

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(next(iter(self.splits.values())).x.shape[1:])


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_items(manifest: Manifest) -> dict[str, list[Item]]:
    """The labeled items of each split (items without a split count as train)."""
    out: dict[str, list[Item]] = {str(s): [] for s in SPLITS}
    for item in manifest.items:
        if item.label is None:
            continue
        out[item.split or "train"].append(item)
    return out


class ActivationCache:
    """Finds, derives or computes the activations at a freeze boundary (see the module docstring)."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        work_dir: str | Path,
        runner: PrefixRunner,
        batch_size: int = 32,
        max_bytes: int = 2 << 30,
    ) -> None:
        self.objects = objects
        self.work_dir = Path(work_dir)
        self.runner = runner
        self.batch_size = batch_size
        self.max_bytes = max_bytes

    @staticmethod
    def entry_prefix(*, arch: str, input_size: int, manifest_digest: str, weights_digest: str) -> str:
        return f"{CACHE_PREFIX}/{arch}-{input_size}/{manifest_digest[:24]}-{weights_digest[:24]}"

    def get(
        self,
        *,
        net: StagedNetwork,
        spec: NetworkSpec,
        manifest: Manifest,
        manifest_digest: str,
        weights_digest: str,
        input_size: int,
        boundary: int,
        from_boundary: int | None = None,
        views: Sequence[str] = (IDENTITY,),
    ) -> CachedActivations:
        """The activations at ``boundary`` for every labeled item of ``manifest``, under each of ``views``.

        The identity's arrays are ``splits``; every other view's are ``views[name]`` (same rows).
        """
        started = time.perf_counter()
        prefix = self.entry_prefix(arch=spec.arch, input_size=input_size, manifest_digest=manifest_digest,
                                   weights_digest=weights_digest)
        wanted = [IDENTITY, *(v for v in dict.fromkeys(views) if v != IDENTITY)]
        found: dict[str, dict[str, SplitArrays]] = {}
        sources: dict[str, str] = {}
        to_compute: list[str] = []
        for view in wanted:
            if self._complete(prefix, boundary, view):
                found[view], sources[view] = self._load(prefix, boundary, view), "hit"
                continue
            nearest = max((b for b in self._cached_boundaries(prefix, view) if b < boundary), default=None)
            if nearest is None:
                to_compute.append(view)
            else:
                derived = self._derive(net, self._load(prefix, nearest, view), nearest, boundary)
                self._store(prefix, boundary, derived, view)
                found[view], sources[view] = derived, "derived"
        images = 0
        if to_compute:
            start = boundary if from_boundary is None else min(boundary, from_boundary)
            computed = self._from_images(net, spec, manifest, input_size, start, to_compute)
            images = sum(len(s) for s in computed[to_compute[0]].values())
            for view, splits in computed.items():
                self._store(prefix, start, splits, view)
                if start < boundary:
                    splits = self._derive(net, splits, start, boundary)
                    self._store(prefix, boundary, splits, view)
                found[view], sources[view] = splits, "computed"
        seconds = time.perf_counter() - started
        source = sources[IDENTITY]
        if source != "hit" or len(wanted) > 1:
            log.info("activation cache %s/b%02d: %s in %.1fs (%d images through the network%s)", prefix, boundary,
                     source, seconds, images,
                     "" if len(wanted) == 1 else f"; views {', '.join(f'{v}: {sources[v]}' for v in wanted[1:])}")
        keys = [k for view in wanted for k in self._keys(prefix, boundary, view)]
        return CachedActivations(boundary, found[IDENTITY], source, seconds,  # type: ignore[arg-type]
                                 images, keys=keys, views={v: found[v] for v in wanted[1:]})

    # -- storage ---------------------------------------------------------------------------

    @staticmethod
    def _dir(prefix: str, boundary: int, view: str = IDENTITY) -> str:
        d = f"{prefix}/b{boundary:03d}"
        return d if view == IDENTITY else f"{d}/views/{view}"

    def _keys(self, prefix: str, boundary: int, view: str = IDENTITY) -> list[str]:
        d = self._dir(prefix, boundary, view)
        return [f"{d}/index.json", *(f"{d}/{s}.npy" for s in SPLITS)]

    def _complete(self, prefix: str, boundary: int, view: str = IDENTITY) -> bool:
        return self.objects.exists(f"{self._dir(prefix, boundary, view)}/index.json")

    def _cached_boundaries(self, prefix: str, view: str = IDENTITY) -> list[int]:
        found = []
        tail = ["index.json"] if view == IDENTITY else ["views", view, "index.json"]
        for info in self.objects.list(prefix + "/"):
            parts = info.key[len(prefix) + 1:].split("/")
            if len(parts) == 1 + len(tail) and parts[1:] == tail and parts[0].startswith("b"):
                found.append(int(parts[0][1:]))
        return found

    def _local(self, key: str) -> Path:
        return self.work_dir / "cache" / key

    def _load(self, prefix: str, boundary: int, view: str = IDENTITY) -> dict[str, SplitArrays]:
        d = self._dir(prefix, boundary, view)
        index = self.objects.get_json(f"{d}/index.json")
        out: dict[str, SplitArrays] = {}
        for split in SPLITS:
            key = f"{d}/{split}.npy"
            local = self._local(key)
            if not local.exists() or local.stat().st_size != self.objects.stat(key).size:
                self.objects.get_file(key, local)
            meta = index["splits"][split]
            out[split] = SplitArrays(np.load(local, mmap_mode="r"), list(meta["labels"]), list(meta["item_ids"]))
        return out

    def _store(self, prefix: str, boundary: int, splits: dict[str, SplitArrays], view: str = IDENTITY) -> None:
        d = self._dir(prefix, boundary, view)
        for split in SPLITS:
            key = f"{d}/{split}.npy"
            local = self._local(key)
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".part")
            with tmp.open("wb") as f:
                np.save(f, np.ascontiguousarray(splits[split].x, dtype=np.float16))
            tmp.replace(local)
            self.objects.put_file(key, local)
            splits[split] = SplitArrays(np.load(local, mmap_mode="r"), splits[split].labels, splits[split].item_ids)
        index = {
            "boundary": boundary,
            "view": view,
            "shape": list(splits["train"].x.shape[1:]),
            "dtype": "float16",
            "splits": {s: {"item_ids": splits[s].item_ids, "labels": splits[s].labels} for s in SPLITS},
        }
        self.objects.put_json(f"{d}/index.json", index)  # last: marks the entry complete

    # -- computing -------------------------------------------------------------------------

    def _check_size(self, n: int, row_shape: Sequence[int]) -> None:
        size = n * int(np.prod(row_shape)) * 2
        if size > self.max_bytes:
            raise InvalidInput(
                f"the activation cache at this freeze boundary would take {size / 2**20:.0f} MB "
                f"(> {self.max_bytes / 2**20:.0f} MB): unfreeze fewer stages or raise DLFORGE_TRAINER_CACHE_MAX_MB"
            )

    def _from_images(
        self, net: StagedNetwork, spec: NetworkSpec, manifest: Manifest, input_size: int, boundary: int,
        views: Sequence[str] = (IDENTITY,),
    ) -> dict[str, dict[str, SplitArrays]]:
        """Each view's splits at ``boundary``; every image is fetched and decoded once for all views."""
        items = cached_items(manifest)
        if not any(items.values()):
            raise InvalidInput(f"manifest {manifest.dataset_id}: no labeled items to train on")
        if spec.arch == "efficientnet_lite0" and 0 < boundary <= net.max_unfreeze + 1:
            return {v: self._from_feature_store(net, items, input_size, boundary, v) for v in views}
        prefix = net.span(0, boundary).eval()
        run_spec = NetworkSpec(spec.arch, spec.in_channels, input_size, spec.feature_dim, spec.mean, spec.std)
        example = torch.zeros(1, spec.in_channels, input_size, input_size)
        fn: ArrayFn = (lambda x: x) if boundary == 0 else self.runner.compile(prefix, example)
        with torch.inference_mode():
            row_shape = tuple(prefix(example).shape[1:])
        out: dict[str, dict[str, SplitArrays]] = {v: {} for v in views}
        for split in SPLITS:
            rows = items[split]
            self._check_size(len(rows) * len(views), row_shape)
            xs = {v: np.zeros((len(rows), *row_shape), dtype=np.float16) for v in views}
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                arr = load_arrays(self.objects, chunk, size=input_size, channels=spec.in_channels)
                for view in views:
                    batch = to_tensor(apply_view(view, arr), run_spec).numpy()
                    xs[view][start:start + len(chunk)] = fn(batch)
            for view in views:
                out[view][split] = SplitArrays(xs[view], [str(i.label) for i in rows], [i.item_id for i in rows])
        return out

    def _from_feature_store(
        self, net: StagedNetwork, items: dict[str, list[Item]], input_size: int, boundary: int, view: str
    ) -> dict[str, SplitArrays]:
        """One view's splits from the vision core's feature store: an image another stage (or run) already
        put through the same frozen weights at this size is not run again (keys: the prefix's weights)."""
        from dlforge.vision.features import feature_store
        from dlforge.vision.staged import StagedNetwork as Units
        from dlforge.vision.trunk import TrunkFeatures

        units = Units(net.model, arch="efficientnet_lite0").eval()
        onnx = isinstance(self.runner, OnnxPrefixRunner)
        trunk = TrunkFeatures(feature_store(self.objects), units, runtime="onnxruntime" if onnx else "torch",
                              threads=self.runner.threads if isinstance(self.runner, OnnxPrefixRunner)
                              else torch.get_num_threads(),
                              batch_size=self.batch_size, view=view)
        out: dict[str, SplitArrays] = {}
        for split in SPLITS:
            rows = items[split]
            contents = [i.sha256 for i in rows]
            plain = trunk.for_items(self.objects, rows, size=input_size)

            def load(r: list[int], plain: Callable[[list[int]], np.ndarray] = plain) -> np.ndarray:
                return np.ascontiguousarray(apply_view(view, plain(r)))

            # an empty split gets zero rows of the activations' shape (the vision core's empty-input shapes)
            if boundary <= len(units):
                x = trunk.activations(contents, size=input_size, boundary=boundary, load=load)
            else:  # after the global pooling: the pooled head features
                x = trunk.pooled(contents, size=input_size, stages=["head"], load=load)["head"]
            self._check_size(len(rows), x.shape[1:])
            out[split] = SplitArrays(np.asarray(x, dtype=np.float16), [str(i.label) for i in rows],
                                     [i.item_id for i in rows])
        return out

    def _derive(
        self, net: StagedNetwork, splits: dict[str, SplitArrays], start: int, stop: int
    ) -> dict[str, SplitArrays]:
        between = net.span(start, stop).eval()
        example = torch.zeros(1, *next(iter(splits.values())).x.shape[1:])
        with torch.inference_mode():
            shape = tuple(between(example).shape[1:])
        fn = self.runner.compile(between, example)
        out: dict[str, SplitArrays] = {}
        for split, arrays in splits.items():
            x = np.zeros((len(arrays), *shape), dtype=np.float16)
            for lo in range(0, len(arrays), 256):
                x[lo:lo + 256] = fn(np.asarray(arrays.x[lo:lo + 256], dtype=np.float32))
            out[split] = SplitArrays(x, arrays.labels, arrays.item_ids)
        return out


def manifest_digest(raw: bytes) -> str:
    """Digest of a manifest's bytes (canonicalized so key order does not matter)."""
    return digest_bytes(json.dumps(json.loads(raw), sort_keys=True).encode())
