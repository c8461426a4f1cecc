"""Block Jacobians J = dh_l/dh_{l-1} and branch Jacobians J_F: exact on small inputs, matrix-free at full size.

Everything is per example. With BN in inference mode the examples of a batch are independent, so
the Jacobian of a batch is block-diagonal: one jvp (or vjp) of the batch applies every example's
own Jacobian to that example's probe, and the estimators below run on all examples at once. The
numbers reported for a batch are means over its examples (deviations: maxima).

- Top singular values: Lanczos on J^T J (one jvp and one vjp per step, full reorthogonalisation).
- ||J||_F: Hutchinson, ||J||_F^2 = E ||J v||^2 over Rademacher probes v.
- The identity that applies (`blocks.FORMS`): J v against D(S v + J_F v) with J, J_F and J_s
  each from autodiff of y(x), F(x), shortcut(x), and S the analytic shortcut (I, P or W_s).
  Probes are random vectors at full size; the complete basis makes the same check exact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.blocks import Block, block_parts, capture_blocks
from resnet_jax.analysis.common import (
    ModelSnapshot,
    ProgressLine,
    line_styles,
    pyplot,
    save_figure,
    single_threaded_blas,
    write_csv,
    write_json,
)
from resnet_jax.analysis.interception import BLOCK, Call, intercept

Parts = dict[str, jax.Array]


# --- applying the Jacobians to probes ------------------------------------------------------------


def linearize_block(block: Block, variables: dict[str, Any], x: jax.Array) -> tuple[Parts, Callable[..., Parts]]:
    """The block's parts at ``x``, and the map v -> {output: J v, branch: J_F v, shortcut: J_s v} (one forward
    pass serves any number of products)."""
    return jax.linearize(partial(block_parts, block, variables), x)


def analytic_shortcut(block: Block, variables: dict[str, Any]) -> Callable[[jax.Array], jax.Array] | None:
    """S, the shortcut's Jacobian as theory has it: I; P (subsample by the stride, zero-pad the new channels at
    the end); W_s, the linear part of the affine conv + BN (W_s v = s(v) - s(0)). None where there is no
    fixed map: plain blocks and pre-activation projections, which read relu(bn(x))."""
    kind = block.info.kind
    if kind == "identity":
        return lambda v: v
    if kind == "pad":
        source = pad_indices(block.info.input_shape, block.info.output_shape, block.module.strides)
        return partial(apply_indices, source=source, output_shape=block.info.output_shape)
    if kind == "projection" and not block.info.preact:
        zero = block_parts(block, variables, jnp.zeros((1, *block.info.input_shape)))["shortcut"]
        return lambda v: block_parts(block, variables, v)["shortcut"] - zero
    return None


def pad_indices(input_shape: Sequence[int], output_shape: Sequence[int], stride: int) -> np.ndarray:
    """For every output entry of P (flat, H'W'C'), the flat input entry it copies, or -1 for a padded channel."""
    (_, width, channels), (out_h, out_w, out_c) = input_shape, output_shape
    i, j, c = np.meshgrid(np.arange(out_h), np.arange(out_w), np.arange(out_c), indexing="ij")
    source = ((stride * i) * width + stride * j) * channels + c
    return np.where(c < channels, source, -1).reshape(-1)


def apply_indices(v: jax.Array, source: np.ndarray, output_shape: Sequence[int]) -> jax.Array:
    """P v for a batch ``v`` (B, H, W, C), with P given by `pad_indices`."""
    flat = v.reshape(v.shape[0], -1)
    out = jnp.where(source >= 0, flat[:, np.maximum(source, 0)], 0)
    return out.reshape(v.shape[0], *output_shape)


def identity_deviations(
    block: Block, variables: dict[str, Any], values: Parts, tangents: Parts, probes: jax.Array
) -> dict[str, jax.Array]:
    """Largest relative deviations over probes and examples of ``identity``: J v from its form (`BlockInfo.form`)
    with the analytic S where there is one (else J_s from autodiff), and of ``shortcut``: J_s v from S v
    (NaN where there is no analytic S)."""
    shortcut = analytic_shortcut(block, variables)
    expected = jax.vmap(shortcut)(probes) if shortcut else tangents.get("shortcut", 0.0)
    predicted = expected + tangents["branch"]
    if not block.info.preact:  # D: the ReLU mask of s + F
        predicted = jnp.where(values["branch"] + values.get("shortcut", 0.0) > 0, predicted, 0.0)
    deviations = {"identity": _relative(tangents["output"] - predicted, tangents["output"])}
    deviations["shortcut"] = (
        _relative(tangents["shortcut"] - expected, expected) if shortcut else jnp.asarray(jnp.nan, jnp.float32)
    )
    return deviations


def _norms(a: jax.Array) -> jax.Array:
    """Per (probe, example) norms of (P, B, H, W, C) arrays."""
    return jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)), axis=(2, 3, 4)))


def _relative(error: jax.Array, reference: jax.Array) -> jax.Array:
    return jnp.max(_norms(error) / jnp.maximum(_norms(reference), jnp.finfo(jnp.float32).tiny))


# --- matrix-free estimators ----------------------------------------------------------------------


class Krylov(NamedTuple):
    """What `lanczos` learns about J^T J for each example."""

    values: jax.Array  # (B, steps) Ritz values, largest first: the squared singular values of J, from the top
    basis: jax.Array  # (steps, B, n) orthonormal vectors (zero after the Krylov space ran out)
    captured: jax.Array  # (B,) ||J Q||_F^2, the part of ||J||_F^2 in the span of the basis


def lanczos(
    jvp: Callable[[jax.Array], jax.Array], vjp: Callable[[jax.Array], jax.Array], start: jax.Array, steps: int
) -> Krylov:
    """``steps`` Lanczos steps on J^T J per example; ``jvp`` and ``vjp`` apply J and J^T to a batch, ``start``
    (B, ...) is a random starting vector per example.

    Every new vector is orthogonalised (twice) against all earlier ones, and the Ritz values come from the
    full projection Q^T (J^T J) Q. A block Jacobian such as D(I + J_F) with a small J_F has its singular
    values packed near 1: the Krylov space runs out within a few steps, and what is left of a new vector
    after orthogonalisation is round-off, neither orthogonal nor meaningful (a tridiagonal recurrence fed
    with it reports singular values well above the Jacobian's norm). The iteration stops there for that
    example (zero vectors), so the Ritz values stay those of an orthonormal basis and never exceed the true
    ones. The vectors are flat, (B, n): XLA compiles the loop faster than on image-shaped vectors.
    """
    batch, shape = start.shape[0], start.shape
    start = start.reshape(batch, -1)
    basis = jnp.zeros((steps, *start.shape), start.dtype).at[0].set(start / jnp.linalg.norm(start, axis=1)[:, None])

    def step(i: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        basis, products = carry
        w = vjp(jvp(basis[i].reshape(shape))).reshape(batch, -1)
        products = products.at[i].set(w)
        before = jnp.linalg.norm(w, axis=1)
        for _ in range(2):
            w = w - jnp.einsum("sb,sbn->bn", jnp.einsum("sbn,bn->sb", basis, w), basis)
        norm = jnp.linalg.norm(w, axis=1)
        # What survives orthogonalisation at round-off level is not orthogonal: stop (zero vectors) instead.
        q = jnp.where((norm > 1e-3 * before)[:, None], w / jnp.maximum(norm, jnp.finfo(w.dtype).tiny)[:, None], 0.0)
        return basis.at[i + 1].set(q, mode="drop"), products

    basis, products = jax.lax.fori_loop(0, steps, step, (basis, jnp.zeros_like(basis)))
    projection = jnp.einsum("sbn,tbn->bst", basis, products)
    values = jnp.linalg.eigvalsh((projection + jnp.swapaxes(projection, 1, 2)) / 2)[:, ::-1]
    return Krylov(values, basis, jnp.trace(projection, axis1=1, axis2=2))


def lanczos_singular_values(
    jvp: Callable[[jax.Array], jax.Array],
    vjp: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    steps: int,
    top_k: int,
) -> jax.Array:
    """The ``top_k`` largest singular values of J per example, (B, top_k), from `lanczos`."""
    if not 1 <= top_k <= steps:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of Lanczos steps ({steps}).")
    return jnp.sqrt(jnp.maximum(lanczos(jvp, vjp, start, steps).values[:, :top_k], 0.0))


def deflate(probes: jax.Array, basis: jax.Array) -> jax.Array:
    """Probes (P, B, ...) with their components in the span of a `Krylov` basis removed, per example."""
    flat = probes.reshape(*probes.shape[:2], -1)
    return (flat - jnp.einsum("pbs,sbn->pbn", jnp.einsum("pbn,sbn->pbs", flat, basis), basis)).reshape(probes.shape)


def hutchinson_frobenius(products: jax.Array, captured: jax.Array | float = 0.0) -> jax.Array:
    """||J||_F per example, (B,), from J v for Rademacher probes v, products (P, B, ...): E ||J v||^2 = ||J||_F^2.

    Deflated (Hutch++-style): with probes `deflate`d by a Krylov basis Q and ``captured`` = ||J Q||_F^2, the
    estimate is captured + mean ||J v||^2, unbiased still, and the dominant directions, which make plain
    Hutchinson noisy when a few singular values carry most of the norm, are counted exactly.
    """
    return jnp.sqrt(captured + jnp.mean(jnp.sum(jnp.square(products), axis=tuple(range(2, products.ndim))), axis=0))


class BlockJacobians:
    """Jacobians of any block, matrix-free (`estimate`) or exact (`exact`), compiled once per block structure.

    Blocks of a stage after its first share one structure (and so do the blocks of resnet20 and resnet56):
    one compiled program, with the module closed over and the variables, input and random vectors as
    arguments, serves them all. ``iterations`` Lanczos steps and ``probes`` Rademacher probes (Hutchinson
    and the identity check share them) per block, for both J and J_F. The random vectors are drawn on the
    host: at these sizes jax's PRNG takes longer to compile than all the rest. The tests hold the defaults'
    estimates to 5% of the exact values; fewer steps and probes trade accuracy for time.
    """

    def __init__(self, iterations: int = 30, probes: int = 64, top_k: int = 3) -> None:
        if iterations < 1 or probes < 1:
            raise ValueError(f"Need at least one Lanczos step and one probe; got {iterations} and {probes}.")
        if not 1 <= top_k <= iterations:
            raise ValueError(
                f"top_k={top_k} (--top-k) must be between 1 and the number of Lanczos steps, iterations={iterations} "
                "(--iterations)."
            )
        self.iterations, self.probes, self.top_k = iterations, probes, top_k
        self._compiled: dict[tuple, Callable] = {}

    @property
    def structures(self) -> list[tuple]:
        """(method, block structure) of every program compiled so far."""
        return list(self._compiled)

    def estimate(self, block: Block, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-example arrays: sv_J, sv_F (B, top_k), fro_J, fro_F (B,); scalars identity and shortcut deviations."""
        shape = block.inputs.shape
        probes = (2 * rng.integers(0, 2, (self.probes, *shape)) - 1).astype(np.float32)  # Rademacher
        start = rng.standard_normal(shape, np.float32)
        return jax.device_get(self._program(self._estimate, block)(block.variables, block.inputs, probes, start))

    def exact(self, block: Block, example: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Dense J, J_F and J_s (n_out x n_in) of one example, and the identity deviations over the whole basis.

        Forms every column, so keep inputs small (8x8 images give at most 1,024 inputs per block).
        """
        single = dataclasses.replace(block, inputs=block.inputs[example : example + 1])
        matrices, deviations = jax.device_get(self._program(self._exact, single)(single.variables, single.inputs))
        return matrices, {name: float(value) for name, value in deviations.items()}

    def _program(self, method: Callable, block: Block) -> Callable:
        key = (method.__name__, block.structure)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(partial(method, block))
        return self._compiled[key]

    def _estimate(
        self, block: Block, variables: dict[str, Any], x: jax.Array, probes: jax.Array, start: jax.Array
    ) -> dict[str, Any]:
        values, jvp = linearize_block(block, variables, x)
        out = {}
        for part, name in (("output", "J"), ("branch", "F")):

            def apply(v: jax.Array, part: str = part) -> jax.Array:
                return jvp(v)[part]

            transpose = jax.linear_transpose(apply, x)
            krylov = lanczos(apply, lambda u, t=transpose: t(u)[0], start, self.iterations)
            out[f"sv_{name}"] = jnp.sqrt(jnp.maximum(krylov.values[:, : self.top_k], 0.0))
            deflated = deflate(probes, krylov.basis)
            tangents = jax.vmap(jvp)(deflated)
            out[f"fro_{name}"] = hutchinson_frobenius(tangents[part], krylov.captured)
            if part == "output":  # any probes serve the identity check: these are at hand
                out.update(identity_deviations(block, variables, values, tangents, deflated))
        return out

    @staticmethod
    def _exact(block: Block, variables: dict[str, Any], x: jax.Array) -> tuple[Parts, dict[str, jax.Array]]:
        size = x[0].size
        basis = jnp.eye(size, dtype=x.dtype).reshape(size, *x.shape)
        values, jvp = linearize_block(block, variables, x)
        tangents = jax.vmap(jvp)(basis)
        matrices = {part: t.reshape(size, -1).T for part, t in tangents.items()}
        return matrices, identity_deviations(block, variables, values, tangents, basis)


def exact_block_report(block: Block, jacobians: BlockJacobians, rng: np.random.Generator) -> dict[str, Any]:
    """Exact top singular values, Frobenius norms and identity deviations of the first example's block Jacobians,
    and the relative errors of the estimators run on the same example against them."""
    single = dataclasses.replace(block, inputs=block.inputs[:1])
    matrices, deviations = jacobians.exact(single)
    estimates = jacobians.estimate(single, rng)
    report: dict[str, Any] = {f"{name}_deviation": value for name, value in deviations.items()}
    for part, name in (("output", "J"), ("branch", "F")):
        with single_threaded_blas():  # float64: OpenBLAS's float32 SVD is the slower one
            singular = np.linalg.svd(matrices[part].astype(np.float64), compute_uv=False)
        exact_top, estimated_top = singular[: jacobians.top_k], estimates[f"sv_{name}"][0]
        exact_fro = float(np.sqrt(np.sum(singular**2)))
        report[f"sv_{name}"] = exact_top
        report[f"fro_{name}"] = exact_fro
        report[f"sv_{name}_error"] = float(np.max(np.abs(estimated_top - exact_top) / exact_top))
        report[f"fro_{name}_error"] = float(abs(estimates[f"fro_{name}"][0] - exact_fro) / exact_fro)
    return report


# --- across depth --------------------------------------------------------------------------------


def block_chain_product(blocks: Sequence[Block], probes: jax.Array) -> jax.Array:
    """J_L ... J_1 v for each probe v (P, B, ...): successive jvps of the blocks at their recorded inputs."""
    product = probes
    for block in blocks:
        _, jvp = jax.linearize(lambda x, b=block: block_parts(b, b.variables, x)["output"], block.inputs)
        product = jax.vmap(jvp)(product)
    return product


def end_to_end_jvp(model: nn.Module, variables: dict[str, Any], images: jax.Array, probes: jax.Array) -> jax.Array:
    """The jvp, for each probe, of the model's own map from its first block's input to its last block's output
    (the model run on ``images`` with that input replaced), at the input it has for ``images``."""
    outputs: list[jax.Array] = []

    def first_to_last_block(h: jax.Array) -> jax.Array:
        outputs.clear()

        def replace_first_input(call: Call) -> jax.Array:
            outputs.append(call.run_on(h) if call.depth == 0 else call.run())
            return outputs[-1]

        with intercept({BLOCK: replace_first_input}):
            model.apply(variables, images, train=False)
        return outputs[-1]

    first_input = capture_blocks(model, variables, images)[0].inputs
    _, jvp = jax.linearize(first_to_last_block, first_input)
    return jax.vmap(jvp)(probes)


def chain_rule_check(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    rng: np.random.Generator,
    num_probes: int = 4,
) -> dict[str, float]:
    """`block_chain_product` against `end_to_end_jvp` for random probes: the largest relative difference, and the
    median gain ||J_L ... J_1 v|| / ||v|| of the whole stack of blocks."""
    blocks = capture_blocks(model, variables, images)
    probes = rng.standard_normal((num_probes, *blocks[0].inputs.shape), np.float32)
    product = block_chain_product(blocks, probes)
    composed = end_to_end_jvp(model, variables, images, probes)
    return {
        "relative_error": float(_relative(product - composed, composed)),
        "gain": float(jnp.median(_norms(composed) / _norms(probes))),
    }


def end_to_end_singular_values(model: nn.Module, variables: dict[str, Any], image: jax.Array) -> np.ndarray:
    """Singular values of the input-output Jacobian d pre_logits / d image of one image (H, W, C), BN in inference
    mode: the pooled features the head reads, so the random head plays no part. Exact (jacrev: one vjp per
    feature)."""

    def pre_logits(x: jax.Array) -> jax.Array:
        return model.apply(variables, x[None], train=False)[1]["pre_logits"][0]

    jacobian = np.asarray(jax.jit(jax.jacrev(pre_logits))(image), np.float64)
    with single_threaded_blas():
        return np.linalg.svd(jacobian.reshape(jacobian.shape[0], -1), compute_uv=False)


# --- the whole analysis and its files ------------------------------------------------------------


def snapshot_jacobians(
    snapshot: ModelSnapshot,
    images: jax.Array,
    exact_images: jax.Array | None,
    jacobians: BlockJacobians,
    seed: int,
) -> dict[str, Any]:
    """One snapshot's part of `analyze_jacobians`, with the time each of its steps took."""
    seconds = {}
    began = time.perf_counter()
    blocks = []
    captured = capture_blocks(snapshot.model, snapshot.variables, images)
    line = ProgressLine(f"jacobian {snapshot.label}", len(captured), "blocks")  # a 110-layer net takes minutes
    for block in captured:
        estimates = jacobians.estimate(block, np.random.default_rng([seed, 1, block.info.depth]))
        blocks.append(_block_row(block, estimates))
        line.update(len(blocks))
    seconds["estimates"] = time.perf_counter() - began
    if exact_images is not None:
        began = time.perf_counter()
        small = capture_blocks(snapshot.model, snapshot.variables, exact_images[:1])
        for row, block in zip(blocks, small, strict=True):
            row["exact"] = exact_block_report(block, jacobians, np.random.default_rng([seed, 2, block.info.depth]))
        seconds["exact"] = time.perf_counter() - began
    began = time.perf_counter()
    chain = chain_rule_check(snapshot.model, snapshot.variables, images, np.random.default_rng([seed, 3]))
    seconds["chain_rule"] = time.perf_counter() - began
    began = time.perf_counter()
    singular = end_to_end_singular_values(snapshot.model, snapshot.variables, images[0])
    seconds["end_to_end"] = time.perf_counter() - began
    return {
        **snapshot.report_fields(),
        "blocks": blocks,
        "chain_rule": chain,
        "end_to_end": _spread(singular),
        "seconds": seconds,
    }


def analyze_jacobians(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    out: str | Path,
    *,
    exact_images: jax.Array | None = None,
    jacobians: BlockJacobians | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every block of every snapshot: matrix-free estimates on ``images`` (each example's Jacobian, averaged),
    exact Jacobians and estimator errors on the first of ``exact_images`` (small, e.g. 8x8), the chain rule
    and the end-to-end spectrum. Writes jacobian.json, jacobian_blocks.csv, jacobian_depth.png and
    jacobian_spectrum.png to ``out`` and returns the JSON's content."""
    out = Path(out)
    jacobians = jacobians or BlockJacobians()
    reports = [snapshot_jacobians(snapshot, images, exact_images, jacobians, seed) for snapshot in snapshots]
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "exact_input_shape": list(exact_images.shape[1:]) if exact_images is not None else None,
            "lanczos_steps": jacobians.iterations,
            "hutchinson_probes": jacobians.probes,
            "top_k": jacobians.top_k,
            "seed": seed,
        },
        "summary": _summary(reports),
        "models": reports,
    }
    write_json(out / "jacobian.json", report)
    write_csv(out / "jacobian_blocks.csv", [_csv_row(r, b) for r in reports for b in r["blocks"]])
    plot_depth(reports, out / "jacobian_depth.png")
    plot_spectra(reports, out / "jacobian_spectrum.png")
    return report


def _spread(singular: np.ndarray) -> dict[str, Any]:
    """The spectrum, its numerical rank (values above float32 round-off of the largest; dead features lower it)
    and its condition number over those non-zero values."""
    nonzero = singular[singular > 1e-5 * singular[0]]
    return {
        "jacobian": "d pre_logits / d input, one image",
        "singular_values": singular,
        "rank": len(nonzero),
        "condition": float(nonzero[0] / nonzero[-1]),
    }


def _block_row(block: Block, estimates: dict[str, np.ndarray]) -> dict[str, Any]:
    info = block.info
    return {
        "name": info.name,
        "stage": info.stage,
        "block": info.index,
        "depth": info.depth,
        "kind": info.kind,
        "preact": info.preact,
        "form": info.form,
        "sv_J": estimates["sv_J"].mean(0),
        "sv_F": estimates["sv_F"].mean(0),
        "fro_J": float(estimates["fro_J"].mean()),
        "fro_F": float(estimates["fro_F"].mean()),
        "identity_deviation": float(estimates["identity"]),
        "shortcut_deviation": float(estimates["shortcut"]),
    }


def _summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest deviations per identity form (matrix-free and exact), largest estimator errors, worst chain rule."""
    deviations: dict[str, dict[str, float]] = {}
    errors: dict[str, float] = {}
    for report in reports:
        for row in report["blocks"]:
            sources = [("probes", row)] + ([("exact", row["exact"])] if "exact" in row else [])
            for where, values in sources:
                for check in ("identity", "shortcut"):
                    value = values[f"{check}_deviation"]
                    if not np.isnan(value):
                        name = f"{check} {where}"
                        form = deviations.setdefault(row["form"], {})
                        form[name] = max(form.get(name, 0.0), value)
            for name in ("sv_J_error", "sv_F_error", "fro_J_error", "fro_F_error"):
                if "exact" in row:
                    errors[name] = max(errors.get(name, 0.0), row["exact"][name])
    return {
        "largest_deviation": max((v for form in deviations.values() for v in form.values()), default=None),
        "largest_deviation_by_form": deviations,
        "largest_estimator_error": errors or None,
        "largest_chain_rule_error": max(r["chain_rule"]["relative_error"] for r in reports),
    }


def _csv_row(report: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """One CSV row per block, with the largest singular values only (the JSON has the top k)."""
    flat = {"model": report["label"]}
    for prefix, values in (("", row), ("exact_", row.get("exact", {}))):
        for key, value in values.items():
            if key in ("sv_J", "sv_F"):
                flat[f"{prefix}{key}_max"] = float(value[0])
            elif key != "exact":
                flat[prefix + key] = value
    return flat


def plot_depth(reports: list[dict[str, Any]], path: Path) -> Path:
    """Largest singular value of J_F (left) and of J (right) against block depth, one line per snapshot, log scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for report, style in zip(reports, line_styles(reports), strict=True):
        depth = [row["depth"] + 1 for row in report["blocks"]]
        for ax, name in zip(axes, ("sv_F", "sv_J"), strict=True):
            ax.plot(depth, [row[name][0] for row in report["blocks"]], "o-", markersize=3, **style)
    for ax, title in zip(axes, ("||J_F||_2 (residual branch)", "||J||_2 (whole block)"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("block (input to output)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, "Block Jacobians, BN in inference mode (Lanczos, mean over examples)")


def plot_spectra(reports: list[dict[str, Any]], path: Path) -> Path:
    """The non-zero singular values of d pre_logits / d input, largest first, one line per snapshot, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report, style in zip(reports, line_styles(reports), strict=True):
        spread = report["end_to_end"]
        nonzero = spread["singular_values"][: spread["rank"]]
        style["label"] += f" (rank {spread['rank']}, cond {spread['condition']:.3g})"
        ax.plot(np.arange(1, len(nonzero) + 1), nonzero, ".-", **style)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, "End-to-end Jacobian d pre_logits / d input (one image; non-zero singular values)")
