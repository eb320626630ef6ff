"""Fourier analysis for grokking: an orthonormal basis for any p, and planted frequencies are found."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import fourier
from helpers.tasks.modular import make_data


@pytest.mark.parametrize("p", [2, 3, 10, 11, 31, 113])
def test_basis_is_orthonormal_for_odd_and_even_p(p):
    basis = fourier.fourier_basis(p, dtype=torch.float64)
    assert basis.matrix.shape == (p, p) and len(basis.names) == p
    torch.testing.assert_close(basis.matrix @ basis.matrix.T, torch.eye(p, dtype=torch.float64))


def planted_neurons(p, frequencies, per_frequency=4, seed=0):
    """Neuron activations over (a, b) that are ReLU-free trig products of one frequency each: [p, p, n]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.arange(p, dtype=torch.float64)
    a, b = x[:, None], x[None, :]
    neurons = []
    for k in frequencies:
        for _ in range(per_frequency):
            phase = torch.rand(1, generator=generator).item() * 2 * math.pi
            w = 2 * math.pi * k / p
            neurons.append(torch.cos(w * (a + b) + phase) + 0.5 * torch.cos(w * a) + 0.3)
    return torch.stack(neurons, dim=-1)


def test_planted_frequencies_are_recovered_as_key_frequencies():
    p = 13
    acts = planted_neurons(p, [2, 5], per_frequency=6)
    noise = torch.randn(p, p, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fractions = fourier.neuron_frequency_fractions(torch.cat([acts, noise], -1), fourier.fourier_basis(p, torch.float64))
    assert fractions.shape == (p // 2, 15)
    torch.testing.assert_close(fractions[:, :12].sum(0), torch.ones(12, dtype=torch.float64))
    clusters = fourier.cluster_neurons(fractions, threshold=0.85)
    assert sorted(clusters.key_frequencies) == [2, 5]
    assert clusters.counts == {2: 6, 5: 6}


def test_frequency_norms_of_a_planted_embedding():
    p = 11
    x = torch.arange(p, dtype=torch.float64)
    embedding = torch.stack([torch.cos(2 * math.pi * 3 * x / p), torch.sin(2 * math.pi * 3 * x / p)], 1)
    norms = fourier.frequency_norms(embedding, fourier.fourier_basis(p, torch.float64))
    assert int(norms.argmax()) + 1 == 3
    assert norms.pow(2).sum() == pytest.approx(embedding.pow(2).sum().item())


def test_trig_fit_recovers_a_logit_cube_exactly():
    p = 11
    logits = 3.0 * fourier.trig_cube(p, 2) - 1.5 * fourier.trig_cube(p, 4)
    fit = fourier.logit_trig_fit(logits, [2, 4])
    torch.testing.assert_close(fit["coefficients"], torch.tensor([3.0, -1.5], dtype=torch.float64))
    assert fit["residual_fraction"].item() < 1e-10
    assert fourier.logit_trig_fit(logits, [1])["residual_fraction"].item() == pytest.approx(1.0)


def test_key_frequency_component_keeps_functions_of_the_sum_only():
    p = 7
    x = torch.arange(p, dtype=torch.float64)
    a, b = x.repeat_interleave(p), x.repeat(p)
    of_sum = torch.cos(2 * math.pi * 3 * (a + b) / p)
    of_a = torch.cos(2 * math.pi * 3 * a / p)
    acts = torch.stack([of_sum, of_a], 1)
    kept = fourier.key_frequency_component(acts, p, [3])
    torch.testing.assert_close(kept[:, 0], of_sum)
    assert kept[:, 1].abs().max() < 1e-10


def test_modular_data_rows_and_split():
    data = make_data(5, "modular", frac_train=0.4, seed=0)
    assert data.tokens.shape == (25, 3) and data.tokens[7].tolist() == [1, 2, 5]
    assert data.labels[7] == 3 and make_data(5, "addition", 0.4).labels.max() == 8
    assert sorted(torch.cat([data.train_indices, data.test_indices]).tolist()) == list(range(25))
    assert len(data.train_indices) == 10
    with pytest.raises(ValueError):
        make_data(5, "multiplication")
