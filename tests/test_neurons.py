"""Neuron statistics: streaming reductions equal their one-shot versions; F1/AUROC match scikit-learn; scans,
pinned-neuron ablations, direct patching and next-token DLA behave on a tiny GPT-NeoX."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from helpers.techniques import neurons
from helpers.core.components import Component, hook_name


def _sklearn_best_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return float(f1.max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_f1_and_auroc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(size=400) + 1.2 * labels
    scores[:50] = np.round(scores[:50])            # some ties
    f1, threshold = neurons.best_threshold_f1(torch.tensor(scores), torch.tensor(labels))
    assert f1 == pytest.approx(_sklearn_best_f1(scores, labels), abs=1e-12)
    predicted = scores >= threshold
    tp = (predicted & (labels == 1)).sum()
    assert f1 == pytest.approx(2 * tp / (predicted.sum() + labels.sum()))
    assert neurons.auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores))


def test_streaming_classifier_matches_exact_per_neuron_and_direction():
    gen = torch.Generator().manual_seed(0)
    n, d = 3000, 6
    labels = (torch.rand(n, generator=gen) < 0.4).long()
    acts = torch.randn(n, 2, d, generator=gen)
    acts[..., 0] += 3 * labels[:, None]            # strongly positive for label 1
    acts[..., 1] -= 1.0 * labels[:, None]          # anti neuron
    acc = neurons.NeuronClassifierAccumulator((2, d), bins=4096, low=torch.full((2, d), -8.0),
                                              high=torch.full((2, d), 8.0))
    for chunk in torch.split(torch.arange(n), 700):
        acc.update(acts[chunk], labels[chunk])
    result = acc.result(layers=[3, 5])
    for layer in range(2):
        for neuron in range(d):
            x = acts[:, layer, neuron]
            auc = roc_auc_score(labels.numpy(), x.numpy())
            best = max(_sklearn_best_f1(x.numpy(), labels.numpy()), _sklearn_best_f1(-x.numpy(), labels.numpy()))
            assert float(result.auroc[layer, neuron]) == pytest.approx(auc, abs=2e-3)
            assert float(result.f1[layer, neuron]) == pytest.approx(best, abs=5e-3)
    assert int(result.direction[0, 0]) == 1 and int(result.direction[0, 1]) == -1
    assert result.ranking(1)[0][:2] == (3, 0) or result.ranking(1)[0][:2] == (5, 0)
    assert torch.allclose(result.mean_pos.double(), acts[labels == 1].mean(0).double(), atol=1e-5)
    assert torch.allclose(result.std_neg.double(), acts[labels == 0].std(0, unbiased=False).double(), atol=1e-5)
    assert result.n_pos == int(labels.sum()) and result.n_neg == int((1 - labels).sum())


def test_running_stats_equal_one_shot():
    x = torch.randn(1000, 5, dtype=torch.float64) * 3 + 1
    stats = neurons.RunningStats()
    for chunk in torch.split(x, 137):
        stats.update(chunk)
    assert stats.count == 1000
    assert torch.allclose(stats.mean, x.mean(0))
    assert torch.allclose(stats.var, x.var(0, unbiased=False))
    assert torch.equal(stats.max, x.max(0).values) and torch.equal(stats.min, x.min(0).values)


def test_topk_accumulator_equals_global_topk():
    scores = torch.randn(10, 7)
    mask = torch.rand(10, 7) > 0.2
    acc = neurons.TopKAccumulator(5)
    for rows in torch.split(torch.arange(10), 3):
        acc.update(scores[rows], mask[rows])
    top = acc.result()
    masked = torch.where(mask, scores, torch.full_like(scores, -float("inf"))).flatten()
    expected = torch.topk(masked, 5)
    assert torch.allclose(top.values.float(), expected.values)
    assert torch.equal(top.row * 7 + top.position, expected.indices)


def test_token_counts_count_repeats():
    tokens = torch.tensor([[1, 1, 1, 3], [1, 2, 2, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    counts = neurons.token_counts(tokens, 5, mask)
    assert counts.tolist() == [0, 4, 2, 1, 0]


def test_fit_probe_with_groups_keeps_documents_apart():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 25)
    y = (groups % 2).astype(int)
    X = y[:, None] + 0.3 * rng.normal(size=(len(y), 3))
    result = neurons.fit_probe(X, y, kind="classification", groups=groups, seed=0, l1_ratio=1.0,
                               solver="liblinear", C=1.0)
    assert result.score > 0.95 and result.f1 > 0.95 and result.auroc > 0.99
    # split is by group: re-derive it and check disjointness
    from sklearn.model_selection import GroupShuffleSplit

    train, test = next(GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=0).split(X, y, groups))
    assert not set(groups[train]) & set(groups[test])
    assert len(result.y_test) == len(test)


# ---- on a tiny model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint("gpt_neox"), device="cpu")
    texts = ["Das ist ein kleiner Test mit vielen deutschen", "All cats are red, not blue. Kittens are",
             "Das ist ein Test mit vielen kleinen Wörtern", 'Tom said, "Let us go to the park." Mia']
    tokens = model.to_tokens(texts)[:, :10]
    return model, tokens


def test_scan_neurons_matches_cache(tiny):
    model, tokens = tiny
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, :2] = False
    labels = torch.tensor([1, 0, 1, 0])
    batches = [(tokens[:2], mask[:2], labels[:2]), (tokens[2:], mask[2:], labels[2:])]
    result = neurons.scan_neurons(model, batches, layers=[0, 1], bins=8192)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    token_labels = labels[:, None].expand_as(mask)[mask]
    for row, layer in enumerate([0, 1]):
        acts = cache[hook_name("neuron", layer)][mask]
        assert torch.allclose(result.mean_pos[row], acts[token_labels == 1].mean(0), atol=1e-5)
        for neuron in (0, 5, 17):
            expected = roc_auc_score(token_labels.numpy(), acts[:, neuron].numpy())
            assert float(result.auroc[row, neuron]) == pytest.approx(expected, abs=0.02)


def test_identity_pin_changes_loss_by_zero_and_real_pin_writes_value(tiny):
    from helpers.techniques.ablation import neuron_value_hooks
    from helpers.techniques.losses import token_losses

    model, tokens = tiny
    clean = token_losses(model, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    post = cache["blocks.0.mlp.hook_post"]

    def identity(act, hook=None):
        return act.clone()

    assert torch.equal(token_losses(model, tokens, [("blocks.0.mlp.hook_post", identity)]), clean)
    # pinning a neuron to the value it already has everywhere (a constant input row) changes nothing
    constant = torch.full_like(tokens, int(tokens[0, 0]))
    base = token_losses(model, constant)
    value = float(model.run_with_cache(constant)[1]["blocks.0.mlp.hook_post"][0, 0, 3])
    pinned = token_losses(model, constant, neuron_value_hooks({(0, 3): value}, from_position=0))
    assert torch.allclose(pinned, base, atol=1e-6)
    hooks = neuron_value_hooks({(0, 3): 1.5, (0, 7): -0.1, (1, 2): 0.25}, from_position=1)
    with model.hooks(fwd_hooks=hooks):
        _, ablated = model.run_with_cache(tokens)
    a0 = ablated["blocks.0.mlp.hook_post"]
    assert torch.all(a0[:, 1:, 3] == 1.5) and torch.allclose(a0[:, 1:, 7], torch.tensor(-0.1))
    assert torch.equal(a0[:, 0], post[:, 0])
    assert torch.all(ablated["blocks.1.mlp.hook_post"][:, 1:, 2] == 0.25)


def test_direct_patching_with_itself_changes_nothing_and_full_patch_matches(tiny):
    from helpers.techniques.ablation import neuron_value_hooks
    from helpers.techniques.dla import direct_patch_losses

    model, tokens = tiny
    patched, components, clean, hooked = direct_patch_losses(model, tokens, [])
    assert components[0] == Component.embed() and components[-1] == Component.mlp(model.cfg.n_layers - 1)
    assert torch.allclose(patched, clean.expand_as(patched), atol=1e-5)
    assert torch.allclose(hooked, clean, atol=1e-6)
    # an intervention in the last MLP has only a direct effect: patching that MLP reproduces the hooked run
    last = model.cfg.n_layers - 1
    patched, components, clean, hooked = direct_patch_losses(model, tokens, neuron_value_hooks({(last, 4): 3.0}),
                                                             components=[Component.mlp(last), "MLP0"])
    assert components == [Component.mlp(last), Component.mlp(0)]
    assert torch.allclose(patched[0], hooked, atol=1e-4)
    assert torch.allclose(patched[1], clean, atol=1e-5)
    assert not torch.allclose(hooked, clean, atol=1e-4)


def test_next_token_dla_sums_to_correct_logit(tiny):
    from helpers.techniques.dla import next_token_dla

    model, tokens = tiny
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        values, components = next_token_dla(model, cache, tokens)
    assert components[-1] == Component.unembed_bias() and values.shape == (len(components), *tokens[:, 1:].shape)
    correct = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(values.sum(0), correct, atol=1e-4)


def test_neuron_unembed_effect_is_w_out_times_w_u(tiny):
    model, _ = tiny
    effect = neurons.neuron_unembed_effect(model, 1, 9, active=2.0, inactive=0.5)
    assert effect.shape == (model.cfg.d_vocab,)
    assert torch.allclose(effect, 1.5 * model.W_out[1, 9] @ model.W_U, atol=1e-6)


def test_activation_difference_stats_zero_for_same_hooks_and_exact_for_a_pin(tiny):
    from helpers.techniques.ablation import neuron_value_hooks

    model, tokens = tiny
    mask = torch.ones_like(tokens, dtype=torch.bool)
    same = neurons.activation_difference_stats(model, [(tokens, mask)], [1], [], [])
    assert torch.all(same[1].mean == 0) and torch.all(same[1].std == 0)
    hooks = neuron_value_hooks({(1, 3): 5.0})
    diff = neurons.activation_difference_stats(model, [(tokens, mask)], [1], hooks, [])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    expected = (5.0 - cache["blocks.1.mlp.hook_post"][..., 3]).mean()
    assert float(diff[1].mean[3]) == pytest.approx(float(expected), abs=1e-5)
    assert float(diff[1].mean[4]) == 0.0


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2", "llama", "gpt_neo"])
def test_activations_under_each_variant_equal_separate_runs(architecture, tiny_checkpoint):
    """The shared-prefix replay gives each variant's activations exactly as its own run: the clean run, a pin in
    layer 0 read in layer 1, a pin in layer 1 read in layer 1, and a hook outside the blocks."""
    from helpers.techniques.ablation import neuron_value_hooks
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(1))
    variants = [[], neuron_value_hooks({(0, 4): 3.0}), neuron_value_hooks({(1, 2): -1.0}),
                [("hook_embed", lambda act, hook: act * 0.5)]]
    for reading in ([1], [0, 1]):
        each = neurons.mlp_activations_each(model, tokens, reading, variants, hook="pre", neurons=[2, 5])
        for hooks, acts in zip(variants, each):
            alone = neurons.mlp_activations(model, tokens, reading, hook="pre", fwd_hooks=hooks, neurons=[2, 5])
            for layer in reading:
                torch.testing.assert_close(acts[layer], alone[layer], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(each[0][1], each[1][1])   # the layer-0 pin reaches layer 1


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2", "llama", "gpt_neo"])
def test_runs_from_a_kept_clean_run_skip_the_blocks_before_it_and_change_nothing(architecture, tiny_checkpoint):
    """With clean runs kept at block 1 (`replay.keep_clean_block_inputs`), runs of the same tokens under hooks
    in block 1 start there: block 0 is not run again, and the losses and activations equal runs from the embedding.
    A hook in block 0 runs from the embedding."""
    from helpers.techniques import replay
    from helpers.techniques.ablation import neuron_value_hooks
    from helpers.techniques.losses import token_losses, token_losses_each
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(2))
    late = [neuron_value_hooks({(1, 2): -1.0}), neuron_value_hooks({(1, 5): 2.0})]
    early = neuron_value_hooks({(0, 4): 3.0})
    expected_losses = token_losses_each(model, tokens, late)
    expected = [neurons.mlp_activations(model, tokens, [1], fwd_hooks=hooks) for hooks in [*late, early]]
    read = ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    clean = model.run_with_cache(tokens, names_filter=lambda name: name in read)[1]
    for name, act in replay.activations(model, tokens, read).items():   # nothing kept: from the embedding
        torch.testing.assert_close(act, clean[name])
    block_0_runs = []
    handle = model.blocks[0].register_forward_hook(lambda *args: block_0_runs.append(1))
    replay.keep_clean_block_inputs(model, 1)
    try:
        torch.testing.assert_close(token_losses_each(model, tokens, late), expected_losses)   # keeps the clean run
        before = len(block_0_runs)
        torch.testing.assert_close(token_losses_each(model, tokens, late), expected_losses, rtol=1e-5, atol=1e-5)
        for hooks, alone in zip(late, expected):
            torch.testing.assert_close(neurons.mlp_activations(model, tokens, [1], fwd_hooks=hooks)[1], alone[1],
                                       rtol=1e-5, atol=1e-5)
        each = neurons.mlp_activations_each(model, tokens, [1], late)
        for acts, alone in zip(each, expected):
            torch.testing.assert_close(acts[1], alone[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(token_losses(model, tokens, late[1]), expected_losses[2], rtol=1e-5, atol=1e-5)
        for name, act in replay.activations(model, tokens, read).items():
            torch.testing.assert_close(act, clean[name], rtol=1e-5, atol=1e-5)
        assert len(block_0_runs) == before
        kept = replay._KEPT[model].calls(tokens)   # one [batch, pos, d_model] input kept, no key/value cache
        assert [name for call in kept if call for name, v in call.items() if isinstance(v, torch.Tensor)
                and v.shape == (3, 8, model.cfg.d_model)] == [next(iter(kept[1]))]
        assert not any(type(v).__name__ == "DynamicCache" for call in kept if call for v in call.values())
        torch.testing.assert_close(neurons.mlp_activations(model, tokens, [1], fwd_hooks=early)[1], expected[2][1])
        assert len(block_0_runs) > before
        with pytest.raises(ValueError, match="layer"):
            replay.keep_clean_block_inputs(model, model.cfg.n_layers)
    finally:
        replay.keep_clean_block_inputs(model, None)
        handle.remove()
