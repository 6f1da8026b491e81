"""The staged network: named stages, shapes, freeze boundaries, ONNX prefix; trunk features via the store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dlforge.common.backends import open_objects
from dlforge.common.errors import InvalidInput
from dlforge.vision.networks import build_network, freeze_backbone
from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.staged import StagedNetwork, imagenet_trunk

torch.set_num_threads(1)

# EfficientNet-Lite0 at 224 px (Tan & Le 2019, lite variant): channels and strides per stage.
EXPECTED_224 = {"stem": (32, 112), "c16": (16, 112), "c24": (24, 56), "c40": (40, 28), "c80": (80, 14),
                "c112": (112, 14), "c192": (192, 7), "c320": (320, 7), "head": (1280, 7)}


@pytest.fixture(scope="module")
def trunk() -> StagedNetwork:
    return imagenet_trunk()


def test_stage_shapes_at_224(trunk: StagedNetwork) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        for stage, (channels, side) in EXPECTED_224.items():
            out = trunk.run(x, 0, trunk.index(stage) + 1)
            assert tuple(out.shape) == (2, channels, side, side), stage
    assert len(trunk) == 18 and trunk.names[0] == "stem" and trunk.names[-1] == "head"


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_each_stage_is_the_last_unit_of_its_width(arch: str) -> None:
    from dlforge.vision.staged import EFFICIENTNET_LITE0_STAGES

    net = StagedNetwork(build_network(arch, 2, pretrained=False), arch=arch).eval()
    x = torch.randn(1, 3, 64, 64)
    widths = []
    with torch.inference_mode():
        for unit in net.units:
            x = unit(x)
            widths.append(x.shape[1])
    # measured: the unit after which the width is N for the last time, for every block width N
    want = {f"c{w}": net.names[max(i for i, v in enumerate(widths) if v == w)]
            for w in widths[1:-1]}
    assert {k: v for k, v in net.stages.items() if k not in ("stem", "head")} == want
    assert net.stages["stem"] == "stem" and net.stages["head"] == "head"
    if arch == "efficientnet_lite0":
        assert net.stages == EFFICIENTNET_LITE0_STAGES
    else:  # deeper: 21 blocks
        assert len(net) == 23 and net.stages["c16"] == "block00" and net.names[-2] == "block20"


def test_pooled_equals_the_classifier_features_and_tail_of_prefix_is_the_whole(trunk: StagedNetwork) -> None:
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        whole = trunk.model.features(x)
        np.testing.assert_allclose(trunk(x).numpy(), whole.numpy(), atol=1e-5)
        for b in (0, 5, 15, 18):
            np.testing.assert_allclose(trunk.tail(b)(trunk.prefix(b)(x)).numpy(), whole.numpy(), atol=1e-5)
        pooled, acts = trunk.outputs(x, pooled=[4, 17], boundaries=[15])
        np.testing.assert_allclose(pooled[1].numpy(), whole.numpy(), atol=1e-5)
        np.testing.assert_allclose(pooled[0].numpy(), trunk.run(x, 0, 5).mean((2, 3)).numpy(), atol=1e-6)
        np.testing.assert_allclose(acts[0].numpy(), trunk.prefix(15)(x).numpy(), atol=1e-6)


def test_freeze_boundary_is_the_one_freeze_backbone_uses() -> None:
    model = build_network("efficientnet_lite0", 2, pretrained=False)
    net = StagedNetwork(model, arch="efficientnet_lite0")
    for unfreeze in (0, 1, 3, 18):
        freeze_backbone(model, unfreeze_last=unfreeze)
        b = net.boundary(unfreeze)
        assert b == 18 - unfreeze
        assert not any(p.requires_grad for u in net.units[:b] for p in u.parameters())
        assert all(p.requires_grad for u in net.units[b:] for p in u.parameters())
    with pytest.raises(InvalidInput, match="unfreeze=19"):
        net.boundary(19)
    with pytest.raises(InvalidInput, match="no stage or unit 'c999'"):
        net.index("c999")


def test_small_cnn_units_are_its_convs_and_batch_norms() -> None:
    model = build_network("small_cnn", 3, pretrained=False).eval()
    net = StagedNetwork(model, arch="small_cnn")
    assert net.names == ["conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        assert tuple(net.run(x, 0, 1).shape) == (2, 32, 64, 64)  # the first conv keeps the size
        assert tuple(net.run(x, 0, net.index("group0") + 1).shape) == (2, 32, 32, 32)  # BN, ReLU, 2x2 max pool
        assert tuple(net.run(x, 0, net.index("group3") + 1).shape) == (2, 128, 8, 8)  # no pool after the last
        np.testing.assert_allclose(net(x).numpy(), model.features(x).numpy(), atol=1e-6)
    freeze_backbone(model, unfreeze_last=3)
    trained = [n for n, u in zip(net.names, net.units, strict=True) if any(p.requires_grad for p in u.parameters())]
    assert trained == ["bn2", "conv3", "bn3"] and net.boundary(3) == 5


def test_onnx_prefix_matches_torch(trunk: StagedNetwork) -> None:
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 3, 128, 128)
    options = ort.SessionOptions()
    # The graph as exported (ORT's conv-BN fusion alone moves deep activations by up to ~5e-5)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for boundary in (5, 15):
        session = ort.InferenceSession(trunk.export_prefix_onnx(boundary, size=128), options,
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
        with torch.inference_mode():
            want = trunk.prefix(boundary)(x).numpy()
        assert got.shape == want.shape
        # 1e-5 of the activations' scale: float32 kernels of two libraries differ in rounding after
        # 15 blocks by ~4e-6 of it (measured); a wrong export differs by far more.
        scale = float(np.abs(want).max())
        assert float(np.abs(got - want).max()) <= 1e-5 * scale, (boundary, float(np.abs(got - want).max()), scale)


def test_digest_depends_only_on_the_units_before_the_stop() -> None:
    torch.manual_seed(0)
    a = StagedNetwork(build_network("efficientnet_lite0", 2, pretrained=False), arch="efficientnet_lite0")
    b = StagedNetwork(build_network("efficientnet_lite0", 2, pretrained=False), arch="efficientnet_lite0")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.units[10].block._project_conv.weight.add_(1.0)  # type: ignore[union-attr,operator]
    assert a.digest(10) == b.digest(10)
    assert a.digest(11) != b.digest(11)


def _contents(n: int) -> list[str]:
    return [hashlib.sha256(f"img{k}".encode()).hexdigest() for k in range(n)]


def test_trunk_features_run_from_pixels_once_and_derive_deeper_outputs(tmp_path: Path, trunk: StagedNetwork) -> None:
    from dlforge.vision.features import FeatureStore
    from dlforge.vision.images import to_tensor
    from dlforge.vision.networks import spec_of
    from dlforge.vision.trunk import TrunkFeatures

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    contents = _contents(5)
    loads: list[list[int]] = []

    def load(rows: list[int]) -> np.ndarray:
        loads.append(rows)
        return pixels[rows]

    objects = open_objects(f"file://{tmp_path}/objects")
    features = TrunkFeatures(FeatureStore(objects), trunk, runtime="torch", batch_size=4)
    with observing(CountingObserver()) as counts:
        first = features.pooled(contents[:3], size=64, stages=["c40", "head"], load=load)
        # a second request at the same size: later stages and a deeper boundary, no pass from pixels
        second = TrunkFeatures(FeatureStore(objects), trunk, runtime="torch").pooled(
            contents[:3], size=64, stages=["c320", "head"], load=load)
        acts = features.activations(contents[:3], size=64, boundary=17, load=load)
        # two new images and one known: only the new ones run
        features.pooled([contents[4], contents[0], contents[3]], size=64, stages=["head"], load=load)
    assert sorted(counts.embeds.values()) == [1] * 5
    assert loads == [[0, 1, 2], [0, 2]]  # rows of the request in which the images first appear

    spec = spec_of("efficientnet_lite0")
    x = to_tensor(pixels[:3], spec.__class__(**{**spec.__dict__, "input_size": 64}))
    # the reference from the network's own modules, not dlforge.vision.staged: the 40-channel stage ends after
    # block 4, the 320-channel one after block 15 (the input of unit 17, the head), then the head conv
    from dlforge.vision.networks import efficientnet_lite0_imagenet

    raw = efficientnet_lite0_imagenet().eval()
    with torch.inference_mode():
        h = raw._swish(raw._bn0(raw._conv_stem(x)))
        for idx, block in enumerate(raw._blocks):
            h = block(h)
            if idx == 4:
                c40 = h.mean((2, 3))
        b17, c320 = h, h.mean((2, 3))
        head = raw._swish(raw._bn1(raw._conv_head(h))).mean((2, 3))
    np.testing.assert_allclose(first["c40"], c40.numpy(), atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(first["head"], head.numpy(), atol=5e-5, rtol=1e-5)
    # derived from the stored float16 shared-boundary activation: float16 accuracy
    np.testing.assert_allclose(second["c320"], c320.numpy(), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(second["head"], head.numpy(), atol=5e-5, rtol=1e-5)  # stored by the first pass
    np.testing.assert_allclose(acts.astype(np.float32), b17.numpy(), atol=5e-2, rtol=2e-2)


def test_trunk_features_onnx_and_torch_agree(tmp_path: Path, trunk: StagedNetwork) -> None:
    pytest.importorskip("onnxruntime")
    from dlforge.vision.features import FeatureStore
    from dlforge.vision.trunk import TrunkFeatures

    pixels = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    got = {}
    for runtime in ("onnxruntime", "torch"):
        features = TrunkFeatures(FeatureStore(open_objects(f"file://{tmp_path}/{runtime}")), trunk, runtime=runtime)
        got[runtime] = features.pooled(_contents(3), size=64, stages=["c80", "head"], load=lambda r: pixels[r])
    for stage in ("c80", "head"):
        np.testing.assert_allclose(got["onnxruntime"][stage], got["torch"][stage], atol=1e-4, rtol=1e-4)


def test_outputs_at_the_shared_boundary_itself_come_from_the_stored_activation(tmp_path: Path,
                                                                                trunk: StagedNetwork) -> None:
    from dlforge.vision.features import FeatureStore
    from dlforge.vision.trunk import TrunkFeatures

    pixels = np.random.default_rng(2).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    features = TrunkFeatures(FeatureStore(open_objects(f"file://{tmp_path}/o")), trunk, runtime="torch")
    assert features.shared == 15
    with observing(CountingObserver()) as counts:
        features.pooled(_contents(2), size=64, stages=["c320"], load=lambda r: pixels[r])  # stores b15
        acts = features.activations(_contents(2), size=64, boundary=15, load=lambda r: pixels[r])
        pooled13 = features.pooled(_contents(2), size=64, stages=["block13"], load=lambda r: pixels[r])["block13"]
    assert sorted(counts.embeds.values()) == [1, 1]
    np.testing.assert_allclose(pooled13, acts.astype(np.float32).mean(axis=(2, 3)), atol=1e-3)


def test_a_view_is_its_own_value_and_its_own_pass(tmp_path: Path, trunk: StagedNetwork) -> None:
    from dlforge.vision.features import FeatureStore
    from dlforge.vision.trunk import TrunkFeatures

    pixels = np.random.default_rng(3).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    store = FeatureStore(open_objects(f"file://{tmp_path}/o"))
    plain = TrunkFeatures(store, trunk, runtime="torch")
    flipped = TrunkFeatures(store, trunk, runtime="torch", view="hflip")
    with observing(CountingObserver()) as counts:
        a = plain.pooled(_contents(2), size=64, stages=["head"], load=lambda r: pixels[r])["head"]
        b = flipped.pooled(_contents(2), size=64, stages=["head"], load=lambda r: pixels[r][:, :, ::-1])["head"]
        b2 = flipped.pooled(_contents(2), size=64, stages=["head"], load=lambda r: pixels[r][:, :, ::-1])["head"]
    c = _contents(2)
    t = plain.trunk_id()
    assert dict(counts.embeds) == {(t, 64, c[0]): 1, (t, 64, c[1]): 1, (t, 64, f"{c[0]}/hflip"): 1,
                                   (t, 64, f"{c[1]}/hflip"): 1}
    assert plain.preprocess() + "/view=hflip" == flipped.preprocess()
    assert float(np.abs(a - b).max()) > 1e-3  # a flipped image has other features
    np.testing.assert_array_equal(b, b2)


def test_no_images_give_no_rows_of_the_shape_images_would_have(tmp_path: Path, trunk: StagedNetwork) -> None:
    """An empty request (a class or split without items) is zero rows with the trailing shape a non-empty
    one has, so callers concatenate and read ``shape[1:]`` as for any other; nothing is counted as embedded."""
    from dlforge.vision.features import FeatureStore
    from dlforge.vision.trunk import TrunkFeatures

    none = np.zeros((0, 64, 64, 3), dtype=np.uint8)
    stored = TrunkFeatures(FeatureStore(open_objects(f"file://{tmp_path}/o")), trunk, runtime="torch")
    unstored = TrunkFeatures(None, trunk, runtime="torch")
    with observing(CountingObserver()) as counts:
        c80, head = unstored.pooled_arrays(none, stages=["c80", "head"])
        acts = unstored.activation_arrays(none, boundary=15)  # the input of unit 15: 192 channels at stride 32
        pooled = stored.pooled([], size=64, stages=["c40", "head"], load=lambda r: none[r])
        stored_acts = stored.activations([], size=64, boundary=15, load=lambda r: none[r])
    assert (c80.shape, c80.dtype, head.shape, head.dtype) == ((0, 80), np.float32, (0, 1280), np.float32)
    assert (pooled["c40"].shape, pooled["head"].shape) == ((0, 40), (0, 1280))
    assert pooled["c40"].dtype == pooled["head"].dtype == np.float32
    assert acts.shape == stored_acts.shape == (0, 192, 2, 2) and acts.dtype == stored_acts.dtype == np.float16
    assert not counts.embeds
    # the default runtime answers too, without exporting a network for the empty call
    sessions = set(trunk.onnx_sessions)
    onnx = TrunkFeatures(None, trunk).activation_arrays(none, boundary=15)
    assert (onnx.shape, onnx.dtype) == ((0, 192, 2, 2), np.float16) and set(trunk.onnx_sessions) == sessions
    with pytest.raises(ValueError, match="N x S x S x C"):
        unstored.activation_arrays(np.zeros((0,), dtype=np.uint8), boundary=15)
