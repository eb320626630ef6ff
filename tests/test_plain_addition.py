"""Notebook 01b's study: a planted number line and parabola are recovered from an embedding, the sum neurons and the
neuron-on-PCs fit find what was planted, the PC1-only ablation measures a real model, and the acceptance bars fail
on a planted run that misses each of them."""
from __future__ import annotations

import pytest
import torch

from helpers.models.load import build_native_model
from helpers.models.zoo import grokking_transformer_config
from helpers.studies import plain_addition
from helpers.tasks.modular import accuracy, make_data
from helpers.techniques.neurons import fit_probe
from tests.conftest import failed_bars


def planted_embedding(p=10, d_model=16, seed=0):
    """`W_E [p, d]`: the number n along one direction, (n - mean)^2 along another, a little noise."""
    generator = torch.Generator().manual_seed(seed)
    n = torch.arange(p, dtype=torch.float64)
    directions = torch.linalg.qr(torch.randn(d_model, 2, generator=generator, dtype=torch.float64))[0].T
    line, parabola = n - n.mean(), 0.3 * ((n - n.mean()) ** 2 - ((n - n.mean()) ** 2).mean())
    noise = 1e-3 * torch.randn(p, d_model, generator=generator, dtype=torch.float64)
    return line[:, None] * directions[0] + parabola[:, None] * directions[1] + noise


def test_pc1_is_the_number_line_and_pc2_its_parabola():
    shape = plain_addition.embedding_shape(planted_embedding())
    assert shape.pca.explained_variance_ratio[:2].sum() > 0.999
    assert shape.pc1_fit.r2 > 0.999 and shape.pc2_fit.r2 > 0.999
    assert abs(shape.pc2_fit.coef[1]) > 0.1            # the n^2 term carries PC2
    assert shape.pc1.shape == shape.pc2.shape == (10,)


def sum_neurons_setup(p=6):
    data = make_data(p, "addition", frac_train=0.5, seed=0)
    sums = data.labels.double()
    generator = torch.Generator().manual_seed(1)
    pre = torch.stack([sums + 1,                                      # a sum neuron, positive: the ReLU keeps it
                       torch.randn(p * p, generator=generator, dtype=torch.float64),  # noise
                       -torch.ones(p * p, dtype=torch.float64),       # dead after the ReLU
                       0.5 * data.a.double() - 1], 1)                 # reads a only
    return data, sums, pre, pre.relu()


def test_sum_correlations_count_the_planted_sum_neuron_and_the_dead_one():
    data, sums, pre, post = sum_neurons_setup()
    found = plain_addition.sum_correlations(post, sums, threshold=0.9, n_top=2)
    assert found.strong == 1 and found.dead == 1 and found.top[0] == 0
    assert found.correlations[2] == 0


def test_the_sum_neuron_is_a_linear_function_of_both_inputs_pcs():
    data, sums, pre, post = sum_neurons_setup()
    shape = plain_addition.embedding_shape(planted_embedding(p=6))
    found = plain_addition.sum_correlations(post, sums)
    neuron, fit = plain_addition.sum_neuron_on_pcs(pre, post, found, shape, data.a, data.b)
    assert neuron == 0 and fit.r2 > 0.999
    assert fit.coef[0] == pytest.approx(fit.coef[2], rel=1e-6)      # equal weight on PC1(a) and PC1(b)


def test_a_dead_neuron_is_never_the_sum_neuron():
    data, sums, pre, post = sum_neurons_setup()
    found = plain_addition.sum_correlations(post, sums)
    found.correlations[2] = 1.0                                       # planted: dead, yet "perfectly correlated"
    neuron, _ = plain_addition.sum_neuron_on_pcs(pre, post, found, plain_addition.embedding_shape(
        planted_embedding(p=6)), data.a, data.b)
    assert neuron == 0


def tiny_addition_model(p):
    config = grokking_transformer_config(d_vocab=p + 1, d_vocab_out=2 * p - 1, d_model=32, d_head=8, d_mlp=64)
    return build_native_model(config, seed=0)


def test_the_ablation_keeping_every_pc_changes_nothing_and_pc1_only_is_measured():
    p = 5
    data = make_data(p, "addition", frac_train=0.5, seed=0)
    model = tiny_addition_model(p)
    shape = plain_addition.embedding_shape(model.W_E[:-1].detach())
    with torch.no_grad():
        full = accuracy(model(data.tokens), data.labels)
    everything = plain_addition.pc1_only_ablation(model, data.tokens, data.labels, shape.pca, n_components=p)
    assert everything.full_accuracy == everything.ablated_accuracy == pytest.approx(full)
    pc1_only = plain_addition.pc1_only_ablation(model, data.tokens, data.labels, shape.pca)
    assert pc1_only.failures.shape == (p, p)
    assert pc1_only.ablated_accuracy == pytest.approx(1 - pc1_only.failures.mean().item())


PASSING = dict(final_test_accuracy=1.0, grokked=True, top2_variance=0.99, probe_r2=0.999, full_accuracy=1.0,
               pc1_only_accuracy=0.44)


def test_the_acceptance_checks_pass_the_original_notebooks_findings_and_fail_each_bar_alone():
    assert plain_addition.acceptance_checks(**PASSING) == {
        "test accuracy reaches 99% (final 100.0%)": True, "embedding PC1 and PC2 hold over 90% of its variance": True,
        "linear probe for a + b: held-out R^2 above 0.95": True,
        "keeping only PC1 of the embedding lowers accuracy": True}
    for change, failed in [({"final_test_accuracy": 0.5, "grokked": False},
                            "test accuracy reaches 99% (final 50.0%; this seed memorised)"),
                           ({"top2_variance": 0.85}, "embedding PC1 and PC2 hold over 90% of its variance"),
                           ({"probe_r2": 0.9}, "linear probe for a + b: held-out R^2 above 0.95"),
                           ({"pc1_only_accuracy": 1.0}, "keeping only PC1 of the embedding lowers accuracy")]:
        assert failed_bars(plain_addition.acceptance_checks, PASSING, change) == [failed]


def test_a_planted_run_without_the_findings_fails_every_bar():
    """Noise for an embedding, a probe on an unrelated feature, an ablation that changes nothing, a memorised run."""
    noise = torch.randn(10, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data, sums, pre, post = sum_neurons_setup()
    probe = fit_probe(torch.randn(len(sums), 1, generator=torch.Generator().manual_seed(2)), sums)
    top2 = plain_addition.embedding_shape(noise).pca.explained_variance_ratio[:2].sum().item()
    checks = plain_addition.acceptance_checks(0.5, False, top2, probe.score, 0.9, 0.9)
    assert not any(checks.values()) and len(checks) == 4


def test_the_reference_is_the_original_notebooks_figures_by_what_they_describe():
    assert plain_addition.REFERENCE["accuracy with PC1 only"] == "100% -> 42%"
    assert plain_addition.RECIPE["p"] == 10 and plain_addition.RECIPE["num_epochs"] == 5000
