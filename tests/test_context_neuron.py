"""The German context neuron study's helpers: masks, token-weighted losses, pins measured where they are written,
the backup test, one-pass neuron means and the downstream unembedding, on every architecture."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import neurons
from helpers.techniques.losses import token_losses
from helpers.studies import context_neuron
from tests.conftest import ARCHITECTURES, failed_bars


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_checkpoint):
    """`(model, german, english)`: a tiny model and two `Documents` of three padded rows each (skip 2 positions)."""
    from helpers.models.load import load_model
    from helpers.tasks.bilingual import tokenize_documents

    model = load_model(tiny_checkpoint(request.param), device="cpu")
    docs = []
    for texts in (["Das ist ein kleiner Test mit vielen", "Das ist ein Test", "mit vielen deutschen Wörtern und"],
                  ["All cats are red, not blue.", "Kittens are cats.", "Tom said, let us go to the park"]):
        tokens, present = tokenize_documents(model.tokenizer, texts, 10)
        docs.append(context_neuron.Documents.from_tokens(tokens, present, 2, batch_size=2))
    return model, *docs


def test_documents_masks_and_batches(tiny):
    _, german, _ = tiny
    assert torch.all(german.scored <= german.present) and not german.scored[:, :2].any()
    assert torch.equal(german.scored[:, 2:], german.present[:, 2:])
    rows = [len(t) for t, _ in german.batches()]
    assert rows == [2, 1]
    assert german.n_scored_targets == int(german.scored[:, 1:].sum())
    labels = [int(l[0]) for _, _, l in context_neuron.labelled_batches(german, german.rows([0]))]
    assert labels == [1, 1, 0]


def test_mean_loss_is_token_weighted_over_scored_targets(tiny):
    model, german, _ = tiny
    losses = token_losses(model, german.tokens)
    expected = float(losses[german.scored[:, 1:]].double().mean())
    assert context_neuron.mean_loss(model, german) == pytest.approx(expected, rel=1e-6)


def test_pins_are_measured_at_every_position_they_write(tiny):
    model, _, english = tiny
    chosen = [(0, 3), (1, 5), (1, 2)]
    means = context_neuron.pin_means(model, english, chosen)
    with torch.no_grad():
        _, cache = model.run_with_cache(english.tokens)
    for layer, neuron in chosen:
        acts = cache[f"blocks.{layer}.mlp.hook_post"][..., neuron]
        assert means[(layer, neuron)] == pytest.approx(float(acts[english.present].mean()), abs=1e-5)
        scored = context_neuron.pin_means(model, english, [(layer, neuron)], mask="scored")[(layer, neuron)]
        assert scored == pytest.approx(float(acts[english.scored].mean()), abs=1e-5)
    # one pass for all layers equals the per-layer streaming statistic
    single = neurons.neuron_mean_activations(model, english.batches("present"), 1, [5, 2]).mean
    assert [means[(1, 5)], means[(1, 2)]] == pytest.approx(single.tolist(), abs=1e-6)


def test_pinning_a_neuron_to_its_own_constant_value_changes_nothing_and_a_real_pin_does(tiny):
    model, german, english = tiny
    clean = (context_neuron.mean_loss(model, german), context_neuron.mean_loss(model, english))
    change = context_neuron.loss_changes(model, german, english, [], clean)
    assert change.german == 0 and change.english == 0
    pinned = context_neuron.loss_changes(model, german, english,
                                         context_neuron.pin_hooks({(0, 3): 25.0}, [(0, 3)]), clean)
    assert pinned.german != 0


def test_backup_test_single_joint_and_with_context(tiny):
    model, german, english = tiny
    keys = [(0, 3), (1, 5)]
    means = context_neuron.pin_means(model, english, keys + [(0, 1)])
    means = {key: value + 10.0 for key, value in means.items()}   # pins far from the mean, so each one matters
    clean = (context_neuron.mean_loss(model, german), context_neuron.mean_loss(model, english))
    losses = context_neuron.variant_losses(
        model, german, english, context_neuron.pin_variants(means, context_neuron.backup_pins((0, 1), keys)))
    assert losses.clean_means == pytest.approx(clean, rel=1e-6)
    result = context_neuron.backup_test(losses, keys, (0, 1))
    for key in keys:
        alone = context_neuron.loss_changes(model, german, english, context_neuron.pin_hooks(means, [key]), clean)
        assert result.single[key].german == pytest.approx(alone.german, rel=1e-4)
        assert result.single[key].english == pytest.approx(alone.english, rel=1e-4)
    both = context_neuron.mean_loss(model, german, context_neuron.pin_hooks(means, keys))
    assert result.joint.german == pytest.approx(context_neuron.percent_change(both, clean[0]), rel=1e-4)
    assert result.sum_of_single == pytest.approx(sum(result.single[k].german for k in keys))
    assert result.backup_share == pytest.approx((result.joint.german - result.sum_of_single) / result.joint.german)
    everything = context_neuron.mean_loss(model, german, context_neuron.pin_hooks(means, keys + [(0, 1)]))
    assert result.with_context == pytest.approx(context_neuron.percent_change(everything, clean[0]), rel=1e-4)


def test_variant_losses_equal_separate_hooked_runs_per_document(tiny):
    model, german, english = tiny
    variants = {"late": context_neuron.pin_hooks({(1, 3): 2.0}, [(1, 3)]),
                "early and late": context_neuron.pin_hooks({(0, 2): -1.0, (1, 4): 3.0}, [(0, 2), (1, 4)]),
                "none": []}
    losses = context_neuron.variant_losses(model, german, english, variants)
    for name, hooks in variants.items():
        for hooked, documents in zip(losses.hooked[name], (german, english)):
            assert torch.allclose(hooked, context_neuron.document_loss_sums(model, documents, hooks), rtol=1e-5)
    assert losses.change("none").german == pytest.approx(0, abs=1e-4)


def test_downstream_unembed_is_zero_without_an_intervention_and_exact_with_one(tiny):
    model, german, _ = tiny
    same = context_neuron.downstream_unembed(model, german, [(1, 4)], [])
    assert torch.all(same[(1, 4)] == 0)
    hooks = context_neuron.pin_hooks({(1, 4): 2.0}, [(1, 4)])
    on = context_neuron.neuron_means(model, german.batches(), [(1, 4)])[(1, 4)]
    effect = context_neuron.downstream_unembed(model, german, [(1, 4)], hooks)[(1, 4)]
    assert torch.allclose(effect, (on - 2.0) * model.W_out[1, 4] @ model.W_U, atol=1e-5)


def test_shift_histograms_hold_every_scored_position_of_both_languages(tiny):
    model, german, english = tiny
    on = context_neuron.pin_hooks({(0, 2): 3.0}, [(0, 2)])
    off = context_neuron.pin_hooks({(0, 2): 0.0}, [(0, 2)])
    values = context_neuron.shift_histogram_values(model, german, english, [(1, 3), (1, 6)], on, off)
    n = int(german.scored.sum() + english.scored.sum())
    assert all(len(v) == n for runs in values.values() for v in runs.values())
    assert not torch.equal(values[(1, 3)]["on"], values[(1, 3)]["off"])


def test_examples_change_nothing_without_hooks(tiny):
    model, _, _ = tiny
    changes = context_neuron.example_loss_changes(model, model.tokenizer, ["Das ist ein Test", "All cats"], [], 10)
    assert [len(ids) == len(change) > 1 for ids, change in changes] == [True, True]
    assert all(torch.all(change == 0) for _, change in changes)


def test_the_acceptance_checks_hold_for_a_clear_detector_and_fail_each_bar_alone():
    passing = dict(best_f1=0.99, runner_up_f1=0.90, german_change=12.0, english_change=0.1, boost_german=1.8,
                   boost_english=0.3, ngram_found=True)
    assert all(context_neuron.acceptance_checks(**passing).values())
    specific = "English loss within 0.5% while German rises (a German-specific effect)"
    for change, failed in [({"runner_up_f1": 0.985}, ["F1 >= 0.95 and clearly above the runner-up"]),
                           ({"german_change": 4.0}, ["German loss +5% or more", specific]),
                           ({"english_change": -0.6}, [specific]),
                           ({"boost_german": 0.2}, ["direct boost larger on German unigrams"]),
                           ({"ngram_found": False}, ["downstream neuron completes a German word only with context"])]:
        assert failed_bars(context_neuron.acceptance_checks, passing, change) == failed


def test_language_direction_and_writer_separation_equal_a_full_run(tiny):
    """The passes stop after the last block; the direction and each writer's separation are those of full runs."""
    from helpers.techniques import dla

    model, german, english = tiny
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    values, masks = {}, {"de": german, "en": english}
    with torch.no_grad():
        caches = {name: model.run_with_cache(docs.tokens)[1] for name, docs in masks.items()}
    means = {name: caches[name][final][docs.scored].double().mean(0) for name, docs in masks.items()}
    expected = (means["de"] - means["en"]) / (means["de"] - means["en"]).norm()
    direction = context_neuron.language_direction(model, german, english)
    torch.testing.assert_close(direction.double(), expected, atol=1e-5, rtol=1e-4)
    separation, components = context_neuron.writer_separation(model, german, english, direction)
    for name, docs in masks.items():
        writes, labels = dla.direction_writes(model, caches[name], direction)
        values[name] = writes[:, docs.scored].double()                               # [component, tokens]
    assert [c.label for c in components] == [c.label for c in labels]
    pooled = ((values["de"].var(1, correction=0) + values["en"].var(1, correction=0)) / 2).sqrt()
    expected = (values["de"].mean(1) - values["en"].mean(1)) / pooled.clamp_min(1e-6)
    kept = pooled > 1e-6
    torch.testing.assert_close(separation[kept].double(), expected[kept], atol=1e-3, rtol=1e-3)
