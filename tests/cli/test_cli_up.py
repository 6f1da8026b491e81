"""``dlforge up`` checks every service's settings at start: a bad one stops it, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "libs" / name / "src" for name in ("common", "cli", "vision", "hpo", "sdk")] + [
    ROOT / "services" / name / "src" for name in ("labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer")]


def up(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """``dlforge up`` with embedded backends under ``tmp_path`` and ``variables``; it must end within 120 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLFORGE_", "OTEL_"))}
    env.update({"DLFORGE_BUS": "memory://", "DLFORGE_OBJECTS": f"file://{tmp_path}/objects",
                "DLFORGE_DOCS": f"sqlite:///{tmp_path}/docs.db", "DLFORGE_WORK_DIR": str(tmp_path / "work"),
                "DLFORGE_HTTP_PORT": "0", "DLFORGE_PROPOSER_BUILD_ON_START": "false",
                "DLFORGE_TUNER_STORAGE": f"sqlite:///{tmp_path}/tuner.db", **variables})
    env["PYTHONPATH"] = os.pathsep.join([*map(str, SOURCES), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "dlforge.cli.main", "up"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_bad_service_settings_stop_up_before_anything_opens(tmp_path: Path) -> None:
    done = up(tmp_path, DLFORGE_AUGMENTER_THRESHOLD="high", DLFORGE_TRAINER_ENGINE="mpi",
              DLFORGE_LABELER_EMBEDDER="resnet")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlforge: invalid settings: ")
    for variable in ("DLFORGE_AUGMENTER_THRESHOLD", "DLFORGE_TRAINER_ENGINE", "DLFORGE_LABELER_EMBEDDER"):
        assert f"{variable}: " in last  # every bad one, named
    assert "unknown embedder 'resnet'" in last and "'ddp' or 'horovod'" in last
    assert not (tmp_path / "docs.db").exists()  # refused before a backend was opened


def test_a_setting_whose_plug_in_cannot_be_built_stops_up(tmp_path: Path) -> None:
    done = up(tmp_path, DLFORGE_TUNER_SAMPLER="annealing")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlforge: DLFORGE_TUNER_SAMPLER") and "unknown sampler 'annealing'" in last


async def test_every_part_is_built_once_at_start_and_its_worker_holds_those_deps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlforge.augmenter.settings import AugmenterSettings
    from dlforge.augmenter.worker import AugmenterDeps
    from dlforge.cli.platform import combined_app
    from dlforge.common.settings import CommonSettings, load_settings
    from dlforge.console.app import ConsoleSettings
    from dlforge.labeler.simulated import AnnotatorSim
    from dlforge.labeler.worker import LabelerDeps
    from dlforge.optimizer.worker import OptimizerDeps
    from dlforge.proposer.worker import ProposerDeps
    from dlforge.trainer.worker import TrainerDeps
    from dlforge.tuner.worker import TunerDeps

    monkeypatch.setenv("DLFORGE_PROPOSER_BUILD_ON_START", "false")
    monkeypatch.setenv("DLFORGE_TUNER_STORAGE", f"sqlite:///{tmp_path}/tuner.db")
    monkeypatch.setenv("DLFORGE_AUGMENTER_THRESHOLD", "0.8")
    monkeypatch.setenv("DLFORGE_ANNOTATOR_SIM_WAIT_SECONDS", "2.5")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db")
    app = combined_app(settings=settings, simulated_annotator=True)
    async with app.router.lifespan_context(app):
        deps, workers = app.state.deps, app.state.workers
        kinds = {"labeler": LabelerDeps, "augmenter": AugmenterDeps, "proposer": ProposerDeps, "tuner": TunerDeps,
                 "trainer": TrainerDeps, "optimizer": OptimizerDeps, "annotator-sim": AnnotatorSim,
                 "runs": type(None), "auth": type(None), "console": ConsoleSettings}
        assert {name: type(d) for name, d in deps.items()} == kinds
        assert all(workers[name].deps is deps[name] for name in kinds)
        augmenter = app.state.settings["augmenter"]
        assert isinstance(augmenter, AugmenterSettings) and augmenter.augmenter_threshold == 0.8
        assert deps["augmenter"].settings is augmenter and deps["augmenter"].sample_filter.threshold == 0.8
        assert deps["annotator-sim"].wait_seconds == 2.5
        assert type(app.state.settings["runs"]) is CommonSettings
