"""Trunk features of stored images through the feature store: computed once, read by every stage.

:class:`TrunkFeatures` gives pooled features at any unit and activations at any freeze boundary
of a :class:`~dlforge.vision.staged.StagedNetwork` (by default the ImageNet EfficientNet-Lite0)
for images named by their content hash. A value already in the store is read; otherwise

* if the activation at the shared boundary (``SHARED_UNFREEZE``) of that image at that size is
  stored and the request lies at or after it, only the units in between run;
* else the trunk runs from pixels **once**, keeping the requested outputs *and* the pooled
  features of every named stage and the shared-boundary activation, so that the next stage's
  request at the same size is answered without another pass from pixels.

Passes from pixels are reported to :mod:`dlforge.vision.observe`. Pooled features are stored as
float32, activations as float16 (as the trainer's cache always did).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlforge.common.backends import optional_import
from dlforge.common.errors import ConfigError
from dlforge.common.objects import ObjectStore
from dlforge.vision import observe
from dlforge.vision.features import FeatureKey, FeatureKind, FeatureStore, feature_store
from dlforge.vision.manifest import Item, load_arrays
from dlforge.vision.networks import spec_of
from dlforge.vision.staged import SHARED_UNFREEZE, StagedNetwork, export_onnx, imagenet_trunk

log = logging.getLogger(__name__)

LoadPixels = Callable[[list[int]], np.ndarray]
"""Indices into the request's contents -> uint8 N x size x size x C at the request's size."""


@dataclass(frozen=True)
class _Out:
    what: str  # "pooled" (GAP of unit ``at``'s output) or "activation" (at boundary ``at``)
    at: int

    @property
    def stop(self) -> int:
        """The boundary this output needs the network up to."""
        return self.at + 1 if self.what == "pooled" else self.at


class _Outputs(torch.nn.Module):
    def __init__(self, net: StagedNetwork, start: int, outs: Sequence[_Out]) -> None:
        super().__init__()
        self.net, self.start = net, start
        self.pooled = [o.at for o in outs if o.what == "pooled"]
        self.boundaries = [o.at for o in outs if o.what == "activation"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled, acts = self.net.outputs(x, start=self.start, pooled=self.pooled, boundaries=self.boundaries)
        return (*pooled, *acts)


class TrunkFeatures:
    """Pooled features and activations of a staged network for stored images (see the module docstring)."""

    def __init__(
        self,
        store: FeatureStore | None,
        net: StagedNetwork | None = None,
        *,
        runtime: str = "onnxruntime",
        threads: int = 2,
        batch_size: int = 32,
        shared_unfreeze: int = SHARED_UNFREEZE,
        view: str = "",
        keep_standard: bool = True,
    ) -> None:
        """``view``: the name of a transform the caller's loader applies to the pixels (a flip, a
        rotation; "" or "identity" for none, the same keys). It enters the keys, and passes are reported
        for ``<content>/<view>``.
        ``keep_standard``: a pass from pixels also stores every named stage's pooled features and the
        shared-boundary activation (for the next service); False stores only what was asked (a view
        only one caller reads)."""
        if runtime not in ("onnxruntime", "torch"):
            raise ConfigError(f"unknown trunk runtime {runtime!r} (onnxruntime or torch)")
        self.store = store
        self.net = net if net is not None else imagenet_trunk()
        self.spec = spec_of(self.net.arch)
        self.runtime = runtime
        self.threads = threads
        self.batch_size = batch_size
        self.shared = self.net.boundary(min(shared_unfreeze, len(self.net)))
        self.view = "" if view == "identity" else view
        self.keep_standard = keep_standard
        self._digests: dict[int, str] = {}

    @classmethod
    def on(cls, objects: ObjectStore, net: StagedNetwork | None = None, **kwargs: Any) -> TrunkFeatures:
        return cls(feature_store(objects), net, **kwargs)

    # -- keys -------------------------------------------------------------------------------

    def preprocess(self) -> str:
        """How pixels become the input: PIL bilinear resize, /255, the spec's mean and std."""
        mode = "L" if self.spec.in_channels == 1 else "RGB"
        base = f"pil-bilinear-{mode}/255/mean{list(self.spec.mean)}/std{list(self.spec.std)}"
        return f"{base}/view={self.view}" if self.view else base

    def trunk_id(self) -> str:
        """Which trunk this is (arch and stem weights), as reported to observers."""
        return f"{self.net.arch}:{self._digest(1)[:16]}"

    def _digest(self, stop: int) -> str:
        if stop not in self._digests:
            self._digests[stop] = self.net.digest(stop)
        return self._digests[stop]

    def kind(self, out: _Out, size: int) -> FeatureKind:
        name = self.net.names[out.at] if out.what == "pooled" else f"b{out.at:02d}"
        return FeatureKind(out.what, weights=self._digest(out.stop), preprocess=self.preprocess(), size=size,
                           stage=name)

    # -- public API -------------------------------------------------------------------------

    def pooled(self, contents: Sequence[str], *, size: int, stages: Sequence[str], load: LoadPixels
               ) -> dict[str, np.ndarray]:
        """float32 N x C pooled features at each of ``stages`` (stage or unit names)."""
        outs = [_Out("pooled", self.net.index(s)) for s in stages]
        got = self._get(contents, size=size, outs=outs, load=load)
        return {s: got[o] for s, o in zip(stages, outs, strict=True)}

    def pooled_arrays(self, pixels: np.ndarray, *, stages: Sequence[str]) -> list[np.ndarray]:
        """Pooled features of images given as uint8 N x S x S x C arrays, computed and not stored."""
        outs = [_Out("pooled", self.net.index(s)) for s in stages]
        if len(pixels) == 0:
            return self._empty(outs, pixels)
        results: list[list[np.ndarray]] = [[] for _ in outs]
        for lo in range(0, len(pixels), self.batch_size):
            for k, arr in enumerate(self._run(self._input(pixels[lo:lo + self.batch_size]), start=0, outs=outs)):
                results[k].append(np.asarray(arr, dtype=np.float32))
        return [np.concatenate(r) for r in results]

    def activation_arrays(self, pixels: np.ndarray, *, boundary: int) -> np.ndarray:
        """float16 activations at freeze boundary ``boundary`` of images given as uint8 N x S x S x C
        arrays, computed and not stored."""
        out = _Out("activation", boundary)
        if len(pixels) == 0:
            return self._empty([out], pixels)[0]
        parts = [self._cast(out, self._run(self._input(pixels[lo:lo + self.batch_size]), start=0, outs=[out])[0])
                 for lo in range(0, len(pixels), self.batch_size)]
        return np.concatenate(parts)

    def _empty(self, outs: Sequence[_Out], pixels: np.ndarray) -> list[np.ndarray]:
        """No rows of each of ``outs``, shaped as for images like ``pixels`` (0 x S x S x C): a caller that
        concatenates or reads ``shape[1:]`` works on an empty set as on any other (one black image's
        forward pass in torch tells the shapes, whatever the runtime: no ONNX export for it)."""
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be N x S x S x C, got shape {pixels.shape}")
        black = torch.from_numpy(self._input(np.zeros((1, *pixels.shape[1:]), dtype=np.uint8)))
        with torch.inference_mode():
            probe = dict(zip(self._ordered(outs), _Outputs(self.net, 0, outs).eval()(black), strict=True))
        return [self._cast(o, np.zeros((0, *probe[o].shape[1:]))) for o in outs]

    @staticmethod
    def _ordered(outs: Sequence[_Out]) -> list[_Out]:
        """``outs`` in the order :class:`_Outputs` returns them: pooled ones first."""
        return [o for o in outs if o.what == "pooled"] + [o for o in outs if o.what == "activation"]

    def activations(self, contents: Sequence[str], *, size: int, boundary: int, load: LoadPixels) -> np.ndarray:
        """float16 activations at freeze boundary ``boundary`` (1 .. len(net)); N x C x H x W."""
        out = _Out("activation", boundary)
        return self._get(contents, size=size, outs=[out], load=load)[out]

    def for_items(self, objects: ObjectStore, items: Sequence[Item], *, size: int) -> LoadPixels:
        """A pixel loader for manifest items (decoded pixels come from the feature store too)."""
        channels = self.spec.in_channels

        def load(rows: list[int]) -> np.ndarray:
            return load_arrays(objects, [items[r] for r in rows], size=size, channels=channels)

        return load

    # -- computing --------------------------------------------------------------------------

    def _standard(self) -> list[_Out]:
        named = sorted({self.net.index(s) for s in self.net.stages})
        return [*(_Out("pooled", u) for u in named), _Out("activation", self.shared)]

    def _get(self, contents: Sequence[str], *, size: int, outs: Sequence[_Out], load: LoadPixels
             ) -> dict[_Out, np.ndarray]:
        contents = list(contents)
        rows_of: dict[str, list[int]] = {}
        for n, c in enumerate(contents):
            rows_of.setdefault(c, []).append(n)
        unique = list(rows_of)
        keys = [FeatureKey(self.kind(o, size), c) for o in outs for c in unique]

        def compute(missing: list[FeatureKey]) -> dict[FeatureKey, np.ndarray]:
            return self._compute(missing, size=size, outs=outs, contents=contents, load=load)

        if self.store is None:
            raise RuntimeError("these TrunkFeatures have no feature store: use pooled_arrays")
        if not unique:
            none = np.zeros((0, size, size, self.spec.in_channels), dtype=np.uint8)
            return dict(zip(outs, self._empty(outs, none), strict=True))
        values = self.store.get_or_compute(keys, compute)
        result: dict[_Out, np.ndarray] = {}
        for k, o in enumerate(outs):
            block = values[k * len(unique):(k + 1) * len(unique)]
            stacked = np.stack(block)
            order = np.empty(len(contents), dtype=np.int64)
            for u, c in enumerate(unique):
                order[rows_of[c]] = u
            result[o] = stacked[order]
        return result

    def _compute(self, missing: list[FeatureKey], *, size: int, outs: Sequence[_Out], contents: list[str],
                 load: LoadPixels) -> dict[FeatureKey, np.ndarray]:
        need = list(dict.fromkeys(k.content for k in missing))
        first_row: dict[str, int] = {}
        for n, c in enumerate(contents):
            first_row.setdefault(c, n)
        computed: dict[FeatureKey, np.ndarray] = {}
        derivable = all(o.stop >= self.shared for o in outs) and self.shared > 0
        from_pixels = need
        if derivable:
            shared_kind = self.kind(_Out("activation", self.shared), size)
            assert self.store is not None
            stored = self.store.get_many([FeatureKey(shared_kind, c) for c in need])
            have = [c for c, v in zip(need, stored, strict=True) if v is not None]
            from_pixels = [c for c, v in zip(need, stored, strict=True) if v is None]
            if have:
                acts = np.stack([v for v in stored if v is not None]).astype(np.float32)
                deeper = [o for o in outs if o.stop > self.shared]
                for o in (o for o in outs if o.stop == self.shared):
                    for c, a in zip(have, acts, strict=True):
                        value = a if o.what == "activation" else a.mean(axis=(1, 2))
                        computed[FeatureKey(self.kind(o, size), c)] = self._cast(o, value)
                if deeper:
                    results = self._run(acts, start=self.shared, outs=deeper)
                    for o, arr in zip(deeper, results, strict=True):
                        for c, a in zip(have, arr, strict=True):
                            computed[FeatureKey(self.kind(o, size), c)] = self._cast(o, a)
        if from_pixels:
            started = time.perf_counter()
            full = list(dict.fromkeys([*outs, *(self._standard() if self.keep_standard else [])]))
            for lo in range(0, len(from_pixels), self.batch_size):
                chunk = from_pixels[lo:lo + self.batch_size]
                pixels = load([first_row[c] for c in chunk])
                x = self._input(pixels)
                results = self._run(x, start=0, outs=full)
                observe.notify_embedded(trunk=self.trunk_id(), size=size,
                                        contents=[f"{c}/{self.view}" for c in chunk] if self.view else chunk)
                for o, arr in zip(full, results, strict=True):
                    for c, a in zip(chunk, arr, strict=True):
                        computed[FeatureKey(self.kind(o, size), c)] = self._cast(o, a)
            log.info("%s at %d px: %d images from pixels in %.1fs", self.net.arch, size, len(from_pixels),
                     time.perf_counter() - started)
        return computed

    @staticmethod
    def _cast(out: _Out, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float16 if out.what == "activation" else np.float32)

    def _input(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        mean = np.array(self.spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.array(self.spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.asarray((x - mean) / std, dtype=np.float32)

    def _run(self, x: np.ndarray, *, start: int, outs: Sequence[_Out]) -> list[np.ndarray]:
        module = _Outputs(self.net, start, outs).eval()
        pooled_first = self._ordered(outs)
        if self.runtime == "onnxruntime":
            key = (start, tuple(pooled_first), x.shape[1:])
            session = self.net.onnx_sessions.get(key)
            if session is None:
                ort = optional_import("onnxruntime", install="pip install onnxruntime",
                                      purpose="the onnxruntime trunk runtime (or runtime='torch')")
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                onnx = export_onnx(module, torch.zeros(1, *x.shape[1:]), outputs=len(outs))
                session = self.net.onnx_sessions[key] = ort.InferenceSession(
                    onnx, options, providers=["CPUExecutionProvider"])
            results = [np.asarray(r) for r in session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})]
        else:
            torch.set_num_threads(self.threads)
            with torch.inference_mode():
                results = [r.numpy() for r in module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))]
        by_out = dict(zip(pooled_first, results, strict=True))
        return [by_out[o] for o in outs]
