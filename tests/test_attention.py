"""Head views (helpers.techniques.attention) against the model's own cache, on every test architecture; the OV circuit
by hand under grouped-query attention."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques.attention import attention_from_last, mean_patterns, ov_transition
from tests.conftest import ARCHITECTURES, SYLLOGISM_PROMPTS


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model_and_tokens(request, tiny_checkpoint):
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(request.param), device="cpu")
    return model, model.to_tokens(SYLLOGISM_PROMPTS)


def test_attention_from_last_and_mean_patterns_read_the_pattern(model_and_tokens):
    model, tokens = model_and_tokens
    _, cache = model.run_with_cache(tokens)
    grid = attention_from_last(model, tokens, batch_size=3)          # two batches
    assert grid.shape == (model.cfg.n_layers, model.cfg.n_heads, len(tokens), tokens.shape[1])
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert torch.allclose(grid[1, 2], pattern[:, 2, -1], atol=1e-6)
    assert torch.allclose(grid.sum(-1), torch.ones_like(grid.sum(-1)), atol=1e-4)
    mean = mean_patterns(model, tokens, [(1, 2), (0, 0)])
    assert torch.allclose(mean[0], pattern[:, 2].mean(0), atol=1e-6)


def test_ov_transition_by_hand(model_and_tokens):
    model, _ = model_and_tokens
    ids = torch.tensor([3, 5, 7])
    layer, head = 1, model.cfg.n_heads - 1
    W_V = model.W_V[layer]
    kv_head = head // (model.cfg.n_heads // W_V.shape[0])        # GQA: the value head this query head reads
    x = model.W_U[:, ids].T
    expected = x @ W_V[kv_head] @ model.W_O[layer, head] @ model.W_U[:, ids]
    assert torch.allclose(ov_transition(model, layer, head, ids, source="unembed"), expected, atol=1e-4)
    assert ov_transition(model, layer, head, ids).shape == (3, 3)
    with pytest.raises(ValueError):
        ov_transition(model, layer, head, ids, source="neither")
