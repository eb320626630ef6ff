"""SAE feature analyses: direct logit effects (LayerNorm and RMSNorm), direct feature attribution, token detectors and
blocked cross-layer cosines, each against an independent computation, on every test architecture."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sae_lens")

from helpers.techniques import sae_training as T  # noqa: E402
from helpers.techniques import sae_features as SF  # noqa: E402
from helpers.techniques.dla import token_attribution_at  # noqa: E402
from helpers.core.components import Component, hook_name  # noqa: E402
from tests.conftest import ARCHITECTURES  # noqa: E402


@pytest.fixture(autouse=True)
def no_grad():
    """Every test here runs without autograd, and leaves the global mode as it found it."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    from helpers.models.load import load_model

    return {arch: load_model(tiny_checkpoint(arch), device="cpu") for arch in ARCHITECTURES}


def _tokens(model, n: int = 6, seq: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.cfg.d_vocab, (n, seq), generator=generator)
    tokens[:, 0] = 0
    positions = torch.randint(1, seq, (n,), generator=generator)
    return tokens, positions


def _sae(model, layer: int, seed: int = 0, d_in: int | None = None, hook: str | None = None):
    """A random SAE on `blocks.{layer}.mlp.hook_post` with non-zero biases and encoder rows of the activation's
    scale, so that some features fire and some do not."""
    d_in = d_in or model.cfg.d_mlp
    sae = T.new_sae(d_in, 2 * d_in, hook_name=hook or hook_name("neuron", layer), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    sae.W_enc.data = torch.randn(sae.W_enc.shape, generator=generator)
    sae.b_enc.data = 0.05 * torch.randn(sae.b_enc.shape, generator=generator)
    sae.b_dec.data = 0.05 * torch.randn(sae.b_dec.shape, generator=generator)
    return sae


def _frozen_scale(name: str, scale: torch.Tensor):
    return name, lambda act, hook=None: scale.to(act)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_vector_dla_is_the_mlps_term_of_token_attribution(models, architecture, layer):
    """The MLP's DLA term from `token_attribution_at` splits exactly into `mlp_vector_dla` of its activation plus
    what `b_out` writes (measured by zeroing hook_post with the final norm's scale frozen); it holds on RMSNorm
    (Llama), where centring the writes would be wrong."""
    model = models[architecture]
    tokens, positions = _tokens(model)
    rows = torch.arange(len(tokens))
    answers = tokens[rows, (positions + 1).clamp(max=tokens.shape[1] - 1)]
    _, clean = model.run_with_cache(tokens)
    scale = clean["ln_final.hook_scale"]
    post = clean[hook_name("neuron", layer)][rows, positions]
    with model.hooks(fwd_hooks=[(hook_name("neuron", layer), lambda act, hook=None: torch.zeros_like(act)),
                                _frozen_scale("ln_final.hook_scale", scale)]):
        _, zeroed = model.run_with_cache(tokens)
    mlp = Component.mlp(layer)
    full = token_attribution_at(model, clean, answers, positions)
    bias_only = token_attribution_at(model, zeroed, answers, positions)
    index = full.components.index(mlp)
    expected = full.per_prompt[index] - bias_only.per_prompt[index]
    got = SF.mlp_vector_dla(model, layer, post, answers, scale[rows, positions, 0])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_feature_logit_effects_add_up_to_the_reconstruction(models, architecture):
    """Per-feature DLA summed over features is the DLA of `acts @ W_dec`, and equals activation x the weight-based
    effect at that prompt's scale (the old centring made these disagree on RMSNorm)."""
    model, layer = models[architecture], 1
    sae = _sae(model, layer)
    tokens, positions = _tokens(model)
    rows = torch.arange(len(tokens))
    answers = tokens[:, 1]
    _, cache = model.run_with_cache(tokens)
    acts = sae.encode(cache[hook_name("neuron", layer)][rows, positions])
    scale = cache["ln_final.hook_scale"][rows, positions, 0]
    per_feature = SF.feature_answer_dla(model, sae, layer, acts, answers, scale)
    assert per_feature.shape == (len(tokens), sae.cfg.d_sae)
    assert torch.allclose(per_feature.sum(-1), SF.mlp_vector_dla(model, layer, acts @ sae.W_dec, answers, scale),
                          atol=1e-4, rtol=1e-4)
    for b in range(len(tokens)):
        weights = SF.feature_logit_weights(model, sae, layer, ln_scale=scale[b])
        assert weights.shape == (sae.cfg.d_sae, model.cfg.d_vocab)
        assert torch.allclose(acts[b] * weights[:, answers[b]], per_feature[b], atol=1e-5, rtol=1e-4)


def test_rmsnorm_writes_are_not_centred(models):
    """RMSNorm keeps the residual stream's mean, so a feature that writes the all-ones vector moves the logits by
    `ones @ W_U`; centring the write (right under LayerNorm, where processed writers are centred anyway) would
    erase it."""
    model, layer = models["llama"], 1
    sae = _sae(model, layer)
    sae.W_dec.data[0] = torch.ones(model.cfg.d_model) @ torch.linalg.pinv(model.W_out[layer])
    assert torch.allclose(SF.feature_writes(model, sae, layer)[0], torch.ones(model.cfg.d_model), atol=1e-4)
    weight = getattr(model.ln_final, "w", None)
    expected = (torch.ones(model.cfg.d_model) * (1.0 if weight is None else weight)) @ model.W_U
    assert expected.abs().max() > 1e-2
    assert torch.allclose(SF.feature_logit_weights(model, sae, layer)[0], expected, atol=1e-3, rtol=1e-3)
    gpt2 = models["gpt2"]  # center_writing_weights: a LayerNorm model's MLP writes have zero mean already
    writes = SF.feature_writes(gpt2, _sae(gpt2, layer), layer)
    assert torch.allclose(writes.mean(-1), torch.zeros(len(writes)), atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("layer", [0, 1])
def test_feature_input_attribution_sums_to_the_pre_activation(models, architecture, layer):
    model = models[architecture]
    sae = _sae(model, layer, seed=layer)
    tokens, positions = _tokens(model, seed=3)
    rows = torch.arange(len(tokens))
    features = [0, 5, 17, 2 * model.cfg.d_mlp - 1]
    _, cache = model.run_with_cache(tokens, names_filter=SF.mlp_input_names(model, layer))  # all it needs
    result = SF.feature_input_attribution(model, cache, sae, layer, features, positions)
    _, sae_cache = sae.run_with_cache(cache[hook_name("neuron", layer)][rows, positions])
    expected = sae_cache["hook_sae_acts_pre"][:, features].T  # [feature, batch]
    assert result.per_prompt.shape == (len(result.components), len(features), len(tokens))
    assert torch.allclose(result.per_prompt.sum(0) + result.constant, expected, atol=1e-4, rtol=1e-4)
    own_heads = Component.head(layer, 0) in result.components
    assert own_heads == (not model.cfg.parallel_attn_mlp)  # GPT-NeoX: attention and MLP read the same stream
    assert (Component.mlp(0) in result.components) == (layer == 1)
    active = expected > 0
    means = result.mean(active)
    assert means.shape == (len(result.components), len(features))
    column = int(active.sum(-1).argmax())
    assert torch.allclose(means[:, column], result.per_prompt[:, column][:, active[column]].mean(-1), atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_heads_part_is_what_removing_it_changes_with_norm_and_gains_frozen(models, architecture):
    """At layer 0 a head reaches the MLP only through its own write, so zeroing its `z` at the position, with the
    MLP norm's scale and every neuron's gain held at their clean values, moves the feature's pre-activation by
    exactly minus the head's part. Under parallel attention (GPT-NeoX) MLP0 never reads layer-0 heads."""
    model, layer, head = models[architecture], 0, 1
    sae = _sae(model, layer)
    tokens, positions = _tokens(model, seed=5)
    rows = torch.arange(len(tokens))
    _, cache = model.run_with_cache(tokens)
    features = list(range(8))
    result = SF.feature_input_attribution(model, cache, sae, layer, features, positions)
    linear_name = hook_name("neuron", layer, "pre_linear" if model.cfg.gated_mlp else "pre")
    clean_linear, clean_post = cache[linear_name], cache[hook_name("neuron", layer)]
    gain = torch.where(clean_linear != 0, clean_post / clean_linear, 0.0)
    seen = {}

    def zero_head(z, hook=None):
        z = z.clone()
        z[rows, positions, head] = 0.0
        return z

    def keep_linear(act, hook=None):
        seen["linear"] = act
        return act

    hooks = [(hook_name("head", layer), zero_head),
             _frozen_scale(f"blocks.{layer}.ln2.hook_scale", cache[f"blocks.{layer}.ln2.hook_scale"]),
             (linear_name, keep_linear), (hook_name("neuron", layer), lambda act, hook=None: gain * seen["linear"])]
    with model.hooks(fwd_hooks=hooks):
        _, ablated = model.run_with_cache(tokens, names_filter=hook_name("neuron", layer))
    pre = lambda post: sae.run_with_cache(post[rows, positions])[1]["hook_sae_acts_pre"][:, features].T  # noqa: E731
    change = pre(ablated[hook_name("neuron", layer)]) - pre(clean_post)
    if model.cfg.parallel_attn_mlp:
        assert Component.head(layer, head) not in result.components
        assert torch.allclose(change, torch.zeros_like(change), atol=1e-5)
    else:
        part = result.per_prompt[result.components.index(Component.head(layer, head))]
        assert part.abs().max() > 1e-3  # the head does drive these features
        assert torch.allclose(change, -part, atol=1e-4, rtol=1e-3)


def test_token_detector_statistics_match_a_dense_count(models):
    """Sparse counting equals the dense `[d_sae, d_vocab]` count of the original notebook, and a planted single-token
    detector (an SAE on `hook_embed` whose feature 0 reads one token's embedding) is found with share 1."""
    model = models["gpt2"]
    tokens, _ = _tokens(model, n=16, seq=24, seed=7)
    sae = _sae(model, 0, d_in=model.cfg.d_model, hook="hook_embed")
    embeddings = model.W_E
    target = int(tokens[3, 5])
    direction = F.normalize(embeddings[target], dim=0)
    projections = embeddings @ direction
    runner_up = projections[torch.arange(len(projections)) != target].max()
    assert projections[target] > runner_up
    sae.W_enc.data[:, 0] = direction
    sae.b_enc.data[0] = -(projections[target] + runner_up) / 2 + sae.b_dec @ direction
    stats = SF.token_detector_statistics(model, sae, tokens, threshold_fraction=0.5, batch_size=5)
    body = tokens[:, 1:]
    assert stats.top_token[0] == target and stats.top_share[0] == 1.0
    assert stats.n_active[0] == int((body == target).sum())
    acts = sae.encode(model.run_with_cache(tokens)[1]["hook_embed"][:, 1:])  # [batch, seq-1, d_sae]
    peak = acts.amax(dim=(0, 1))
    above = acts > 0.5 * peak
    counts = torch.zeros(sae.cfg.d_sae, model.cfg.d_vocab, dtype=torch.long)
    for feature in range(sae.cfg.d_sae):
        counts[feature] = torch.bincount(body[above[..., feature]], minlength=model.cfg.d_vocab)
    live = counts.sum(-1) > 0
    assert torch.equal(stats.live, live) and torch.equal(stats.n_active, counts.sum(-1))
    assert torch.equal(stats.top_token[live], counts[live].argmax(-1))
    expected_share = counts[live].max(-1).values.float() / counts[live].sum(-1).float()
    assert torch.allclose(stats.top_share[live], expected_share)
    assert (stats.top_token[~live] == -1).all() and stats.top_share[~live].isnan().all()


def test_virtual_cosines_in_blocks_equal_the_dense_matrix(models):
    model = models["gpt_neo"]
    sae_a, sae_b = _sae(model, 0, seed=1), _sae(model, 1, seed=2)
    writes = F.normalize(sae_a.W_dec @ model.W_out[0], dim=-1)
    reads = F.normalize(model.W_in[1] @ sae_b.W_enc, dim=0)
    dense = writes @ reads  # [d_sae_a, d_sae_b]
    blocks = list(SF.virtual_cosine_blocks(model, sae_a, 0, sae_b, 1, block_rows=7))  # 7 does not divide d_sae
    assert [start for start, _ in blocks] == list(range(0, sae_a.cfg.d_sae, 7))
    assert torch.allclose(torch.cat([block for _, block in blocks]), dense, atol=1e-5)
    assert dense.abs().max() <= 1 + 1e-5
    top = torch.topk(dense.flatten(), 5)
    expected = [(int(i) // dense.shape[1], int(i) % dense.shape[1]) for i in top.indices]
    pairs = SF.top_virtual_pairs(model, sae_a, 0, sae_b, 1, 5, block_rows=7)
    assert [(row, col) for row, col, _ in pairs] == expected
    assert torch.allclose(torch.tensor([v for _, _, v in pairs]), top.values, atol=1e-5)
    assert torch.allclose(SF.virtual_cosines_into(model, sae_a, 0, sae_b, 1, [3, 9]), dense[:, [3, 9]], atol=1e-5)
    # top_pairs takes the column count from the matrix (the original notebook used the other SAE's size)
    rect = torch.zeros(3, 5)
    rect[2, 4], rect[1, 0] = 1.0, 0.5
    assert [(r, c) for r, c, _ in SF.top_pairs(rect, 2, row_offset=10)] == [(12, 4), (11, 0)]


def test_coactivation_and_token_statistics():
    acts = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]])
    corr = SF.coactivation(acts)
    assert torch.allclose(corr.diagonal(), torch.ones(2)) and torch.allclose(corr, corr.T)
    tokens = torch.tensor([[5, 6, 5, 7]])
    stats = SF.token_statistics(tokens, acts.T[None].transpose(1, 2), [0, 1])
    assert stats[0] == {"active": 4, "top_token": 5, "top_share": 0.5}
    assert stats[1]["active"] == 2 and stats[1]["top_token"] == 6
