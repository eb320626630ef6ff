"""Heuristic scheme, classifier and knockouts (helpers.studies.heuristics) on synthetic maps and a tiny Llama; faithfulness
bounds; the paper's indirect-effect formula. No trained model needed."""
from __future__ import annotations

import pytest
import torch

from helpers.studies import heuristics as H
from helpers.tasks import arithmetic as task

torch.manual_seed(0)


@pytest.fixture(scope="module")
def addition():
    prompts = task.all_prompts("+", max_op=100)
    scheme = H.build_scheme(prompts.pairs, prompts.results, "+")
    return prompts, scheme


def _planted(prompts, seed=0):
    x, y, r = prompts.x.float(), prompts.y.float(), prompts.results
    g = torch.Generator().manual_seed(seed)

    def noise():
        return 0.1 * torch.randn(len(prompts), generator=g)

    return {
        "op1_range_10_40": ((x >= 10) & (x < 40)).float() + noise(),
        "op2_3mod7": (y.long() % 7 == 3).float() + noise(),
        "result_pattern_.2.": ((r // 10) % 10 == 2).float() + noise(),
        "same_operand": (x == y).float() + noise(),
    }


def test_planted_heuristics_are_found_and_unrelated_ones_score_near_zero(addition):
    prompts, scheme = addition
    planted = _planted(prompts)
    maps = torch.stack(list(planted.values()))
    scores = H.classify(maps, maps, scheme, [(0, i) for i in range(len(maps))])
    for i, name in enumerate(planted):
        best, score = scores.best()[i]
        assert best == name and score >= 0.6, (name, best, score)
        others = scores.neuron_scores(i)
        unrelated = [n for n in ("op2_3mod7", "op1_range_10_40", "same_operand", "result_pattern_.2.", "op1_2mod5",
                                 "result_range_200_230", "both_operands_1mod3") if n != name and n in others]
        assert max(others[n] for n in unrelated) < 0.15, {n: others[n] for n in unrelated}
    assert scores.classified_fraction(0.6) == 1.0
    assert set(scores.classes(0.6)) >= set(planted)


def test_noise_maps_are_not_classified(addition):
    prompts, scheme = addition
    maps = torch.randn(8, len(prompts), generator=torch.Generator().manual_seed(1))
    scores = H.classify(maps, maps, scheme, [(1, i) for i in range(8)])
    assert scores.classified_fraction(0.6) == 0.0
    assert float(scores.scores.max()) < 0.3
    assert abs(float(scores.scores.mean())) < 0.02


def test_bottom_of_k_map_counts_but_not_of_kv_map(addition):
    prompts, scheme = addition
    low = -((prompts.x >= 60) & (prompts.x < 70)).float()
    scores = H.classify(low[None], low[None], scheme, [(0, 0)])
    j = scheme.index["op1_range_60_70"]
    assert float(scores.scores[0, j]) == pytest.approx(1.0)
    assert bool(scores.from_bottom[0, j])
    result_low = -((prompts.results >= 100) & (prompts.results < 110)).float()
    scores = H.classify(result_low[None], result_low[None], scheme, [(0, 0)])
    assert float(scores.scores[0, scheme.index["result_range_100_110"]]) < 0.1  # KV maps: promotion only


def test_direct_heuristics_use_kv_maps_and_indirect_use_k_maps(addition):
    prompts, scheme = addition
    k_map = ((prompts.results >= 150) & (prompts.results < 180)).float()[None]
    kv_map = ((prompts.x >= 10) & (prompts.x < 40)).float()[None]
    scores = H.classify(k_map, kv_map, scheme, [(0, 0)])
    s = scores.neuron_scores(0)
    assert s["result_range_150_180"] < 0.2 and s["op1_range_10_40"] < 0.2
    scores = H.classify(kv_map, k_map, scheme, [(0, 0)])
    s = scores.neuron_scores(0)
    assert s["result_range_150_180"] == pytest.approx(1.0) and s["op1_range_10_40"] == pytest.approx(1.0)


def test_ties_are_shared_out_evenly(addition):
    prompts, scheme = addition
    constant = torch.zeros(1, len(prompts))
    scores = H.classify(constant, constant, scheme, [(0, 0)])
    assert float(scores.scores.abs().max()) < 1e-3
    exact = (prompts.x == prompts.y).float()[None]
    scores = H.classify(exact, exact, scheme, [(0, 0)])
    assert scores.neuron_scores(0)["same_operand"] == pytest.approx(1.0)


def test_names_round_trip_and_association_agrees_with_the_classifier(addition):
    prompts, scheme = addition
    assert len(scheme.names) == len(set(scheme.names)) > 500
    for i, name in enumerate(scheme.names):
        assert H.parse(name).name == name
        mask = H.relevant_mask(name, prompts.pairs, prompts.results)
        assert int(mask.sum()) == int(scheme.sizes[i]), name
    assert H.is_associated("op1_range_10_40", 39, 0, 39) and not H.is_associated("op1_range_10_40", 40, 0, 40)
    assert H.is_associated("result_pattern_.2.", 100, 25, 125)
    assert H.is_associated("result_value_000", 3, 7, 0)  # 3/7 = 0 under integer division
    assert H.is_associated("result_multi_value_2=[0, 1]", 9, 5, 1)
    assert H.is_associated("both_operands_range_10_20", 12, 19, 31)
    assert not H.is_associated("both_operands_range_10_20", 12, 20, 32)


def test_multi_value_heuristic_for_division():
    prompts = task.all_prompts("/", max_op=80)
    scheme = H.build_scheme(prompts.pairs, prompts.results, "/")
    kv = torch.isin(prompts.results, torch.tensor([3, 4])).float()[None]
    scores = H.classify(torch.zeros_like(kv), kv, scheme, [(0, 0)])
    assert scores.neuron_scores(0)["result_multi_value_2=[3, 4]"] == pytest.approx(1.0)
    # the seed deleted ÷'s trivial classes (result 0/1 covers most prompts) because every neuron matched them; with
    # chance correction an unrelated map scores ~0 on them and a map that tracks them exactly still scores 1
    trivial = [n for n in scheme.names if n.startswith("result_range_0_")]
    assert trivial
    noise = torch.rand(1, len(prompts), generator=torch.Generator().manual_seed(0))
    scores = H.classify(noise, noise, scheme, [(0, 0)])
    assert max(scores.neuron_scores(0)[n] for n in trivial) < 0.1


def test_pattern_width_is_a_parameter():
    prompts = task.all_prompts("+", max_op=50)
    scheme = H.build_scheme(prompts.pairs, prompts.results, "+", pattern_width=2)
    assert "op1_pattern_.7" in scheme.names and not any(n.startswith("op1_pattern_..") for n in scheme.names)
    assert H.pattern_masks(3) == [(1,), (2,), (0, 2), (1, 2)]


def test_chance_correction():
    hits, sizes = torch.tensor([[10.0, 5.0, 2.5]]), torch.tensor([10, 10, 10])
    out = H.chance_corrected(hits, sizes, 40)
    assert out[0, 0] == pytest.approx(1.0) and out[0, 2] == pytest.approx(0.0)


# ---- model-based helpers on a tiny random Llama ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_arithmetic):
    return tiny_arithmetic


def test_maps_and_neuron_hooks(tiny):
    from helpers.techniques.ablation import neuron_mask_hooks

    model, tokenizer = tiny
    prompts = task.all_prompts("+", max_op=12)
    tokens = task.prompt_tokens(tokenizer, prompts)
    answers = task.number_token_ids(tokenizer)[prompts.results]
    neurons = [(0, 3), (1, 5), (1, 7)]
    k = H.neuron_activations(model, tokens, neurons, batch_size=50)
    _, cache = model.run_with_cache(tokens)
    assert torch.allclose(k[1], cache["blocks.1.mlp.hook_post"][:, -1, 5], atol=1e-5)
    kv = H.kv_maps(model, k, neurons, answers)
    logits = model.W_out[1, 5] @ model.W_U
    assert torch.allclose(kv[1], k[1] * logits[answers], atol=1e-5)
    masks = {1: torch.zeros(len(tokens), model.cfg.d_mlp, dtype=torch.bool)}
    masks[1][:, 5] = True
    hooks = neuron_mask_hooks(masks)
    with model.hooks(fwd_hooks=hooks):
        _, ablated = model.run_with_cache(tokens)
    assert float(ablated["blocks.1.mlp.hook_post"][:, :, 5].abs().max()) == 0.0
    image = H.grid_map(k[0], prompts.pairs)
    assert image.shape == (12, 12) and torch.isfinite(image).all()


def _scores_for(neurons, names_scores):
    names = sorted({n for ns in names_scores for n, _ in ns})
    scores = torch.zeros(len(neurons), len(names))
    for i, ns in enumerate(names_scores):
        for n, s in ns:
            scores[i, names.index(n)] = s
    return H.HeuristicScores(neurons, names, scores, torch.zeros_like(scores, dtype=torch.bool),
                             [{} for _ in neurons])


def test_knockouts_are_well_formed(tiny):
    model, tokenizer = tiny
    prompts = task.all_prompts("+", max_op=20)
    tokens = task.prompt_tokens(tokenizer, prompts)
    answers = task.number_token_ids(tokenizer)[prompts.results]
    neurons = [(1, i) for i in range(6)] + [(0, 1)]
    scores = _scores_for(neurons, [[("op1_range_0_10", 0.9)]] * 3 + [[("op2_0mod2", 0.7)]] * 3 + [[]])
    results = H.heuristic_knockout(model, scores, 0.6, tokens, answers, prompts.pairs, prompts.results,
                                   min_neurons=2, n_prompts=50, seed=0)
    assert {r.heuristic for r in results} == {"op1_range_0_10", "op2_0mod2"}
    for r in results:
        assert r.n_related == 50 and r.n_unrelated == 50 and len(r.neurons) == 3
        assert 0 <= r.ablated_related <= 1 and 0 <= r.baseline_unrelated <= 1
    top = neurons + [(1, i) for i in range(6, 20)]
    guided = H.prompt_guided_knockout(model, scores, 0.6, tokens[:40], answers[:40], prompts.pairs[:40],
                                      prompts.results[:40], top, limits=[0, 1, 3], seed=0)
    assert guided.ablated.shape == (3,) and float(guided.mean_ablated[0]) == 0.0
    assert float(guided.ablated[0]) == pytest.approx(guided.baseline)
    assert torch.equal(guided.mean_control, guided.mean_ablated)  # the control ablates as many neurons
    assert float(guided.mean_ablated[2]) <= 6
    # the control draws from unassociated top neurons first and tops up from the rest of the layer when they run out
    exhausted = H.prompt_guided_knockout(model, scores, 0.6, tokens[:40], answers[:40], prompts.pairs[:40],
                                         prompts.results[:40], neurons, limits=[6], seed=0)
    assert float(exhausted.mean_ablated[0]) > 0
    assert torch.equal(exhausted.mean_control, exhausted.mean_ablated)
    profile = H.prompt_profile(model, scores, 0.6, tokens[:40], answers[:40], prompts.pairs[:40],
                               prompts.results[:40])
    assert profile.n_associated.shape == (40,)
    assert int(profile.n_associated[0]) == 6  # 0+0: op1 in [0, 10) and op2 even -> all six classified neurons


@pytest.mark.parametrize("from_position", [0, 2])
def test_a_knockout_with_every_prompt_sampled_equals_ablating_by_hand(tiny, from_position):
    """With `n_prompts` above every prompt count, related / unrelated are all the prompts the heuristic does / does
    not concern: the accuracies must equal greedy answers of the model run with the neurons zeroed by a plain hook
    (from `from_position` on)."""
    model, tokenizer = tiny
    prompts = task.all_prompts("+", max_op=12)
    tokens = task.prompt_tokens(tokenizer, prompts)
    answers = model(tokens)[:, -1].argmax(-1)          # the random model's own answers: all correct before ablation
    answers[::3] = (answers[::3] + 1) % model.cfg.d_vocab                     # and a third wrong
    neurons = [(1, n) for n in range(0, 40, 2)] + [(0, 2)]
    scores = _scores_for(neurons, [[("op1_range_0_5", 0.9)]] * len(neurons))
    (result,) = H.heuristic_knockout(model, scores, 0.6, tokens, answers, prompts.pairs, prompts.results,
                                     min_neurons=3, n_prompts=10_000, from_position=from_position)
    assert len(result.neurons) == len(neurons)

    def zero(layer):
        def hook(act, hook=None):
            act[:, from_position:, [n for l, n in neurons if l == layer]] = 0
            return act
        return hook

    clean = model(tokens)[:, -1].argmax(-1) == answers
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.mlp.hook_post", zero(l)) for l in (0, 1)]
                                   )[:, -1].argmax(-1) == answers
    related = prompts.pairs[:, 0] < 5
    assert (result.n_related, result.n_unrelated) == (int(related.sum()), int((~related).sum()))
    assert result.baseline_related == pytest.approx(float(clean[related].float().mean()))
    assert result.baseline_unrelated == pytest.approx(float(clean[~related].float().mean()))
    assert result.ablated_related == pytest.approx(float(ablated[related].float().mean()))
    assert result.ablated_unrelated == pytest.approx(float(ablated[~related].float().mean()))
    assert result.ablated_related != result.baseline_related or result.ablated_unrelated != result.baseline_unrelated


def test_faithfulness_is_one_for_the_full_model_and_zero_for_the_empty_circuit(tiny):
    from helpers.techniques.ablation import circuit_universe, faithfulness, normalized_logit

    model, tokenizer = tiny
    prompts = task.all_prompts("+", max_op=10)
    tokens = task.prompt_tokens(tokenizer, prompts)
    answers = task.number_token_ids(tokenizer)[prompts.results]
    reference = task.prompt_tokens(tokenizer, task.grid_prompts("-", 0, 10))
    metric = normalized_logit(answers)
    universe = circuit_universe(model)
    full = faithfulness(model, tokens, universe, metric, reference_tokens=reference)
    empty = faithfulness(model, tokens, [], metric, reference_tokens=reference)
    assert full["faithfulness"] == pytest.approx(1.0)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-6)


def test_indirect_effect_on_hand_made_distributions():
    from helpers.studies.arithmetic_circuit import indirect_effect, indirect_effect_metric

    pre = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    r, r_prime = torch.tensor([0, 0]), torch.tensor([1, 2])
    assert torch.allclose(indirect_effect(pre, pre, r, r_prime), torch.zeros(2))
    post = torch.tensor([[0.35, 0.6, 0.05], [0.25, 0.25, 0.5]])
    # prompt 0: 0.5 * ((0.6 - 0.2) / 0.2 + (0.7 - 0.35) / 0.35) = 0.5 * (2 + 1) = 1.5
    # prompt 1: 0.5 * ((0.5 - 0.25) / 0.25 + (0.5 - 0.25) / 0.25) = 0.5 * (1 + 1) = 1.0
    assert torch.allclose(indirect_effect(pre, post, r, r_prime), torch.tensor([1.5, 1.0]))
    metric = indirect_effect_metric(pre.log(), r, r_prime)
    assert float(metric(post.log())) == pytest.approx(1.25)
    assert float(metric(pre.log()[:, None, :].expand(2, 3, 3))) == pytest.approx(0.0, abs=1e-6)


def test_log_scale_indirect_effect_metric_averages_signed_logs():
    import math

    from helpers.studies.arithmetic_circuit import indirect_effect_metric, signed_log

    assert torch.allclose(signed_log(torch.tensor([-3.0, 0.0, 1.5])),
                          torch.tensor([-math.log(4.0), 0.0, math.log(2.5)]))
    pre = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    post = torch.tensor([[0.35, 0.6, 0.05], [0.25, 0.25, 0.5]])       # IE 1.5 and 1.0 (see above)
    metric = indirect_effect_metric(pre.log(), torch.tensor([0, 0]), torch.tensor([1, 2]), log_scale=True)
    assert float(metric(post.log())) == pytest.approx((math.log(2.5) + math.log(2.0)) / 2)


def test_paper_statistic_is_uncorrected_precision(addition):
    prompts, scheme = addition
    planted = _planted(prompts)["op1_range_10_40"][None]
    ours = H.classify(planted, planted, scheme, [(0, 0)])
    paper = H.classify(planted, planted, scheme, [(0, 0)], chance_correct=False)
    j = scheme.index["op1_range_10_40"]
    assert float(paper.scores[0, j]) == pytest.approx(1.0) and float(ours.scores[0, j]) == pytest.approx(1.0)
    # a heuristic concerning most pairs scores its coverage on an unrelated map under the paper's statistic, ~0 on ours
    noise = torch.rand(1, len(prompts), generator=torch.Generator().manual_seed(2))
    broad = max(range(len(scheme.names)), key=lambda i: float(scheme.sizes[i]))
    coverage = float(scheme.sizes[broad]) / len(prompts)
    assert coverage > 0.6
    paper = H.classify(noise, noise, scheme, [(0, 0)], chance_correct=False)
    ours = H.classify(noise, noise, scheme, [(0, 0)])
    assert float(paper.scores[0, broad]) == pytest.approx(coverage, abs=0.05)
    assert abs(float(ours.scores[0, broad])) < 0.1
    assert paper.classified_fraction(0.6) == 1.0 and ours.classified_fraction(0.6) == 0.0
    assert torch.allclose(H.precision_at_size(torch.tensor([[5.0]]), torch.tensor([10]), 40), torch.tensor([[0.5]]))
    # converting our scores gives the paper's without rescoring (multi-value heuristics of division included)
    maps = torch.cat([planted, noise, -planted])
    converted = H.uncorrected(H.classify(maps, maps, scheme, [(0, i) for i in range(3)]), scheme)
    direct = H.classify(maps, maps, scheme, [(0, i) for i in range(3)], chance_correct=False)
    assert torch.allclose(converted.scores, direct.scores, atol=1e-5)
    division = task.all_prompts("/", max_op=60)
    div_scheme = H.build_scheme(division.pairs, division.results, "/")
    kv = torch.isin(division.results, torch.tensor([2, 5])).float()[None]
    ours = H.classify(kv, kv, div_scheme, [(0, 0)])
    theirs = H.classify(kv, kv, div_scheme, [(0, 0)], chance_correct=False)
    assert ours.extra and H.uncorrected(ours, div_scheme).extra[0] == pytest.approx(theirs.extra[0], abs=1e-5)


def test_value_logits_and_their_agreement_with_the_heuristic(tiny):
    model, tokenizer = tiny
    numbers = task.number_token_ids(tokenizer, 99)
    logits = H.value_logits(model, [(1, 5), (0, 2)], numbers)
    assert logits.shape == (2, 100)
    assert torch.allclose(logits[0], (model.W_out[1, 5] @ model.W_U)[numbers], atol=1e-5)
    assert H.value_logits(model, [(1, 5)]).shape == (1, model.cfg.d_vocab)
    # planted lens: neuron 0 promotes exactly 40..49 (its heuristic result_range_40_50), neuron 1 promotes 0..9
    lens = torch.zeros(3, 100)
    lens[0, 40:50] = 1.0
    lens[1, :10] = 1.0
    scores = _scores_for([(1, 0), (1, 1), (1, 2)], [[("result_range_40_50", 0.9)], [("result_range_40_50", 0.8)],
                                                     [("op1_range_0_10", 0.9)]])
    agreement = H.value_lens_agreement(scores, 0.6, lens, top=10)
    assert agreement == {(1, 0): 1.0, (1, 1): 0.0}  # the indirect-only neuron (1, 2) has no direct heuristic


def test_a_parity_detector_on_one_digit_numbers_is_classified_as_parity():
    """On the numbers 0-9 (a digit-by-digit tokenizer's operands) a neuron firing on odd numbers matches a mod-2
    heuristic, and no heuristic concerning fewer than half of the numbers is scored (each would match by chance)."""
    values = torch.arange(10)
    response = (values % 2 == 1).float()[None] + 0.01 * torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    scheme = H.value_scheme(values)
    scores = H.classify(response, torch.zeros_like(response), scheme, [(0, 7)])
    assert scores.best()[0] == ("op1_1mod2", pytest.approx(1.0))
    assert all(int(H.relevant_mask(name, torch.stack([values, 0 * values], 1), values).sum()) >= 5
               for name in scores.names)
