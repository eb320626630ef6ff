"""Bootstrap intervals: coverage, pairing, the notebooks' statistics against their direct definitions, and the
figures' helpers (faithfulness, loss changes, detector F1) on every architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.techniques import ablation, neurons
from helpers.studies import context_neuron, ngrams
from helpers.core.components import Component
from helpers.techniques.sae import loss_recovered
from helpers.core.uncertainty import (Interval, bootstrap_interval, f1_statistic, faithfulness_statistic,
                                 fraction_lost_statistic, mean_statistic, percent_change_statistic,
                                 recovered_statistic)
from tests.conftest import ARCHITECTURES


def test_interval_formats_estimate_and_bounds():
    interval = Interval(0.9412, 0.9101, 0.9634)
    assert str(interval) == "0.94 [0.91, 0.96]"
    assert f"{interval:+.1f}" == "+0.9 [+0.9, +1.0]"


def test_a_95_percent_interval_of_the_mean_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        sample = rng.exponential(2.0, size=80)                   # skewed, true mean 2
        interval = bootstrap_interval(mean_statistic, sample, n_resamples=500, seed=trial)
        assert interval.low <= interval.estimate <= interval.high
        covered += interval.low <= 2.0 <= interval.high
    assert 0.86 <= covered / 200 <= 0.99


def test_same_seed_same_interval_and_more_data_narrower():
    rng = np.random.default_rng(1)
    sample = rng.normal(size=400)
    assert bootstrap_interval(mean_statistic, sample) == bootstrap_interval(mean_statistic, sample)
    small = bootstrap_interval(mean_statistic, sample[:50])
    large = bootstrap_interval(mean_statistic, sample)
    assert large.high - large.low < small.high - small.low


def test_resampling_is_paired():
    """The circuit's metric tracks the full model's prompt by prompt: resampled in pairs, the ratio barely moves;
    with the pairing broken it would spread as wide as the prompts' own spread."""
    rng = np.random.default_rng(2)
    full = rng.normal(5.0, 2.0, size=300)
    circuit, empty = 0.9 * full + rng.normal(0, 0.05, size=300), np.zeros(300)
    paired = bootstrap_interval(faithfulness_statistic, circuit, full, empty)
    shuffled = bootstrap_interval(faithfulness_statistic, rng.permutation(circuit), full, empty)
    assert paired.estimate == pytest.approx(shuffled.estimate)
    assert paired.high - paired.low < 0.2 * (shuffled.high - shuffled.low)


def test_statistics_equal_their_direct_definitions():
    rng = np.random.default_rng(3)
    a, b, c = rng.random(50), rng.random(50) + 1, rng.random(50) + 2
    assert faithfulness_statistic(a, b, c) == pytest.approx((a.mean() - c.mean()) / (b.mean() - c.mean()))
    assert recovered_statistic(a, b, c) == pytest.approx(loss_recovered(b.mean(), a.mean(), c.mean()))
    assert percent_change_statistic(b, a) == pytest.approx(100 * (b.sum() / a.sum() - 1))
    assert fraction_lost_statistic(a, b) == pytest.approx(1 - a.mean() / b.mean())
    labels = rng.random(1000) < 0.3
    predicted = rng.random(1000) < 0.4
    from sklearn.metrics import f1_score
    docs = np.repeat(np.arange(100), 10)                                 # 100 documents of 10 tokens
    count = lambda mask: np.bincount(docs, weights=mask, minlength=100)  # noqa: E731
    f1 = f1_statistic(count(labels & predicted), count(~labels & predicted), count(labels & ~predicted))
    assert f1 == pytest.approx(f1_score(labels, predicted))


@pytest.mark.parametrize("bad", [dict(samples=([1.0, 2.0], [1.0])), dict(samples=([1.0],)),
                                 dict(samples=([1.0, 2.0],), confidence=1.5)])
def test_bad_samples_are_refused(bad):
    with pytest.raises(ValueError):
        bootstrap_interval(mean_statistic, *bad["samples"], confidence=bad.get("confidence", 0.95))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_checkpoint):
    from helpers.models.load import load_model
    from helpers.tasks.bilingual import tokenize_documents

    model = load_model(tiny_checkpoint(request.param), device="cpu")
    docs = []
    for texts in (["Das ist ein kleiner Test mit vielen", "Das ist ein Test", "mit vielen deutschen Wörtern und",
                   "Wir gehen heute in den Park"],
                  ["All cats are red, not blue.", "Kittens are cats.", "Tom said, let us go to the park",
                   "The dog runs home"]):
        tokens, present = tokenize_documents(model.tokenizer, texts, 10)
        docs.append(context_neuron.Documents.from_tokens(tokens, present, 2, batch_size=3))
    return model, *docs


def test_circuit_faithfulness_interval_brackets_the_ratio_of_means(tiny):
    model, german, _ = tiny
    tokens = german.tokens[:, :6]
    answers = tokens[:, -1]
    evaluate = ablation.CircuitEvaluator(model, tokens[:, :-1], ablation.normalized_logits(answers))
    result = evaluate.faithfulness([Component.head(0, 0), Component.mlp(0)])
    interval = result.interval()
    assert interval.estimate == pytest.approx(result.ratio_of_means, rel=1e-5, abs=1e-6)
    assert interval.low <= interval.estimate <= interval.high


def test_variant_loss_intervals_estimate_equals_loss_changes(tiny):
    model, german, english = tiny
    hooks = context_neuron.pin_hooks({(1, 3): 2.0}, [(1, 3)])
    clean = (context_neuron.mean_loss(model, german), context_neuron.mean_loss(model, english))
    change = context_neuron.loss_changes(model, german, english, hooks, clean)
    german_ci, english_ci = context_neuron.variant_losses(model, german, english, {"pin": hooks}).intervals("pin")
    assert german_ci.estimate == pytest.approx(change.german, rel=1e-4)
    assert english_ci.estimate == pytest.approx(change.english, rel=1e-4)
    assert german_ci.low <= german_ci.estimate <= german_ci.high


def test_detector_counts_recount_the_scan_rule_token_by_token(tiny):
    model, german, english = tiny
    scan = neurons.scan_neurons(model, context_neuron.labelled_batches(german, english), bins=64)
    layer, neuron, _ = scan.ranking(1)[0]
    row = scan.layers.index(layer)
    threshold, direction = float(scan.threshold[row, neuron]), int(scan.direction[row, neuron])
    activations = tuple(ngrams.neuron_activation(model, docs.tokens, layer, neuron, batch_size=2)
                        for docs in (german, english))
    tp, fp, fn = context_neuron.detector_counts(german, english, activations, threshold, direction)
    with torch.no_grad():
        _, cache_de = model.run_with_cache(german.tokens)
        _, cache_en = model.run_with_cache(english.tokens)
    fires = lambda cache: cache[f"blocks.{layer}.mlp.hook_post"][..., neuron] * direction >= threshold * direction  # noqa: E731
    assert int(tp.sum()) == int((fires(cache_de) & german.scored).sum())
    assert int(fn.sum()) == int((~fires(cache_de) & german.scored).sum())
    assert int(fp.sum()) == int((fires(cache_en) & english.scored).sum())
    assert len(tp) == len(german) + len(english) and not fp[:len(german)].any() and not tp[len(german):].any()
    interval = context_neuron.f1_interval(german, english, activations, threshold, direction)
    assert interval.estimate == pytest.approx(float(f1_statistic(tp.numpy(), fp.numpy(), fn.numpy())))
