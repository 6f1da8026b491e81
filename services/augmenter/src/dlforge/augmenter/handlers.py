"""The augmenter's logic, free of bus and stores: plan per class, generate, filter, build the manifest.

:func:`plan_augmentation` turns the real train counts into how many samples each class gets;
:func:`augment` runs a :class:`~dlforge.augmenter.generators.Generator` and a
:class:`~dlforge.augmenter.filters.SampleFilter` over the images a loader hands it and returns
encoded samples with their verdicts; :func:`training_manifest` adds the kept ones to the real items.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dlforge.augmenter.filters import FilterFit, SampleFilter
from dlforge.augmenter.generators import Generator
from dlforge.common.events import AugmentationCount, AugmentationGain, ClassGain
from dlforge.vision.manifest import Item, Manifest

LoadImages = Callable[[Sequence[Item], int, int], np.ndarray]
"""``(items, size, channels) -> uint8 N x size x size x channels``: how :func:`augment` reads real images."""

GENERATED_PREFIX = "augmenter/{dataset_id}/generated/"


# ------------------------------------------------------------------------------------------------
# Counting and planning
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassPlan:
    """How many samples a class gets: enough to reach ``target``, at most ``cap``."""

    label: str
    real: int
    target: int
    needed: int
    cap: int
    generate: int

    @property
    def scarce(self) -> bool:
        return self.needed > 0


def train_items(manifest: Manifest) -> list[Item]:
    """The labeled real items of the train split."""
    return [i for i in manifest.items if i.split == "train" and i.label is not None and i.label_source != "generated"]


def count_train(manifest: Manifest) -> dict[str, int]:
    """Real train items per class, every class of the manifest listed (0 if it has none)."""
    counts = dict.fromkeys(manifest.classes, 0)
    for item in train_items(manifest):
        label = str(item.label)
        counts[label] = counts.get(label, 0) + 1
    return counts


def plan_augmentation(
    counts: Mapping[str, int], *, min_per_class: int, max_imbalance: float, max_generated_ratio: float
) -> list[ClassPlan]:
    """Per class: target = max(min_per_class, ceil(largest / max_imbalance)); generate min(target - real, cap).

    ``cap = floor(max_generated_ratio * real)``: a class never gets more generated samples than that
    (a class without real train images gets none: there is nothing to generate from).
    """
    if max_imbalance < 1.0:
        raise ValueError(f"max_imbalance {max_imbalance} must be >= 1")
    largest = max(counts.values(), default=0)
    by_ratio = math.ceil(largest / max_imbalance - 1e-9) if largest else 0
    plans = []
    for label, real in counts.items():
        target = max(min_per_class, by_ratio)
        needed = max(0, target - real)
        cap = math.floor(max_generated_ratio * real + 1e-9)
        plans.append(ClassPlan(label=label, real=real, target=target, needed=needed, cap=cap,
                               generate=min(needed, cap)))
    return plans


# ------------------------------------------------------------------------------------------------
# Generating and filtering
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedSample:
    """One generated image, encoded, with where it came from and the filter's verdict."""

    sample_id: str
    key: str
    label: str
    parent_id: str
    recipe: str
    confidence: float | None
    predicted: str | None
    kept: bool
    png: bytes = field(repr=False)
    sha256: str
    width: int
    height: int

    def item(self, *, domain: str | None = None) -> Item:
        return Item(
            item_id=self.sample_id, key=self.key, name=f"generated/{self.sample_id}.png", sha256=self.sha256,
            width=self.width, height=self.height, label=self.label, label_source="generated",
            confidence=self.confidence, split="train", domain=domain, parent_id=self.parent_id,
        )

    def record(self) -> dict[str, Any]:
        """The sample as stored in the document store (no pixels)."""
        return {
            "sample_id": self.sample_id, "key": self.key, "label": self.label, "parent_id": self.parent_id,
            "recipe": self.recipe, "confidence": self.confidence, "predicted": self.predicted, "kept": self.kept,
            "width": self.width, "height": self.height, "sha256": self.sha256,
        }


@dataclass(frozen=True)
class AugmentConfig:
    seed: int
    id_prefix: str = "gen"
    max_sources: int = 2000
    max_filter_train: int = 3000
    max_side: int = 512
    chunk: int = 128


@dataclass
class AugmentationOutcome:
    counts: list[AugmentationCount]
    samples: list[GeneratedSample]
    filter_fit: FilterFit | None
    image_size: int | None
    channels: int | None
    timings: dict[str, float]
    gain: AugmentationGain | None = None


def subsample(items: Sequence[Item], limit: int, rng: np.random.Generator) -> list[Item]:
    """At most ``limit`` items, stratified by label, in their original order."""
    if len(items) <= limit:
        return list(items)
    labels = sorted({str(i.label) for i in items})
    chosen: list[int] = []
    for label in labels:
        idx = [n for n, i in enumerate(items) if i.label == label]
        take = max(1, round(limit * len(idx) / len(items)))
        chosen += list(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return [items[n] for n in sorted(chosen)]


def detect_channels(load: LoadImages, items: Sequence[Item]) -> int:
    """1 if the first (up to 16) images are gray (R == G == B), else 3."""
    probe = load(list(items[:16]), 32, 3)
    gray = bool(np.all(probe[..., 0] == probe[..., 1]) and np.all(probe[..., 1] == probe[..., 2]))
    return 1 if gray else 3


def generation_size(items: Sequence[Item], *, max_side: int) -> int:
    """The median longer side of the real images, at most ``max_side``."""
    return int(min(max_side, max(16, int(np.median([max(i.width, i.height) for i in items])))))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def augment(
    manifest: Manifest,
    plans: Sequence[ClassPlan],
    *,
    load: LoadImages,
    generator: Generator,
    sample_filter: SampleFilter,
    config: AugmentConfig,
) -> AugmentationOutcome:
    """Generate ``plan.generate`` samples per class from its real train images and judge each with the filter."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    classes = list(manifest.classes)
    index = {c: n for n, c in enumerate(classes)}
    wanted = {p.label: p.generate for p in plans if p.generate > 0}
    train = train_items(manifest)
    counts_real = {p.label: p.real for p in plans}
    if not wanted:
        timings["augment"] = round(time.perf_counter() - started, 3)
        return AugmentationOutcome(
            counts=[AugmentationCount(label=c, real=counts_real.get(c, 0), generated=0, kept=0) for c in classes],
            samples=[], filter_fit=None, image_size=None, channels=None, timings=timings,
        )

    channels = detect_channels(load, train)
    size = generation_size(train, max_side=config.max_side)

    # The filter learns the real data (all classes), and is scored on the real validation split.
    t = time.perf_counter()
    fit_items = subsample(train, config.max_filter_train, manifest.rng(config.seed, "filter"))
    val = [i for i in manifest.items if i.split == "val" and i.label is not None and i.label_source != "generated"]
    val = subsample(val, config.max_filter_train, manifest.rng(config.seed, "filter-val"))
    filter_size = sample_filter.image_size or size
    fit_images = load(fit_items, filter_size, channels)
    val_images = load(val, filter_size, channels)
    timings["load_real"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = sample_filter.fit(
        fit_images, manifest.label_indices(fit_items), num_classes=len(classes),
        val_images=val_images, val_labels=manifest.label_indices(val),
        contents=[i.sha256 for i in fit_items], val_contents=[i.sha256 for i in val],
    )
    del fit_images, val_images
    timings["fit_filter"] = time.perf_counter() - t

    samples: list[GeneratedSample] = []
    kept_features: list[np.ndarray] = []
    kept_labels: list[int] = []
    timings.update(load_sources=0.0, generate=0.0, judge=0.0, encode=0.0)
    prefix = GENERATED_PREFIX.format(dataset_id=manifest.dataset_id)
    for label, n in wanted.items():
        ci = index[label]
        rng = manifest.rng(config.seed, f"class:{label}")
        t = time.perf_counter()
        members = [i for i in train if i.label == label]
        sources = subsample(members, config.max_sources, rng)
        source_images = load(sources, size, channels)
        timings["load_sources"] += time.perf_counter() - t
        for start in range(0, n, config.chunk):
            k = min(config.chunk, n - start)
            t = time.perf_counter()
            made = generator.generate(source_images, k, rng)
            timings["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            pngs = [encode_png(made.images[j]) for j in range(k)]
            digests = [hashlib.sha256(png).hexdigest() for png in pngs]
            timings["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            # by content: the features of the kept samples stay in the feature store for later stages
            verdict = sample_filter.judge(made.images, np.full(k, ci, dtype=np.int64), contents=digests)
            timings["judge"] += time.perf_counter() - t
            if verdict.features is not None and verdict.keep.any():
                kept_features.append(verdict.features[verdict.keep])
                kept_labels += [ci] * int(verdict.keep.sum())
            for j in range(k):
                sample_id = f"{config.id_prefix}-c{ci}-{start + j:05d}"
                conf = float(verdict.confidence[j])
                samples.append(GeneratedSample(
                    sample_id=sample_id, key=f"{prefix}{sample_id}.png", label=label,
                    parent_id=sources[int(made.parents[j])].item_id, recipe=made.recipes[j],
                    confidence=conf if math.isfinite(conf) else None,
                    predicted=classes[int(verdict.predicted[j])], kept=bool(verdict.keep[j]),
                    png=pngs[j], sha256=digests[j],
                    width=int(made.images.shape[2]), height=int(made.images.shape[1]),
                ))

    generated = {c: 0 for c in classes}
    kept = {c: 0 for c in classes}
    for s in samples:
        generated[s.label] += 1
        kept[s.label] += int(s.kept)
    gain = None
    people = np.array([i.labeled_by_people for i in val], dtype=bool)  # not the labeler's own auto-labels
    if kept_labels and fit.val_predicted is not None and people.any():
        t = time.perf_counter()
        second = sample_filter.second_classifier(np.concatenate(kept_features), np.asarray(kept_labels))
        if second is not None:
            described = str(fit.details.get("classifier", sample_filter.name))
            gain = gain_figures(manifest.label_indices(val)[people], fit.val_predicted[people], second[people],
                                classes, kept=len(kept_labels), classifier=described)
        timings["gain"] = time.perf_counter() - t
    timings["augment"] = time.perf_counter() - started
    return AugmentationOutcome(
        counts=[AugmentationCount(label=c, real=counts_real.get(c, 0), generated=generated[c], kept=kept[c])
                for c in classes],
        samples=samples, filter_fit=fit, image_size=size, channels=channels,
        timings={k: round(v, 3) for k, v in timings.items()}, gain=gain,
    )


def gain_figures(truth: np.ndarray, real_only: np.ndarray, with_kept: np.ndarray, classes: Sequence[str], *,
                 kept: int, classifier: str) -> AugmentationGain:
    """Accuracy and per-class recall and precision of two predictions of the same validation images (the
    classifier trained on real images alone, and on them plus ``kept`` generated samples)."""
    truth, real_only, with_kept = (np.asarray(a, dtype=np.int64) for a in (truth, real_only, with_kept))
    if not len(truth) == len(real_only) == len(with_kept) > 0:
        raise ValueError(f"{len(truth)} labels, {len(real_only)} and {len(with_kept)} predictions")

    def rate(hits: np.ndarray, of: np.ndarray) -> float | None:
        return float(hits[of].mean()) if of.any() else None

    per_class = []
    for c, label in enumerate(classes):
        actual = truth == c
        per_class.append(ClassGain(
            label=label, val_items=int(actual.sum()),
            recall_real=rate(real_only == c, actual), recall_with_kept=rate(with_kept == c, actual),
            precision_real=rate(actual, real_only == c), precision_with_kept=rate(actual, with_kept == c)))
    return AugmentationGain(
        classifier=classifier[:200], val_items=len(truth), kept_samples=kept,
        accuracy_real=float((real_only == truth).mean()), accuracy_with_kept=float((with_kept == truth).mean()),
        changed=int((real_only != with_kept).sum()), per_class=per_class)


GRID_THUMB = 64  # px of each sample in the grid
GRID_PER_ROW = 8  # samples shown per class and verdict
GRID_CAPTION = 170  # px of the row captions on the left
GRID_MAX_CLASSES = 16  # classes shown (the first that got samples, in the manifest's order)


def _confidence(x: GeneratedSample) -> float:
    return x.confidence if x.confidence is not None and math.isfinite(x.confidence) else -math.inf


def _fit(draw: Any, text: str, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels in ``draw``'s font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def samples_grid(samples: Sequence[GeneratedSample], classes: Sequence[str], *, per_row: int = GRID_PER_ROW,
                 thumb: int = GRID_THUMB, max_classes: int = GRID_MAX_CLASSES) -> bytes | None:
    """A PNG of generated samples: for each class that got any (the first ``max_classes``), a row of kept and a
    row of rejected ones, captioned with the verdict and counts first, then the class (cut to fit), each sample
    with the filter's probability of its intended class under it (n/a: the filter gave none). None: nothing
    was generated.

    A row shows up to ``per_row`` samples spread evenly over the filter's confidence, from the most to the
    least confident, so it shows the range the filter saw rather than the first few made.
    """
    from PIL import ImageDraw

    by_class: dict[str, list[GeneratedSample]] = {}
    for x in samples:
        by_class.setdefault(x.label, []).append(x)
    rows: list[tuple[str, str, list[GeneratedSample]]] = []
    for label in [c for c in classes if c in by_class][:max_classes]:
        mine = by_class[label]
        for verdict, keep in (("kept", True), ("rejected", False)):
            group = sorted((x for x in mine if x.kept == keep), key=lambda x: -_confidence(x))
            shown = [group[int(i)] for i in np.unique(np.linspace(0, len(group) - 1, per_row).round())] if group else []
            rows.append((f"{verdict} {len(group)} of {len(mine)}", label, shown))
    if not rows:
        return None
    cell = thumb + 14
    canvas = Image.new("RGB", (GRID_CAPTION + per_row * (thumb + 4), len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (counts, label, shown) in enumerate(rows):
        top = r * (cell + 4)
        draw.text((4, top + thumb // 2 - 14), counts, fill="black")
        draw.text((4, top + thumb // 2 + 2), _fit(draw, label, GRID_CAPTION - 10), fill="#444444")
        for c, x in enumerate(shown):
            left = GRID_CAPTION + c * (thumb + 4)
            with Image.open(io.BytesIO(x.png)) as img:
                canvas.paste(img.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR), (left, top))
            text = "n/a" if math.isinf(_confidence(x)) else f"{x.confidence:.2f}"
            draw.text((left + 2, top + thumb + 1), text, fill="#2a7a2a" if x.kept else "#b03030")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def training_manifest(manifest: Manifest, samples: Sequence[GeneratedSample]) -> Manifest:
    """The real items (every split) followed by the kept generated samples as train items."""
    domains = {i.item_id: i.domain for i in manifest.items}
    extra = [s.item(domain=domains.get(s.parent_id)) for s in samples if s.kept]
    return manifest.model_copy(update={"items": [*manifest.items, *extra]})


def fingerprint(labels_bytes: bytes, *, dataset_id: str, settings: Mapping[str, Any]) -> str:
    """What the output depends on: the labeled manifest's bytes, the data set and the relevant options."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(labels_bytes).digest())
    h.update(json.dumps({"dataset_id": dataset_id, **settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()
