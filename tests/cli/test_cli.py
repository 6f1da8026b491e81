"""The dlforge command's argument handling and report text."""

from __future__ import annotations

import pytest

from dlforge.cli.main import DEMO_OPTIONS, _options, build_parser, main, parse_spec
from dlforge.common.errors import ConfigError
from dlforge.common.events import Spec


def test_parse_spec_reads_the_compact_form() -> None:
    spec = parse_spec("recall=0.95, accuracy=0.9,fps=2,size=256,positive=defect")
    assert spec == Spec(positive_class="defect", min_recall=0.95, min_accuracy=0.9, min_fps=2.0, input_size=256)


def test_parse_spec_refuses_unknown_and_out_of_range_values() -> None:
    with pytest.raises(ConfigError, match="speed=3"):
        parse_spec("speed=3")
    with pytest.raises(ValueError, match="min_recall"):
        parse_spec("recall=1.5")


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
