"""The component vocabulary: every kind's label parses back to the same component, every hook name the package
spells exists in a real TransformerBridge on every architecture, and `device_of` finds the weights' device."""
from __future__ import annotations

import pytest
import torch

from helpers.core.components import (KINDS, Component, as_components, device_of, final_resid_hook_name, hook_name,
                                hooks_on, labels, run_with_hooks)
from helpers.techniques import eap
from helpers.models.load import load_model
from tests.conftest import ARCHITECTURES

ONE_OF_EACH_KIND = [Component.head(3, 2), Component.attn(3), Component.mlp(3), Component.neuron(3, 669),
                    Component.resid(3), Component.resid(3, where="mid"), Component.resid(3, where="post"),
                    Component.embed(), Component.pos_embed(), Component.attn_bias(3), Component.unembed_bias()]
PARAMETER_KINDS = ("attn_bias", "unembed_bias")


def test_the_examples_cover_every_kind():
    assert sorted({component.kind for component in ONE_OF_EACH_KIND}) == sorted(KINDS)


@pytest.mark.parametrize("position", [None, 0, 4, -1])
@pytest.mark.parametrize("component", ONE_OF_EACH_KIND, ids=str)
def test_labels_round_trip(component, position):
    positioned = component.at(position)
    assert Component.from_label(positioned.label) == positioned
    assert str(positioned) == positioned.label
    assert positioned.label.endswith("" if position is None else f"@{position}")


def test_labels_are_the_documented_ones():
    assert labels(ONE_OF_EACH_KIND) == ["L3H2", "ATTN3", "MLP3", "L3N669", "RESID_PRE3", "RESID_MID3", "RESID_POST3",
                                        "EMBED", "POS_EMBED", "ATTN_BIAS3", "UNEMBED_BIAS"]
    assert as_components(["L3H2", Component.mlp(1), "attn_bias0@-1"]) == [
        Component.head(3, 2), Component.mlp(1), Component.attn_bias(0, position=-1)]


@pytest.mark.parametrize("label", ["L3", "MLP", "BIAS3", "EMBED3", "L3H", "ATTN3@x", "UNEMBED_BIAS2"])
def test_malformed_labels_raise(label):
    with pytest.raises(ValueError):
        Component.from_label(label)


def test_invalid_components_raise():
    for kind, layer, index in [("head", 1, None), ("mlp", None, None), ("mlp", 1, 3), ("embed", 0, None),
                               ("unembed_bias", 2, None), ("attn_bias", None, None), ("nonsense", 1, None)]:
        with pytest.raises(ValueError):
            Component(kind, layer, index)


def test_hook_names():
    assert Component.head(3, 2).hook_name() == "blocks.3.attn.hook_z"
    assert Component.head(3, 2).hook_name("k") == "blocks.3.attn.hook_k"
    assert Component.neuron(3, 669).hook_name() == "blocks.3.mlp.hook_post"
    assert Component.neuron(3, 669).hook_name("pre") == "blocks.3.mlp.hook_pre"
    assert Component.mlp(1).hook_name() == "blocks.1.hook_mlp_out"
    assert Component("resid", 2).hook_name() == "blocks.2.hook_resid_pre"
    assert Component.pos_embed().hook_name() == "hook_pos_embed"
    assert hook_name("attn_out", 2) == hook_name("attn", 2) == "blocks.2.hook_attn_out"
    assert hook_name("head", 0, "pattern") == "blocks.0.attn.hook_pattern"
    for bad in [lambda: hook_name("head", 0, "post"), lambda: hook_name("neuron", 0, "z"),
                lambda: hook_name("mlp", 0, "z"), lambda: hook_name("mlp"), lambda: hook_name("attn_bias", 0),
                lambda: Component.unembed_bias().hook_name(), lambda: Component.attn_bias(0).index_tuple()]:
        with pytest.raises(ValueError):
            bad()


def test_index_tuples():
    assert Component.head(1, 2, 5).index_tuple("pattern") == (2, 5)
    assert Component.head(1, 2, 5).index_tuple() == (5, 2)
    assert Component.neuron(1, 7).index_tuple() == (slice(None), 7)
    assert Component.embed(-1).index_tuple() == (-1,)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def bridge(request, tiny_checkpoint):
    return load_model(tiny_checkpoint(request.param), device="cpu")


def test_hook_names_exist_in_a_real_bridge(bridge):
    """Every activation kind's hook name, at every layer and site, is a hook of the bridge; indexing its cached
    activation with `index_tuple` picks the documented shape."""
    cfg = bridge.cfg
    hooks = bridge.hook_dict
    absent = set(PARAMETER_KINDS)
    if cfg.positional_embedding_type != "standard":
        absent.add("pos_embed")    # rotary positions: nothing is added to the embedding
    if cfg.parallel_attn_mlp:
        absent.add("resid_mid")    # GPT-NeoX: attention and MLP both read resid_pre
    for layer in range(cfg.n_layers):
        for component in ONE_OF_EACH_KIND:
            if component.kind in absent:
                continue
            layered = component if component.layer is None else Component(component.kind, layer, component.index)
            neuron_sites = ("post", "pre", "pre_linear") if cfg.gated_mlp else ("post", "pre")
            sites = {"head": ("z", "q", "k", "v", "pattern", "attn_scores"), "neuron": neuron_sites}
            for site in sites.get(component.kind, (None,)):
                assert layered.hook_name(site) in hooks, (layered, site)
    assert final_resid_hook_name(bridge) in hooks
    tokens = torch.arange(6)[None]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    head, neuron = Component.head(1, 1, position=-1), Component.neuron(0, 5, position=2)
    assert cache[head.hook_name()][(slice(None),) + head.index_tuple()].shape == (1, cfg.d_head)
    assert cache[head.hook_name("pattern")][(slice(None),) + head.index_tuple("pattern")].shape == (1, 6)
    assert cache[neuron.hook_name()][(slice(None),) + neuron.index_tuple()].shape == (1,)
    assert cache[hook_name("resid_pre", 1)].shape == (1, 6, cfg.d_model)


def test_device_of(bridge):
    assert device_of(bridge) == torch.device("cpu") == next(bridge.parameters()).device
    assert device_of(torch.nn.Linear(2, 2).to(torch.device("meta"))) == torch.device("meta")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")
    assert device_of(object()) == torch.device("cpu")


def test_run_with_hooks_equals_the_bridges_own(bridge):
    """Hooks by name, an alias and a split q input among them, are called once each in order, give the bridge's
    `run_with_hooks` logits, and are gone afterwards; a name filter goes to the bridge; an unknown name is named."""
    tokens = torch.arange(1, 7)[None]
    calls = []

    def shift(act, hook):
        calls.append(hook.name)
        return act + 0.5

    split = eap.supports_per_head_inputs(bridge)   # not GPT-Neo's attention
    names = [hook_name("resid_pre", 1), *(["blocks.0.attn.hook_q_input"] if split else []), hook_name("mlp", 0),
             hook_name("resid_pre", 1)]
    hooks = [(name, shift) for name in names]
    with torch.no_grad():
        bridge.set_use_split_qkv_input(split)
        try:
            expected = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
            expected_calls, calls[:] = list(calls), []
            got = run_with_hooks(bridge, tokens, hooks)
        finally:
            bridge.set_use_split_qkv_input(False)
        plain = bridge(tokens)
    assert calls == expected_calls and len(calls) == len(names)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(run_with_hooks(bridge, tokens, []), plain, rtol=0, atol=0)
    by_filter = run_with_hooks(bridge, tokens, [(lambda name: name == hook_name("mlp", 0), shift)])
    torch.testing.assert_close(by_filter, bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name("mlp", 0), shift)]))
    with pytest.raises(ValueError, match="blocks.0.hook_nothing"):
        with hooks_on(bridge, [("blocks.0.hook_nothing", shift)]):
            pass
