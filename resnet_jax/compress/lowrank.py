"""Low-rank factorisation of a run's convs by SVD (``resnet-jax lowrank``), then a short fine-tune.

A conv kernel W of shape (kh, kw, C_in, C_out) is the matrix M = W.reshape(kh * kw * C_in, C_out). Its SVD
M = U S V^T truncated to rank k is the best rank-k approximation (Eckart-Young), and it is two convs: a k-filter
conv of the original window and stride with kernel U_k sqrt(S_k), then a 1x1 conv with kernel sqrt(S_k) V_k^T
(the square roots balance the two factors' scales). Each conv with a window larger than 1x1 gets the smallest
rank that keeps ``energy`` of the squared singular values, and is factorised only where that stores fewer weights
(k * (kh * kw * C_in + C_out) < kh * kw * C_in * C_out); 1x1 convs and the rest stay whole. At full rank the two
convs compute the original one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from resnet_jax.compress.derived import check_new_folder, load_float_run, source_meta, write_derived_run


def factorize_kernel(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernels of the k-filter conv and of the 1x1 conv whose composition is the best rank-``rank``
    approximation of the conv ``kernel``."""
    kh, kw, c_in, c_out = kernel.shape
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64).reshape(kh * kw * c_in, c_out), full_matrices=False)
    root = np.sqrt(s[:rank])
    basis = (u[:, :rank] * root).reshape(kh, kw, c_in, rank)
    combine = (root[:, None] * vt[:rank]).reshape(1, 1, rank, c_out)
    return basis.astype(kernel.dtype), combine.astype(kernel.dtype)


def energy_rank(kernel: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the sum of all squared singular values."""
    s = np.linalg.svd(np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def plan_ranks(params: Any, energy: float) -> dict[str, int]:
    """The rank of every conv (by module path joined by "/") that factorising at ``energy`` makes smaller."""
    ranks = {}
    for path, kernel in traverse_util.flatten_dict(jax.device_get(params)).items():
        if path[-1] != "kernel" or np.ndim(kernel) != 4 or kernel.shape[0] * kernel.shape[1] == 1:
            continue
        kh, kw, c_in, c_out = kernel.shape
        rank = energy_rank(kernel, energy)
        if rank * (kh * kw * c_in + c_out) < kh * kw * c_in * c_out:
            ranks["/".join(path[:-1])] = rank
    return ranks


def factorized_params(params: Any, ranks: dict[str, int]) -> Any:
    """``params`` as `resnet_jax.compress.layers.FactorizedConv` holds them: the convs in ``ranks`` as "basis" and
    "combine" kernels, every other conv's kernel under "full"."""
    flat = {}
    for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
        layer = path[:-1]
        if path[-1] != "kernel" or np.ndim(value) != 4:
            flat[path] = value
        elif "/".join(layer) in ranks:
            basis, combine = factorize_kernel(np.asarray(value), ranks["/".join(layer)])
            flat[(*layer, "basis", "kernel")], flat[(*layer, "combine", "kernel")] = basis, combine
        else:
            flat[(*layer, "full", "kernel")] = value
    return traverse_util.unflatten_dict(flat)


def lowrank_settings(energy: float, ranks: dict[str, int]) -> ml_collections.ConfigDict:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy}; give the fraction of squared singular values to keep, in (0, 1].")
    return ml_collections.ConfigDict({"energy": energy, "ranks": tuple(sorted(ranks.items()))})


def lowrank_run(checkpoint: str | Path, out: str | Path, energy: float, fine_tune_steps: int) -> dict[str, Any]:
    """Write the factorisation of ``checkpoint``'s latest step as that step of a run in ``out``, then train it
    ``fine_tune_steps`` more steps there (`write_derived_run`). Returns the meta of the factorised checkpoint."""
    out = check_new_folder(out, fine_tune_steps)
    lowrank_settings(energy, {})  # checks energy before anything loads
    model, state, config = load_float_run(checkpoint)
    config = config.copy_and_resolve_references()
    config.lowrank = lowrank_settings(energy, plan_ranks(state.params, energy))
    variables = {
        "params": factorized_params(state.params, dict(config.lowrank.ranks)),
        "batch_stats": state.batch_stats,
    }
    origin = {"factorized_from": str(Path(checkpoint).resolve())}
    return write_derived_run(
        out, config, model.num_classes, variables, int(state.step), fine_tune_steps, origin | source_meta(checkpoint)
    )
