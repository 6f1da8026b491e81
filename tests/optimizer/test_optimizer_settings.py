"""Optimizer settings: DLFORGE_OPTIMIZER_* from the environment, common fields from the process."""

from __future__ import annotations

import pytest

from dlforge.common.app import settings_for
from dlforge.common.errors import ConfigError
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.optimizer.handlers import OptimizeOptions
from dlforge.optimizer.settings import OptimizerSettings


def test_optimizer_settings_extend_the_process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_OPTIMIZER_ITERATIONS", "7")
    monkeypatch.setenv("DLFORGE_OPTIMIZER_CALIBRATION_METHODS", '["entropy", "minmax", "entropy"]')
    common = load_settings(CommonSettings, work_dir="/srv/work", bus="memory://")
    s = settings_for(OptimizerSettings, common)
    assert s.work_dir == "/srv/work" and s.optimizer_iterations == 7
    assert s.optimizer_calibration_methods == ["entropy", "minmax"]
    assert settings_for(OptimizerSettings, s) is s
    opts = OptimizeOptions.from_settings(s)
    assert opts.iterations == 7 and opts.calibration_methods == ["entropy", "minmax"] and opts.threads == 2
    assert opts.max_accuracy_drop == 0.01 and opts.batch_sizes == [1, 32]


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_OPTIMIZER_CALIBRATION_METHODS", '["kl"]')
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_CALIBRATION_METHODS"):
        load_settings(OptimizerSettings)
    monkeypatch.delenv("DLFORGE_OPTIMIZER_CALIBRATION_METHODS")
    monkeypatch.setenv("DLFORGE_OPTIMIZER_OPSET", "13")
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_OPSET"):
        load_settings(OptimizerSettings)


def test_int8_disagreement_limit_is_a_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_OPTIMIZER_MAX_INT8_DISAGREEMENT", "0.05")
    assert OptimizeOptions.from_settings(load_settings(OptimizerSettings)).max_int8_disagreement == 0.05
    monkeypatch.setenv("DLFORGE_OPTIMIZER_MAX_INT8_DISAGREEMENT", "2")  # 2 % is 0.02, not 2
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_MAX_INT8_DISAGREEMENT"):
        load_settings(OptimizerSettings)


def test_structured_compression_configs_come_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(OptimizerSettings).optimizer_compression == []  # off unless configured
    monkeypatch.setenv("DLFORGE_OPTIMIZER_COMPRESSION",
                       '[{"prune_ratio": 0.5, "resolution": 160}, {"rank_fraction": 0.25, "int8": false}]')
    monkeypatch.setenv("DLFORGE_OPTIMIZER_COMPRESSION_RECOVERY_SECONDS", "12")
    opts = OptimizeOptions.from_settings(load_settings(OptimizerSettings))
    assert [c.name for c in opts.compression] == ["pruned_p50_s160_int8", "pruned_p0_r25_fp32"]
    assert opts.compression_recovery_seconds == 12.0
    monkeypatch.setenv("DLFORGE_OPTIMIZER_COMPRESSION", '[{"prune_ratio": 1.0}]')  # nothing would be left
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_COMPRESSION"):
        load_settings(OptimizerSettings)
    monkeypatch.setenv("DLFORGE_OPTIMIZER_COMPRESSION", '[{"prune": 0.5}]')  # a misspelt field is refused
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_COMPRESSION"):
        load_settings(OptimizerSettings)


def test_test_time_views_are_off_by_default_and_can_be_turned_on(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OptimizeOptions.from_settings(load_settings(OptimizerSettings)).test_views == "none"
    monkeypatch.setenv("DLFORGE_OPTIMIZER_TEST_VIEWS", "trained")
    assert OptimizeOptions.from_settings(load_settings(OptimizerSettings)).test_views == "trained"
    monkeypatch.setenv("DLFORGE_OPTIMIZER_TEST_VIEWS", "dihedral")  # a view set is the trainer's to declare
    with pytest.raises(ConfigError, match="DLFORGE_OPTIMIZER_TEST_VIEWS"):
        load_settings(OptimizerSettings)
