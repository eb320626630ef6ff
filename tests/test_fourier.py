"""Fourier analysis for grokking: an orthonormal basis for any p, planted frequencies are found (also when their
neurons are impure), the progress measures decompose the model exactly, and every helper keeps its inputs' device."""
from __future__ import annotations

import math

import pytest
import torch

from helpers.studies import fourier
from helpers.models.load import build_native_model
from helpers.tasks.modular import last_position_loss, make_data
from helpers.models.zoo import grokking_transformer_config
from tests.conftest import failed_bars


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
    assert sorted(clusters.frequencies) == [2, 5]
    assert clusters.counts == {2: 6, 5: 6}
    power = fourier.frequency_power(fourier.neuron_fourier_norms(acts, fourier.fourier_basis(p, torch.float64)),
                                    fourier.fourier_basis(p, torch.float64))
    assert sorted(fourier.key_frequencies(power)) == [2, 5]
    assert power.sum().item() == pytest.approx(1.0)


def half_grokked_neurons(p, seed=0):
    """A model caught mid-circuit: 40 neurons of frequency 3 still mixed with noise (each ~0.6 pure, so none is
    single-frequency) carry most of the power; 10 pure frequency-7 neurons of smaller amplitude carry a little."""
    generator = torch.Generator().manual_seed(seed)
    impure = planted_neurons(p, [3], per_frequency=40, seed=seed)
    impure = impure + 0.55 * torch.randn(impure.shape, generator=generator, dtype=torch.float64)
    pure = 0.7 * planted_neurons(p, [7], per_frequency=10, seed=seed + 1)
    return torch.cat([impure, pure], -1)


def test_an_impure_dominant_frequency_is_a_key_frequency_though_no_neuron_clusters_on_it():
    p = 31
    basis = fourier.fourier_basis(p, torch.float64)
    acts = half_grokked_neurons(p)
    fractions = fourier.neuron_frequency_fractions(acts, basis)
    purity = fractions[3 - 1, :40]
    assert 0.45 < purity.mean() < 0.75 and purity.max() < 0.85
    assert fourier.cluster_neurons(fractions, threshold=0.85).frequencies == [7]  # the old reading misses 3
    power = fourier.frequency_power(fourier.neuron_fourier_norms(acts, basis), basis)
    assert fourier.key_frequencies(power) == [3, 7]
    assert power[3 - 1] > 0.5 and all(power[k - 1] < 0.05 for k in range(1, 16) if k not in (3, 7))


def test_fourier_norms_of_centred_neurons_live_in_the_key_rows_and_columns():
    p = 11
    basis = fourier.fourier_basis(p, torch.float64)
    norms = fourier.neuron_fourier_norms(planted_neurons(p, [4], per_frequency=3), basis)
    support = torch.zeros(p, p, dtype=torch.bool)
    block = basis.block(4)
    support[torch.tensor(block)[:, None], torch.tensor(block)[None, :]] = True
    assert norms[0, 0].abs() < 1e-10  # centred
    assert norms[~support].abs().max() < 1e-10 and norms[support].max() > 1


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


def test_trig_outer_product_of_cos_cos_minus_sin_sin_is_cos_of_the_sum():
    p = 13
    basis = fourier.fourier_basis(p, torch.float64)
    sin_row, cos_row = basis.rows(5)
    product = fourier.trig_outer_product(basis, cos_row, cos_row) - fourier.trig_outer_product(basis, sin_row, sin_row)
    x = torch.arange(p, dtype=torch.float64)
    of_sum = torch.cos(2 * math.pi * 5 * (x[:, None] + x[None, :]) / p) * 2 / p  # both rows scaled by sqrt(2/p)
    torch.testing.assert_close(product, of_sum)


def tiny_model(p, device="cpu", seed=0):
    config = grokking_transformer_config(d_vocab=p + 1, d_vocab_out=p, d_model=32, d_head=8, d_mlp=64)
    return build_native_model(config, seed=seed, device=device)


def test_progress_measures_decompose_the_model_exactly():
    p = 7
    data = make_data(p, "modular", frac_train=0.5, seed=0)
    model = tiny_model(p)
    args = (data.tokens, data.labels, data.train_indices, data.test_indices, p)
    nothing_removed = fourier.progress_measures(model, *args, [])
    assert nothing_removed.excluded_loss == pytest.approx(nothing_removed.train_loss, rel=1e-6)
    every_frequency = fourier.progress_measures(model, *args, [1, 2, 3])
    with torch.no_grad():
        logits = model(data.tokens)[:, -1]
    assert every_frequency.test_loss == pytest.approx(last_position_loss(logits[data.test_indices],
                                                                         data.labels[data.test_indices]).item())
    fit = fourier.logit_trig_fit(logits.reshape(p, p, p), [1, 2, 3])
    assert every_frequency.logit_cosine == pytest.approx(fit["cosine_similarity"].tolist())
    assert every_frequency.logit_residual == pytest.approx(fit["residual_fraction"].item())
    assert 0 < every_frequency.logit_residual < 1


def run_tensor_helpers(device, p=7):
    """Every tensor-returning analysis helper on inputs of one device (random values of fixed shapes)."""
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)  # noqa: E731
    basis = fourier.fourier_basis(p, torch.float64)  # built on the CPU, as the notebook does
    acts = draw(p, p, 5)
    norms = fourier.neuron_fourier_norms(acts, basis)
    fit = fourier.logit_trig_fit(draw(p, p, p), [1, 3])
    return {"transform_2d": fourier.transform_2d(acts[..., 0], basis),
            "frequency_norms": fourier.frequency_norms(draw(p, 4), basis),
            "neuron_fourier_norms": norms, "frequency_power": fourier.frequency_power(norms, basis),
            "neuron_frequency_fractions": fourier.neuron_frequency_fractions(acts, basis),
            "key_frequency_component": fourier.key_frequency_component(draw(p * p, 5), p, [1, 2]),
            "sum_direction_basis": fourier.sum_direction_basis(p, [2], device=device),
            "trig_cube": fourier.trig_cube(p, 2, device=device), "fit": fit["fit"], "cosine": fit["cosine_similarity"],
            "basis_on_device": fourier.fourier_basis(p, device=device).matrix}


def test_every_helper_keeps_its_inputs_device_and_shape():
    p = 7
    on_meta = run_tensor_helpers("meta", p)
    on_cpu = run_tensor_helpers("cpu", p)
    for name, value in on_meta.items():
        assert value.device.type == "meta", name
        assert value.shape == on_cpu[name].shape, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_helpers_and_progress_measures_agree_on_cpu_and_cuda():
    for name, value in run_tensor_helpers("cuda").items():
        torch.testing.assert_close(value.cpu(), run_tensor_helpers("cpu")[name], msg=name)
    p = 7
    data = make_data(p, "modular", frac_train=0.5, seed=0)
    model = tiny_model(p)
    on_cpu = fourier.progress_measures(model, data.tokens, data.labels, data.train_indices, data.test_indices, p, [1])
    gpu_data = data.to("cuda")
    on_gpu = fourier.progress_measures(model.to("cuda"), gpu_data.tokens, gpu_data.labels, gpu_data.train_indices,
                                       gpu_data.test_indices, p, [1])
    for name in ("train_loss", "test_loss", "restricted_loss", "excluded_loss", "logit_residual"):
        assert getattr(on_gpu, name) == pytest.approx(getattr(on_cpu, name), rel=1e-4), name



MEMORISED = "test accuracy reaches 99% (final 62.0%; this seed memorised)"


def test_the_acceptance_checks_pass_a_grokked_run_and_fail_each_bar_alone():
    passing = dict(final_test_accuracy=1.0, grokked=True, n_key_frequencies=3, excluded_loss=2.76,
                   residual_start=0.87, residual_end=0.13)
    assert fourier.acceptance_checks(**passing) == {
        "test accuracy reaches 99% (final 100.0%)": True, "at least two key frequencies": True,
        "excluded loss above 1 at the end": True, "logit residual fraction falls across training": True}
    for change, failed in [({"final_test_accuracy": 0.62, "grokked": False}, MEMORISED),
                           ({"n_key_frequencies": 1}, "at least two key frequencies"),
                           ({"excluded_loss": 0.9}, "excluded loss above 1 at the end"),
                           ({"residual_end": 0.9}, "logit residual fraction falls across training")]:
        assert failed_bars(fourier.acceptance_checks, passing, change) == [failed]


def test_a_planted_memorising_run_fails_every_bar():
    checks = fourier.acceptance_checks(0.62, False, 1, 0.4, 0.5, 0.7)
    assert checks == {MEMORISED: False, "at least two key frequencies": False,
                      "excluded loss above 1 at the end": False, "logit residual fraction falls across training": False}


def test_the_reference_holds_the_papers_figures_by_what_they_describe():
    assert fourier.REFERENCE["key frequencies"] == "17, 25, 32, 47"
    assert set(fourier.RECIPE) == {"p", "frac_train", "lr", "num_epochs", "weight_decay", "betas", "data_seed",
                                   "model_seed"}
