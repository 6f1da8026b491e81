"""The dlforge command's argument handling and report text."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlforge.cli.main import DEMO_OPTIONS, _embedded_settings, _options, build_parser, check_folder, main, parse_spec
from dlforge.common.errors import ConfigError
from dlforge.common.events import Spec


def test_parse_spec_reads_the_compact_form() -> None:
    spec = parse_spec("recall=0.95, accuracy=0.9,fps=2,size=256,positive=defect")
    assert spec == Spec(positive_class="defect", min_recall=0.95, min_accuracy=0.9, min_fps=2.0, input_size=256)


def test_parse_spec_refuses_unknown_and_out_of_range_values() -> None:
    with pytest.raises(ConfigError, match="speed=3"):
        parse_spec("speed=3")
    with pytest.raises(ConfigError, match="--spec: min_recall: Input should be less than or equal to 1"):
        parse_spec("recall=1.5")
    with pytest.raises(ConfigError, match="--spec: positive_class: Value error, 'a/b' is not a valid class name"):
        parse_spec("positive=a/b")


def test_demo_options_keep_demo_defaults_unless_a_flag_overrides() -> None:
    args = build_parser().parse_args(["demo", "--hpo-trials", "2"])
    options = _options(args, base=DEMO_OPTIONS)
    assert options.hpo_trials == 2
    assert options.max_imbalance == DEMO_OPTIONS.max_imbalance


def test_run_without_spec_fails_with_a_message(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path)]) == 2
    assert "--spec is required" in capsys.readouterr().err


def test_run_on_a_missing_folder_fails_with_a_message(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope"), "--spec", "recall=0.9"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_help_lists_every_pipeline_option(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["demo", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--max-auto-label-error" in out and "95 % confidence" in out


def test_boolean_options_read_true_and_false(capsys) -> None:
    assert build_parser().parse_args(["demo", "--auto-label-all", "true"]).auto_label_all is True
    assert build_parser().parse_args(["demo", "--auto-label-all", "off"]).auto_label_all is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--auto-label-all", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_a_choice_option_takes_its_choices_only(capsys) -> None:
    args = build_parser().parse_args(["demo", "--domain-adaptation", "standardize"])
    assert _options(args).domain_adaptation == "standardize"
    assert _options(build_parser().parse_args(["demo"])).domain_adaptation is None  # unset: the labeler's setting
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--domain-adaptation", "align"])
    assert "--domain-adaptation: invalid choice: 'align'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# dlforge run FOLDER --answers CSV: the CSV is checked against the folder before any work
# ------------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), seed, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(i))
    return root


def test_answers_with_a_class_folder_prefix_match_a_flat_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "cells", ["a.png", "b.png", "c.png"])
    # the CSV came from the original class folders: defect/a.png, good/b.png; c.png given bare
    check = check_folder(folder, {"defect/a.png": "defect", "good/b.png": "good", "./c.png": "good"})
    assert check.layout == "flat" and check.to_label == 3 and check.notes == []
    assert check.answers == {"a.png": "defect", "b.png": "good", "c.png": "good"}


def test_answers_match_the_names_the_labeler_gives_without_a_wrapper_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "cells", ["batch1/a.png", "batch1/b.png"])
    check = check_folder(folder, {"a.png": "defect", "batch1/b.png": "good"})
    # the labeler strips the single top-level folder: items are named a.png, b.png
    assert check.layout == "flat"
    assert check.answers is not None
    assert check.answers["a.png"] == "defect" and check.answers["b.png"] == "good"
    assert check.answers["batch1/a.png"] == "defect"


def test_an_ambiguous_file_name_does_not_match(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "cells", ["x1.png", "x/a.png", "y/a.png"])
    with pytest.raises(ConfigError, match=r"no answer for 1 of the 1 image\(s\).*e.g. 'x1.png'"):
        check_folder(folder, {"a.png": "good", "x/a.png": "good"})
    # given the path, the same file matches
    check = check_folder(folder, {"x1.png": "good", "x/a.png": "good"})
    assert check.answers is not None and "a.png" not in check.answers and check.answers["x/a.png"] == "good"


def test_unanswered_images_fail_fast_naming_examples_and_the_expected_form(tmp_path: Path, capsys) -> None:
    folder = _folder(tmp_path / "cells", [f"img{i:03d}.png" for i in range(8)])
    answers = tmp_path / "answers.csv"
    answers.write_text("file,label\n" + "".join(f"other/zzz{i}.png,good\n" for i in range(7))
                       + "img000.png,good\n")
    workdir = tmp_path / "work"
    code = main(["run", str(folder), "--spec", "recall=0.9", "--answers", str(answers), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no answer for 7 of the 8 image(s) people would be asked to label" in err
    assert "e.g. 'img001.png', 'img002.png', 'img003.png', 'img004.png', 'img005.png' and 2 more" in err
    assert "7 of its paths match no image of the folder, e.g. 'other/zzz0.png'" in err
    assert f"give paths relative to {folder} (e.g. 'img000.png')" in err
    assert not workdir.exists()  # nothing started: no state, no dataset


def test_class_sub_folders_say_that_labeling_is_off(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "cells", ["good/a.png", "defect/b.png"])
    check = check_folder(folder, {"good/a.png": "good", "defect/b.png": "defect"})
    assert check.layout == "class_folders" and check.to_label == 0
    assert check.notes == [f"{folder} has class sub-folders ('defect', 'good'): their names are the images' labels, "
                           "so labeling is off (people are asked only about images outside them); the answers "
                           "serve only as the truth the report compares with"]
    assert check_folder(folder, None).notes[0].startswith(f"{folder} has class sub-folders")


def test_the_report_text_shows_the_notes() -> None:
    from dlforge.common.report import format_text

    report = {"run_id": "r1", "state": "failed", "notes": ["cells has class sub-folders"],
              "failure": {"stage": "annotator-sim", "reason": "no answer"},
              "stages": {"labeler": {"state": "failed", "seconds": None}}}
    text = format_text(report)
    assert "note: cells has class sub-folders" in text and "FAILED in annotator-sim: no answer" in text


def test_run_options_beyond_their_bounds_fail_with_the_flag_named(tmp_path: Path, capsys) -> None:
    folder = _folder(tmp_path / "cells", ["a.png"])
    code = main(["run", str(folder), "--spec", "recall=0.9", "--hpo-trials", "1000000000"])
    assert code == 2
    assert "--hpo-trials: Input should be less than or equal to 200" in capsys.readouterr().err


async def test_the_simulated_annotator_answers_every_item_with_the_matched_answers(tmp_path: Path) -> None:
    """The names the CLI registers are the names the labeler gives the items (here without the
    wrapper folder 'batch1/') although the CSV carries class-folder prefixes the folder lacks."""
    from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, PipelineOptions, Spec
    from dlforge.common.runtime import Backends, HandlerContext
    from dlforge.common.settings import load_settings
    from dlforge.labeler import simulated
    from dlforge.labeler.app import DatasetRequest, import_dataset
    from dlforge.labeler.ingest import IngestLimits, open_folder, scan
    from dlforge.labeler.settings import LabelerSettings
    from dlforge.vision.manifest import load_manifest

    names = [f"batch1/img{i:02d}.png" for i in range(6)]
    folder = _folder(tmp_path / "cells", names)
    truth = {f"{'dark' if i % 2 else 'bright'}/img{i:02d}.png": "dark" if i % 2 else "bright" for i in range(6)}
    check = check_folder(folder, truth)
    assert check.answers is not None and check.to_label == 6

    settings = load_settings(LabelerSettings, bus="memory://", objects=f"file://{tmp_path}/o",
                             docs=f"sqlite:///{tmp_path}/d.db", work_dir=str(tmp_path / "w"))
    backends = Backends.from_settings(settings)
    await backends.start()
    try:
        tree = open_folder(folder, roots=[tmp_path.resolve()], limits=IngestLimits(10**6, 10**7, 100))
        req = DatasetRequest(folder=str(folder), spec=Spec(), options=PipelineOptions(label_budget=1.0),
                             dataset_id="cells", run_id="run-1")
        await import_dataset(backends, settings, req, tree, scan(tree))
        simulated.register_answers(backends.objects, "cells", check.answers)
        manifest = load_manifest(backends.objects, "labeler/datasets/cells/manifest.json")
        assert sorted(i.name for i in manifest.items) == [f"img{i:02d}.png" for i in range(6)]
        asked = Event.new(LabelsRequested(dataset_id="cells", batch_id="b1", round=1,
                                          item_ids=[i.item_id for i in manifest.items], reason="seed"), run_id="run-1")
        ctx = HandlerContext(service="annotator-sim", objects=backends.objects, docs=backends.docs,
                             settings=settings, bus=backends.bus, deps=simulated.AnnotatorSim())
        answered = await simulated.answer(asked, ctx)
    finally:
        await backends.stop()
    assert isinstance(answered, Event) and isinstance(answered.payload, LabelsSubmitted)
    by_name = {i.item_id: i.name for i in manifest.items}
    assert {by_name[k]: v for k, v in answered.payload.labels.items()} == {
        f"img{i:02d}.png": "dark" if i % 2 else "bright" for i in range(6)}


def test_embedded_settings_keep_the_bus_documents_and_objects_under_the_work_dir(tmp_path) -> None:
    settings = _embedded_settings(tmp_path / "state")
    root = (tmp_path / "state").resolve()
    assert settings.bus == f"sqlite:///{root}/bus.db"  # the durable bus: a killed run keeps its events
    assert settings.docs == f"sqlite:///{root}/docs.db"
    assert settings.objects == f"file://{root}/objects"


def test_serving_for_people_revokes_its_token_when_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token `dlforge run` (no answers) mints for itself is revoked however the command ends."""
    import sqlite3

    import uvicorn

    from dlforge.cli import main as cli_main

    monkeypatch.setenv("DLFORGE_AUTH", "required")
    monkeypatch.setenv("DLFORGE_BUS", "memory://")
    monkeypatch.setenv("DLFORGE_DOCS", f"sqlite:///{tmp_path}/docs.db")
    monkeypatch.setenv("DLFORGE_OBJECTS", f"file://{tmp_path}/objects")
    monkeypatch.setenv("DLFORGE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DLFORGE_PROPOSER_BUILD_ON_START", "false")

    async def port_taken(self: uvicorn.Server, sockets: object = None) -> None:
        raise OSError("address already in use")

    monkeypatch.setattr(uvicorn.Server, "serve", port_taken)
    (tmp_path / "cells").mkdir()
    with pytest.raises(OSError, match="already in use"):
        cli_main._serve_for_people(tmp_path / "cells", Spec(positive_class="defect"), cli_main.PipelineOptions())
    rows = sqlite3.connect(tmp_path / "docs.db").execute(
        "SELECT json_extract(body, '$.name'), json_extract(body, '$.revoked_at') FROM c_auth_tokens").fetchall()
    assert len(rows) == 1 and rows[0][0] == "dlforge run" and rows[0][1] is not None, rows
