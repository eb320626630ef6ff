"""Fourier analysis of modular-arithmetic models (Nanda et al. 2023, "Progress measures for grokking").

The basis is a real orthonormal basis of functions on Z_p for every p: constant, sin k and cos k for
k = 1..(p-1)//2, and for even p the alternating "cos p/2" row. Functions take tensors and return tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FourierBasis:
    """Orthonormal basis of R^p.

    Attributes:
        matrix: `[p, p]`, row i is basis vector i (so `matrix @ matrix.T == I`).
        names: `["Constant", "Sin 1", "Cos 1", ...]`.
        frequencies: `[p]` frequency k of each row (0 for the constant).
    """

    matrix: Tensor
    names: list[str]
    frequencies: Tensor

    @property
    def p(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_frequencies(self) -> int:
        """Number of non-zero frequencies, 1..p//2."""
        return self.p // 2

    def rows(self, frequency: int) -> list[int]:
        """Basis rows of one frequency: [sin k, cos k], or only [cos p/2] for the Nyquist row of even p."""
        return [i for i, k in enumerate(self.frequencies.tolist()) if k == frequency]


def fourier_basis(p: int, dtype: torch.dtype = torch.float32) -> FourierBasis:
    """The orthonormal real Fourier basis on Z_p (for odd and even p)."""
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    x = torch.arange(p, dtype=torch.float64)
    rows, names, freqs = [torch.ones(p, dtype=torch.float64)], ["Constant"], [0]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.sin(2 * math.pi * k * x / p), torch.cos(2 * math.pi * k * x / p)]
        names += [f"Sin {k}", f"Cos {k}"]
        freqs += [k, k]
    if p % 2 == 0:
        rows.append(torch.cos(math.pi * x))
        names.append(f"Cos {p // 2}")
        freqs.append(p // 2)
    matrix = torch.stack(rows)
    matrix = matrix / matrix.norm(dim=1, keepdim=True)
    return FourierBasis(matrix.to(dtype), names, torch.tensor(freqs))


def transform_2d(values: Tensor, basis: FourierBasis) -> Tensor:
    """2-D Fourier transform over (a, b): `[..., p, p] -> [..., p, p]`, i.e. F @ X @ F.T."""
    F = basis.matrix.to(values.dtype)
    return F @ values @ F.T


def frequency_norms(values: Tensor, basis: FourierBasis) -> Tensor:
    """Norm of `values [p, d]` (e.g. the embedding W_E) in each frequency: `[n_frequencies]` for k = 1..p//2."""
    coefficients = basis.matrix.to(values.dtype) @ values
    return torch.stack([coefficients[basis.rows(k)].norm() for k in range(1, basis.n_frequencies + 1)])


def neuron_frequency_fractions(neuron_acts: Tensor, basis: FourierBasis) -> Tensor:
    """Fraction of each neuron's non-constant variance over (a, b) carried by each frequency.

    A neuron "of frequency k" puts its mass on the terms (const, k), (k, const) and (k, k) of its 2-D transform.

    Args:
        neuron_acts: `[p, p, n_neurons]` activations at `=` for every (a, b).
    Returns:
        `[n_frequencies, n_neurons]`, rows k = 1..p//2; zeros for constant neurons.
    """
    coefficients = transform_2d(neuron_acts.permute(2, 0, 1), basis)  # [n, p, p]
    coefficients[:, 0, 0] = 0
    total = coefficients.pow(2).sum((1, 2))
    fractions = []
    for k in range(1, basis.n_frequencies + 1):
        rows = basis.rows(k)
        idx = [0] + rows
        block = coefficients[:, idx][:, :, idx].pow(2).sum((1, 2))
        fractions.append(block)
    stacked = torch.stack(fractions)
    return torch.where(total > 0, stacked / total.clamp_min(1e-30), torch.zeros_like(stacked))


@dataclass
class NeuronClusters:
    """Neurons grouped by their dominant frequency.

    Attributes:
        key_frequencies: frequencies with enough neurons, by neuron count (descending).
        counts: `{frequency: number of neurons}` for every frequency that has a clustered neuron.
        neuron_frequency: `[n_neurons]` dominant frequency of each neuron, 0 where below the threshold.
    """

    key_frequencies: list[int]
    counts: dict[int, int]
    neuron_frequency: Tensor


def cluster_neurons(fractions: Tensor, threshold: float = 0.85, min_share: float = 0.05) -> NeuronClusters:
    """Cluster neurons whose best frequency explains more than `threshold` of their variance.

    Key frequencies are those holding at least `min_share` of the clustered neurons.

    Args:
        fractions: `[n_frequencies, n_neurons]` from `neuron_frequency_fractions`.
    """
    best_fraction, best_index = fractions.max(0)
    neuron_frequency = torch.where(best_fraction > threshold, best_index + 1, torch.zeros_like(best_index))
    clustered = neuron_frequency[neuron_frequency > 0]
    frequencies, counts = clustered.unique(return_counts=True)
    count_map = {int(k): int(c) for k, c in zip(frequencies, counts)}
    total = max(1, len(clustered))
    key = sorted((k for k, c in count_map.items() if c / total >= min_share), key=lambda k: (-count_map[k], k))
    return NeuronClusters(key, count_map, neuron_frequency)


def sum_direction_basis(p: int, frequencies: list[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit vectors cos(w_k (a+b)) and sin(w_k (a+b)) over the p*p inputs (row order a*p + b): `[2*len(freqs), p*p]`."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    directions = []
    for k in frequencies:
        angle = 2 * math.pi * k * (a + b) / p
        for wave in (torch.cos(angle), torch.sin(angle)):
            directions.append(wave / wave.norm())
    return torch.stack(directions).to(dtype)


def key_frequency_component(neuron_acts: Tensor, p: int, frequencies: list[int]) -> Tensor:
    """The part of each neuron's activation that is a function of cos/sin(w_k (a+b)) for the key frequencies.

    Args:
        neuron_acts: `[p*p, n_neurons]` at `=`, rows in order a*p + b.
    Returns:
        `[p*p, n_neurons]` projection onto span{cos w_k(a+b), sin w_k(a+b)} (mean not included).
    """
    directions = sum_direction_basis(p, frequencies, neuron_acts.dtype)
    return directions.T @ (directions @ neuron_acts)


def trig_cube(p: int, frequency: int) -> Tensor:
    """Unit-norm `cos(w_k (a + b - c))` over (a, b, c): `[p, p, p]` in float64."""
    x = torch.arange(p, dtype=torch.float64)
    cube = torch.cos(2 * math.pi * frequency * (x[:, None, None] + x[None, :, None] - x[None, None, :]) / p)
    return cube / cube.norm()


def logit_trig_fit(logits: Tensor, frequencies: list[int]) -> dict[str, Tensor]:
    """How well `cos(w_k (a + b - c))` terms explain the logits (the trig-identity check).

    Args:
        logits: `[p, p, p]` logits for answer c at every (a, b).
        frequencies: frequencies k to fit, one normalised cube each (cubes of distinct k are orthogonal).
    Returns:
        `coefficients [len(freqs)]`, `cosine_similarity [len(freqs)]` (coefficient / ||logits||), and
        `residual_fraction` (||logits - fit|| / ||logits||, a scalar tensor), and the `fit [p, p, p]` itself.
    """
    p = logits.shape[0]
    values = logits.double()
    fit = torch.zeros_like(values)
    coefficients = []
    for k in frequencies:
        cube = trig_cube(p, k)
        coefficient = (values * cube).sum()
        coefficients.append(coefficient)
        fit += coefficient * cube
    norm = values.norm()
    coefficients_t = torch.stack(coefficients) if coefficients else torch.zeros(0, dtype=torch.float64)
    return {"coefficients": coefficients_t, "cosine_similarity": coefficients_t / norm,
            "residual_fraction": (values - fit).norm() / norm, "fit": fit}


@dataclass
class ProgressMeasures:
    """Nanda et al.'s progress measures for one model state (all losses are last-position cross-entropy).

    Attributes:
        train_loss, test_loss: the model's own losses.
        restricted_loss: test loss when each neuron keeps only its mean plus its key-frequency part of cos/sin
            w_k(a+b) (bias-corrected as upstream). Low restricted loss = the Fourier circuit alone solves the task.
        excluded_loss: train loss when the key-frequency part is removed from the neurons (the direct path through
            resid_mid is kept). High excluded loss = the model relies on the key frequencies even on training data.
    """

    train_loss: float
    test_loss: float
    restricted_loss: float
    excluded_loss: float


def progress_measures(model, tokens: Tensor, labels: Tensor, train_indices: Tensor, test_indices: Tensor,
                      p: int, frequencies: list[int]) -> ProgressMeasures:
    """Compute the progress measures of a 1-layer model on all p*p inputs.

    Args:
        model: a TransformerBridge with `blocks.0.mlp.hook_post`, `blocks.0.hook_resid_mid`, `W_out`, `W_U`, `b_U`.
        tokens: `[p*p, 3]` in row order a*p + b; labels `[p*p]`.
    """
    from helpers.tasks.modular import last_position_loss  # the grokking loss; tasks never import techniques

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in {
            "blocks.0.mlp.hook_post", "blocks.0.hook_resid_mid"})
        logits = logits[:, -1].double()
        acts = cache["blocks.0.mlp.hook_post"][:, -1].double()
        resid_mid = cache["blocks.0.hook_resid_mid"][:, -1].double()
        W_out, W_U, b_U = model.W_out[0].double(), model.W_U.double(), model.b_U.double()
        key_part = key_frequency_component(acts - acts.mean(0), p, frequencies)
        restricted = (acts.mean(0) + key_part) @ W_out @ W_U
        restricted = restricted + (logits.mean(0) - restricted.mean(0))
        excluded = ((acts - key_part) @ W_out + resid_mid) @ W_U + b_U
    return ProgressMeasures(
        train_loss=last_position_loss(logits[train_indices], labels[train_indices]).item(),
        test_loss=last_position_loss(logits[test_indices], labels[test_indices]).item(),
        restricted_loss=last_position_loss(restricted[test_indices], labels[test_indices]).item(),
        excluded_loss=last_position_loss(excluded[train_indices], labels[train_indices]).item(),
    )
