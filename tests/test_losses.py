"""Per-token losses (helpers.techniques.losses): from logits in chunks, equal to cross-entropy; a clean pass and
hooked variants sharing it equal separate hooked runs, on every tiny architecture."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import ablation, losses


def test_losses_from_logits_equal_cross_entropy_whatever_the_chunk(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=generator)
    tokens = torch.randint(0, 11, (5, 7), generator=generator)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1),
                                                 reduction="none").view(5, 6)
    for chunk in (1, 77, 2 ** 24):  # one row at a time, a few rows, everything at once
        monkeypatch.setattr(losses, "LOSS_CHUNK", chunk)
        torch.testing.assert_close(losses.losses_from_logits(logits, tokens), expected)


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2", "llama", "gpt_neo"])
def test_token_losses_each_equal_separate_hooked_runs(architecture, tiny_checkpoint, monkeypatch):
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 9), generator=torch.Generator().manual_seed(0))
    variants = [ablation.neuron_value_hooks({(1, 3): 4.0}),                      # replayed from block 1
                ablation.neuron_value_hooks({(0, 2): -2.0, (1, 5): 1.0}),         # from block 0
                [("hook_embed", lambda act, hook: act * 0.5)],                    # outside the blocks: full run
                []]
    monkeypatch.setattr(losses, "LOGIT_ROWS_BUDGET", 2 * 9 * model.cfg.d_vocab)   # two rows at a time
    each = losses.token_losses_each(model, tokens, variants)
    assert each.shape == (1 + len(variants), 5, 8)
    torch.testing.assert_close(each[0], losses.token_losses(model, tokens))
    for row, hooks in enumerate(variants, start=1):
        torch.testing.assert_close(each[row], losses.token_losses(model, tokens, hooks), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(each[1], each[0])
