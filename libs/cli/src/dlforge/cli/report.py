"""What only the CLI adds to a run's report: the auto-labels checked against the answers it was given.

The report itself is built by :mod:`dlforge.common.report` (the run view serves the same one).
"""

from __future__ import annotations

from typing import Any

from dlforge.common.objects import ObjectStore
from dlforge.vision.manifest import load_manifest


def auto_label_accuracy(objects: ObjectStore, labels_key: str, truth: dict[str, str]) -> dict[str, Any]:
    """Accuracy of the auto-labeled items against known labels (by file name)."""
    manifest = load_manifest(objects, labels_key)
    auto = [i for i in manifest.items if i.label_source == "auto" and i.name in truth]
    human = [i for i in manifest.items if i.label_source == "human" and i.name in truth]
    correct = sum(1 for i in auto if i.label == truth[i.name])
    return {
        "auto_labeled": len(auto),
        "auto_correct": correct,
        "auto_label_accuracy": round(correct / len(auto), 4) if auto else None,
        "human_label_agreement": round(sum(1 for i in human if i.label == truth[i.name]) / len(human), 4)
        if human else None,
    }


def add_truth(report: dict[str, Any], *, objects: ObjectStore, labels_key: str | None,
              truth: dict[str, str] | None) -> dict[str, Any]:
    """``report`` with ``auto_label_accuracy`` (and ``auto_labeling``) measured against ``truth``, when
    both the truth and the labeled manifest are there."""
    if not truth or not labels_key:
        return report
    acc = auto_label_accuracy(objects, labels_key, truth)
    return {**report, "auto_label_accuracy": acc.pop("auto_label_accuracy"), "auto_labeling": acc}
