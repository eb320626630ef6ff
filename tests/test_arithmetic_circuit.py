"""The circuit-localisation steps of the arithmetic study (helpers.studies.arithmetic_circuit) on a tiny random Llama:
IE maps against hand-made patches, rankings, the circuit search, probes on planted labels, top-k curves whose end
points are known, early-MLP token responses, and the seeds derived from one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.studies import arithmetic_circuit as AC
from helpers.techniques.ablation import CircuitEvaluator, normalized_logits
from helpers.core.components import Component, all_mlps
from helpers.tasks import arithmetic as task
from tests.conftest import failed_bars


@pytest.fixture(scope="module")
def tiny(tiny_arithmetic):
    return tiny_arithmetic


@pytest.fixture(scope="module")
def prompts(tiny):
    model, tokenizer = tiny
    numbers = task.number_token_ids(tokenizer, 300)
    clean = task.all_prompts("+", max_op=12).sample(16, 0)
    other = task.all_prompts("-", max_op=12).sample(16, 1)
    return (task.prompt_tokens(tokenizer, clean), task.prompt_tokens(tokenizer, other), numbers[clean.results],
            numbers[other.results])


def test_derived_seeds_keep_the_notebooks_offsets():
    assert [AC.derived_seed(42, p, 1) for p in ("discovery split", "evaluation sample", "counterfactuals",
                                                "probe prompts", "incorrect sample", "knockout", "eap partners")] == \
        [43, 143, 243, 343, 443, 43, 543]
    with pytest.raises(ValueError, match="unknown purpose"):
        AC.derived_seed(0, "typo")


def test_ie_maps_are_zero_without_a_change_and_match_a_hand_made_patch(tiny, prompts):
    model, _ = tiny
    clean, corrupt, clean_answers, corrupt_answers = prompts
    same = AC.ie_maps(model, clean, clean, clean_answers, corrupt_answers)
    assert same.shape == (4, 2, 5) and float(same.abs().max()) < 1e-5
    maps = AC.ie_maps(model, clean, corrupt, clean_answers, corrupt_answers, log_scale=False)
    _, cache = model.run_with_cache(corrupt)
    metric = AC.indirect_effect_metric(model(clean), clean_answers, corrupt_answers)

    def patch(act, hook=None):  # noqa: ARG001 - head 2 of layer 1 at op2 (position 3) from the counterfactual run
        act = act.clone()
        act[:, 3, 2] = cache["blocks.1.attn.hook_z"][:, 3, 2]
        return act

    by_hand = float(metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_z", patch)])))
    assert float(maps[2, 1, 2]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    log_maps = AC.ie_maps(model, clean, corrupt, clean_answers, corrupt_answers)
    assert not torch.allclose(log_maps, maps)  # the two averages differ once any IE is large


def test_ie_maps_patch_the_last_four_positions_after_a_prefix(tiny, prompts):
    """With tokens before the prompt (a few-shot prefix, the same in both runs) the maps still cover op1, operator,
    op2 and `=`, counted from the end: op2 is the second-last position."""
    model, _ = tiny
    clean, corrupt, clean_answers, corrupt_answers = prompts
    prefix = torch.tensor([[7, 3, 9, 5, 8, 2]]).expand(len(clean), -1)
    clean, corrupt = torch.cat([prefix, clean], dim=1), torch.cat([prefix, corrupt], dim=1)
    maps = AC.ie_maps(model, clean, corrupt, clean_answers, corrupt_answers, log_scale=False)
    assert maps.shape == (4, 2, 5)
    _, cache = model.run_with_cache(corrupt)
    metric = AC.indirect_effect_metric(model(clean), clean_answers, corrupt_answers)
    op2 = clean.shape[1] - 2

    def patch(act, hook=None):  # noqa: ARG001
        act = act.clone()
        act[:, op2, 2] = cache["blocks.1.attn.hook_z"][:, op2, 2]
        return act

    by_hand = float(metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_z", patch)])))
    assert float(maps[2, 1, 2]) == pytest.approx(by_hand, rel=1e-4, abs=1e-6)


def test_a_screened_ie_sweep_is_exact_on_its_top_sites(tiny, prompts):
    model, _ = tiny
    full = AC.ie_maps(model, *prompts)
    screened = AC.ie_sweep(model, *prompts, exact_top=6)
    assert int(screened.exact.sum()) == 6 and screened.values.shape == full.shape
    assert torch.allclose(screened.values[screened.exact], full[screened.exact], atol=1e-5)
    assert "6 of 40 sites patched exactly" in screened.describe()
    assert float(screened.estimate.abs().max()) > 0   # the log scale's slope at IE = 0 reaches attribution patching


def test_signed_log_keeps_the_sign_and_has_slope_one_at_zero():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    y = AC.signed_log(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.sign(x.detach()) * torch.log1p(x.detach().abs()))
    assert torch.allclose(x.grad, 1 / (1 + x.detach().abs()))


def test_rankings_and_the_circuit_search():
    maps = torch.zeros(4, 2, 3)                      # two layers, two heads, MLP column last
    maps[:, 1, 0], maps[:, 0, 1], maps[:, 0, 2] = 3.0, 1.0, 9.0
    assert AC.rank_heads(AC.head_scores(maps))[:2] == [(1, 0), (0, 1)]   # the MLP column is not a head
    assert torch.allclose(AC.head_scores(maps, paper=True), torch.log1p(AC.head_scores(maps)))

    class Share:  # faithfulness = the share of heads kept (of 4)
        model = SimpleNamespace(cfg=SimpleNamespace(n_layers=2))

        def __call__(self, circuit):
            return sum(c.kind == "head" for c in circuit) / 4

    ranked = [(1, 0), (0, 1), (0, 0), (1, 1)]
    assert AC.smallest_faithful_circuit(Share(), ranked, 0.5, 4) == [(1, 0), (0, 1)]
    assert AC.smallest_faithful_circuit(Share(), ranked, 0.99, 3) == ranked[:3]   # never reached: max_heads
    assert AC.head_circuit([(1, 0)], 2) == [Component.head(1, 0)] + all_mlps(2)


def test_answer_probes_decode_a_planted_label(tmp_path):
    from tests.conftest import build_tiny_arithmetic

    # embeddings of unit scale: on the ~0.02 of an untrained init a default-C logistic probe underfits
    model, tokenizer = build_tiny_arithmetic(tmp_path / "m", embed_scale=50)
    grid = task.all_prompts("+", max_op=12)
    acc = AC.answer_probe_accuracy(model, task.prompt_tokens(tokenizer, grid), grid.x, seed=0)
    assert acc.shape == (4, 3)
    assert float(acc[0, 0]) > 0.9            # op1 is its own token at the op1 position
    assert float(acc[1, 0]) < 0.3            # the operator token says nothing about op1
    assert AC.first_answer_layer(torch.tensor([0.0, 0.1, 0.5, 0.6])) == 1
    assert AC.saturation(torch.tensor([0.0, 0.5, 0.95, 1.0]), [0, 10, 20, 40], 40) == 0.5
    assert AC.saturation(torch.tensor([-0.5, -0.4, -0.3, 0.1]), [0, 10, 20, 40], 40) == 1.0  # only at the end


def test_topk_curve_ends_at_the_circuit_and_starts_at_the_ablated_mlp(tiny, prompts):
    model, _ = tiny
    clean, _, clean_answers, _ = prompts
    evaluate = CircuitEvaluator(model, clean, normalized_logits(clean_answers), neuron_layers=[1])
    circuit = [Component.head(0, 1)] + all_mlps(2)
    importance = torch.rand(2, model.cfg.d_mlp, generator=torch.Generator().manual_seed(0))
    curve = AC.topk_curve(evaluate, circuit, importance, [1], [0, 5, model.cfg.d_mlp])
    assert float(curve[-1]) == pytest.approx(evaluate(circuit), abs=1e-5)
    # every neuron of MLP1 at its mean is MLP1's output at its mean (the output is linear in the neurons)
    assert float(curve[0]) == pytest.approx(evaluate([Component.head(0, 1), Component.mlp(0)]), abs=1e-4)


def test_neuron_attribution_check_and_token_responses(tiny, prompts):
    model, tokenizer = tiny
    clean, corrupt, clean_answers, corrupt_answers = prompts
    attribution = AC.neuron_attribution(model, clean, corrupt, clean_answers, corrupt_answers)
    assert attribution.shape == (2, 5, model.cfg.d_mlp)
    importance = attribution[:, -1].abs()
    sample = AC.check_sample(importance, 3, seed=0)
    assert len(sample) == 12 and sample[:3] == [(0, n) for n in importance[0].topk(3).indices.tolist()]
    unchanged = AC.patch_neurons_at_last(model, clean, clean, clean_answers, corrupt_answers, sample)
    assert float(unchanged.abs().max()) < 1e-5
    numbers = task.number_token_ids(tokenizer, 20)
    responses = AC.token_responses(model, numbers, 0, [3, 7])
    _, cache = model.run_with_cache(torch.stack([torch.full_like(numbers, tokenizer.bos_token_id), numbers], 1))
    assert torch.allclose(responses, cache["blocks.0.mlp.hook_post"][:, 1, [3, 7]].T, atol=1e-6)
    alone = AC.token_responses(model, numbers, 0, [3, 7], prepend_bos=False)   # a model trained without BOS
    _, cache = model.run_with_cache(numbers[:, None])
    assert torch.allclose(alone, cache["blocks.0.mlp.hook_post"][:, 0, [3, 7]].T, atol=1e-6)


def test_counterfactual_prompt_set_scores_clean_as_one_and_partners_as_zero(tiny, prompts):
    model, _ = tiny
    clean, corrupt, clean_answers, corrupt_answers = prompts
    task_set = AC.counterfactual_prompt_set(model, clean, clean_answers, corrupt, corrupt_answers)
    assert torch.equal(task_set.clean, clean) and torch.equal(task_set.corrupted, corrupt)
    assert float(task_set.metric(model(clean))) == pytest.approx(1.0, abs=1e-5)
    assert float(task_set.metric(model(corrupt))) == pytest.approx(0.0, abs=1e-5)


def test_the_acceptance_checks_pass_a_clear_run_and_fail_each_bar_alone():
    passing = dict(accuracy={"+": 0.6, "-": 0.7}, chance={"+": 0.01, "-": 0.01},
                   circuit_faithfulness={"+": 0.95, "-": 0.92}, circuit_sizes={"+": 6, "-": 8}, max_circuit_heads=9,
                   saturation=[0.05, 0.3], full_faithfulness=[0.99, 0.95], faithfulness_target=0.9,
                   mean_classified=0.6, related={"+": 0.4, "-": float("nan")}, unrelated={"+": 0.8, "-": 0.9},
                   guided_gap=0.1)
    assert all(AC.acceptance_checks(**passing).values())
    circuit = "circuit of <= 9 heads + MLPs with faithfulness >= 0.9 for + and -"
    curve = "top-k curve of every faithful circuit saturates at <= 35% of d_mlp"
    for change, failed in [({"accuracy": {"+": 1.0, "-": 0.7}}, "accuracy above chance and below 1"),
                           ({"circuit_sizes": {"+": 10, "-": 8}}, circuit),
                           ({"circuit_faithfulness": {"+": 0.95, "-": 0.8}}, circuit),
                           ({"saturation": [0.05, 0.4]}, curve), ({"full_faithfulness": [0.5, 0.5]}, curve),
                           ({"mean_classified": 0.4}, ">= 50% of top neurons classified at 0.6"),
                           ({"related": {"+": 0.9, "-": float("nan")}, "unrelated": {"+": 0.8, "-": 0.9}},
                            "knockout: related hurt more than unrelated"),
                           ({"guided_gap": 0.0}, "prompt-guided knockout below random control")]:
        assert failed_bars(AC.acceptance_checks, passing, change) == [failed], change
