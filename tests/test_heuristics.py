"""Heuristic maps and knockouts (helpers.studies.heuristics) on a tiny Llama; faithfulness bounds; the paper's
indirect-effect formula. No trained model needed."""
from __future__ import annotations

import pytest
import torch

from helpers.studies import heuristic_scheme as HS
from helpers.studies import heuristics as H
from helpers.tasks import arithmetic as task

torch.manual_seed(0)


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
    image = HS.grid_map(k[0], prompts.pairs)
    assert image.shape == (12, 12) and torch.isfinite(image).all()


def _scores_for(neurons, names_scores):
    names = sorted({n for ns in names_scores for n, _ in ns})
    scores = torch.zeros(len(neurons), len(names))
    for i, ns in enumerate(names_scores):
        for n, s in ns:
            scores[i, names.index(n)] = s
    return HS.HeuristicScores(neurons, names, scores, torch.zeros_like(scores, dtype=torch.bool),
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
    agreement = HS.value_lens_agreement(scores, 0.6, lens, top=10)
    assert agreement == {(1, 0): 1.0, (1, 1): 0.0}  # the indirect-only neuron (1, 2) has no direct heuristic
