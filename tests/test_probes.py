"""Probes and neuron correlations used by the grokking notebook (the German-neuron tests cover the rest)."""
from __future__ import annotations

import torch
from scipy.stats import pearsonr

from helpers.techniques.neurons import correlations, fit_probe, linear_fit
from helpers.techniques.subspaces import affine_projection_hook, pca, project_onto_affine


def test_correlations_match_scipy_and_dead_neurons_are_zero():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(50, generator=generator, dtype=torch.float64)
    acts = torch.stack([2 * target + 0.1 * torch.randn(50, generator=generator, dtype=torch.float64),
                        torch.randn(50, generator=generator, dtype=torch.float64), torch.ones(50, dtype=torch.float64)], 1)
    r = correlations(acts, target)
    for i in range(2):
        assert abs(r[i].item() - pearsonr(acts[:, i].numpy(), target.numpy())[0]) < 1e-10
    assert r[2].item() == 0.0


def test_regression_probe_finds_a_linear_signal_and_beats_baseline():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    targets = features @ torch.arange(8.0) + 0.01 * torch.randn(200, generator=generator)
    result = fit_probe(features, targets, kind="regression", seed=0)
    assert result.score > 0.99 and result.baseline < 0.05


def test_classification_probe_and_linear_fit():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 4, generator=generator)
    labels = (features[:, 2] > 0).long()
    assert fit_probe(features, labels, kind="classification", seed=0).score > 0.95
    fit = linear_fit(torch.arange(10.0), 3 * torch.arange(10.0) - 2)
    assert abs(fit.r2 - 1) < 1e-9 and abs(fit.coef[0] - 3) < 1e-6 and abs(fit.intercept + 2) < 1e-5


def test_pca_and_projection_keep_only_the_chosen_directions():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 1, generator=generator, dtype=torch.float64) * torch.tensor([[3.0, 0, 0]], dtype=torch.float64) \
        + 0.1 * torch.randn(20, 3, generator=generator, dtype=torch.float64)
    result = pca(rows)
    assert result.explained_variance_ratio[0] > 0.95
    projected = project_onto_affine(rows, result.mean, result.components[:1])
    torch.testing.assert_close(project_onto_affine(projected, result.mean, result.components[:1]), projected)
    hook = affine_projection_hook(result.mean, result.components[:1], positions=[0])
    batch = rows.reshape(4, 5, 3)
    patched = hook(batch)
    torch.testing.assert_close(patched[:, 1:], batch[:, 1:])
    torch.testing.assert_close(patched[:, 0], project_onto_affine(batch[:, 0], result.mean, result.components[:1]))
