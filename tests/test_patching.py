"""The batched patching engine against transformer_lens.patching (run on the same TransformerBridge), plus
properties: clean-into-clean gives 1, path patching with identical senders changes nothing, attribution patching is
the directional derivative of the patch."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import transformer_lens.patching as tl_patching

from helpers import patching
from helpers.attribution import logit_diff
from helpers.components import Component
from helpers.models import load_model

SEQ_LEN = 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = load_model(tiny_checkpoint("gpt_neox"), device="cpu")
    # two short random prompts starting with BOS; the corrupted batch swaps them
    clean = torch.randint(1, model.cfg.d_vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    clean[:, 0] = model.tokenizer.bos_token_id
    corrupted = clean[[1, 0]]
    answers = torch.tensor([[5, 9], [9, 5]])
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_value = logit_diff(clean_logits, answers).item()
    corrupted_value = logit_diff(model(corrupted), answers).item()
    metric = patching.normalised_logit_diff(answers, clean_value, corrupted_value)
    return model, clean, corrupted, clean_cache, metric


@pytest.mark.parametrize("ours, theirs", [
    (patching.act_patch_resid_pre, tl_patching.get_act_patch_resid_pre),
    (patching.act_patch_attn_out, tl_patching.get_act_patch_attn_out),
    (patching.act_patch_mlp_out, tl_patching.get_act_patch_mlp_out),
])
def test_layer_pos_sweeps_equal_transformer_lens(setup, ours, theirs):
    model, _, corrupted, cache, metric = setup
    expected = theirs(model, corrupted, cache, metric)
    got = ours(model, corrupted, cache, metric, max_rows=2 * 5)  # several chunks, one partial
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.cpu().float(), atol=ATOL)


@pytest.mark.parametrize("site, by_position, theirs", [
    ("z", False, tl_patching.get_act_patch_attn_head_out_all_pos),
    ("q", False, tl_patching.get_act_patch_attn_head_q_all_pos),
    ("k", False, tl_patching.get_act_patch_attn_head_k_all_pos),
    ("v", False, tl_patching.get_act_patch_attn_head_v_all_pos),
    ("pattern", False, tl_patching.get_act_patch_attn_head_pattern_all_pos),
    ("z", True, tl_patching.get_act_patch_attn_head_out_by_pos),
    ("q", True, tl_patching.get_act_patch_attn_head_q_by_pos),
    ("k", True, tl_patching.get_act_patch_attn_head_k_by_pos),
    ("v", True, tl_patching.get_act_patch_attn_head_v_by_pos),
    ("pattern", True, tl_patching.get_act_patch_attn_head_pattern_by_pos),
])
def test_head_sweeps_equal_transformer_lens(setup, site, by_position, theirs):
    model, _, corrupted, cache, metric = setup
    expected = theirs(model, corrupted, cache, metric)
    got = patching.act_patch_heads(model, corrupted, cache, metric, site, by_position=by_position)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.cpu().float(), atol=ATOL)


def test_every_sweeps_equal_transformer_lens(setup):
    model, _, corrupted, cache, metric = setup
    expected = tl_patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    got = patching.act_patch_heads_every(model, corrupted, cache, metric)
    assert got.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(got, expected.cpu().float(), atol=ATOL)
    expected = tl_patching.get_act_patch_block_every(model, corrupted, cache, metric)
    got = patching.act_patch_block_every(model, corrupted, cache, metric)
    assert torch.allclose(got, expected.cpu().float(), atol=ATOL)


def test_clean_into_clean_is_one_everywhere(setup):
    model, clean, _, cache, metric = setup
    for result in (patching.act_patch_resid_pre(model, clean, cache, metric),
                   patching.act_patch_heads(model, clean, cache, metric, "z", by_position=True),
                   patching.act_patch_heads_every(model, clean, cache, metric)):
        assert torch.allclose(result, torch.ones_like(result), atol=ATOL)


def test_patch_components_matches_single_sweep(setup):
    model, _, corrupted, cache, metric = setup
    by_pos = patching.act_patch_heads(model, corrupted, cache, metric, "z", by_position=True)
    got = patching.patch_components(model, corrupted, cache, metric, [[Component.head(1, 2, position=3)],
                                                                      [Component.mlp(0, position=-1)]])
    assert got[0].item() == pytest.approx(by_pos[1, 3, 2].item(), abs=ATOL)
    mlp = patching.act_patch_mlp_out(model, corrupted, cache, metric)
    assert got[1].item() == pytest.approx(mlp[0, -1].item(), abs=ATOL)


def _path_patch_loop(model, clean, corrupted, metric, sender, receivers, site, sender_positions=None):
    """Unbatched reference: passes A/B (caches), C (frozen heads, sender corrupted, record), D (patch receivers)."""
    _, clean_cache = model.run_with_cache(clean)
    _, corrupt_cache = model.run_with_cache(corrupted)
    pos = slice(None) if sender_positions is None else list(sender_positions)
    hooks = []
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"

        def freeze(act, hook, name=name, layer=layer):
            act = clean_cache[name].clone()
            if sender.layer == layer:
                act[:, pos, sender.index] = corrupt_cache[name][:, pos, sender.index]
            return act

        hooks.append((name, freeze))
    recorded = {}
    names = {r.hook_name(site) for r in receivers}
    for name in names:
        hooks.append((name, lambda act, hook, name=name: recorded.__setitem__(name, act.clone()) or act))
    model.run_with_hooks(clean, fwd_hooks=hooks)
    grouped = defaultdict(list)
    for r in receivers:
        grouped[r.hook_name(site)].append(r.index_tuple(site))

    def write(act, hook, name):
        for index in grouped[name]:
            act[(slice(None),) + index] = recorded[name][(slice(None),) + index]
        return act

    logits = model.run_with_hooks(clean, fwd_hooks=[(n, lambda a, hook, n=n: write(a, hook, n)) for n in grouped])
    return float(metric(logits))


@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_path_patching_equals_unbatched_loop(setup, site):
    model, clean, corrupted, _, metric = setup
    receivers = [Component.head(1, 0, position=-1), Component.head(1, 3, position=4)]
    senders = [[Component.head(0, h)] for h in range(model.cfg.n_heads)]
    got = patching.path_patch(model, clean, corrupted, metric, receivers, site, senders, sender_positions=[3, 4, 5],
                              max_rows=6)
    expected = [_path_patch_loop(model, clean, corrupted, metric, s[0], receivers, site, [3, 4, 5]) for s in senders]
    assert torch.allclose(got, torch.tensor(expected), atol=ATOL)


def test_path_patching_identical_senders_change_nothing(setup):
    model, clean, corrupted, _, metric = setup
    receivers = [Component.head(1, h, position=-1) for h in range(model.cfg.n_heads)]
    same = patching.path_patch(model, clean, clean.clone(), metric, receivers, "k")
    assert same.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(same, torch.ones_like(same), atol=ATOL)
    # senders at position 0 (BOS), identical in the clean and corrupted prompts
    at_bos = patching.path_patch(model, clean, corrupted, metric, receivers, "q", sender_positions=[0])
    assert torch.allclose(at_bos, torch.ones_like(at_bos), atol=ATOL)


def _interpolated_metric(model, clean, corrupted, metric, name, alpha):
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n == name)

    def hook(act, hook):
        return act + alpha * (clean_cache[name] - act)

    return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))


def test_attribution_patching_is_directional_derivative(setup):
    model, clean, corrupted, _, metric = setup
    heads = patching.attribution_patch_heads(model, clean, corrupted, metric)
    neurons = patching.attribution_patch_neurons(model, clean, corrupted, metric)
    resid = patching.attribution_patch_layer_pos(model, clean, corrupted, metric, "resid_pre")
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert neurons.shape == (model.cfg.n_layers, model.cfg.d_mlp)
    assert resid.shape == (model.cfg.n_layers, clean.shape[1])
    eps = 1e-3
    for name, estimate in [("blocks.1.attn.hook_z", heads[1].sum()), ("blocks.0.mlp.hook_post", neurons[0].sum()),
                           ("blocks.1.hook_resid_pre", resid[1].sum())]:
        plus = _interpolated_metric(model, clean, corrupted, metric, name, eps)
        minus = _interpolated_metric(model, clean, corrupted, metric, name, -eps)
        derivative = (plus - minus) / (2 * eps)
        assert estimate.item() == pytest.approx(derivative, rel=2e-2, abs=1e-3)


def test_attribution_patching_exact_for_final_residual(setup):
    """resid_pre of layer 0 patched everywhere gives the clean run exactly; the estimate is first order, so only
    check that by-position head attributions sum to the all-position ones."""
    model, clean, corrupted, _, metric = setup
    by_pos = patching.attribution_patch_heads(model, clean, corrupted, metric, by_position=True)
    total = patching.attribution_patch_heads(model, clean, corrupted, metric)
    assert torch.allclose(by_pos.sum(1), total, atol=1e-6)
