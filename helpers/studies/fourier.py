"""Fourier analysis of modular-arithmetic models (Nanda et al. 2023, "Progress measures for grokking").

The basis is a real orthonormal basis of functions on Z_p for every p: constant, sin k and cos k for
k = 1..(p-1)//2, and for even p the alternating "cos p/2" row. Functions take tensors and return tensors on the
device of their inputs (a basis built on the CPU is moved to the data, so a model on a GPU needs no extra step).

The paper's key frequencies are the few frequencies the trained network computes with. They are read off the
Fourier power of the centred neuron activations (`neuron_fourier_norms` -> `frequency_power` -> `key_frequencies`),
as the paper reads them off the sparse Fourier norms of the embedding and the neurons; counting neurons that are
single-frequency (`cluster_neurons`) misses a frequency whose neurons are still mixed, as in a half-grokked model.

Notebook 01 ends on `REFERENCE` (the paper's figures, keyed by what they describe) beside its own run, and on
`acceptance_checks` (the bars it holds its committed `RECIPE` to).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import Model, hook_name
from helpers.tasks.modular import last_position_loss

RECIPE = dict(p=41, frac_train=0.5, lr=3e-3, num_epochs=3500, weight_decay=1.0, betas=(0.9, 0.98), data_seed=598,
              model_seed=999)
"""Notebook 01's default recipe and seeds, which the project checked: on them the notebook asserts its bars (the
recipe groks on ten of ten data/model seed pairs tried, docs/robustness.md)."""

REFERENCE_LABEL = "paper (p = 113)"
REFERENCE = {  # Nanda et al. 2023 and the TransformerLens grokking demo: p = 113, 30% of the pairs, 25,000 epochs
    "memorised (train accuracy 100%)": "epoch ~1,400 (train loss 4e-7)",
    "grokked (test loss < 1)": "epoch ~13,700; cleanup done ~16,600",
    "key frequencies": "17, 25, 32, 47",
    "restricted loss": "falls long before the test loss",
    "excluded loss (train)": "rises far above train loss",
    "logit residual after key cosines": "falls during circuit formation",
}


@dataclass
class FourierBasis:
    """Orthonormal basis of R^p.

    Attributes:
        matrix: `[p, p]`, row i is basis vector i (so `matrix @ matrix.T == I`).
        names: `["Constant", "Sin 1", "Cos 1", ...]`.
        frequencies: `[p]` frequency k of each row (0 for the constant), on the CPU.
    """

    matrix: Float[Tensor, "p p"]
    names: list[str]
    frequencies: Int[Tensor, " p"]

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

    def block(self, frequency: int) -> list[int]:
        """The constant row and the rows of `frequency`: the 2-D terms (const, k), (k, const), (k, k) of a
        function of (a, b) that depends on frequency k only."""
        return [0] + self.rows(frequency)


def fourier_basis(p: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> FourierBasis:
    """The orthonormal real Fourier basis on Z_p (for odd and even p), its matrix on `device` (default CPU)."""
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
    return FourierBasis(matrix.to(device=device, dtype=dtype), names, torch.tensor(freqs))


def transform_2d(values: Float[Tensor, "... p p"], basis: FourierBasis) -> Float[Tensor, "... p p"]:
    """2-D Fourier transform over (a, b): F @ X @ F.T, on the device and in the dtype of `values`."""
    F = basis.matrix.to(values)
    return F @ values @ F.T


def frequency_norms(values: Float[Tensor, "p d"], basis: FourierBasis) -> Float[Tensor, " n_frequencies"]:
    """Norm of `values` (e.g. the embedding W_E) in each frequency k = 1..p//2."""
    coefficients = basis.matrix.to(values) @ values  # [p, d]
    return torch.stack([coefficients[basis.rows(k)].norm() for k in range(1, basis.n_frequencies + 1)])


def neuron_fourier_norms(neuron_acts: Float[Tensor, "p p n_neurons"], basis: FourierBasis) -> Float[Tensor, "p p"]:
    """Norm over the neurons of the 2-D Fourier transform of the centred activations (the paper's "norms of neuron
    activations by Fourier component"): entry (i, j) is the size of basis term i(a) * j(b) across all neurons.

    A grokked model has mass only in the rows and columns of its key frequencies: (const, k), (k, const), (k, k).
    """
    centred = neuron_acts - neuron_acts.mean((0, 1), keepdim=True)
    return transform_2d(centred.permute(2, 0, 1), basis).norm(dim=0)  # [n, p, p] -> [p, p]


def frequency_power(fourier_norms: Float[Tensor, "p p"], basis: FourierBasis) -> Float[Tensor, " n_frequencies"]:
    """Share of the neurons' total power in each frequency's block (const, k), (k, const), (k, k), for k = 1..p//2.

    Args:
        fourier_norms: from `neuron_fourier_norms`. Power outside every block (products of two different
            frequencies) counts in the total, so the shares sum to at most 1.
    """
    power = fourier_norms.pow(2)
    total = power.sum() - power[0, 0]
    shares = torch.stack([power[basis.block(k)][:, basis.block(k)].sum() - power[0, 0]
                          for k in range(1, basis.n_frequencies + 1)])
    return shares / total.clamp_min(torch.finfo(power.dtype).tiny)


def key_frequencies(power: Float[Tensor, " n_frequencies"], min_share: float = 0.05) -> list[int]:
    """The frequencies holding at least `min_share` of the power, strongest first (frequency k is entry k - 1);
    the strongest one alone when none does (a model that has not formed its circuit yet).

    With `frequency_power` of the neuron activations this is the paper's reading: a handful of frequencies carry
    nearly all the power (0.45 / 0.34 / 0.18 and then 0.003 on this project's default run), whether or not each of
    their neurons is already pure. On the grokking recipe with data_seed=1, model_seed=2 frequency 10 holds 0.41 of
    the power but no neuron is single-frequency in it: the neuron clusters give [1, 4] (restricted loss 0.68),
    the power gives [10, 4, 1, 11] (restricted loss 3e-7).
    """
    shares = power.detach().cpu()
    order = shares.argsort(descending=True)
    return [int(index) + 1 for index in order if shares[index] >= min_share] or [int(order[0]) + 1]


def neuron_frequency_fractions(neuron_acts: Float[Tensor, "p p n_neurons"],
                               basis: FourierBasis) -> Float[Tensor, "n_frequencies n_neurons"]:
    """Fraction of each neuron's non-constant variance over (a, b) carried by each frequency k = 1..p//2.

    A neuron "of frequency k" puts its mass on the terms (const, k), (k, const) and (k, k) of its 2-D transform.
    Constant neurons get zeros.
    """
    coefficients = transform_2d(neuron_acts.permute(2, 0, 1), basis)  # [n, p, p]
    coefficients[:, 0, 0] = 0
    total = coefficients.pow(2).sum((1, 2))
    blocks = [coefficients[:, basis.block(k)][:, :, basis.block(k)].pow(2).sum((1, 2))
              for k in range(1, basis.n_frequencies + 1)]
    stacked = torch.stack(blocks)
    return torch.where(total > 0, stacked / total.clamp_min(1e-30), torch.zeros_like(stacked))


@dataclass
class NeuronClusters:
    """Neurons grouped by their dominant frequency.

    Attributes:
        frequencies: frequencies with enough neurons, by neuron count (descending).
        counts: `{frequency: number of neurons}` for every frequency that has a clustered neuron.
        neuron_frequency: `[n_neurons]` dominant frequency of each neuron, 0 where below the threshold.
    """

    frequencies: list[int]
    counts: dict[int, int]
    neuron_frequency: Int[Tensor, " n_neurons"]


def cluster_neurons(fractions: Float[Tensor, "n_frequencies n_neurons"], threshold: float = 0.85,
                    min_share: float = 0.05) -> NeuronClusters:
    """Cluster neurons whose best frequency explains more than `threshold` of their variance.

    The cluster frequencies are those holding at least `min_share` of the clustered neurons. They describe the
    neurons; the key frequencies come from `key_frequencies`, which also sees impure neurons.
    """
    best_fraction, best_index = fractions.max(0)
    neuron_frequency = torch.where(best_fraction > threshold, best_index + 1, torch.zeros_like(best_index))
    clustered = neuron_frequency[neuron_frequency > 0]
    frequencies, counts = clustered.unique(return_counts=True)
    count_map = {int(k): int(c) for k, c in zip(frequencies, counts)}
    total = max(1, len(clustered))
    kept = sorted((k for k, c in count_map.items() if c / total >= min_share), key=lambda k: (-count_map[k], k))
    return NeuronClusters(kept, count_map, neuron_frequency)


def sum_direction_basis(p: int, frequencies: list[int], dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Float[Tensor, "n_directions pairs"]:
    """Unit vectors cos(w_k (a+b)) and sin(w_k (a+b)) over the p*p inputs (row order a*p + b), two per frequency."""
    a = torch.arange(p, dtype=torch.float64, device=device).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64, device=device).repeat(p)
    directions = []
    for k in frequencies:
        angle = 2 * math.pi * k * (a + b) / p
        for wave in (torch.cos(angle), torch.sin(angle)):
            directions.append(wave / wave.norm())
    if not directions:
        return torch.zeros(0, p * p, dtype=dtype, device=device)
    return torch.stack(directions).to(dtype)


def key_frequency_component(neuron_acts: Float[Tensor, "pairs n_neurons"], p: int,
                            frequencies: list[int]) -> Float[Tensor, "pairs n_neurons"]:
    """The part of each neuron's activation that is a function of cos/sin(w_k (a+b)) for the given frequencies: the
    projection onto span{cos w_k(a+b), sin w_k(a+b)} (the mean is not included). Rows in order a*p + b."""
    directions = sum_direction_basis(p, frequencies, neuron_acts.dtype, neuron_acts.device)
    return directions.T @ (directions @ neuron_acts)


def trig_cube(p: int, frequency: int, device: torch.device | str | None = None) -> Float[Tensor, "p p p"]:
    """Unit-norm `cos(w_k (a + b - c))` over (a, b, c), in float64."""
    x = torch.arange(p, dtype=torch.float64, device=device)
    cube = torch.cos(2 * math.pi * frequency * (x[:, None, None] + x[None, :, None] - x[None, None, :]) / p)
    return cube / cube.norm()


def trig_outer_product(basis: FourierBasis, row_a: int, row_b: int) -> Float[Tensor, "p p"]:
    """Basis function `row_a` of a times basis function `row_b` of b over the (a, b) grid, e.g. cos(w a) cos(w b).

    A neuron's activation over (a, b) is a sum of such products; because cos(w(a+b)) = cos wa cos wb - sin wa sin wb,
    a neuron made of (cos, cos) and (sin, sin) products of one frequency is periodic in a + b.
    """
    return torch.outer(basis.matrix[row_a], basis.matrix[row_b])


def logit_trig_fit(logits: Float[Tensor, "p p p"], frequencies: list[int]) -> dict[str, Float[Tensor, "..."]]:
    """How well `cos(w_k (a + b - c))` terms explain the logits (the paper's third progress measure).

    Args:
        logits: logits for answer c at every (a, b).
        frequencies: frequencies k to fit, one normalised cube each (cubes of distinct k are orthogonal).
    Returns:
        `coefficients [len(freqs)]`, `cosine_similarity [len(freqs)]` (coefficient / ||logits||),
        `residual_fraction` (||logits - fit|| / ||logits||, a scalar tensor) and the `fit [p, p, p]` itself,
        all float64 on the device of `logits`.
    """
    p = logits.shape[0]
    values = logits.double()
    fit = torch.zeros_like(values)
    coefficients = []
    for k in frequencies:
        cube = trig_cube(p, k, device=values.device)
        coefficient = (values * cube).sum()
        coefficients.append(coefficient)
        fit += coefficient * cube
    norm = values.norm()
    coefficients_t = (torch.stack(coefficients) if coefficients
                      else torch.zeros(0, dtype=torch.float64, device=values.device))
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
        logit_cosine: per key frequency, the cosine similarity of the logits over (a, b, c) with cos(w_k(a+b-c)).
        logit_residual: the fraction of the logits' norm that those cosines leave unexplained.
    """

    train_loss: float
    test_loss: float
    restricted_loss: float
    excluded_loss: float
    logit_cosine: list[float]
    logit_residual: float


def progress_measures(model: Model, tokens: Int[Tensor, "pairs 3"], labels: Int[Tensor, " pairs"],
                      train_indices: Int[Tensor, " n_train"], test_indices: Int[Tensor, " n_test"],
                      p: int, frequencies: list[int]) -> ProgressMeasures:
    """Compute the progress measures of a 1-layer modular-addition model on all p*p inputs (rows a*p + b).

    Args:
        model: a TransformerBridge with p answer classes and `W_out`, `W_U`, `b_U`.
    """
    post, resid = hook_name("neuron", 0), hook_name("resid_mid", 0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[post, resid])
        logits = logits[:, -1].double()                         # [p*p, p]
        acts = cache[post][:, -1].double()                      # [p*p, d_mlp]
        resid_mid = cache[resid][:, -1].double()                # [p*p, d_model]
        W_out, W_U, b_U = model.W_out[0].double(), model.W_U.double(), model.b_U.double()
        key_part = key_frequency_component(acts - acts.mean(0), p, frequencies)
        restricted = (acts.mean(0) + key_part) @ W_out @ W_U
        restricted = restricted + (logits.mean(0) - restricted.mean(0))
        excluded = ((acts - key_part) @ W_out + resid_mid) @ W_U + b_U
        trig = logit_trig_fit(logits.reshape(p, p, p), frequencies)
    loss = lambda values, rows: last_position_loss(values[rows], labels[rows]).item()  # noqa: E731
    return ProgressMeasures(
        train_loss=loss(logits, train_indices), test_loss=loss(logits, test_indices),
        restricted_loss=loss(restricted, test_indices), excluded_loss=loss(excluded, train_indices),
        logit_cosine=trig["cosine_similarity"].tolist(), logit_residual=trig["residual_fraction"].item())


def acceptance_checks(final_test_accuracy: float, grokked: bool, n_key_frequencies: int, excluded_loss: float,
                      residual_start: float, residual_end: float) -> dict[str, bool]:
    """Notebook 01's acceptance bars, `{name: held}` (asserted on the committed `RECIPE`): the model grokked (its test
    accuracy reached 99%; the name carries the final accuracy), it computes with at least two key frequencies, its
    excluded loss on the training pairs is above 1 at the end (it relies on those frequencies even where it
    memorised), and the logit residual the key cosines leave falls from the first checkpoint to the last."""
    return {
        f"test accuracy reaches 99% (final {final_test_accuracy:.1%}{'' if grokked else '; this seed memorised'})":
            grokked,
        "at least two key frequencies": n_key_frequencies >= 2,
        "excluded loss above 1 at the end": excluded_loss > 1,
        "logit residual fraction falls across training": residual_end < residual_start,
    }
