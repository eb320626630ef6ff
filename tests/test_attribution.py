"""Direct logit attribution: the pieces add up to the logit difference; the logit lens ends at the model's answer."""
from __future__ import annotations

import pytest
import torch

from helpers import attribution
from helpers.components import Component


@pytest.fixture(scope="module")
def setup(syllogism_batch):
    model, tokens, answers = syllogism_batch
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, answers, logits, cache


def test_layer_attribution_sums_to_logit_diff(setup):
    model, _, answers, logits, cache = setup
    target = attribution.logit_diff(logits, answers)
    result = attribution.layer_attribution(model, cache, answers)
    assert result.labels[0] == "embed" and result.labels[-1] == "unembed_bias"
    assert len(result.labels) == 2 * model.cfg.n_layers + 2
    assert abs(result.values.sum().item() - target.item()) < 1e-4
    per_prompt = attribution.logit_diff(logits, answers, per_prompt=True)
    assert torch.allclose(result.per_prompt.sum(0), per_prompt, atol=1e-4)


def test_full_attribution_heads_sum_to_logit_diff(setup):
    model, _, answers, logits, cache = setup
    result = attribution.full_attribution(model, cache, answers)
    assert abs(result.values.sum().item() - attribution.logit_diff(logits, answers).item()) < 1e-4
    heads = attribution.head_attribution(model, cache, answers)
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    as_dict = result.as_dict()
    assert abs(as_dict["L1H2"] - heads[1, 2].item()) < 1e-6


def test_heads_plus_bias_equal_attention_layer(setup):
    model, _, answers, _, cache = setup
    layers = attribution.layer_attribution(model, cache, answers).as_dict()
    full = attribution.full_attribution(model, cache, answers).as_dict()
    for layer in range(model.cfg.n_layers):
        heads = sum(full[f"L{layer}H{h}"] for h in range(model.cfg.n_heads)) + full[f"L{layer}_attn_bias"]
        assert abs(heads - layers[f"L{layer}_attn"]) < 1e-5


def test_logit_lens_last_entry_is_logit_diff(setup):
    model, _, answers, logits, cache = setup
    lens = attribution.logit_lens(model, cache, answers)
    assert lens.values.shape == (model.cfg.n_layers + 1,)
    assert abs(lens.values[-1].item() - attribution.logit_diff(logits, answers).item()) < 1e-4


def test_attention_vs_contribution_shapes(setup):
    model, tokens, answers, _, cache = setup
    keys = torch.full((len(tokens),), 3)
    attention, contribution = attribution.attention_vs_contribution(model, cache, answers, 1, 0, -1, keys)
    assert attention.shape == contribution.shape == (len(tokens),)
    assert torch.all((attention >= 0) & (attention <= 1))


def test_top_components():
    values = torch.tensor([[0.1, 0.5], [-0.7, 0.2]])
    assert attribution.top_components(values, 1)[0][0] == (0, 1)
    assert attribution.top_components(values, 1, largest=False)[0][0] == (1, 0)


def test_component_names():
    assert Component.head(3, 2).hook_name() == "blocks.3.attn.hook_z"
    assert Component.head(3, 2).hook_name("k") == "blocks.3.attn.hook_k"
    assert Component.neuron(3, 669).hook_name() == "blocks.3.mlp.hook_post"
    assert Component.mlp(1).hook_name() == "blocks.1.hook_mlp_out"
    assert Component("resid", 2).hook_name() == "blocks.2.hook_resid_pre"
    for label in ["L3H2", "L3N669@-1", "MLP1", "ATTN0@4", "EMBED"]:
        assert Component.from_label(label).label == label
    assert Component.head(1, 2, 5).index_tuple("pattern") == (2, 5)


def test_direction_writes_sum_to_the_final_residual_projection(setup):
    model, tokens, _, _, cache = setup
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    values, labels = attribution.direction_writes(model, cache, direction)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"] @ direction
    assert values.shape == (len(labels), *tokens.shape)
    assert torch.allclose(values.sum(0), final, atol=1e-4)
    assert f"L0H{model.cfg.n_heads - 1}" in labels and "L0_mlp" in labels
    # the attention bias is a constant: the same at every position of every prompt
    bias = values[labels.index("L0_attn_bias")]
    assert torch.allclose(bias, bias[0, 0].expand_as(bias), atol=1e-5)
