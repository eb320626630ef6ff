"""Subspaces of weights and activations: PCA (scikit-learn) and ablation by projection onto an affine subspace."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import Tensor


@dataclass
class PCAResult:
    """PCA of the rows of a matrix.

    Attributes:
        scores: `[n_rows, n_components]` coordinates of each row on the components.
        components: `[n_components, d]` unit principal directions.
        mean: `[d]` the mean row that was subtracted.
        explained_variance_ratio: `[n_components]`.
    """

    scores: Tensor
    components: Tensor
    mean: Tensor
    explained_variance_ratio: Tensor


def pca(rows: Tensor, n_components: int | None = None) -> PCAResult:
    """PCA of `rows [n, d]` with scikit-learn (full SVD, deterministic signs)."""
    model = PCA(n_components=n_components, svd_solver="full").fit(rows.detach().cpu().double().numpy())
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(dtype)  # noqa: E731
    return PCAResult(as_tensor(model.transform(rows.detach().cpu().double().numpy())), as_tensor(model.components_),
                     as_tensor(model.mean_), as_tensor(model.explained_variance_ratio_))


def project_onto_affine(vectors: Tensor, mean: Tensor, directions: Tensor) -> Tensor:
    """Project `vectors [..., d]` onto `mean + span(directions)`; `directions [k, d]` must be orthonormal."""
    centred = vectors - mean
    return mean + (centred @ directions.T) @ directions


def affine_projection_hook(mean: Tensor, directions: Tensor, positions: list[int]):
    """A forward hook that replaces activations `[batch, pos, d]` at `positions` by their projection onto
    `mean + span(directions)` (e.g. keep only PC1 of the embedding)."""

    def hook(activation: Tensor, hook=None) -> Tensor:
        patched = activation.clone()
        patched[:, positions] = project_onto_affine(activation[:, positions], mean.to(activation), directions.to(activation))
        return patched

    return hook
