"""Circuit sketching level by level: the knockout search stops at the first head that matters, DLA under a
knockout is the knocked-out run's own exact attribution, backup heads are the ones whose DLA rose, and upstream path
patching equals path patching where a path exists and is exactly zero where none can."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import ablation, dla, circuit_levels, patching
from helpers.core.components import Component, all_heads
from helpers.models.load import load_model
from tests.conftest import ARCHITECTURES

SEQ_LEN = 8


@pytest.fixture(scope="module", params=ARCHITECTURES)
def setup(request, tiny_checkpoint):
    """`(model, clean, corrupted, answers)`: four random prompts starting with BOS, the corrupted batch their rows
    permuted; answers are each clean prompt's top and bottom next token."""
    model = load_model(tiny_checkpoint(request.param), device="cpu")
    clean = torch.randint(1, model.cfg.d_vocab, (4, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    clean[:, 0] = model.tokenizer.bos_token_id
    with torch.no_grad():
        last = model(clean)[:, -1]
    answers = torch.stack([last.argmax(-1), last.argmin(-1)], dim=1)
    return model, clean, clean[[1, 0, 3, 2]], answers


def test_knockout_search_stops_at_the_first_prefix_with_a_live_head(setup):
    model, tokens, _, _ = setup
    live = (1, 1)
    dead = [(l, h) for l, h in ((0, 0), (1, 0), (0, 1)) if (l, h) != live]
    silenced = [c for c in all_heads(model.cfg.n_layers, model.cfg.n_heads) if (c.layer, c.index) != live]
    with torch.no_grad(), model.hooks(fwd_hooks=ablation.ablation_hooks(silenced, "zero")):  # the planted model
        intact = model(tokens)[:, -1]
        without_live = ablation.run_ablated(model, tokens, [Component.head(*live, -1)])[:, -1]
        scale = (without_live - intact).norm()
        metric = lambda logits: 1 - (logits[:, -1] - intact).norm() / scale  # noqa: E731  1 intact, 0 live gone
        ranked = [dead[0], dead[1], live, dead[2]]
        found, value = circuit_levels.smallest_knockout_set(model, tokens, ranked, metric, target=0.5)
        nothing, intact_value = circuit_levels.smallest_knockout_set(model, tokens, dead, metric, target=0.5)
    assert scale > 0
    assert found == [Component.head(l, h, -1) for l, h in ranked[:3]]
    assert value == pytest.approx(0.0, abs=1e-5)
    assert nothing == [] and intact_value == pytest.approx(1.0, abs=1e-5)


def test_dla_under_knockout_is_the_knocked_out_runs_exact_attribution(setup):
    model, tokens, _, answers = setup
    knocked = [Component.head(1, 0, -1), Component.head(0, 1, -1)]
    with torch.no_grad():
        logits, clean_cache = model.run_with_cache(tokens)
        result = circuit_levels.dla_under_knockout(model, tokens, answers, knocked, "zero")
        ablated_logits = ablation.run_ablated(model, tokens, knocked)
        intact = circuit_levels.dla_under_knockout(model, tokens, answers, [], "mean", clean_cache=clean_cache)
        mean = circuit_levels.dla_under_knockout(model, tokens, answers, knocked, "mean")
    torch.testing.assert_close(result.original, dla.head_attribution(model, clean_cache, answers))
    torch.testing.assert_close(result.logits, ablated_logits)
    assert result.ablated[1, 0] == 0 and result.ablated[0, 1] == 0  # a zeroed head writes nothing
    full = dla.full_attribution(model, result.cache, answers)
    assert full.values.sum().item() == pytest.approx(dla.logit_diff(ablated_logits, answers).item(), abs=1e-4)
    change = result.change
    assert change[1, 0] == 0 and change[0, 1] == 0
    others = torch.ones_like(change, dtype=torch.bool)
    others[1, 0] = others[0, 1] = False
    torch.testing.assert_close(change[others], (result.ablated - result.original)[others])
    assert torch.count_nonzero(change) > 0  # knocking out a layer-0 head moves the later heads' DLA
    assert torch.equal(intact.ablated, intact.original) and intact.total_rise == 0
    assert not torch.allclose(mean.ablated[1, 0], result.ablated[1, 0])  # the mean is not zero


def test_backup_heads_are_those_whose_dla_rose_past_the_threshold():
    original = torch.zeros(2, 3)
    ablated = torch.tensor([[0.01, 0.2, -0.3], [0.5, 0.0, -1.0]])
    planted = circuit_levels.KnockoutDLA(original, ablated, [Component.head(1, 2, -1)], logits=None, cache=None)
    assert planted.backup(0.1) == [(1, 0), (0, 1)]
    assert planted.backup(0.1, k=1) == [(1, 0)]
    assert planted.backup(0.6) == []
    assert planted.total_rise == pytest.approx(0.71)
    assert planted.change[1, 2] == 0  # the knocked-out head's own drop is not compensation


def test_attention_from_reads_the_mean_pattern_row(setup):
    model, tokens, _, _ = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    heads = [(0, 1), (1, 2)]
    rows = circuit_levels.attention_from(cache, heads, query_pos=3)
    assert rows.shape == (2, SEQ_LEN)
    torch.testing.assert_close(rows[1], cache["blocks.1.attn.hook_pattern"][:, 2, 3].mean(0))
    torch.testing.assert_close(rows.sum(-1), torch.ones(2))
    assert torch.all(rows[:, 4:] == 0)  # causal: nothing after the query
    assert circuit_levels.attention_from(cache, [], 3).shape == (0, SEQ_LEN)


@pytest.mark.parametrize("site", ["k", "v"])
def test_upstream_path_patch_equals_path_patching_and_is_zero_without_a_path(setup, site):
    model, clean, corrupted, answers = setup
    with torch.no_grad():
        clean_ld = dla.logit_diff(model(clean), answers).item()
        metric = patching.normalised_logit_diff(answers, clean_ld, 0.0)
        receivers = [Component.head(1, head) for head in range(model.cfg.n_heads)]
        change = circuit_levels.upstream_path_patch(model, clean, corrupted, metric, receivers, site)
        senders = [[c] for c in all_heads(1, model.cfg.n_heads)]
        expected = patching.path_patch(model, clean, corrupted, metric, receivers, site, senders) - 1.0
        layer0 = circuit_levels.upstream_path_patch(model, clean, corrupted, metric, [Component.head(0, 2)], site)
        same = circuit_levels.upstream_path_patch(model, clean, clean, metric, receivers, site)
    assert change.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(change[0], expected, atol=1e-5, rtol=1e-4)
    if site == "v":  # at random init attention is near uniform, so a key path moves the metric by ~1e-6 only
        assert change[0].abs().max() > 1e-4  # layer-0 heads do reach layer 1
    assert torch.all(change[1:] == 0)
    assert torch.all(layer0 == 0)  # a layer-0 receiver reads only the embedding
    assert same.abs().max() < 1e-6  # clean into clean moves nothing


def test_screened_senders_are_the_largest_estimates_and_only_they_are_path_patched(setup):
    model, clean, corrupted, answers = setup
    with torch.no_grad():
        clean_ld = dla.logit_diff(model(clean), answers).item()
    metric = patching.normalised_logit_diff(answers, clean_ld, 0.0)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    chosen = circuit_levels.screened_senders(model, clean, corrupted, metric, n_layers - 1, 3)
    estimate = patching.attribution_patch_heads(model, corrupted, clean, metric, "z")[:n_layers - 1].abs()
    assert len(chosen) == 3 and all(layer < n_layers - 1 for layer, _ in chosen)
    left_out = [estimate[l, h] for l in range(n_layers - 1) for h in range(n_heads) if (l, h) not in chosen]
    assert min(estimate[l, h] for l, h in chosen) >= max(left_out)
    receivers = [Component.head(n_layers - 1, head) for head in range(n_heads)]
    with torch.no_grad():
        every = circuit_levels.upstream_path_patch(model, clean, corrupted, metric, receivers, "v")
        screened = circuit_levels.upstream_path_patch(model, clean, corrupted, metric, receivers, "v", chosen)
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    mask[tuple(torch.tensor(chosen).T)] = True
    torch.testing.assert_close(screened[mask], every[mask], atol=1e-5, rtol=1e-4)
    assert torch.all(screened[~mask] == 0)
