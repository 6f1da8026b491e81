"""ELPV demo data, CSV answers for the simulated annotator, and the real EfficientNet-Lite0 embedder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dlforge.common.errors import InvalidInput
from dlforge.common.objects.fs import FsObjectStore
from dlforge.labeler.demo_data import elpv_cells, materialize_elpv
from dlforge.labeler.embeddings import EfficientNetLite0Embedder, embed_items, load_embeddings, save_embeddings
from dlforge.labeler.index import build_index, load_index
from dlforge.labeler.ingest import IngestLimits, open_folder, persist, scan
from dlforge.labeler.simulated import answers_key, load_answers_csv, register_answers


def test_elpv_is_complete_and_labels_follow_the_threshold() -> None:
    cells = elpv_cells()
    assert len(cells) == 2624
    defect = [c for c in cells if c.label == "defect"]
    assert len(defect) == 821  # probability >= 0.5: 2/3 and 1
    assert {c.kind for c in cells} == {"mono", "poly"}


def test_materialize_elpv_hides_the_labels(tmp_path: Path) -> None:
    truth = materialize_elpv(tmp_path / "elpv", limit=40)
    assert len(truth) == 40
    assert 8 <= sum(v == "defect" for v in truth.values()) <= 16  # stratified: ~31 % defect
    rows = list(csv.DictReader((tmp_path / "elpv" / "labels.csv").open()))
    assert [r["file"] for r in rows] == sorted(truth)
    assert all(r["label"] == "" for r in rows) and {r["domain"] for r in rows} <= {"mono", "poly"}
    assert sorted(p.name for p in (tmp_path / "elpv").glob("*.png")) == sorted(truth)
    tree = open_folder(tmp_path / "elpv", roots=[tmp_path.resolve()],
                       limits=IngestLimits(max_file_bytes=1 << 20, max_total_bytes=1 << 30, max_entries=10_000))
    result = scan(tree)
    assert result.layout == "csv" and result.labeled_count == 0 and result.classes == []
    assert len(result.items) == 40 and all(i.domain in ("mono", "poly") for i in result.items)


def test_answers_from_csv_and_registration(tmp_path: Path) -> None:
    path = tmp_path / "answers.csv"
    path.write_text("file,label\na.png,good\nb.png,defect\nc.png,\n")
    assert load_answers_csv(path) == {"a.png": "good", "b.png": "defect"}
    path.write_text("a.png;good\nsub/b.png;defect\n")
    assert load_answers_csv(path) == {"a.png": "good", "sub/b.png": "defect"}
    path.write_text("file,label\na.png,\n")
    with pytest.raises(InvalidInput, match="no labels"):
        load_answers_csv(path)
    objects = FsObjectStore(tmp_path / "o")
    key = register_answers(objects, "ds", {"a.png": "good", "b.png": ""})
    assert key == answers_key("ds") and objects.get_json(key) == {"a.png": "good"}


@pytest.mark.slow
def test_efficientnet_embeddings_on_elpv_cells(tmp_path: Path) -> None:
    truth = materialize_elpv(tmp_path / "elpv", limit=20, seed=3)
    tree = open_folder(tmp_path / "elpv", roots=[tmp_path.resolve()],
                       limits=IngestLimits(max_file_bytes=1 << 20, max_total_bytes=1 << 30, max_entries=10_000))
    objects = FsObjectStore(tmp_path / "o")
    manifest = persist(objects, tree, dataset_id="elpv", name="elpv", result=scan(tree))
    embedder = EfficientNetLite0Embedder(size=224, threads=2)
    vectors = embed_items(objects, manifest.items, embedder, batch_size=8)
    assert vectors.shape == (20, 40 + 80 + 112 + 192 + 320 + 1280) and vectors.dtype == np.float32
    assert np.all(np.isfinite(vectors))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # deterministic, batch-size independent, and the same in PyTorch as in ONNX Runtime
    again = embed_items(objects, manifest.items[:3], embedder, batch_size=2)
    assert np.allclose(again, vectors[:3], atol=1e-4)
    in_torch = embed_items(objects, manifest.items[:3], EfficientNetLite0Embedder(size=224, runtime="torch"))
    assert np.allclose(in_torch, vectors[:3], atol=1e-4)
    none = embed_items(objects, [], embedder)  # no items: zero rows of the embedding's width
    assert none.shape == (0, vectors.shape[1]) and none.dtype == np.float32
    # stored and read back only for the same items
    ids = [i.item_id for i in manifest.items]
    save_embeddings(objects, "e.npy", vectors, ids)
    assert np.array_equal(load_embeddings(objects, "e.npy", ids), vectors)  # type: ignore[arg-type]
    assert load_embeddings(objects, "e.npy", ids[::-1]) is None
    # the index finds each cell itself first; distinct cells are not near-duplicates
    index = load_index(build_index(vectors).to_bytes())
    sims, rows = index.search(vectors, 3)
    assert list(rows[:, 0]) == list(range(20))
    assert np.all(sims[:, 1] < 0.999)
    # the embedding carries the defect signal: a cell's nearest other cell shares its label more often than not
    labels = np.array([truth[i.name] for i in manifest.items])
    assert (labels[rows[:, 1]] == labels).mean() >= 0.6
