"""Knowledge distillation: the loss, the teacher inside the train step, and the checks of its settings."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import idx_folder_fixture
from test_compress_quantize import save_run
from test_train import small_config

from resnet_jax.compress.distill import Distillation, attach_teacher, check_distillation, soft_target_loss
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, load_run, new_train_state
from resnet_jax.train.steps import train_step

idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)


def test_the_soft_loss_at_temperature_1_is_the_kl_divergence_written_out():
    student = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = jnp.array([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    p_teacher, p_student = jax.nn.softmax(teacher), jax.nn.softmax(student)
    by_hand = np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=-1))
    chex.assert_trees_all_close(soft_target_loss(student, teacher, 1.0), by_hand, rtol=1e-6)
    assert float(soft_target_loss(teacher, teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def teacher(idx_dir, tmp_path_factory):
    """A run folder of resnet8 weights at initialisation, as a teacher (a trained one is not needed to test)."""
    workdir = tmp_path_factory.mktemp("teacher")
    config = small_config(idx_dir, seed=7)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))
    save_run(workdir, config, new_train_state(config, build_model(config, 10), tx, (28, 28, 1)))
    return workdir


def test_alpha_0_trains_bit_for_bit_as_without_a_teacher(idx_dir, teacher):
    config = small_config(idx_dir)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=8))
    plain = new_train_state(config, build_model(config, 10), tx, (28, 28, 1))
    config.distill.update(teacher=str(teacher), alpha=0.0)
    distilled = attach_teacher(plain, config, num_classes=10)
    assert isinstance(distilled.distill, Distillation)
    rng = np.random.default_rng(0)
    step = jax.jit(train_step)
    for _ in range(3):
        batch = {"image": rng.standard_normal((8, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 8)}
        plain, plain_metrics = step(plain, batch)
        distilled, distilled_metrics = step(distilled, batch)
    chex.assert_trees_all_equal(plain.params, distilled.params)
    chex.assert_trees_all_equal(plain_metrics["loss"], distilled_metrics["loss"])


@pytest.mark.slow  # a training run
def test_a_distilled_run_trains_and_records_its_teacher(idx_dir, teacher, tmp_path):
    config = small_config(idx_dir, model="resnet14")  # another zoo model as the student
    config.distill.update(teacher=str(teacher), temperature=2.0, alpha=0.5)
    train_and_evaluate(config, tmp_path)
    _, state, saved = load_run(tmp_path)  # read back without loading the teacher
    assert saved.distill.teacher == str(teacher) and int(state.step) == 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": 0.0}, "temperature > 0"),
        ({"alpha": 1.5}, "alpha in"),
        ({"teacher": "/nonexistent/run"}, "holds no checkpoint"),
    ],
)
def test_bad_distillation_settings_fail_before_anything_loads(idx_dir, teacher, change, message):
    config = small_config(idx_dir)
    config.distill.update({"teacher": str(teacher), **change})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_distillation(config)


def test_a_teacher_of_another_data_set_is_refused(idx_dir, teacher):
    config = small_config(idx_dir, dataset="mnist")
    config.distill.teacher = str(teacher)
    with pytest.raises(ValueError, match="trained on fashion_mnist, the student trains on mnist"):
        check_distillation(config)
    _, state, _ = load_run(teacher)
    config = small_config(idx_dir)
    config.distill.teacher = str(teacher)
    with pytest.raises(ValueError, match="10 classes, the student 100"):
        attach_teacher(state, config, num_classes=100)
