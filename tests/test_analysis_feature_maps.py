"""Feature maps per stage: shapes, the most active channels, and the files of the analysis."""

from __future__ import annotations

import json
from functools import partial

import jax
import numpy as np
import pytest
from idx_files import make_idx_folder
from smooth_images import smooth_images

from resnet_jax.analysis.common import ModelSnapshot
from resnet_jax.analysis.feature_maps import analyze_features, feature_maps, most_active_channels
from resnet_jax.cli import main
from resnet_jax.models import create_model


@pytest.fixture(scope="module")
def snapshots() -> list[ModelSnapshot]:
    images = smooth_images(4)
    made = []
    for name in ("resnet8", "plain8"):
        model = create_model(name)
        made.append(ModelSnapshot(name, model, jax.jit(partial(model.init, train=False))(jax.random.key(0), images)))
    return made


def test_the_most_active_channels_are_the_top_ones_in_order():
    maps = np.zeros((2, 3, 3, 5), np.float32)
    maps[0, ..., 3], maps[0, ..., 1], maps[0, 0, 0, 4] = 2.0, -3.0, 50.0  # channel 4: one very active pixel
    maps[1, ..., 0] = 1.0
    np.testing.assert_array_equal(most_active_channels(maps, 3)[0], [4, 1, 3])  # |activity| 5.6, 3, 2
    assert most_active_channels(maps, 1)[1, 0] == 0
    with pytest.raises(ValueError, match="between 1 and the 5"):
        most_active_channels(maps, 6)


def test_feature_maps_per_stage_have_the_stage_shapes_and_its_top_channels(snapshots):
    resnet = snapshots[0]
    images = smooth_images(3, seed=2)
    stages = feature_maps(resnet.model, resnet.variables, images, top=2)
    assert list(stages) == ["stem", "c0", "c1", "c2"]
    _, features = resnet.model.apply(resnet.variables, images, train=False)
    for name, (height, width, channels) in {"stem": (8, 8, 16), "c1": (4, 4, 32), "c2": (2, 2, 64)}.items():
        stage, maps = stages[name], np.asarray(features[name])
        assert stage["shape"] == [height, width, channels]
        assert stage["channel_mean"].shape == (3, height, width) and stage["maps"].shape == (3, 2, height, width)
        activity = np.abs(maps).mean(axis=(1, 2))  # (3, channels)
        for image in range(3):
            top = stage["channels"][image]
            assert (
                set(top) == set(np.argsort(activity[image])[-2:]) and activity[image, top[0]] >= activity[image, top[1]]
            )
            np.testing.assert_allclose(stage["maps"][image, 1], maps[image, ..., top[1]])
            np.testing.assert_allclose(stage["activity"][image], activity[image, top], rtol=1e-6)
        np.testing.assert_allclose(stage["channel_mean"], maps.mean(axis=-1), rtol=1e-6)


def test_analyze_features_writes_a_picture_per_model(snapshots, tmp_path):
    report = analyze_features(snapshots, smooth_images(2, seed=4), tmp_path, top=2)
    written = json.loads((tmp_path / "features.json").read_text())
    assert [run["label"] for run in written["runs"]] == ["resnet8 init", "plain8 init"]
    assert np.asarray(written["runs"][1]["stages"]["c2"]["channels"]).shape == (2, 2)
    for name in ("features_1_resnet8_init.png", "features_2_plain8_init.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert len(report["files"]) == 3
    with pytest.raises(ValueError, match="top=0"):
        analyze_features(snapshots, smooth_images(2), tmp_path / "bad", top=0)


@pytest.mark.slow  # two models through the command; the library test above covers the maps
def test_analyze_features_draws_residual_and_plain_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "idx"
    make_idx_folder(data, compressed=False, num_train=4, num_test=4)
    out = tmp_path / "out"
    args = ["analyze", "features", "--model", "resnet8", "--model", "plain8", "--data-dir", str(data)]
    assert main([*args, "--examples", "2", "--top", "2", "--out", str(out)]) == 0
    assert "2 model(s), 2 image(s)" in capsys.readouterr().out
    report = json.loads((out / "features.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["resnet8 init", "plain8 init"]
    assert report["runs"][0]["stages"]["c2"]["shape"] == [7, 7, 64]  # 28 x 28 images, stride 4
    assert np.asarray(report["runs"][1]["stages"]["stem"]["channels"]).shape == (2, 2)
    for name in ("features_1_resnet8_init.png", "features_2_plain8_init.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert main(["analyze", "features", "--model", "resnet8", "--top", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--top 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
