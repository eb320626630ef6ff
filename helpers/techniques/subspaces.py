"""Subspaces of weights and activations: PCA (scikit-learn) and ablation by projection onto an affine subspace."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
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

    scores: Float[Tensor, "n_rows n_components"]
    components: Float[Tensor, "n_components d"]
    mean: Float[Tensor, " d"]
    explained_variance_ratio: Float[Tensor, " n_components"]


def pca(rows: Float[Tensor, "n d"], n_components: int | None = None) -> PCAResult:
    """PCA of `rows` with scikit-learn (full SVD, deterministic signs); the results on the device of `rows`."""
    as_numpy = rows.detach().cpu().double().numpy()
    model = PCA(n_components=n_components, svd_solver="full").fit(as_numpy)
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(rows.device, dtype)  # noqa: E731
    return PCAResult(as_tensor(model.transform(as_numpy)), as_tensor(model.components_),
                     as_tensor(model.mean_), as_tensor(model.explained_variance_ratio_))


def project_onto_affine(vectors: Float[Tensor, "... d"], mean: Float[Tensor, " d"],
                        directions: Float[Tensor, "k d"]) -> Float[Tensor, "... d"]:
    """Project `vectors` onto `mean + span(directions)`; the `directions` must be orthonormal."""
    centred = vectors - mean
    return mean + (centred @ directions.T) @ directions


def affine_projection_hook(mean: Float[Tensor, " d"], directions: Float[Tensor, "k d"], positions: list[int]):
    """A forward hook that replaces activations `[batch, pos, d]` at `positions` by their projection onto
    `mean + span(directions)` (e.g. keep only PC1 of the embedding)."""

    def hook(activation: Tensor, hook=None) -> Tensor:
        patched = activation.clone()
        patched[:, positions] = project_onto_affine(activation[:, positions], mean.to(activation), directions.to(activation))
        return patched

    return hook
