"""Lesions: deletion and reordering against the blocks run by hand, Kendall's tau, one compiled program, the CLI."""

from __future__ import annotations

import csv
import functools
import json
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import make_idx_folder
from smooth_images import smooth_images

from resnet_jax.analysis.blocks import block_parts, capture_blocks
from resnet_jax.analysis.common import ModelSnapshot
from resnet_jax.analysis.lesion import (
    LesionEval,
    block_infos,
    deletable,
    deletion_sets,
    kendall_tau,
    lesion_snapshot,
    lesioned_logits,
    random_order,
    reordered_variables,
    swap_groups,
)
from resnet_jax.cli import main
from resnet_jax.models import create_model

# two blocks per stage: identity blocks that can swap (stage 1), downsampling blocks (shortcut "A" or projection)
MODELS = {"resnet14": ("resnet14", {}), "resnet14 B": ("resnet14", {"shortcut": "B"}), "plain14": ("plain14", {})}


@functools.cache
def _setup(key: str, count: int = 6):
    name, overrides = MODELS[key]
    model = create_model(name, **overrides)
    images = smooth_images(count)
    return model, model.init(jax.random.key(0), images, train=False), images


def _by_hand(model, variables, images, replace):
    """Logits from the captured blocks run one after another on the stem's output, where ``replace(depth, parts)``
    picks each block's output, then the head applied by hand (post-activation nets: pool, then dense)."""
    blocks = capture_blocks(model, variables, images)
    h = blocks[0].inputs
    for block in blocks:
        h = replace(block.info.depth, block_parts(block, block.variables, h), h)
    head = variables["params"]["head"]
    return h.mean(axis=(1, 2)) @ head["kernel"] + head["bias"]


@pytest.mark.parametrize("key", list(MODELS))
def test_deleting_nothing_reproduces_the_model(key):
    model, variables, images = _setup(key)
    n = len(block_infos(model, variables, images))
    expected, _ = model.apply(variables, images, train=False)
    np.testing.assert_array_equal(lesioned_logits(model, variables, images, jnp.zeros(n, bool)), expected)
    evaluate = LesionEval(model, batch_size=4)  # 6 images: the second batch is padded
    compiled, _ = jax.jit(partial(model.apply, train=False))(variables, images)
    np.testing.assert_array_equal(evaluate.predictions(variables, images, [False] * n), np.argmax(compiled, -1))


@pytest.mark.parametrize("key", ["resnet14", "resnet14 B"])
def test_deleting_a_block_puts_its_shortcut_in_its_place(key):
    model, variables, images = _setup(key)
    infos = block_infos(model, variables, images)
    assert [info.kind for info in infos][2] == ("pad" if key == "resnet14" else "projection")
    baseline, _ = model.apply(variables, images, train=False)
    for deleted in range(len(infos)):
        mask = jnp.arange(len(infos)) == deleted
        logits = lesioned_logits(model, variables, images, mask)
        expected = _by_hand(model, variables, images, lambda d, p, h, i=deleted: p["shortcut" if d == i else "output"])
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(logits - baseline).max()) > 1e-4, infos[deleted].name


def test_a_plain_net_loses_only_its_shape_preserving_blocks():
    model, variables, images = _setup("plain14")
    infos = block_infos(model, variables, images)
    assert [deletable(info) for info in infos] == [True, True, False, True, False, True]
    for deleted in (1, 3):  # y = x
        mask = jnp.arange(6) == deleted
        expected = _by_hand(model, variables, images, lambda d, p, h, i=deleted: h if d == i else p["output"])
        np.testing.assert_allclose(lesioned_logits(model, variables, images, mask), expected, rtol=1e-5, atol=1e-5)
    snapshot = ModelSnapshot("plain14", model, variables)
    report = lesion_snapshot(snapshot, images, jnp.arange(6) % 10, LesionEval(model), 2, np.random.default_rng(0))
    assert [row["error"] is None for row in report["single"]] == [False, False, True, False, True, False]
    assert [row["downsampling"] for row in report["single"]] == [False, False, True, False, True, False]
    assert not report["residual"] and "random" not in report and "reorder" not in report


def test_kendall_tau():
    assert kendall_tau(range(7)) == 1.0
    assert kendall_tau(list(range(7))[::-1]) == -1.0
    assert kendall_tau([1, 0, 2, 3]) == pytest.approx(2 / 3)  # 5 of 6 pairs in order, 1 not
    assert kendall_tau([0, 1, 2, 4, 3, 5]) == pytest.approx(13 / 15)


def test_reordering_runs_the_swapped_blocks_in_their_new_places():
    model, variables, images = _setup("resnet14")
    infos = block_infos(model, variables, images)
    assert swap_groups(infos) == [[0, 1]]  # stages 2 and 3 have one shape-preserving block each
    same = reordered_variables(variables, infos, range(6))
    chex.assert_trees_all_equal(same, variables)
    no_deletion = jnp.zeros(6, bool)
    np.testing.assert_array_equal(
        lesioned_logits(model, same, images, no_deletion), lesioned_logits(model, variables, images, no_deletion)
    )
    swapped = lesioned_logits(model, reordered_variables(variables, infos, [1, 0, 2, 3, 4, 5]), images, no_deletion)
    blocks = capture_blocks(model, variables, images)
    h = blocks[0].inputs
    for depth in (1, 0, 2, 3, 4, 5):
        h = block_parts(blocks[depth], blocks[depth].variables, h)["output"]
    head = variables["params"]["head"]
    np.testing.assert_allclose(swapped, h.mean(axis=(1, 2)) @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(swapped - lesioned_logits(model, variables, images, no_deletion)).max()) > 1e-4
    with pytest.raises(ValueError, match="cannot run in place"):
        reordered_variables(variables, infos, [0, 2, 1, 3, 4, 5])  # a downsampling block
    with pytest.raises(ValueError, match="not a permutation"):
        reordered_variables(variables, infos, [0, 0, 2, 3, 4, 5])


def test_random_orders_and_deletion_sets():
    rng = np.random.default_rng(0)
    groups = [[0, 1, 2], [4, 5]]
    for swaps in (1, 3, 8):
        order = random_order(groups, 7, swaps, rng)
        assert sorted(order) == list(range(7)) and order[3] == 3 and order[6] == 6
        assert set(order[:3]) == {0, 1, 2}
    assert random_order(groups, 7, 1, rng) != list(range(7))  # one swap always moves two blocks
    assert deletion_sets([0, 1, 3, 5], 3, 5, rng) == [(0, 1, 3), (0, 1, 5), (0, 3, 5), (1, 3, 5)]  # all 4
    drawn = deletion_sets([0, 1, 3, 5], 2, 3, rng)
    assert len(drawn) == 3 and all(len(set(s)) == 2 and set(s) <= {0, 1, 3, 5} for s in drawn)


def test_one_compiled_program_serves_every_lesion(capsys):
    model, variables, images = _setup("resnet14")
    evaluate = LesionEval(model, batch_size=8)
    labels = jnp.arange(6) % 10
    report = lesion_snapshot(
        ModelSnapshot("resnet14", model, variables), images, labels, evaluate, 2, np.random.default_rng(0)
    )
    assert evaluate.traces == 1
    evaluations = 1 + 6 + 7 + 4  # baseline, single deletions, random deletions, reorderings
    assert capsys.readouterr().out.splitlines()[-1] == f"lesion resnet14 init: {evaluations}/{evaluations} evaluations"
    assert len(report["single"]) == 6 and all(row["error"] is not None for row in report["single"])
    assert [row["deleted"] for row in report["random"]] == [1, 1, 2, 2, 3, 3, 4]  # the four-block set only once
    assert len(report["reorder"]) == 4 and all(
        row["kendall_tau"] == pytest.approx(13 / 15) for row in report["reorder"][:2]
    )
    predictions = np.argmax(model.apply(variables, images, train=False)[0], -1)
    assert report["baseline_error"] == pytest.approx(float(np.mean(predictions != np.asarray(labels))))


@pytest.mark.slow  # over 30 s on 2 cores
def test_analyze_lesion_writes_tables_and_plots(tmp_path, capsys):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=8, num_test=12)
    out = tmp_path / "out"
    args = ["analyze", "lesion", "--model", "resnet14", "--model", "plain14", "--data-dir", str(data)]
    args += ["--examples", "12", "--input-size", "8", "--draws", "2", "--batch-size", "8"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet14 init: baseline error" in printed and "plain14 init: baseline error" in printed
    report = json.loads((out / "lesion.json").read_text())
    assert [m["label"] for m in report["models"]] == ["resnet14 init", "plain14 init"]
    plain = report["summary"]["plain14 init"]
    assert plain["downsampling_errors"] == {"stage2/block0": None, "stage3/block0": None}
    assert set(report["summary"]["resnet14 init"]["downsampling_errors"]) == {"stage2/block0", "stage3/block0"}
    names = [f"lesion_{study}.{ext}" for study in ("single", "random", "reorder") for ext in ("csv", "png")]
    assert report["files"] == [str(out / "lesion.json")] + [str(out / name) for name in names]
    for name in names[::2]:
        with (out / name).open() as f:
            rows = list(csv.DictReader(f))
        assert rows and all(row["baseline_error"] != "" for row in rows), name
    for name in names[1::2]:
        assert (out / name).stat().st_size > 10_000


def test_analyze_lesion_explains_bad_settings(capsys):
    assert main(["analyze", "lesion", "--model", "resnet14", "--draws", "0"]) == 2
    assert "(--draws)" in capsys.readouterr().err
    assert main(["analyze", "lesion", "--model", "resnet14", "--batch-size", "0"]) == 2
    assert "(--batch-size)" in capsys.readouterr().err
