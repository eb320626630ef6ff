"""The quotation study's pipeline on the toy story model: closing prompts per closing token, DLA at the closing
position, the original notebook's five conditions and the per-closing comparison, checked against direct
computations."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sae_lens")

from helpers.studies import quote_features as Q  # noqa: E402
from helpers.techniques import sae as S  # noqa: E402
from helpers.techniques import sae_training as T  # noqa: E402
from helpers.techniques.dla import token_attribution_at  # noqa: E402
from helpers.core.components import hook_name  # noqa: E402
from helpers.tasks.stories import generate_stories  # noqa: E402
from tests.conftest import failed_bars  # noqa: E402


@pytest.fixture(autouse=True)
def no_grad():
    """Every test here runs without autograd, and leaves the global mode as it found it."""
    with torch.no_grad():
        yield
HOOK = hook_name("neuron", 1)


@pytest.fixture(scope="module")
def toy():
    from helpers.models.load import load_model

    model = load_model("toy-stories", device="cpu")
    stories = generate_stories(40, seed=11)
    sets = Q.closing_prompt_sets(stories, model.tokenizer, ('."', '!"', '?"'), max_prompts=12)
    sae = T.new_sae(model.cfg.d_mlp, 2 * model.cfg.d_mlp, hook_name=HOOK, seed=3)
    return model, sets, sae


def test_closing_prompt_sets_per_token(toy):
    model, sets, _ = toy
    assert set(sets) == {'."', '!"', '?"'}
    only = Q.closing_prompt_sets(['Tom said, "Look at the kite."'], model.tokenizer, ('."', '?"'), max_prompts=3)
    assert list(only) == ['."'] and len(only['."']) == 1  # a closing that never occurs is left out
    for closing, prompts in sets.items():
        assert 0 < len(prompts) <= 12
        assert (prompts.answers == model.tokenizer.convert_tokens_to_ids(closing)).all()


def test_closing_dla_in_chunks_sums_to_the_logit(toy):
    model, sets, _ = toy
    prompts = sets['."']
    dla = Q.closing_dla(model, prompts, batch_size=5)
    logits = S.logits_at(model, prompts.tokens, prompts.last_pos)
    expected = logits[torch.arange(len(prompts)), prompts.answers]
    assert torch.allclose(dla.per_prompt.sum(0), expected, atol=1e-3)
    _, cache = model.run_with_cache(prompts.tokens)
    whole = token_attribution_at(model, cache, prompts.answers, prompts.last_pos)
    assert dla.labels == whole.labels and torch.allclose(dla.per_prompt, whole.per_prompt, atol=1e-4)
    post, scales = Q.closing_activations(model, prompts, HOOK, batch_size=5)
    rows = torch.arange(len(prompts))
    assert torch.allclose(post, cache[HOOK][rows, prompts.last_pos], atol=1e-5)
    assert torch.allclose(scales, cache["ln_final.hook_scale"][rows, prompts.last_pos, 0], atol=1e-6)


def test_conditions_and_closing_comparison(toy):
    model, sets, sae = toy
    prompts = sets['."']
    clean = S.answer_measures(S.logits_at(model, prompts.tokens, prompts.last_pos), prompts.answers)
    silent = [0, 1]  # make two features that never fire: ablating them changes nothing
    sae.b_enc.data[silent] = -1e6
    measures = Q.condition_measures(model, sae, HOOK, prompts, clean, silent, torch.zeros(model.cfg.d_mlp), "MLP1")
    assert list(measures) == ["original", "MLP1 zero-ablated", "MLP1 mean-ablated", "top-2 features ablated",
                              "SAE spliced"]
    assert torch.allclose(measures["top-2 features ablated"]["logprob"], clean["logprob"], atol=1e-4)
    # a zero mean is zero ablation
    assert torch.allclose(measures["MLP1 mean-ablated"]["logit"], measures["MLP1 zero-ablated"]["logit"], atol=1e-5)
    plain_losses = lambda make: S.answer_losses(S.logprobs_at(  # noqa: E731 - one full run per intervention
        model, prompts.tokens, prompts.last_pos, S.at_positions(HOOK, make)), prompts.answers)
    zero_loss = plain_losses(lambda pos: S.replace_hook(0.0, pos))
    assert torch.allclose(-measures["MLP1 zero-ablated"]["logprob"], zero_loss, atol=1e-5)
    table = Q.closing_token_comparison(model, sae, HOOK, sets, [2, 3])
    assert list(table.index) == ['."', '!"', '?"']
    spliced = plain_losses(lambda pos: S.splice_hook(sae, positions=pos))
    expected = S.loss_recovered(-clean["logprob"].mean().item(), spliced.mean().item(), zero_loss.mean().item())
    assert table.loc['."', "loss recovered by the SAE"] == pytest.approx(expected, rel=1e-4)
    assert table.loc['."', "prompts"] == len(prompts)
    increases = Q.ablation_losses(model, sae, HOOK, prompts, silent)
    assert all(torch.allclose(loss, -clean["logprob"], atol=1e-4) for loss in increases.values())


def test_the_acceptance_checks_pass_a_clear_feature_and_fail_each_bar_alone():
    passing = dict(recovered=0.9, top_share=0.95, top_increase=0.1, increase_on_active=torch.tensor([0.1, 0.12, 0.09]),
                   boosted_closings=['."'])
    assert all(Q.acceptance_checks(**passing).values())
    feature = "a feature active on most closing prompts raises the loss when ablated"
    for change, failed in [({"recovered": 0.7}, "SAE splice recovers >= 80% of the loss at the quote position"),
                           ({"top_share": 0.4}, feature), ({"top_increase": 0.01}, feature),
                           ({"increase_on_active": torch.tensor([0.3, -0.3, 0.05])}, feature),
                           ({"boosted_closings": []}, "its top boosted tokens include a closing-quote token")]:
        assert failed_bars(Q.acceptance_checks, passing, change) == [failed]
