"""The replay engine's runs after a shared prefix (`replay.share_prefix`, `hooked_logits`) equal whole runs on four
architectures, and compute only the prompt's positions."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import patching, replay
from helpers.core.components import Component
from helpers.models.load import load_model
from tests.conftest import ARCHITECTURES


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_runs_after_a_shared_prefix_equal_whole_runs_and_compute_only_the_prompt(architecture, tiny_checkpoint):
    """With a prefix registered (`replay.share_prefix`), `hooked_logits` of prompts that begin with it equals the
    whole run under hooks that leave the prefix as it is (mean ablation over prompts sharing it, neurons zeroed from
    the prompt on, reads at one position) and computes only the prompt's positions; a hook that changes the prefix
    (neurons zeroed everywhere), prompts without the prefix and a prefix too short to share run whole."""
    from helpers.techniques.ablation import ablation_hooks, neuron_mask_hooks, reference_activations
    from helpers.core.components import run_with_hooks, unembed_only_at

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, model.cfg.d_vocab, (10,), generator=generator)
    prompts = torch.randint(0, model.cfg.d_vocab, (5, 4), generator=generator)
    tokens = torch.cat([prefix.repeat(5, 1), prompts], dim=1)
    components = [Component.head(1, 2), Component.mlp(0), Component.neuron(1, 3)]
    means = reference_activations(model, tokens, components, "mean")
    mask = {1: torch.arange(model.cfg.d_mlp) < 5}
    leave_prefix = {"clean": [], "mean ablation": ablation_hooks(components, "mean", means),
                    "neurons from the prompt": neuron_mask_hooks(mask, None, from_position=10),
                    "read at one position": unembed_only_at(model, torch.full((5,), 12))}
    positions_run = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: positions_run.append(args[0].shape[1]))
    assert replay.share_prefix(model, prefix[:replay.MIN_SHARED_PREFIX - 1]) == 0
    try:
        assert replay.share_prefix(model, prefix) == 10
        replay.hooked_logits(model, tokens, [])   # the first run of a prompt length also checks one prompt
        for name, hooks in leave_prefix.items():
            expected = run_with_hooks(model, tokens, hooks)
            positions_run.clear()
            torch.testing.assert_close(replay.hooked_logits(model, tokens, hooks), expected, rtol=1e-4, atol=1e-5,
                                       msg=name)
            assert positions_run[-1] == 4 and set(positions_run) <= {4, 10}, name   # + the prefix's clean reads
        zeroed = neuron_mask_hooks(mask, None)
        changed = replay.hooked_logits(model, tokens, zeroed)
        torch.testing.assert_close(changed, run_with_hooks(model, tokens, zeroed))
        assert not torch.allclose(changed, run_with_hooks(model, tokens, []))
        other = tokens.flip(1)
        expected = model(other)
        positions_run.clear()
        torch.testing.assert_close(replay.hooked_logits(model, other, []), expected)
        assert positions_run == [14]
    finally:
        replay.share_prefix(model, None)
        handle.remove()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_attribution_after_a_shared_prefix_equals_the_whole_run(architecture, tiny_checkpoint):
    """Attribution patching of prompts that share a registered prefix equals the whole run's, whether the clean
    prompts share it too (run after the prefix, whose positions count 0) or not (run whole)."""
    model = load_model(tiny_checkpoint(architecture), device="cpu")
    generator = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, model.cfg.d_vocab, (10,), generator=generator)
    prompts = [torch.randint(0, model.cfg.d_vocab, (4, 4), generator=generator) for _ in range(2)]
    corrupted = torch.cat([prefix.repeat(4, 1), prompts[0]], dim=1)
    cleans = {"same prefix": torch.cat([prefix.repeat(4, 1), prompts[1]], dim=1),
              "other prefix": torch.randint(0, model.cfg.d_vocab, (4, 14), generator=generator)}
    answers = torch.randint(0, model.cfg.d_vocab, (4, 2), generator=generator)
    metric = patching.PositionalMetric([-1], lambda logits: (logits[:, 0].gather(1, answers)
                                                              @ torch.tensor([1.0, -1.0])).mean())
    names = [Component.neuron(1, 0).hook_name(), Component.head(0, 0).hook_name()]
    expected = {label: patching.attribution_patch(model, clean, corrupted, metric, names)
                for label, clean in cleans.items()}
    positions_run = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: positions_run.append(args[0].shape[1]))
    replay.share_prefix(model, prefix)
    try:
        for label, clean in cleans.items():
            positions_run.clear()
            after = patching.attribution_patch(model, clean, corrupted, metric, names)
            for name in names:
                torch.testing.assert_close(after[name], expected[label][name], rtol=1e-4, atol=1e-6,
                                           msg=f"{label}, {name}")
            assert (4 in positions_run) == (label == "same prefix"), label
    finally:
        replay.share_prefix(model, None)
        handle.remove()
