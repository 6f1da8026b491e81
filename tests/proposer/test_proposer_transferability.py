"""The transferability scorers: k-NN, SFDA, agreement across candidates, PCA/CAM activation analysis,
and the ImageNet stand-in sample of the domain discriminator.

Feature-level tests give candidates known features (``Candidate.remember``): one whose features
separate the classes, one whose features are noise; the expected values come from the construction
(closed forms, hand-worked cases, or a literal re-implementation of the authors' code).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from proposer_testdata import bars
from torch import nn

from dlforge.common.events import Spec
from dlforge.proposer.handlers import measure, rank, target_from_arrays
from dlforge.proposer.scoring import (
    ActivationScorer,
    AgreementScorer,
    Candidate,
    CohortScorer,
    Direction,
    DomainDiscriminatorScorer,
    Encoded,
    KNNScorer,
    NCTIScorer,
    Scorer,
    SFDAScorer,
    SubScore,
    TargetSample,
    cam_focus,
    knn_predict,
    linear_cka,
    ncti_terms,
    pca_class_variance,
    sfda,
    sub_score_specs,
)
from dlforge.proposer.sources import natural_image_sample
from dlforge.vision.networks import Classifier, SmallCNN, build_network


def feature_candidate(model_id: str, train: np.ndarray, val: np.ndarray) -> Candidate:
    """A candidate whose encodings of the target's train and val images are ``train`` and ``val``."""
    torch.manual_seed(0)
    cand = Candidate.from_model(build_network("small_cnn", 2, pretrained=False), model_id=model_id, arch="small_cnn",
                                source_dataset="synthetic", weights_key=f"k/{model_id}", unfreeze_last=0)
    cand.remember("train", Encoded(torch.zeros(0), train))
    cand.remember("val", Encoded(torch.zeros(0), val))
    return cand


def dummy_target(train_y: np.ndarray, val_y: np.ndarray, classes: int = 2) -> TargetSample:
    """Labels with placeholder images (the candidates' encodings are given)."""
    return target_from_arrays([f"c{i}" for i in range(classes)],
                              train_x=np.zeros((len(train_y), 8, 8, 1), np.uint8), train_y=train_y,
                              val_x=np.zeros((len(val_y), 8, 8, 1), np.uint8), val_y=val_y)


def class_features(y: np.ndarray, *, d: int, gap: float, seed: int) -> np.ndarray:
    """Class means ``gap`` apart along random directions, unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(int(y.max()) + 1, d)) * gap
    return centers[y] + rng.normal(size=(len(y), d))


# ---------------------------------------------------------------------------------------- k-NN


def test_knn_predict_hand_worked() -> None:
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.6]])
    y = np.array([0, 0, 1, 1, 1])
    query = np.array([[1.0, 0.2], [0.2, 1.0], [0.7, 0.7]])
    # k=1: nearest by angle: (1, 0.2) -> (0.9, 0.1); (0.2, 1) -> (0.1, 0.9); (0.7, 0.7) at 45° -> (0.8, 0.6)
    assert knn_predict(train, y, query, k=1, num_classes=2).tolist() == [0, 1, 1]
    # k=2 at (0.7, 0.7): (0.8, 0.6) [class 1] and (0.9, 0.1) [class 0] tie 1:1 -> the nearer one's class, 1
    assert knn_predict(train, y, query[2:], k=2, num_classes=2).tolist() == [1]
    # k=3 at (1, 0.2): (0.9, 0.1), (1, 0), (0.8, 0.6) -> two votes for class 0
    assert knn_predict(train, y, query[:1], k=3, num_classes=2).tolist() == [0]


def test_knn_scorer_separating_vs_noise_features() -> None:
    y_tr, y_va = np.arange(200) % 3, np.arange(90) % 3
    good = feature_candidate("good", class_features(y_tr, d=16, gap=4.0, seed=1),
                             class_features(y_va, d=16, gap=4.0, seed=1))
    rng = np.random.default_rng(2)
    noise = feature_candidate("noise", rng.normal(size=(200, 16)), rng.normal(size=(90, 16)))
    target = dummy_target(y_tr, y_va, classes=3)
    scorer = KNNScorer(k=5)
    assert scorer.score(good, target)["knn_bacc"] == pytest.approx(1.0)
    # noise: chance is 1/3; 90 val items put 0.6 beyond 5 standard deviations
    assert scorer.score(noise, target)["knn_bacc"] < 0.6
    with pytest.raises(ValueError, match="k must be"):
        KNNScorer(k=0)


# ---------------------------------------------------------------------------------------- SFDA


def sfda_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The authors' SFDA_Score as published (github.com/TencentARC/SFDA), with the generalized
    eigenproblem, the full-dimensional scatter matrices and the exact largest eigenvalue."""
    x = x.astype(np.float64)

    def fit_proba(x: np.ndarray, shrinkage: float | None) -> tuple[np.ndarray, float]:
        classes = np.unique(y)
        priors = np.bincount(y) / len(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        sw = sum(priors[c] * np.cov(x[y == c].T, bias=True) for c in classes)
        if shrinkage is None:
            shrinkage = float(np.exp(-5 * np.linalg.eigvalsh(sw).max()))
        st = np.cov(x.T, bias=True)
        mu = np.trace(sw) / sw.shape[0]
        shrunk = (1 - shrinkage) * sw + shrinkage * mu * np.eye(sw.shape[0])
        sb = st - shrunk
        evals, evecs = scipy.linalg.eigh(sb, shrunk)
        evecs = evecs[:, np.argsort(evals)[::-1]]
        coef = means @ evecs @ evecs.T
        intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
        logits = x @ coef.T + intercept
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True), shrinkage

    prob, shrinkage = fit_proba(x, None)
    prob = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)  # softened for the mixture
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    outer = np.stack([(means.sum(axis=0) - means[i]) / (len(classes) - 1) for i in range(len(classes))])
    mixed = x.copy()
    for c in classes:
        idx = np.flatnonzero(y == c)
        p = prob[idx, c][:, None]
        mixed[idx] = p * x[idx] + (1 - p) * outer[c]
    prob, _ = fit_proba(mixed, shrinkage)
    return float(np.mean(prob[np.arange(len(y)), y]))


@pytest.mark.parametrize(("n", "d", "scale"), [(150, 12, 1.0), (60, 90, 0.1)])
def test_sfda_matches_the_authors_formulation(n: int, d: int, scale: float) -> None:
    y = np.arange(n) % 3
    x = class_features(y, d=d, gap=0.7, seed=3) * scale
    assert sfda(x, y) == pytest.approx(sfda_reference(x, y), rel=1e-6)


def test_sfda_scorer_separating_vs_noise_features() -> None:
    y = np.arange(800) % 4
    good = feature_candidate("good", class_features(y, d=8, gap=3.0, seed=4), np.zeros((1, 8)))
    weak = feature_candidate("weak", class_features(y, d=8, gap=0.5, seed=4), np.zeros((1, 8)))
    noise = feature_candidate("noise", np.random.default_rng(5).normal(size=(800, 8)), np.zeros((1, 8)))
    target = dummy_target(y, np.zeros(1, np.int64), classes=4)
    s = {c.model_id: SFDAScorer().score(c, target)["sfda"] for c in (good, weak, noise)}
    assert s["good"] > 0.95  # the true-class posterior of well separated classes
    assert s["noise"] < 0.3  # chance is 1/4 (8 noise dimensions, 800 samples: little to overfit)
    assert s["noise"] < s["weak"] < s["good"]


# ---------------------------------------------------------------------------------------- NCTI


def test_ncti_terms_of_collapsed_classes_closed_form() -> None:
    # classes far apart: the discriminant's posteriors are one-hot, so each class's posterior matrix is
    # n_c identical rows e_c, of nuclear norm sqrt(n_c): vc = -ln(sum_c sqrt(n_c)), ncc = 1
    y = np.repeat([0, 1, 2], [100, 64, 36])
    t = ncti_terms(class_features(y, d=12, gap=40.0, seed=9), y)
    assert t["ncc"] == pytest.approx(1.0, abs=1e-6)
    assert t["vc"] == pytest.approx(-np.log(10.0 + 8.0 + 6.0), abs=1e-4)


def test_ncti_terms_seli_is_the_nuclear_norm_of_the_fisher_projection() -> None:
    # two classes, features already low-dimensional (no PCA loss): the projection is onto Fisher's
    # direction S_w^-1 (mu_1 - mu_0); its nuclear norm is the norm of the centred projected column,
    # up to the discriminant's scaling of that direction (the within-class variance of the projection is 1)
    rng = np.random.default_rng(10)
    y = np.arange(400) % 2
    x = class_features(y, d=3, gap=2.0, seed=11) @ np.diag([1.0, 3.0, 0.5]) + rng.normal(size=(1, 3))
    mu = np.stack([x[y == c].mean(axis=0) for c in (0, 1)])
    sw = sum(np.cov(x[y == c].T, bias=True) * np.mean(y == c) for c in (0, 1))
    w = np.linalg.solve(sw, mu[1] - mu[0])
    z = x @ w
    within = sum(np.mean(y == c) * np.var(z[y == c]) for c in (0, 1))
    expected = np.linalg.norm((z - z.mean()) / np.sqrt(within))
    assert ncti_terms(x, y, components=3)["seli"] == pytest.approx(expected, rel=1e-3)


def test_ncti_scorer_ranks_separating_weak_and_noise_features() -> None:
    y = np.arange(300) % 3
    rng = np.random.default_rng(12)
    cands = [feature_candidate("good", class_features(y, d=16, gap=3.0, seed=13), np.zeros((1, 16))),
             feature_candidate("weak", class_features(y, d=16, gap=0.6, seed=13), np.zeros((1, 16))),
             feature_candidate("noise", rng.normal(size=(300, 16)), np.zeros((1, 16)))]
    target = dummy_target(y, np.zeros(1, np.int64), classes=3)
    scorer = NCTIScorer()
    assert isinstance(scorer, CohortScorer)
    scorer.prepare(cands, target)
    s = {c.model_id: scorer.score(c, target) for c in cands}
    assert s["good"]["ncti"] > max(s["weak"]["ncti"], s["noise"]["ncti"])
    for term in ("ncti_seli", "ncti_ncc"):
        assert s["good"][term] > s["weak"][term] > s["noise"][term]
    assert s["noise"]["ncti_ncc"] < 0.5 < s["good"]["ncti_ncc"]  # chance is 1/3
    # the collapse term alone prefers the noise's near-uniform posteriors (rows of norm ~0.58, not 1: a smaller
    # nuclear norm) to the weak features' mixed ones: the authors' sum needs its other two terms
    assert s["noise"]["ncti_vc"] > s["weak"]["ncti_vc"]
    assert all(0.0 <= v["ncti"] <= 3.0 for v in s.values())
    scorer.prepare(cands[:1], target)  # one candidate: its terms, no cohort total
    assert set(scorer.score(cands[0], target)) == {"ncti_seli", "ncti_ncc", "ncti_vc"}


def test_ncti_of_a_candidate_that_fails_is_recorded_and_the_others_still_compared() -> None:
    y = np.arange(120) % 2
    rng = np.random.default_rng(16)
    broken = class_features(y, d=8, gap=2.0, seed=17)
    broken[3, 2] = np.nan  # a feature extractor that produced a NaN
    cands = [feature_candidate("good", class_features(y, d=8, gap=3.0, seed=17), np.zeros((1, 8))),
             feature_candidate("noise", rng.normal(size=(120, 8)), np.zeros((1, 8))),
             feature_candidate("broken", broken, np.zeros((1, 8)))]
    out = {m["model_id"]: m for m in measure(cands, dummy_target(y, np.zeros(1, np.int64)), [NCTIScorer()])}
    assert "ncti" not in out["broken"]["raw"] and "ValueError" in out["broken"]["errors"]["ncti"]
    assert out["good"]["raw"]["ncti"] > out["noise"]["raw"]["ncti"]
    assert not out["good"]["errors"] and not out["noise"]["errors"]


def test_scorers_run_with_single_threaded_blas_and_the_setting_is_restored() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    class Probe:
        name = "probe_threads"
        sub_scores = (SubScore("threads", Direction.HIGHER, ""),)
        seen: list[list[int]] = []

        def score(self, candidate: Candidate, target: TargetSample) -> dict[str, float]:
            self.seen.append(blas_threads())
            return {"threads": 1.0}

    y = np.arange(20) % 2
    cand = feature_candidate("a", class_features(y, d=4, gap=2.0, seed=18), np.zeros((1, 4)))
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() and all(n == 2 for n in blas_threads())
        measure([cand], dummy_target(y, np.zeros(1, np.int64)), [Probe()])
        assert all(n == 2 for n in blas_threads())  # restored
    assert Probe.seen == [[1] * len(blas_threads())]


def test_ncti_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="two classes"):
        ncti_terms(np.ones((10, 4)), np.zeros(10, np.int64))


# ---------------------------------------------------------------------------------------- agreement


def test_linear_cka_invariances() -> None:
    rng = np.random.default_rng(6)
    a = rng.normal(size=(200, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(a, 3.0 * a @ q + 5.0) == pytest.approx(1.0)  # rotation, scale and shift
    assert linear_cka(a, rng.normal(size=(200, 6))) < 0.15  # unrelated


def test_agreement_of_candidates_that_see_the_classes_and_of_one_that_does_not() -> None:
    y_tr, y_va = np.arange(160) % 2, np.arange(100) % 2
    rng = np.random.default_rng(7)
    f_tr, f_va = class_features(y_tr, d=8, gap=4.0, seed=8), class_features(y_va, d=8, gap=4.0, seed=8)
    cands = [feature_candidate("a", f_tr, f_va)]
    for name in ("b", "c"):  # the same information, rotated and scaled: linear CKA 1 with "a"
        q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
        cands.append(feature_candidate(name, 2.0 * f_tr @ q, 2.0 * f_va @ q))
    cands.append(feature_candidate("noise", rng.normal(size=(160, 8)), rng.normal(size=(100, 8))))
    target = dummy_target(y_tr, y_va)
    scorer = AgreementScorer()
    assert isinstance(scorer, CohortScorer)
    measured = {m["model_id"]: m for m in measure(cands, target, [scorer])}
    raw = {k: m["raw"] for k, m in measured.items()}
    for name in ("a", "b", "c"):
        assert raw[name]["agreement"] >= 0.95
    assert 0.3 <= raw["noise"]["agreement"] <= 0.7  # the others' consensus is the truth: chance agreement
    cka_noise = [linear_cka(f_va, cands[-1].encode("val", target.val_x).features)]
    # "a": CKA 1 with b and c, about 0 with the noise -> 1 - (1 + 1 + cka) / 3
    assert raw["a"]["dissimilarity"] == pytest.approx(1 - (2 + cka_noise[0]) / 3, abs=1e-6)
    assert raw["noise"]["dissimilarity"] > 0.85
    ranking = rank(list(measured.values()), sub_score_specs([scorer]), {"agreement": 1.0}, Spec())
    assert ranking.candidates[-1].model_id == "noise"
    assert "dissimilarity" in ranking.candidates[0].candidate_score().scores  # reported in model.proposed
    # one candidate alone: nothing to agree with
    alone = measure(cands[:1], target, [AgreementScorer()])
    assert alone[0]["raw"] == {}


# ---------------------------------------------------------------------------------------- PCA / CAM


def test_pca_class_variance_closed_form() -> None:
    rng = np.random.default_rng(9)
    y = np.arange(4000) % 2
    sign = 2.0 * y - 1.0
    # classes at ±3 along the dominant direction with unit noise: η² = 9 / (9 + 1)
    aligned = np.stack([3.0 * sign + rng.normal(size=4000), 0.1 * rng.normal(size=4000)], axis=1)
    assert pca_class_variance(aligned, y) == pytest.approx(0.9, abs=0.02)
    # the dominant direction (variance 9) is noise; the classes sit in the 1 % left over
    ignored = np.stack([3.0 * rng.normal(size=4000), 0.3 * sign + 0.1 * rng.normal(size=4000)], axis=1)
    assert pca_class_variance(ignored, y) < 0.01
    # both directions needed for 90 %: η² over both = 0.09 / (9 + 0.1)
    assert pca_class_variance(ignored, y, explained=0.999) == pytest.approx(0.09 / 9.1, abs=0.005)


def test_cam_focus_flat_and_concentrated_maps() -> None:
    flat = np.ones((3, 2, 4, 4))
    assert cam_focus(flat, np.array([1.0, -0.5])) == pytest.approx(0.25)
    spot = np.zeros((2, 2, 4, 4))
    spot[:, 0, 1, 2] = 5.0
    assert cam_focus(spot, np.array([0.7, 3.0])) == pytest.approx(1.0)


def pixel_candidate(size: int) -> Candidate:
    """A 'network' whose last-conv map is the (normalized, rectified) image itself: CAM = w * pixels."""
    backbone = SmallCNN(1)
    backbone.body = nn.Sequential(nn.ReLU())
    model = Classifier(backbone, feature_dim=1, num_classes=2)
    return Candidate.from_model(model, model_id="pixels", arch="small_cnn", source_dataset="synthetic",
                                weights_key="k", input_size=size, unfreeze_last=0)


def test_activation_scorer_cam_on_a_spot_and_on_flat_images() -> None:
    rng = np.random.default_rng(10)
    n, size = 48, 16
    y = np.arange(n) % 2
    spots = np.zeros((n, size, size, 1), np.uint8)  # dark images, one 4x4 spot, brighter for class 0
    for i in range(n):
        r, c = rng.integers(0, size - 4, 2)
        spots[i, r:r + 4, c:c + 4] = 255 if y[i] == 0 else 180
    flat = np.where(y[:, None, None, None] == 0, 200, 230).astype(np.uint8) * np.ones((n, size, size, 1), np.uint8)
    scorer = ActivationScorer(cam_images=16)
    for images, expected in ((spots, 1.0), (flat, 0.25)):  # 16 of 256 positions hold all the evidence / none stand out
        target = target_from_arrays(["a", "b"], train_x=images[:32], train_y=y[:32], val_x=images[32:], val_y=y[32:])
        out = scorer.score(pixel_candidate(size), target)
        assert out["cam_focus"] == pytest.approx(expected, abs=1e-6)
        assert 0.0 <= out["pca_class_var"] <= 1.0


# ---------------------------------------------------------------------------------------- domain


def test_natural_image_sample_is_deterministic_photographs() -> None:
    a = natural_image_sample(6, size=32, seed=0)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, natural_image_sample(6, size=32, seed=0))
    assert not np.array_equal(a, natural_image_sample(6, size=32, seed=1))
    assert float(a.std()) > 20  # photographs, not blank images


def test_domain_discriminator_with_the_imagenet_stand_in() -> None:
    torch.manual_seed(0)
    model = build_network("small_cnn", 2, pretrained=False)
    cand = Candidate.from_model(model, model_id="imnet", arch="small_cnn", source_dataset="imagenet",
                                weights_key="k", input_size=32, unfreeze_last=0,
                                source_sample=natural_image_sample(100, size=32, seed=0))
    scorer = DomainDiscriminatorScorer(seed=0)
    photos = natural_image_sample(110, size=32, seed=1)
    same = target_from_arrays(["a", "b"], train_x=photos[:100], train_y=np.arange(100) % 2, val_x=photos[100:],
                              val_y=np.arange(10) % 2)
    x, y = bars(110, seed=3, size=32)
    other = target_from_arrays(["a", "b"], train_x=x[:100, :, :, None], train_y=y[:100], val_x=x[100:, :, :, None],
                               val_y=y[100:])
    assert scorer.score(cand, same)["domain_sim"] > 0.6
    cand_other = Candidate.from_model(model, model_id="imnet", arch="small_cnn", source_dataset="imagenet",
                                      weights_key="k", input_size=32, unfreeze_last=0,
                                      source_sample=natural_image_sample(100, size=32, seed=0))
    assert scorer.score(cand_other, other)["domain_sim"] < 0.1


def test_new_scorers_follow_the_protocol() -> None:
    for scorer in (KNNScorer(), SFDAScorer(), AgreementScorer(), NCTIScorer(), ActivationScorer()):
        assert isinstance(scorer, Scorer)
        assert scorer.sub_scores
