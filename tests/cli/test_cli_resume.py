"""``dlforge run`` remembers the run it started for a folder, so running it again resumes that run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlforge.cli.resume import RunIndex, StartedRun, fingerprint
from dlforge.common.errors import ConfigError
from dlforge.common.events import PipelineOptions, Spec


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cells"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"a" * 10)
    (folder / "sub" / "b.png").write_bytes(b"b" * 20)
    return folder


def test_the_fingerprint_follows_the_files_the_spec_and_the_options(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    spec, options = Spec(min_recall=0.9), PipelineOptions()
    fp = fingerprint(folder, spec=spec, options=options)
    assert fingerprint(folder, spec=spec, options=options) == fp
    assert fingerprint(tmp_path / "." / "cells", spec=spec, options=options) == fp  # the resolved path counts
    assert fingerprint(folder, spec=Spec(min_recall=0.8), options=options) != fp
    assert fingerprint(folder, spec=spec, options=PipelineOptions(hpo_trials=2)) != fp
    (folder / "sub" / "c.png").write_bytes(b"c")
    with_new_file = fingerprint(folder, spec=spec, options=options)
    assert with_new_file != fp
    (folder / "sub" / "c.png").write_bytes(b"cc")  # same name, another size
    assert fingerprint(folder, spec=spec, options=options) != with_new_file
    st = (folder / "a.png").stat()
    before = fingerprint(folder, spec=spec, options=options)
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: maybe changed
    assert fingerprint(folder, spec=spec, options=options) != before


def test_a_run_started_before_an_option_existed_keeps_its_fingerprint(tmp_path: Path) -> None:
    """The digest of the run index's first format, written out: the folder, its one file, the spec's JSON and the
    options' JSON as they were before domain_adaptation; unset, the new option leaves it alone; set, it counts."""
    import hashlib
    import json

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a" * 10)
    st = (folder / "a.png").stat()
    spec, options = Spec(min_recall=0.9), PipelineOptions(hpo_trials=2)
    old_options = {k: v for k, v in json.loads(options.model_dump_json()).items() if k != "domain_adaptation"}
    h = hashlib.sha256()
    h.update(str(folder.resolve()).encode())
    h.update(f"\0a.png\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(spec.model_dump_json().encode())
    h.update(json.dumps(old_options, separators=(",", ":")).encode())
    assert fingerprint(folder, spec=spec, options=options) == h.hexdigest()
    chosen = options.model_copy(update={"domain_adaptation": "standardize"})
    assert fingerprint(folder, spec=spec, options=chosen) != h.hexdigest()


def test_the_index_finds_a_run_by_fingerprint_and_by_id_and_survives_a_reopen(tmp_path: Path) -> None:
    index = RunIndex(tmp_path / "work")
    assert index.find("f1") is None and index.by_run("r1") is None
    index.remember(StartedRun(run_id="r1", dataset_id="d1", folder="/x", fingerprint="f1"))
    index.remember(StartedRun(run_id="r2", dataset_id="d2", folder="/y", fingerprint="f2"))
    reopened = RunIndex(tmp_path / "work")
    found = reopened.find("f1")
    assert found is not None and (found.run_id, found.dataset_id) == ("r1", "d1")
    by_id = reopened.by_run("r2")
    assert by_id is not None and by_id.fingerprint == "f2"
    index.remember(StartedRun(run_id="r3", dataset_id="d3", folder="/x", fingerprint="f1"))  # a new run for f1
    replaced = RunIndex(tmp_path / "work").find("f1")
    assert replaced is not None and replaced.run_id == "r3"
    assert not list((tmp_path / "work").glob("*.tmp"))


def test_an_unreadable_index_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / "runs.json").write_text("{not json")
    with pytest.raises(ConfigError, match="remove it"):
        RunIndex(tmp_path).find("f1")
