"""Ablation hooks: zero/mean/resample knockouts do what they say; circuits and faithfulness are normalised."""
from __future__ import annotations

import pytest
import torch

from helpers import ablation
from helpers.attribution import logit_diff
from helpers.components import Component


@pytest.fixture(scope="module")
def setup(syllogism_batch):
    return syllogism_batch


def _cache_with(model, tokens, hooks):
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens)
    return cache


def test_zero_ablation_of_head_at_position(setup):
    model, tokens, _ = setup
    cache = _cache_with(model, tokens, ablation.ablation_hooks([Component.head(1, 2, position=-1)], "zero"))
    _, clean = model.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]
    assert torch.all(z[:, -1, 2] == 0)
    assert torch.equal(z[:, :-1], clean["blocks.1.attn.hook_z"][:, :-1])
    assert torch.equal(z[:, -1, :2], clean["blocks.1.attn.hook_z"][:, -1, :2])


def test_mean_ablation_writes_reference_mean(setup):
    model, tokens, _ = setup
    components = [Component.mlp(0), Component.neuron(1, 7, position=3)]
    reference = ablation.reference_activations(model, tokens, components, "mean")
    _, clean = model.run_with_cache(tokens)
    cache = _cache_with(model, tokens, ablation.ablation_hooks(components, "mean", reference))
    expected = clean["blocks.0.hook_mlp_out"].mean(0, keepdim=True).expand_as(clean["blocks.0.hook_mlp_out"])
    assert torch.allclose(cache["blocks.0.hook_mlp_out"], expected, atol=1e-6)
    post = cache["blocks.1.mlp.hook_post"]
    assert torch.allclose(post[:, 3, 7], post[0, 3, 7].expand(len(tokens)))


def test_resample_is_seeded_permutation(setup):
    model, tokens, _ = setup
    components = [Component.head(0, 1)]
    a = ablation.reference_activations(model, tokens, components, "resample", seed=3)
    b = ablation.reference_activations(model, tokens, components, "resample", seed=3)
    assert torch.equal(a["blocks.0.attn.hook_z"], b["blocks.0.attn.hook_z"])
    _, clean = model.run_with_cache(tokens)
    rows = {tuple(r.flatten().tolist()) for r in clean["blocks.0.attn.hook_z"]}
    assert {tuple(r.flatten().tolist()) for r in a["blocks.0.attn.hook_z"]} == rows


def test_faithfulness_full_and_empty(setup):
    model, tokens, answers = setup
    metric = lambda logits: logit_diff(logits, answers)  # noqa: E731
    universe = ablation.circuit_universe(model)
    full = ablation.faithfulness(model, tokens, universe, metric)
    assert abs(full["faithfulness"] - 1) < 1e-5
    empty = ablation.faithfulness(model, tokens, [], metric)
    assert abs(empty["faithfulness"]) < 1e-5
    partial = ablation.faithfulness(model, tokens, [Component.head(1, 0, position=-1)], metric)
    assert partial["full"] == pytest.approx(full["full"])


def test_complement_respects_positions():
    universe = [Component.head(0, 0), Component.head(0, 1), Component.mlp(0)]
    out = ablation.complement([Component.head(0, 0, position=-1), Component.mlp(0)], universe, seq_len=3)
    assert set(out) == {Component.head(0, 0, 0), Component.head(0, 0, 1), Component.head(0, 1)}


def test_knockout_each_matches_single_knockouts(setup):
    model, tokens, answers = setup
    metric = lambda logits: logit_diff(logits, answers)  # noqa: E731
    comps = [Component.head(1, h) for h in range(model.cfg.n_heads)]
    each = ablation.knockout_each(model, tokens, comps, metric, method="mean")
    single = ablation.knockout(model, tokens, [comps[2]], metric, method="mean")
    assert each[2].item() == pytest.approx(single, abs=1e-6)


def test_head_value_hooks_pin_one_head_from_a_position(setup):
    model, tokens, _ = setup
    d_head = model.cfg.d_head
    value = torch.linspace(-1, 1, d_head)
    cache = _cache_with(model, tokens, ablation.head_value_hooks({(1, 2): value}, from_position=2))
    _, clean = model.run_with_cache(tokens)
    z, z_clean = cache["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"]
    assert torch.allclose(z[:, 2:, 2], value.expand_as(z[:, 2:, 2]))
    assert torch.equal(z[:, :2], z_clean[:, :2]) and torch.equal(z[:, :, :2], z_clean[:, :, :2])
    # pinning a head to the value it already has changes nothing downstream
    one_token = tokens[:, :1]
    z_one = model.run_with_cache(one_token)[1]["blocks.0.attn.hook_z"]
    same = ablation.head_value_hooks({Component.head(0, 1): z_one[0, 0, 1]}, from_position=0)
    assert torch.allclose(model.run_with_hooks(one_token, fwd_hooks=same), model(one_token), atol=1e-5)
    with pytest.raises(ValueError):
        ablation.head_value_hooks({Component.neuron(0, 1): value})


def test_losses_from_logits_equal_cross_entropy_whatever_the_chunk(monkeypatch):
    from helpers import ablation

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=generator)
    tokens = torch.randint(0, 11, (5, 7), generator=generator)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1),
                                                 reduction="none").view(5, 6)
    for chunk in (1, 77, 2 ** 24):  # one row at a time, a few rows, everything at once
        monkeypatch.setattr(ablation, "LOSS_CHUNK", chunk)
        torch.testing.assert_close(ablation.losses_from_logits(logits, tokens), expected)
