"""Ablation hooks: zero/mean/resample knockouts do what they say; circuits and faithfulness are normalised."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import ablation
from helpers.techniques.dla import logit_diff
from helpers.core.components import Component


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


def test_reference_means_streamed_in_chunks_equal_the_whole_batchs(setup, monkeypatch):
    model, tokens, _ = setup
    components = [Component.mlp(0), Component.head(1, 2), Component.neuron(1, 7)]
    whole = ablation.reference_activations(model, tokens, components, "mean")
    monkeypatch.setattr(ablation, "REFERENCE_BUDGET", 1)   # one row per chunk
    streamed = ablation.reference_activations(model, tokens, components, "mean")
    assert whole.keys() == streamed.keys()
    assert ablation.reference_activations(model, tokens, [], "mean") == {}   # nothing to ablate, nothing to run
    for name, mean in whole.items():
        assert streamed[name].shape == mean.shape and streamed[name].dtype == mean.dtype
        assert torch.allclose(streamed[name], mean, atol=1e-6), name


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


# ---- the circuit evaluator on a planted circuit ------------------------------------------------------------------
LIVE_HEADS = [(0, 1), (1, 2)]          # every other head's output projection is zeroed: its z cannot matter
LIVE_NEURONS = 8                        # MLP1 neurons 8.. have zero output weights: only 0..7 can matter


def _out_projections(hf, architecture: str, layer: int):
    """(attention output projection, MLP output projection, input dimension is the weight's second axis)."""
    if architecture == "gpt_neox":
        block = hf.gpt_neox.layers[layer]
        return block.attention.dense, block.mlp.dense_4h_to_h, True
    if architecture == "llama":
        block = hf.model.layers[layer]
        return block.self_attn.o_proj, block.mlp.down_proj, True
    block = hf.transformer.h[layer]
    if architecture == "gpt2":  # Conv1D: weight [in, out]
        return block.attn.c_proj, block.mlp.c_proj, False
    return block.attn.attention.out_proj, block.mlp.c_proj, True


@pytest.fixture(scope="module", params=["gpt_neox", "gpt2", "llama", "gpt_neo"])
def planted(request, tiny_checkpoint, tmp_path_factory):
    """A tiny model of each architecture whose only live heads are LIVE_HEADS and whose MLP1 writes only through its
    first LIVE_NEURONS neurons; the circuit LIVE_HEADS + MLPs is then exactly faithful under mean ablation."""
    import shutil

    from transformers import AutoModelForCausalLM

    from helpers.models.load import load_model

    architecture = request.param
    source = tiny_checkpoint(architecture)
    folder = tmp_path_factory.mktemp(f"planted_{architecture}") / "m"
    shutil.copytree(source, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    n_heads = hf.config.num_attention_heads
    d_head = hf.config.hidden_size // n_heads
    with torch.no_grad():
        for layer in range(hf.config.num_hidden_layers):
            attn_out, mlp_out, columns = _out_projections(hf, architecture, layer)
            for head in range(n_heads):
                if (layer, head) not in LIVE_HEADS:
                    rows = slice(head * d_head, (head + 1) * d_head)
                    (attn_out.weight[:, rows] if columns else attn_out.weight[rows]).zero_()
            if layer == 1:
                (mlp_out.weight[:, LIVE_NEURONS:] if columns else mlp_out.weight[LIVE_NEURONS:]).zero_()
    hf.save_pretrained(folder, safe_serialization=True)
    model = load_model(folder, device="cpu")
    prompts = ["All cats are red, not blue. Kittens are", "All dogs are blue, not red. Puppies are",
               "All cats are blue, not red. Kittens are", "All dogs are red, not blue. Puppies are"]
    tokens = model.to_tokens(prompts)
    answers = model(tokens)[:, -1].topk(2).indices[:, 1]  # the runner-up: its normalised logit moves under ablation
    reference = model.to_tokens(prompts[::-1])
    return model, tokens, answers, reference


def test_planted_circuit_is_exactly_faithful_and_dead_heads_are_empty(planted):
    from helpers.core.components import all_mlps

    model, tokens, answers, reference = planted
    evaluate = ablation.CircuitEvaluator(model, tokens, ablation.normalized_logits(answers),
                                         reference_tokens=reference, neuron_layers=[1])
    mlps = all_mlps(model.cfg.n_layers)
    live = [Component.head(l, h) for l, h in LIVE_HEADS]
    dead = [c for c in ablation.circuit_universe(model, include_mlps=False) if (c.layer, c.index) not in LIVE_HEADS]
    assert float((evaluate.full - evaluate.empty).abs().min()) > 1e-4  # the planted case is not degenerate
    exact = evaluate.faithfulness(live + mlps)
    assert exact.ratio_of_means == pytest.approx(1.0, abs=1e-4)
    assert exact.mean_of_ratios == pytest.approx(1.0, abs=1e-4)
    assert evaluate(dead) == pytest.approx(0.0, abs=1e-4)            # dead heads kept = nothing kept
    assert evaluate(live + mlps, kept_neurons={1: range(LIVE_NEURONS)}) == pytest.approx(1.0, abs=1e-4)
    # keeping only dead neurons of MLP1 is ablating MLP1 itself (to its mean)
    only_dead = evaluate.faithfulness(live + mlps, kept_neurons={1: range(LIVE_NEURONS, model.cfg.d_mlp)})
    without = evaluate.faithfulness(live + [Component.mlp(0)])
    assert only_dead.ratio_of_means == pytest.approx(without.ratio_of_means, abs=1e-4)
    assert torch.allclose(only_dead.circuit, without.circuit, atol=1e-5)


def test_evaluator_agrees_with_faithfulness_and_computes_both_averages(planted):
    model, tokens, answers, reference = planted
    metric = ablation.normalized_logits(answers)
    evaluate = ablation.CircuitEvaluator(model, tokens, metric, reference_tokens=reference)
    partial = [Component.head(*LIVE_HEADS[0]), Component.mlp(1)]
    result = evaluate.faithfulness(partial)
    one_shot = ablation.faithfulness(model, tokens, partial, ablation.normalized_logit(answers),
                                     reference_tokens=reference)
    assert result.ratio_of_means == pytest.approx(one_shot["faithfulness"], abs=1e-5)
    per_prompt = (result.circuit - evaluate.empty) / (evaluate.full - evaluate.empty)
    assert result.mean_of_ratios == pytest.approx(float(per_prompt.mean()), abs=1e-6)
    # the two averages differ in general: a mean of ratios is not a ratio of means
    full, empty, kept = evaluate.full.mean(), evaluate.empty.mean(), result.circuit.mean()
    assert result.ratio_of_means == pytest.approx(float((kept - empty) / (full - empty)), abs=1e-5)


def test_neuron_mask_hooks_per_prompt_with_mean_fill_and_from_position(setup):
    model, tokens, _ = setup
    d_mlp = model.cfg.d_mlp
    masks = {1: torch.zeros(len(tokens), d_mlp, dtype=torch.bool)}
    masks[1][0, 3] = True                      # prompt 0 only
    fill = {1: torch.full((tokens.shape[1], d_mlp), 2.5)}
    cache = _cache_with(model, tokens, ablation.neuron_mask_hooks(masks, fill, from_position=2))
    _, clean = model.run_with_cache(tokens)
    post, clean_post = cache["blocks.1.mlp.hook_post"], clean["blocks.1.mlp.hook_post"]
    assert torch.all(post[0, 2:, 3] == 2.5)
    assert torch.equal(post[0, :2], clean_post[0, :2]) and torch.equal(post[1:], clean_post[1:])
    same_for_all = _cache_with(model, tokens, ablation.neuron_mask_hooks({1: masks[1][0]}))
    assert torch.all(same_for_all["blocks.1.mlp.hook_post"][:, :, 3] == 0)


def test_eq2_leaves_out_prompts_where_it_is_undefined(planted):
    """A prompt whose full and empty runs agree has no Eq. 2 ratio: it is counted, not averaged as NaN."""
    model, tokens, answers, reference = planted
    evaluate = ablation.CircuitEvaluator(model, tokens, ablation.normalized_logits(answers), reference_tokens=reference)
    evaluate.empty[0] = evaluate.full[0]                      # plant one undefined prompt
    result = evaluate.faithfulness([Component.head(*LIVE_HEADS[0]), Component.mlp(1)])
    per_prompt = ((result.circuit - evaluate.empty) / (evaluate.full - evaluate.empty))[1:]
    assert result.undefined_prompts == 1
    assert result.mean_of_ratios == pytest.approx(float(per_prompt.mean()), abs=1e-6)
