"""Labeler settings and the lazily chosen index backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlforge.common.app import settings_for
from dlforge.common.errors import ConfigError
from dlforge.common.settings import load_settings
from dlforge.labeler.embeddings import make_embedder
from dlforge.labeler.index import build_index
from dlforge.labeler.settings import LabelerSettings


@pytest.mark.parametrize("value", ["/data/a:/data/b", "/data/a,/data/b", '["/data/a", "/data/b"]'])
def test_import_roots_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DLFORGE_LABELER_IMPORT_ROOTS", value)
    assert load_settings(LabelerSettings).import_roots == [Path("/data/a"), Path("/data/b")]


def test_common_settings_are_extended_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_LABELER_MAX_ENTRIES", "7")
    common = load_settings(bus="memory://", http_port=1234)
    s = settings_for(LabelerSettings, common)
    assert s.http_port == 1234 and s.labeler_max_entries == 7
    monkeypatch.setenv("DLFORGE_LABELER_INDEX", "annoy")
    with pytest.raises(ConfigError, match="DLFORGE_LABELER_INDEX"):
        settings_for(LabelerSettings, common)


def test_faiss_gpu_without_a_gpu_says_what_to_install() -> None:
    with pytest.raises(ConfigError, match="faiss-gpu"):
        build_index(np.eye(3, dtype=np.float32), backend="faiss-gpu")


def test_unknown_embedder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="DLFORGE_LABELER_EMBEDDER"):
        make_embedder("resnet9000")


def test_embed_views_come_from_the_environment_and_reach_the_embedder(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    import asyncio

    from dlforge.common.runtime import Backends
    from dlforge.labeler.worker import build_deps

    common = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db")
    monkeypatch.setenv("DLFORGE_LABELER_EMBED_VIEWS", "dihedral")
    s = settings_for(LabelerSettings, common)
    deps = asyncio.run(build_deps(s, Backends.from_settings(s)))
    assert deps.embedder.name == "efficientnet_lite0-ms-224-dihedral"
    monkeypatch.setenv("DLFORGE_LABELER_EMBED_VIEWS", "octagonal")
    with pytest.raises(ConfigError, match="DLFORGE_LABELER_EMBED_VIEWS"):
        settings_for(LabelerSettings, common)


def test_domains_are_standardized_for_the_classifier_unless_set_to_none(tmp_path: Path) -> None:
    """Labels of one domain carry to another: the poly items' vectors sit far from the mono ones until each domain
    gets the set's moments (DLFORGE_LABELER_DOMAINS=standardize); rows come back at unit length."""
    from dlforge.common.events import PipelineOptions
    from dlforge.labeler.worker import classifier_vectors, domain_adaptation
    from dlforge.vision.manifest import Item, Manifest

    rng = np.random.default_rng(0)
    mono = rng.normal(0.0, 1.0, size=(30, 4))
    poly = rng.normal(0.0, 1.0, size=(30, 4)) * 0.2 + np.array([6.0, 0.0, 0.0, 0.0])
    vectors = np.vstack([mono, poly]).astype(np.float32)
    domains = ["mono"] * 30 + ["poly"] * 30
    items = [Item(item_id=f"i{k}", key=f"k{k}", name=f"{k}.png", sha256="0" * 64, width=8, height=8, domain=d)
             for k, d in enumerate(domains)]
    manifest = Manifest(dataset_id="d", name="d", classes=["a", "b"], items=items)
    settings = LabelerSettings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                               labeler_domains="standardize")
    # the run's option wins over the labeler's setting; unset, the setting decides
    assert domain_adaptation(PipelineOptions(), settings) == "standardize"
    assert domain_adaptation(PipelineOptions(domain_adaptation="none"), settings) == "none"
    plain = settings.model_copy(update={"labeler_domains": "none"})
    assert domain_adaptation(PipelineOptions(domain_adaptation="standardize"), plain) == "standardize"
    # a dataset keeps the mode its labeling started with, whatever the setting says later
    assert domain_adaptation(PipelineOptions(), plain, {"domain_adaptation": "standardize"}) == "standardize"
    assert domain_adaptation(PipelineOptions(), settings, {}) == "standardize"  # a record from before: the setting
    out, done = classifier_vectors(vectors, manifest, "standardize")
    assert done == {"mono": 30, "poly": 30}
    assert np.linalg.norm(out, axis=1) == pytest.approx(np.ones(60), abs=1e-5)
    # the domains' centres (nearly) coincide once standardized; the raw rows at unit length lie about 1 apart
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    before = float(np.linalg.norm(unit[:30].mean(axis=0) - unit[30:].mean(axis=0)))
    after = float(np.linalg.norm(out[:30].mean(axis=0) - out[30:].mean(axis=0)))
    assert before > 0.8 and after < 0.1
    off, nothing = classifier_vectors(vectors, manifest, "none")
    assert off is vectors and nothing == {}


def test_an_unknown_domains_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_LABELER_DOMAINS", "align-everything")
    with pytest.raises(ConfigError, match="DLFORGE_LABELER_DOMAINS"):
        settings_for(LabelerSettings, load_settings(bus="memory://"))
