"""Direct logit attribution: the pieces add up to the logit difference the model actually produces, on every
architecture (LayerNorm and RMSNorm, with and without attention biases, with and without a final norm); the logit
lens ends at the model's answer."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import dla
from helpers.core.components import Component, final_resid_hook_name
from helpers.models.load import build_native_model, load_model
from helpers.models.zoo import grokking_transformer_config
from tests.conftest import ARCHITECTURES, SYLLOGISM_PROMPTS


def assert_matches_model(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 agreement. The logit differences here are about 0.7 and float rounding about 1e-7, while a final
    norm linearised the wrong way misses by more than 1e-2."""
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-4, atol=1e-5)


def forward(model, tokens: torch.Tensor):
    """`(model, tokens, answers, logits, cache)`. The answers `[batch, 2]` are each prompt's top and bottom next
    token, so that every logit difference is large."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answers = torch.stack([logits[:, -1].argmax(-1), logits[:, -1].argmin(-1)], dim=1)
    return model, tokens, answers, logits, cache


def unfold_final_norm(model) -> None:
    """Give an unprocessed model's final norm a random weight (and LayerNorm a random bias), as a trained model
    loaded without fold_ln has: the attribution must apply them itself."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("w", "b"):
            param = getattr(model.ln_final, name, None)
            if param is not None:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def cases(tiny_checkpoint):
    """`(architecture, processed=True) -> (model, tokens, answers, logits, cache)` on the syllogism prompts, each
    built once. processed=False: no weight processing (no fold_ln, no centring) and a random final-norm weight."""
    built = {}

    def get(architecture: str, processed: bool = True):
        if (architecture, processed) not in built:
            model = load_model(tiny_checkpoint(architecture), device="cpu", process_weights=processed)
            if not processed:
                unfold_final_norm(model)
            built[architecture, processed] = forward(model, model.to_tokens(SYLLOGISM_PROMPTS))
        return built[architecture, processed]

    return get


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request, cases):
    """Each tiny architecture as the notebooks load it (compatibility mode, weights processed)."""
    return cases(request.param)


def assert_dla_matches_model(model, answers, logits, cache) -> None:
    """layer_attribution, full_attribution and the logit lens's last entry add up to the model's logit difference,
    per prompt and on average."""
    target = dla.logit_diff(logits, answers, per_prompt=True)  # [batch]
    assert (target > 0.3).all()
    for result in (dla.layer_attribution(model, cache, answers),
                   dla.full_attribution(model, cache, answers)):
        assert_matches_model(result.per_prompt.sum(0), target)
        assert_matches_model(result.values.sum(), target.mean())
    assert_matches_model(dla.logit_lens(model, cache, answers).per_prompt[-1], target)


def rebuilt_logit_diff(model, answers, cache, centre: bool) -> torch.Tensor:
    """The logit difference `[batch]` rebuilt by hand from the final residual stream: `w * x / scale` (centred
    first with `centre`) read along `W_U[:, correct] - W_U[:, wrong]`, plus the constant offset."""
    final = cache[final_resid_hook_name(model)][:, -1]
    if centre:
        final = final - final.mean(-1, keepdim=True)
    normalised = final / cache["ln_final.hook_scale"][:, -1] * model.ln_final.w
    directions = model.W_U[:, answers[:, 0]] - model.W_U[:, answers[:, 1]]
    return (normalised * directions.T).sum(-1) + dla.unembed_bias_diff(model, answers)


def test_dla_sums_to_the_models_logit_diff(case):
    model, _, answers, logits, cache = case
    assert_dla_matches_model(model, answers, logits, cache)


@pytest.mark.parametrize("processed", [True, False])
@pytest.mark.parametrize("architecture, norm, centres", [("gpt2", "LN", True), ("llama", "RMS", False)])
def test_final_norm_is_centred_only_for_layernorm(cases, architecture, norm, centres, processed):
    """LayerNorm removes the residual stream's mean and RMSNorm does not, so DLA centres for one only."""
    model, _, answers, logits, cache = cases(architecture, processed)
    assert model.cfg.normalization_type == norm
    target = dla.logit_diff(logits, answers, per_prompt=True)
    assert_matches_model(rebuilt_logit_diff(model, answers, cache, centre=centres), target)
    # the other choice is wrong, except LayerNorm on processed weights (centred writing weights: the mean is 0)
    if not (centres and processed):
        assert (rebuilt_logit_diff(model, answers, cache, centre=not centres) - target).abs().max() > 1e-2
    assert_dla_matches_model(model, answers, logits, cache)


def test_no_final_norm():
    config = grokking_transformer_config(12, 12, d_model=16, n_heads=2, d_head=8, d_mlp=32)
    model = build_native_model(config, seed=0, device="cpu")
    assert model.cfg.normalization_type is None
    _, _, answers, logits, cache = forward(model, torch.randint(12, (4, 3), generator=torch.Generator().manual_seed(0)))
    assert "ln_final.hook_scale" not in cache.keys()
    target = dla.logit_diff(logits, answers, per_prompt=True)
    assert_matches_model(dla.layer_attribution(model, cache, answers).per_prompt.sum(0), target)
    assert_matches_model(dla.full_attribution(model, cache, answers).per_prompt.sum(0), target)
    assert_matches_model(dla.logit_lens(model, cache, answers).per_prompt[-1], target)


def test_layer_and_full_attribution_labels(case):
    model, _, answers, _, cache = case
    layers = dla.layer_attribution(model, cache, answers)
    full = dla.full_attribution(model, cache, answers)
    n_embed = 2 if "hook_pos_embed" in cache.keys() else 1
    assert layers.labels[0] == "EMBED" and layers.labels[-1] == "UNEMBED_BIAS"
    assert layers.components[0] == Component.embed() and layers.components[-1] == Component.unembed_bias()
    assert (n_embed == 2) == (Component.pos_embed() in full.components)
    assert len(layers.labels) == n_embed + 2 * model.cfg.n_layers + 1
    assert len(full.labels) == n_embed + model.cfg.n_layers * (model.cfg.n_heads + 2) + 1
    assert [Component.from_label(label) for label in full.labels] == full.components
    assert full["MLP0"] == full[Component.mlp(0)] == full.as_dict()["MLP0"]
    lens = dla.logit_lens(model, cache, answers)
    assert lens.labels[0] == "RESID_PRE0" and lens.labels[-1] == f"RESID_POST{model.cfg.n_layers - 1}"


def test_heads_plus_bias_equal_attention_layer(case):
    model, _, answers, _, cache = case
    layers = dla.layer_attribution(model, cache, answers).as_dict()
    full = dla.full_attribution(model, cache, answers).as_dict()
    heads = dla.head_attribution(model, cache, answers)
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        assert full[f"L{layer}H1"] == pytest.approx(heads[layer, 1].item(), abs=1e-6)
        from_heads = sum(full[f"L{layer}H{h}"] for h in range(model.cfg.n_heads)) + full[f"ATTN_BIAS{layer}"]
        assert from_heads == pytest.approx(layers[f"ATTN{layer}"], abs=1e-5)


def test_token_and_next_token_dla_sum_to_the_models_logits(case):
    model, tokens, answers, logits, cache = case
    positions = torch.full((len(tokens),), tokens.shape[1] - 1)
    result = dla.token_attribution_at(model, cache, answers[:, 0], positions)
    assert_matches_model(result.per_prompt.sum(0), logits[:, -1].gather(1, answers[:, :1])[:, 0])
    values, _ = dla.next_token_dla(model, cache, tokens)
    assert_matches_model(values.sum(0), logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0])
    _, needed = model.run_with_cache(tokens, names_filter=dla.dla_hook_names(model))
    assert len(needed.keys()) < len(cache.keys())
    assert torch.allclose(dla.next_token_dla(model, needed, tokens)[0], values)


def test_attention_vs_contribution_shapes(case):
    model, tokens, answers, _, cache = case
    keys = torch.full((len(tokens),), 3)
    attention, contribution = dla.attention_vs_contribution(model, cache, answers, 1, 0, -1, keys)
    assert attention.shape == contribution.shape == (len(tokens),)
    assert torch.all((attention >= 0) & (attention <= 1))


def test_top_components():
    values = torch.tensor([[0.1, 0.5], [-0.7, 0.2]])
    assert dla.top_components(values, 1)[0][0] == (0, 1)
    assert dla.top_components(values, 1, largest=False)[0][0] == (1, 0)


def test_direction_writes_sum_to_the_final_residual_projection(case):
    model, tokens, _, _, cache = case
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    values, components = dla.direction_writes(model, cache, direction)
    final = cache[final_resid_hook_name(model)] @ direction
    assert values.shape == (len(components), *tokens.shape)
    assert torch.allclose(values.sum(0), final, atol=1e-4)
    assert Component.head(0, model.cfg.n_heads - 1) in components and Component.mlp(0) in components
    # the attention bias is a constant: the same at every position of every prompt
    bias = values[components.index(Component.attn_bias(0))]
    assert torch.allclose(bias, bias[0, 0].expand_as(bias), atol=1e-5)
