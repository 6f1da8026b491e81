"""Ingestion as pure functions: layouts, bad files, duplicates and every refusal."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from labeler_testkit import LIMITS, lying_zip, make_zip, png, zip_with_symlink

from dlforge.common.errors import InvalidInput
from dlforge.common.objects.fs import FsObjectStore
from dlforge.labeler.ingest import (
    IngestLimits,
    ZipTree,
    item_key,
    manifest_key,
    open_folder,
    open_zip,
    parse_csv,
    persist,
    scan,
)
from dlforge.vision.manifest import load_manifest


def scan_zip(data: bytes, limits: IngestLimits = LIMITS, **kw: object):  # type: ignore[no-untyped-def]
    tree = open_zip(io.BytesIO(data), limits)
    return scan(tree, **kw)  # type: ignore[arg-type]


def refused(data: bytes, limits: IngestLimits = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        scan_zip(data, limits)
    return info.value


# ---------------------------------------------------------------------------------- layouts


def test_class_folders_label_by_folder_name() -> None:
    data = make_zip({"cats/a.png": png(1), "cats/b.png": png(2), "dogs/c.png": png(3), "dogs/sub/d.png": png(4)})
    result = scan_zip(data)
    assert result.layout == "class_folders"
    assert {i.name: i.label for i in result.items} == {"cats/a.png": "cats", "cats/b.png": "cats",
                                                        "dogs/c.png": "dogs", "dogs/sub/d.png": "dogs"}
    assert result.classes == ["cats", "dogs"]
    assert result.rejected == [] and result.duplicates == []


def test_wrapper_folder_is_stripped() -> None:
    data = make_zip({"mydata/cats/a.png": png(1), "mydata/dogs/b.png": png(2)})
    result = scan_zip(data)
    assert result.layout == "class_folders"
    assert sorted(i.label for i in result.items) == ["cats", "dogs"]
    assert sorted(i.name for i in result.items) == ["cats/a.png", "dogs/b.png"]


def test_csv_with_partial_labels_and_domain() -> None:
    csv = b"file,label,domain\na.png,good,mono\nb.png,,poly\nc.png,defect,\n"
    data = make_zip({"labels.csv": csv, "a.png": png(1), "b.png": png(2), "c.png": png(3), "d.png": png(4)})
    result = scan_zip(data)
    assert result.layout == "csv" and result.csv_name == "labels.csv"
    by_name = {i.name: i for i in result.items}
    assert by_name["a.png"].label == "good" and by_name["a.png"].domain == "mono"
    assert by_name["b.png"].label is None and by_name["b.png"].domain == "poly"
    assert by_name["c.png"].label == "defect"
    assert by_name["d.png"].label is None  # present but not listed: unlabeled, not dropped
    assert result.classes == ["defect", "good"]
    assert result.labeled_count == 2


def test_csv_columns_detected_by_other_header_names_and_order() -> None:
    csv = b"Class;Image Path\ncat;imgs/a.png\n;imgs/b.png\n"
    data = make_zip({"manifest.csv": csv, "imgs/a.png": png(1), "imgs/b.png": png(2)})
    result = scan_zip(data)
    assert {i.name: i.label for i in result.items} == {"imgs/a.png": "cat", "imgs/b.png": None}


def test_csv_without_header_detected_by_content() -> None:
    csv = b"a.png good\nb.png defect\nc.png\n"
    result = scan_zip(make_zip({"labels.csv": csv, "a.png": png(1), "b.png": png(2), "c.png": png(3)}))
    assert {i.name: i.label for i in result.items} == {"a.png": "good", "b.png": "defect", "c.png": None}


def test_csv_naming_missing_files_is_refused() -> None:
    csv = b"file,label\na.png,good\nghost.png,bad\nphantom.png,bad\n"
    exc = refused(make_zip({"labels.csv": csv, "a.png": png(1)}))
    assert exc.status_code == 422
    assert "ghost.png" in str(exc) and "phantom.png" in str(exc) and "2 file(s)" in str(exc)


def test_csv_without_file_column_is_refused() -> None:
    exc = refused(make_zip({"labels.csv": b"label,score\ngood,1\nbad,2\n", "a.png": png(1)}))
    assert exc.status_code == 422 and "no file column" in str(exc)
    exc = refused(make_zip({"labels.csv": b"good,1\nbad,2\n", "a.png": png(1)}))
    assert exc.status_code == 422 and "no file column" in str(exc)


def test_csv_escaping_the_folder_is_refused() -> None:
    exc = refused(make_zip({"labels.csv": b"file,label\n../../etc/passwd,x\n", "a.png": png(1)}))
    assert exc.status_code == 422 and "outside the dataset folder" in str(exc)


def test_flat_folder_without_csv_is_unlabeled() -> None:
    result = scan_zip(make_zip({"a.png": png(1), "b.png": png(2)}))
    assert result.layout == "flat" and result.classes == [] and all(i.label is None for i in result.items)


# ---------------------------------------------------------------------- bad files, duplicates


def test_bad_images_are_reported_one_by_one() -> None:
    data = make_zip({
        "ok/a.png": png(1), "ok/b.png": png(2),
        "ok/truncated.png": png(3)[:60],
        "ok/notes.txt": b"hello",
        "ko/tiny.png": png(4, size=4),
    })
    result = scan_zip(data)
    assert sorted(i.name for i in result.items) == ["ok/a.png", "ok/b.png"]
    reasons = {r.name: r.reason for r in result.rejected}
    assert set(reasons) == {"ok/truncated.png", "ok/notes.txt", "ko/tiny.png"}
    assert "not a readable image" in reasons["ok/notes.txt"]
    assert "not a readable image" in reasons["ok/truncated.png"]
    assert "smaller than 8x8" in reasons["ko/tiny.png"]


def test_duplicates_by_content_hash() -> None:
    same = png(7)
    result = scan_zip(make_zip({"a/x.png": same, "a/y.png": png(8), "b/x_copy.png": same, "b/z.png": same}))
    assert len(result.items) == 2
    assert sorted((d.name, d.duplicate_of) for d in result.duplicates) == [("b/x_copy.png", "a/x.png"),
                                                                           ("b/z.png", "a/x.png")]


def test_hidden_files_are_listed_as_skipped() -> None:
    result = scan_zip(make_zip({"a.png": png(1), "__MACOSX/._a.png": b"junk", ".DS_Store": b"junk"}))
    assert [i.name for i in result.items] == ["a.png"]
    assert sorted(result.skipped) == [".DS_Store", "__MACOSX/._a.png"]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "a\\..\\..\\evil.png"])
def test_path_traversal_is_refused(name: str) -> None:
    exc = refused(make_zip({"a.png": png(1), name: png(2)}))
    assert exc.status_code == 422 and "escape" in str(exc)


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png"])
def test_absolute_path_is_refused(name: str) -> None:
    exc = refused(make_zip({"a.png": png(1), name: png(2)}))
    assert exc.status_code == 422 and "absolute path" in str(exc)


def test_symlink_entry_is_refused() -> None:
    exc = refused(zip_with_symlink("cats/link.png", "/etc/passwd", {"cats/a.png": png(1)}))
    assert exc.status_code == 422 and "symlink" in str(exc)


def test_oversize_file_declared_is_refused() -> None:
    exc = refused(make_zip({"a.png": png(1), "big.png": b"\0" * (LIMITS.max_file_bytes + 1)}))
    assert exc.status_code == 413 and "big.png" in str(exc) and "per-file limit" in str(exc)


def test_oversize_file_with_lying_header_is_caught_while_inflating() -> None:
    data = lying_zip("big.png", LIMITS.max_file_bytes * 3, declared=100, extra={"a.png": png(1)})
    # the header check passes (100 bytes declared) ...
    tree = open_zip(io.BytesIO(data), LIMITS)
    assert isinstance(tree, ZipTree) and tree.declared_size("big.png") == 100
    # ... the stream does not
    with pytest.raises(InvalidInput) as info:
        scan(tree)
    assert info.value.status_code == 413 and "big.png" in str(info.value)


def test_zip_bomb_declared_total_is_refused() -> None:
    limits = IngestLimits(max_file_bytes=1_000_000, max_total_bytes=1_500_000, max_entries=100)
    data = make_zip({f"f{i}.png": b"\0" * 600_000 for i in range(3)})
    assert len(data) < 10_000  # tiny archive, big expansion
    exc = refused(data, limits)
    assert exc.status_code == 413 and "1800000 bytes uncompressed" in str(exc)


def test_zip_bomb_with_lying_headers_is_caught_while_streaming() -> None:
    limits = IngestLimits(max_file_bytes=10_000_000, max_total_bytes=1_000_000, max_entries=100)
    data = lying_zip("bomb.png", 5_000_000, declared=1_000, extra={"a.png": png(1)})
    assert len(data) < 20_000
    exc = refused(data, limits)
    assert exc.status_code == 413
    assert "bomb.png" in str(exc)


def test_entry_expanding_beyond_its_header_is_refused_even_under_the_limits() -> None:
    data = lying_zip("liar.png", 50_000, declared=10, extra={"a.png": png(1)})
    exc = refused(data)
    assert exc.status_code == 413 and "declares" in str(exc)


def test_too_many_entries_is_refused() -> None:
    limits = IngestLimits(max_file_bytes=100_000, max_total_bytes=10_000_000, max_entries=5)
    exc = refused(make_zip({f"{i}.png": png(i) for i in range(6)}), limits)
    assert exc.status_code == 413 and "6 entries" in str(exc)


def test_not_a_zip_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        open_zip(io.BytesIO(png(1)), LIMITS)
    assert info.value.status_code == 415 and "not a zip" in str(info.value)


def test_empty_dataset_is_refused() -> None:
    exc = refused(make_zip({"notes.txt": b"no images here", "broken.png": b"\x89PNG garbage"}))
    assert exc.status_code == 422 and "empty" in str(exc)
    assert [r["name"] for r in exc.details["rejected"]] == ["broken.png", "notes.txt"]  # type: ignore[index]
    exc = refused(make_zip({"emptydir/": b""}))
    assert exc.status_code == 422 and "empty" in str(exc)


# ---------------------------------------------------------------------------- folders


def test_folder_outside_import_roots_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    (root / "ds").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InvalidInput) as info:
        open_folder(other, roots=[root.resolve()], limits=LIMITS)
    assert info.value.status_code == 403
    with pytest.raises(InvalidInput) as info:
        open_folder(root / "ds" / ".." / ".." / "other", roots=[root.resolve()], limits=LIMITS)
    assert info.value.status_code == 403
    with pytest.raises(InvalidInput) as info:
        open_folder(root / "ds", roots=[], limits=LIMITS)
    assert info.value.status_code == 403 and "DLFORGE_LABELER_IMPORT_ROOTS" in str(info.value)


def test_folder_with_symlink_is_refused(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    (ds / "cats").mkdir(parents=True)
    (ds / "cats" / "a.png").write_bytes(png(1))
    os.symlink("/etc/passwd", ds / "cats" / "b.png")
    with pytest.raises(InvalidInput) as info:
        open_folder(ds, roots=[tmp_path.resolve()], limits=LIMITS)
    assert info.value.status_code == 422 and "symlink" in str(info.value)


def test_folder_with_oversize_file_is_refused(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "a.png").write_bytes(png(1))
    (ds / "big.png").write_bytes(b"\0" * (LIMITS.max_file_bytes + 1))
    with pytest.raises(InvalidInput) as info:
        open_folder(ds, roots=[tmp_path.resolve()], limits=LIMITS)
    assert info.value.status_code == 413


def test_folder_scan_and_persist(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "a.png").write_bytes(png(1))
    (ds / "b.png").write_bytes(png(2))
    (ds / "bad.png").write_bytes(b"nope")
    (ds / "labels.csv").write_text("file,label\na.png,x\nb.png,\nbad.png,y\n")
    tree = open_folder(ds, roots=[tmp_path.resolve()], limits=LIMITS)
    result = scan(tree)
    assert [(i.name, i.label) for i in result.items] == [("a.png", "x"), ("b.png", None)]
    assert [r.name for r in result.rejected] == ["bad.png"]
    objects = FsObjectStore(tmp_path / "objects")
    manifest = persist(objects, tree, dataset_id="ds1", name="ds", result=result)
    assert load_manifest(objects, manifest_key("ds1")) == manifest
    assert [i.key for i in manifest.items] == [item_key("ds1", i) for i in result.items]
    assert objects.get_bytes(manifest.items[0].key) == png(1)
    assert manifest.items[0].label_source == "given" and manifest.items[1].label_source is None
    assert [r.name for r in manifest.rejected] == ["bad.png"]


def test_persist_failure_leaves_nothing(tmp_path: Path) -> None:
    data = make_zip({"a.png": png(1), "b.png": png(2), "c.png": png(3)})
    tree = open_zip(io.BytesIO(data), LIMITS)
    result = scan(tree)

    class Failing(FsObjectStore):
        calls = 0

        def put_stream(self, key, stream, *, length=-1, content_type="application/octet-stream"):  # type: ignore[no-untyped-def]
            Failing.calls += 1
            if Failing.calls == 3:
                raise OSError("disk full")
            return super().put_stream(key, stream, length=length, content_type=content_type)

    objects = Failing(tmp_path / "objects")
    with pytest.raises(OSError):
        persist(objects, tree, dataset_id="ds1", name="x", result=result)
    assert list(objects.list()) == []


def test_parse_csv_reports_conflicting_duplicate_rows() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_csv(b"file,label\na.png,x\na.png,y\n", csv_name="l.csv", files=["a.png"])
    assert "different labels" in str(info.value)
