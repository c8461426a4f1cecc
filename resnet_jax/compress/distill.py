"""Knowledge distillation from a trained teacher run (``--config.distill.*``; Hinton et al. 2015).

The student's loss is

    (1 - alpha) * CE(labels, student) + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))

where T is the temperature (the T**2 keeps the soft term's gradients on the scale of the hard term's as T
changes). The teacher's logits come from the same compiled train step: the teacher is frozen (its weights are
constants of the step, no gradient reaches them) and runs in eval mode (running BN statistics). It is any run
folder of the same data set and class count; the student is any model of the zoo. The checkpoints record the
teacher's path in their config, not its weights: a resumed run loads the teacher again from that path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.runs import load_run


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static part of the compiled step
class Distillation:
    """A frozen teacher (its ``apply_fn`` and ``variables``) and the loss that mixes its soft targets in."""

    apply_fn: Any
    variables: Any
    temperature: float
    alpha: float

    def loss(self, hard_loss: jax.Array, logits: jax.Array, images: jax.Array) -> jax.Array:
        """The student's loss, given its mean cross-entropy ``hard_loss`` and its ``logits`` on ``images``."""
        teacher, _ = self.apply_fn(self.variables, images, train=False)
        soft = soft_target_loss(logits, jax.lax.stop_gradient(teacher), self.temperature)
        return (1.0 - self.alpha) * hard_loss + self.alpha * soft


def soft_target_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """T**2 times the mean over the batch of KL(softmax(teacher / T) || softmax(student / T))."""
    targets = jax.nn.softmax(teacher_logits / temperature)
    kl = optax.softmax_cross_entropy(logits / temperature, targets) + jnp.sum(
        targets * jax.nn.log_softmax(teacher_logits / temperature), axis=-1
    )
    return temperature**2 * jnp.mean(kl)


def check_distillation(config: ml_collections.ConfigDict) -> None:
    """The settings of ``config.distill`` and its teacher's run, checked before anything loads or compiles: a
    teacher of another data set (or class count) cannot teach this student."""
    settings = config.get("distill")
    if settings is None or not settings.teacher:
        return
    if not settings.temperature > 0 or not 0.0 <= settings.alpha <= 1.0:
        raise ValueError(
            f"distill.temperature={settings.temperature}, distill.alpha={settings.alpha}: give a temperature > 0 "
            "(e.g. 4) and an alpha in [0, 1] (the weight of the teacher's soft targets, e.g. 0.9)."
        )
    checkpoints = Checkpoints(settings.teacher, every_steps=1, keep_latest=1, async_save=False)
    if checkpoints.latest_step() is None:
        raise FileNotFoundError(f"distill.teacher={settings.teacher} holds no checkpoint; train the teacher first.")
    meta = checkpoints.read_meta()
    checkpoints.close()
    if meta["dataset"] != config.dataset:
        raise ValueError(
            f"The teacher {settings.teacher} was trained on {meta['dataset']}, the student trains on {config.dataset}; "
            "distill from a teacher of the same data set."
        )
    teacher_classes, student_classes = meta.get("num_classes"), config.get("num_classes")
    if teacher_classes is not None and student_classes is not None and teacher_classes != student_classes:
        raise ValueError(f"The teacher has {teacher_classes} classes, the student {student_classes}; they must agree.")


def attach_teacher(state: Any, config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The train state with the teacher of ``config.distill`` (unchanged when the run distils nothing)."""
    settings = config.get("distill")
    if settings is None or not settings.teacher:
        return state
    model, teacher, _ = load_run(Path(settings.teacher))
    if model.num_classes != num_classes:
        raise ValueError(f"The teacher has {model.num_classes} classes, the student {num_classes}; they must agree.")
    variables = {"params": teacher.params, "batch_stats": teacher.batch_stats}
    return state.replace(distill=Distillation(model.apply, variables, float(settings.temperature), settings.alpha))
