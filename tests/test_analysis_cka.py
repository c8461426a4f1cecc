"""Linear CKA: its invariances, the unbiased HSIC against its definition as a U-statistic, minibatch CKA against
the full-data formula, and the block-by-block CKA of real models."""

from __future__ import annotations

import itertools
import json
from functools import partial

import chex
import jax
import numpy as np
import pytest
from idx_files import idx_folder_fixture
from smooth_images import smooth_images

from resnet_jax.analysis.blocks import block_parts, capture_blocks
from resnet_jax.analysis.cka import (
    MinibatchCKA,
    analyze_cka,
    block_cka,
    block_names,
    block_statistics,
    cka_report,
    gram,
    linear_cka,
    minibatch_cka,
    sown_blocks,
    unbiased_hsic,
)
from resnet_jax.analysis.common import ModelSnapshot
from resnet_jax.cli import main
from resnet_jax.models import create_model


def related(n: int, seed: int = 0, p: int = 12, q: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Two representations of n examples: X and a noisy linear map of it (CKA well between 0 and 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)).astype(np.float32) + 3.0  # uncentred, like ReLU outputs
    y = np.tanh(x @ rng.standard_normal((p, q))) + 0.5 * rng.standard_normal((n, q))
    return x, y.astype(np.float32)


def hsic_u_statistic(k: np.ndarray, l_: np.ndarray) -> float:
    """HSIC as Song et al. (2012, Thm. 3) define the unbiased estimator: the mean over ordered 4-tuples of distinct
    examples (t, u, v, w) of K_tu L_tu + K_tu L_vw - 2 K_tu L_tv. Brute force, for a few examples only."""
    tuples = np.array(list(itertools.permutations(range(len(k)), 4)))
    t, u, v, w = tuples.T
    return float(np.mean(k[t, u] * l_[t, u] + k[t, u] * l_[v, w] - 2 * k[t, u] * l_[t, v]))


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = related(64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    chex.assert_trees_all_close(minibatch_cka([x, x], batch_size=16), np.ones((2, 2)), atol=1e-5)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = related(96)
    rotation, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((x.shape[1], x.shape[1])))
    moved = (7.5 * x @ rotation).astype(np.float32)
    assert linear_cka(moved, y) == pytest.approx(linear_cka(x, y), rel=1e-5)
    assert 0.2 < linear_cka(x, y) < 0.95  # a case where the invariance means something
    cka = minibatch_cka([x, moved, y], batch_size=32)
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert cka[1, 2] == pytest.approx(cka[0, 2], rel=1e-5)
    stretched = x * np.linspace(1.0, 5.0, x.shape[1], dtype=np.float32)  # scaling each feature differently is not
    assert linear_cka(stretched, y) != pytest.approx(linear_cka(x, y), rel=1e-2)


def test_unbiased_hsic_is_the_u_statistic_of_its_definition():
    x, y = related(7)
    grams = np.stack([np.asarray(gram(x)), np.asarray(gram(y))])
    hsic = np.asarray(unbiased_hsic(grams))
    for i, j in itertools.product(range(2), repeat=2):
        assert hsic[i, j] == pytest.approx(hsic_u_statistic(grams[i], grams[j]), rel=1e-4), (i, j)
    raw = np.stack([x @ x.T, y @ y.T])  # uncentred Gram matrices: the estimator ignores the means
    chex.assert_trees_all_close(np.asarray(unbiased_hsic(raw)), hsic, rtol=1e-3)


def unbiased_cka(grams: list[list[np.ndarray]]) -> float:
    """Minibatch CKA from its definition: the mean U-statistic of each pair over minibatches, as a ratio."""

    def mean_hsic(i: int, j: int) -> float:
        return float(np.mean([hsic_u_statistic(batch[i], batch[j]) for batch in grams]))

    return mean_hsic(0, 1) / np.sqrt(mean_hsic(0, 0) * mean_hsic(1, 1))


def test_minibatch_cka_is_the_ratio_of_mean_unbiased_hsic_over_minibatches():
    x, y = related(21)  # three minibatches of 6, and 3 examples left out
    grams = [[np.asarray(gram(r[start : start + 6])) for r in (x, y)] for start in (0, 6, 12)]
    assert minibatch_cka([x, y], batch_size=6)[0, 1] == pytest.approx(unbiased_cka(grams), rel=1e-4)
    whole = [[np.asarray(gram(r[:7])) for r in (x, y)]]  # one minibatch: the full-data unbiased CKA
    assert minibatch_cka([x[:7], y[:7]], batch_size=7)[0, 1] == pytest.approx(unbiased_cka(whole), rel=1e-4)


def test_minibatch_cka_approaches_the_full_data_cka_and_removes_the_small_batch_bias():
    x, y = related(4096, seed=2)
    full = linear_cka(x, y)
    assert minibatch_cka([x, y], batch_size=512)[0, 1] == pytest.approx(full, abs=0.01)
    assert minibatch_cka([x, y], batch_size=64)[0, 1] == pytest.approx(full, abs=0.02)
    # Independent representations: the biased CKA of small batches is far from 0, the unbiased minibatch one is not.
    noise = np.random.default_rng(9).standard_normal((4096, 50)).astype(np.float32)
    biased = np.mean([linear_cka(x[s : s + 16], noise[s : s + 16]) for s in range(0, 4096, 16)])
    assert biased > 0.3
    assert abs(minibatch_cka([x, noise], batch_size=16)[0, 1]) < 0.05


def test_an_empty_accumulator_and_a_tiny_batch_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        MinibatchCKA().value()
    with pytest.raises(ValueError, match="at least 4"):
        MinibatchCKA().add(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="choose between 4"):
        minibatch_cka([np.zeros((10, 2))], batch_size=3)


def test_blocks_are_read_in_forward_order_with_numeric_block_numbers():
    value = (np.zeros(1),)
    tree = {"stage2": {"block0": {"output": value}}, "stage1": {f"block{i}": {"output": value} for i in (10, 2, 1)}}
    order = [path for path, _ in sown_blocks(tree)]
    assert order == ["stage1/block1", "stage1/block2", "stage1/block10", "stage2/block0"]


@pytest.fixture(scope="module")
def snapshots() -> list[ModelSnapshot]:
    images = smooth_images(4)
    made = []
    for name in ("resnet8", "plain8"):
        model = create_model(name)
        made.append(ModelSnapshot(name, model, jax.jit(partial(model.init, train=False))(jax.random.key(0), images)))
    return made


def test_block_cka_of_real_models(snapshots):
    images = smooth_images(24, seed=4)
    resnet, plain = snapshots
    assert block_names(resnet.model, resnet.variables, images) == ["stage1/block0", "stage2/block0", "stage3/block0"]
    matrix, ratios = block_cka([resnet, plain, resnet], images, batch_size=8)
    chex.assert_shape(matrix, (9, 9))
    chex.assert_trees_all_close(matrix, matrix.T, atol=1e-6)
    chex.assert_trees_all_close(np.diag(matrix), np.ones(9), atol=1e-5)
    chex.assert_trees_all_close(matrix[6:, 6:], matrix[:3, :3], atol=1e-6)  # the same model twice
    chex.assert_trees_all_close(matrix[:3, 6:], matrix[:3, :3], atol=1e-6)
    assert np.all(matrix < 1 + 1e-5) and not np.allclose(matrix[:3, 3:6], 1.0, atol=1e-3)
    assert np.all(np.isnan(ratios[1])) and np.all(np.isfinite(ratios[0])) and np.all(ratios[0] > 0)


def test_branch_to_skip_is_the_norm_of_the_branch_over_the_shortcut_per_example(snapshots):
    resnet = snapshots[0]
    images = smooth_images(5, seed=6)
    _, ratios = block_statistics(resnet.model, resnet.variables, images)
    for block, row in zip(capture_blocks(resnet.model, resnet.variables, images), ratios, strict=True):
        parts = block_parts(block, block.variables, block.inputs)
        norms = {part: np.linalg.norm(np.asarray(parts[part]).reshape(5, -1), axis=1) for part in parts}
        chex.assert_trees_all_close(np.asarray(row), norms["branch"] / norms["shortcut"], rtol=1e-5)


def test_cka_report_splits_the_matrix_by_snapshot_and_pair(snapshots):
    report = cka_report(snapshots, smooth_images(16, seed=8), batch_size=8)
    resnet, plain = report["runs"]
    assert resnet["label"] == "resnet8 init" and len(resnet["cka"]) == 3
    assert resnet["first_last_cka"] == resnet["cka"][0, -1]
    assert resnet["adjacent_cka"] == pytest.approx((resnet["cka"][0, 1] + resnet["cka"][1, 2]) / 2)
    assert plain["branch_to_skip"] == [None] * 3 and all(r > 0 for r in resnet["branch_to_skip"])
    (pair,) = report["pairs"]
    assert pair["labels"] == ["resnet8 init", "plain8 init"]
    assert pair["matched_block_cka"] == pytest.approx(np.mean(np.diag(pair["cka"])))


def test_analyze_cka_writes_its_files_and_refuses_a_bad_batch_size_first(snapshots, tmp_path, capsys):
    images = smooth_images(12, seed=9)
    with pytest.raises(ValueError, match="batch_size=13"):
        analyze_cka(snapshots, images, tmp_path / "bad", batch_size=13)
    assert not (tmp_path / "bad").exists()
    report = analyze_cka(snapshots, images, tmp_path / "out", batch_size=5)
    assert report["settings"]["examples"] == 10  # two whole minibatches
    assert capsys.readouterr().out.splitlines()[-1] == "cka 2 nets: 2/2 minibatches"
    written = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert written["runs"][1]["branch_to_skip"] == [None] * 3
    assert len(written["pairs"]) == 1 and np.asarray(written["pairs"][0]["cka"]).shape == (3, 3)
    assert (tmp_path / "out" / "cka_branch.csv").read_text().count("\n") == 7  # header and 2 x 3 blocks
    for name in ("cka.png", "cka_branch.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name


idx_dir = idx_folder_fixture(num_train=8, num_test=16)


@pytest.mark.slow  # over 30 s on 2 cores
def test_analyze_cka_compares_residual_with_plain_and_two_seeds(idx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "cka", "--model", "resnet8", "--model", "plain8", "--seeds", "2", "--data-dir", str(idx_dir)]
    assert main([*args, "--examples", "16", "--batch-size", "8", "--input-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet8 init (seed 0) vs plain8 init (seed 0): CKA of matched blocks" in printed
    report = json.loads((out / "cka.json").read_text())
    assert report["settings"]["examples"] == 16 and report["settings"]["batch_size"] == 8
    residual, other_seed, plain, _ = report["runs"]
    assert all(r > 0 for r in residual["branch_to_skip"]) and plain["branch_to_skip"] == [None] * 3
    chex.assert_trees_all_close(np.diag(residual["cka"]), np.ones(3), atol=1e-5)  # each block with itself
    seeds = next(pair for pair in report["pairs"] if pair["labels"][1] == other_seed["label"])
    assert seeds["labels"] == ["resnet8 init (seed 0)", "resnet8 init (seed 1)"]
    assert 0 < seeds["matched_block_cka"] < 0.99  # two initialisations: related, not the same
    assert len(report["pairs"]) == 6  # every two of the four
    for name in ("cka.png", "cka_branch.png"):
        assert (out / name).stat().st_size > 10_000, name


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--batch-size", "3"], "batch_size=3"), (["--seeds", "2", "--checkpoint", "run"], "two seeds of trained")],
)
def test_analyze_cka_refuses_bad_settings_before_any_work(tmp_path, capsys, options, message):
    assert main(["analyze", "cka", "--model", "resnet8", *options, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
