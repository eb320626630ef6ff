"""The batched patching engine against transformer_lens.patching (run on the same TransformerBridge), on GPT-2,
GPT-NeoX (rotary 0.25, parallel residual), Llama (grouped-query attention, 8 query / 2 key-value heads) and GPT-Neo
(local attention), plus properties: clean-into-clean gives 1, path patching with identical senders changes nothing,
attribution patching is the directional derivative of the patch.

transformer-lens 3.9's GPT-Neo bridge ignores what is written at `hook_pattern`, so TransformerLens's pattern
sweeps change nothing there; the reference for GPT-Neo's patterns is the Hugging Face attention itself, with the
attention weights replaced where it applies them (its `attn_dropout`, the identity in eval mode)."""
from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
import transformer_lens.patching as tl_patching

from helpers.techniques import patching, replay
from helpers.techniques.dla import logit_diff
from helpers.core.components import Component
from helpers.models.load import load_model
from tests.conftest import ARCHITECTURES

SEQ_LEN = 4
ATOL = 1e-5
TL_HEAD_SWEEPS = {  # (site, by_position) -> TransformerLens's single sweep
    ("z", False): tl_patching.get_act_patch_attn_head_out_all_pos,
    ("q", False): tl_patching.get_act_patch_attn_head_q_all_pos,
    ("k", False): tl_patching.get_act_patch_attn_head_k_all_pos,
    ("v", False): tl_patching.get_act_patch_attn_head_v_all_pos,
    ("pattern", False): tl_patching.get_act_patch_attn_head_pattern_all_pos,
    ("z", True): tl_patching.get_act_patch_attn_head_out_by_pos,
    ("q", True): tl_patching.get_act_patch_attn_head_q_by_pos,
    ("k", True): tl_patching.get_act_patch_attn_head_k_by_pos,
    ("v", True): tl_patching.get_act_patch_attn_head_v_by_pos,
    ("pattern", True): tl_patching.get_act_patch_attn_head_pattern_by_pos,
}
HEAD_CASES = list(TL_HEAD_SWEEPS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds overhead, and stalls the whole file when the other core is
    busy (about 20 times slower on a shared two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def setup(request, tiny_checkpoint):
    """`(arch, model, clean, corrupted, clean_cache, metric)`: two random prompts starting with BOS, swapped."""
    model = load_model(tiny_checkpoint(request.param), device="cpu")
    clean = torch.randint(1, model.cfg.d_vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    clean[:, 0] = model.tokenizer.bos_token_id
    corrupted = clean[[1, 0]]
    answers = torch.tensor([[5, 9], [9, 5]])
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_value = logit_diff(clean_logits, answers).item()
    corrupted_value = logit_diff(model(corrupted), answers).item()
    metric = patching.normalised_logit_diff(answers, clean_value, corrupted_value)
    return request.param, model, clean, corrupted, clean_cache, metric


class _ReplaceRows(torch.nn.Module):
    """Stands in for a Hugging Face attention's `attn_dropout`: returns the weights with `[:, *index]` from source."""

    def __init__(self, source: torch.Tensor, index: tuple):
        super().__init__()
        self.source, self.index = source, index

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.clone()
        weights[(slice(None),) + self.index] = self.source[(slice(None),) + self.index]
        return weights


@contextmanager
def _attention_weights_replaced(attention: torch.nn.Module, source: torch.Tensor, index: tuple):
    """Swap the module itself (pytest's monkeypatch would delete a submodule on undo)."""
    original = attention.attn_dropout
    attention.attn_dropout = _ReplaceRows(source, index)
    try:
        yield
    finally:
        attention.attn_dropout = original


def _hf_pattern_sweep(model, corrupted, cache, metric, by_position: bool) -> torch.Tensor:
    """GPT-Neo's pattern sweeps, one unbatched run per patch, patched inside the Hugging Face attention:
    `[n_layers, n_heads]` or `[n_layers, n_heads, dest_pos]`."""
    positions = [(p,) for p in range(corrupted.shape[1])] if by_position else [()]
    result = torch.empty(model.cfg.n_layers, model.cfg.n_heads, len(positions))
    for layer in range(model.cfg.n_layers):
        attention = model.blocks[layer].attn.original_component
        for head in range(model.cfg.n_heads):
            for i, pos in enumerate(positions):
                with _attention_weights_replaced(attention, cache[f"blocks.{layer}.attn.hook_pattern"], (head, *pos)):
                    result[layer, head, i] = float(metric(model(corrupted)))
    return result if by_position else result[..., 0]


@pytest.fixture(scope="module")
def reference(setup):
    """`reference(site, by_position)`: TransformerLens's head sweep on `setup`, run once (for GPT-Neo's patterns,
    `_hf_pattern_sweep`, since TransformerLens's pattern patch does nothing there)."""
    arch, model, _, corrupted, cache, metric = setup
    done: dict[tuple[str, bool], torch.Tensor] = {}

    def get(site: str, by_position: bool) -> torch.Tensor:
        if (site, by_position) not in done:
            if site == "pattern" and arch == "gpt_neo":
                done[site, by_position] = _hf_pattern_sweep(model, corrupted, cache, metric, by_position)
            else:
                done[site, by_position] = TL_HEAD_SWEEPS[site, by_position](model, corrupted, cache, metric).float()
        return done[site, by_position]

    return get


@pytest.fixture(scope="module")
def tl_block_every(setup):
    _, model, _, corrupted, cache, metric = setup
    return tl_patching.get_act_patch_block_every(model, corrupted, cache, metric).float()


def _assert_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.cpu().float(), atol=ATOL), (got - expected).abs().max()


# ---- activation patching against TransformerLens ------------------------------------------------------------------
@pytest.mark.parametrize("row, ours", enumerate([patching.act_patch_resid_pre, patching.act_patch_attn_out,
                                                 patching.act_patch_mlp_out]))
def test_layer_pos_sweeps_equal_transformer_lens(setup, tl_block_every, row, ours):
    _, model, _, corrupted, cache, metric = setup
    _assert_equal(ours(model, corrupted, cache, metric, max_rows=2 * 3), tl_block_every[row])  # chunks, one partial


def test_block_every_equals_transformer_lens(setup, tl_block_every):
    _, model, _, corrupted, cache, metric = setup
    _assert_equal(patching.act_patch_block_every(model, corrupted, cache, metric), tl_block_every)


@pytest.mark.parametrize("site, by_position", HEAD_CASES)
def test_head_sweeps_equal_transformer_lens(setup, reference, site, by_position):
    _, model, _, corrupted, cache, metric = setup
    got = patching.act_patch_heads(model, corrupted, cache, metric, site, by_position=by_position, max_rows=2 * 7)
    _assert_equal(got, reference(site, by_position))
    if site in ("k", "v"):  # one column per key/value head (2 for the Llama)
        assert got.shape[-1] == patching.n_kv_heads(model)


def test_heads_every_equals_transformer_lens(setup, reference):
    arch, model, _, corrupted, cache, metric = setup
    got = patching.act_patch_heads_every(model, corrupted, cache, metric)
    assert got.shape == (5, model.cfg.n_layers, model.cfg.n_heads)
    expected = tl_patching.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric).float()
    if arch == "gpt_neo":
        expected[4] = reference("pattern", False)
    _assert_equal(got, expected)


def test_heads_every_by_position_pads_kv_heads_like_transformer_lens(setup, reference):
    """TransformerLens's `get_act_patch_attn_head_by_pos_every` stacks its single sweeps, zero-padding k and v to
    n_heads; ours is its first four slices (z, q, k, v)."""
    _, model, _, corrupted, cache, metric = setup
    got = patching.act_patch_heads_every(model, corrupted, cache, metric, by_position=True)
    parts = [reference(site, True) for site in ("z", "q", "k", "v")]
    expected = torch.stack([torch.nn.functional.pad(p, (0, model.cfg.n_heads - p.shape[-1])) for p in parts])
    _assert_equal(got, expected)


# ---- the fast engine ----------------------------------------------------------------------------------------------
def test_every_architecture_takes_the_fast_path(setup, tl_block_every, monkeypatch):
    """The sweeps above compare the fast engine with TransformerLens: no variant of a resid or head sweep runs from
    the embedding (GPT-Neo's patterns do, through hook_z)."""
    _, model, _, corrupted, cache, metric = setup
    assert replay.fast_path(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a variant ran from the embedding")

    monkeypatch.setattr(patching, "_run_from_embedding", refuse)
    _assert_equal(patching.act_patch_resid_pre(model, corrupted, cache, metric), tl_block_every[0])
    patching.act_patch_heads(model, corrupted, cache, metric, "v", by_position=True)


def test_the_last_block_runs_its_mlp_only_where_the_metric_reads(setup):
    """Every architecture passes the trace's check that the last block's MLP at the read positions only gives the
    model's logits, so the sweeps above (equal to TransformerLens's) ran that way; not where every position is read
    or a hook sits after the last MLP."""
    _, model, _, corrupted, _, _ = setup
    n_pos, last = corrupted.shape[1], model.cfg.n_layers - 1
    trace = replay.Trace(model, corrupted, [n_pos - 1])
    assert trace.last_mlp_at_read
    assert trace._narrows_last_mlp(2, [(f"blocks.{last}.hook_resid_pre", None), (f"blocks.{last}.attn.hook_z", None)])
    for after in ("hook_mlp_out", "mlp.hook_post", "hook_resid_post"):
        assert not trace._narrows_last_mlp(2, [(f"blocks.{last}.{after}", None)])
    assert not replay.Trace(model, corrupted, list(range(n_pos)))._narrows_last_mlp(0, [])


def test_without_the_fast_path_it_warns_once_and_gives_the_same(setup, tl_block_every, monkeypatch):
    arch, model, _, corrupted, cache, metric = setup
    monkeypatch.setattr(replay, "_fast_path_problem", lambda model: "planted for the test")
    monkeypatch.delitem(replay._FAST_PATH, model, raising=False)  # probed already if an earlier test ran here
    with pytest.warns(UserWarning, match="planted for the test"):
        got = patching.act_patch_block_every(model, corrupted, cache, metric)
    _assert_equal(got, tl_block_every)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patching.act_patch_resid_pre(model, corrupted, cache, metric)
    monkeypatch.delitem(replay._FAST_PATH, model, raising=False)  # probed again for the tests after this one


def test_a_metric_is_given_only_the_positions_it_reads(setup):
    """A `PositionalMetric` gets `[batch, len(positions), vocab]`, equal to what a plain metric reads at those
    positions from the full logits; a plain metric gets every position."""
    _, model, _, corrupted, cache, _ = setup
    shapes = []

    def read(logits):
        shapes.append(tuple(logits.shape[1:]))
        return logits[:, 0, 3].mean() - logits[:, 1, 7].mean()

    positional = patching.PositionalMetric([1, -1], read)
    plain = lambda logits: logits[:, 1, 3].mean() - logits[:, -1, 7].mean()  # noqa: E731
    got = patching.act_patch_heads(model, corrupted, cache, positional, "z", by_position=True)
    assert set(shapes) == {(2, model.cfg.d_vocab)}
    expected = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, plain).float()
    _assert_equal(got, expected)


def test_path_patching_fast_equals_from_the_embedding(setup, monkeypatch):
    """Every sender head, senders at positions 1 and 2, receivers at two layers: the passes that start at the
    senders' layer and position give what full runs give."""
    _, model, clean, corrupted, _, metric = setup
    receivers = [Component.head(1, 0), Component.head(0, 1), Component.head(1, 2, position=2)]
    fast = {site: patching.path_patch(model, clean, corrupted, metric, receivers, site, sender_positions=[2, 1])
            for site in ("k", "v")}
    monkeypatch.setitem(replay._FAST_PATH, model, False)
    for site, value in fast.items():
        slow = patching.path_patch(model, clean, corrupted, metric, receivers, site, sender_positions=[2, 1])
        assert torch.allclose(value, slow, atol=ATOL), site
        assert (value[0] - 1).abs().max() > 1e-6, site  # layer-0 senders reach layer-1 keys and values (a little)
        assert torch.allclose(value[1], torch.ones_like(value[1]), atol=ATOL), site  # nothing after layer 1


# ---- attention patterns -------------------------------------------------------------------------------------------
def _uniform(pattern: torch.Tensor, hook=None) -> torch.Tensor:
    causal = torch.ones_like(pattern).tril()
    return causal / causal.sum(-1, keepdim=True)


def test_pattern_hook_is_read_back_by_the_other_architectures(setup):
    arch, model, _, corrupted, _, _ = setup
    if arch == "gpt_neo":
        pytest.skip("transformer-lens 3.9's GPT-Neo bridge drops hook_pattern writes (pattern_route 'z')")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    patched = model.run_with_hooks(corrupted, fwd_hooks=[(name, _uniform) for name in names])
    assert (patched - model(corrupted)).abs().max() > 1e-4
    assert patching.pattern_route(model) == "pattern"


def test_uniform_pattern_patch_changes_the_logits(setup):
    _, model, _, corrupted, _, _ = setup
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(corrupted, names_filter=lambda name: name in names)
    sources = {name: _uniform(cache[name]) for name in names}
    base = model(corrupted)
    every_head = [(name, (head,)) for name in names for head in range(model.cfg.n_heads)]
    changes = patching.run_patched_variants(model, corrupted, sources, [[], every_head],
                                            lambda logits: (logits - base).abs().max())
    assert changes[0] < 1e-6  # batching alone moves logits by float rounding only
    assert changes[1] > 1e-4


@pytest.mark.parametrize("by_position", [False, True])
def test_pattern_patching_through_z_is_exact(setup, reference, monkeypatch, by_position):
    """The hook_z detour GPT-Neo needs gives every architecture's pattern sweeps (GQA included)."""
    _, model, _, corrupted, cache, metric = setup
    monkeypatch.setitem(patching._PATTERN_ROUTES, model, "z")
    got = patching.act_patch_heads(model, corrupted, cache, metric, "pattern", by_position=by_position)
    _assert_equal(got, reference("pattern", by_position))


def test_pattern_patching_refused_when_the_hook_is_dropped_and_z_is_not_pattern_times_v(tiny_checkpoint):
    model = load_model(tiny_checkpoint("gpt_neo"), device="cpu")
    model.add_perma_hook("blocks.0.attn.hook_z", lambda z, hook: 2 * z)
    tokens = torch.arange(1, 1 + SEQ_LEN)[None]
    _, cache = model.run_with_cache(tokens)
    calls = []
    with pytest.raises(NotImplementedError, match="GPTNeoForCausalLM"):
        patching.act_patch_heads(model, tokens, cache, lambda logits: calls.append(1) or logits.sum(), "pattern")
    assert not calls


# ---- properties ---------------------------------------------------------------------------------------------------
def test_clean_into_clean_is_one_everywhere(setup):
    _, model, clean, _, cache, metric = setup
    for result in (patching.act_patch_resid_pre(model, clean, cache, metric),
                   patching.act_patch_heads(model, clean, cache, metric, "z", by_position=True),
                   patching.act_patch_heads(model, clean, cache, metric, "v", by_position=True),
                   patching.act_patch_heads_every(model, clean, cache, metric)[:, :, :patching.n_kv_heads(model)]):
        assert torch.allclose(result, torch.ones_like(result), atol=ATOL)


def test_patch_components_matches_single_sweeps(setup):
    _, model, _, corrupted, cache, metric = setup
    got = patching.patch_components(model, corrupted, cache, metric, [[Component.head(1, 2, position=3)],
                                                                      [Component.mlp(0, position=-1)]])
    by_pos = patching.act_patch_heads(model, corrupted, cache, metric, "z", by_position=True)
    assert got[0].item() == pytest.approx(by_pos[1, 3, 2].item(), abs=ATOL)
    mlp = patching.act_patch_mlp_out(model, corrupted, cache, metric)
    assert got[1].item() == pytest.approx(mlp[0, -1].item(), abs=ATOL)
    keys = patching.act_patch_heads(model, corrupted, cache, metric, "k")
    got = patching.patch_components(model, corrupted, cache, metric, [[Component.head(1, 1)]], "k")
    kv_head = 1 * patching.n_kv_heads(model) // model.cfg.n_heads  # head 1 reads key 1, or 0 (Llama: heads 0-3)
    assert got[0].item() == pytest.approx(keys[1, kv_head].item(), abs=ATOL)


def _path_patch_loop(model, clean, caches, metric, sender, receivers, site, sender_positions=None):
    """Unbatched reference: given passes A/B (`caches`: clean, corrupted), C (frozen heads, sender corrupted,
    record), D (patch receivers). A receiver's k/v is that of its key/value head, query heads grouped in order."""
    clean_cache, corrupt_cache = caches
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
        heads = recorded[r.hook_name(site)].shape[2]
        grouped[r.hook_name(site)].append((r.position, r.index * heads // model.cfg.n_heads))

    def write(act, hook, name):
        for index in grouped[name]:
            act[(slice(None),) + index] = recorded[name][(slice(None),) + index]
        return act

    logits = model.run_with_hooks(clean, fwd_hooks=[(n, lambda a, hook, n=n: write(a, hook, n)) for n in grouped])
    return float(metric(logits))


@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_path_patching_equals_unbatched_loop(setup, site):
    _, model, clean, corrupted, _, metric = setup
    receivers = [Component.head(1, 1, position=-1), Component.head(1, model.cfg.n_heads - 2, position=2)]
    senders = [[Component.head(0, h)] for h in range(model.cfg.n_heads)]
    got = patching.path_patch(model, clean, corrupted, metric, receivers, site, senders, sender_positions=[1, 2],
                              max_rows=6)
    caches = [model.run_with_cache(tokens)[1] for tokens in (clean, corrupted)]
    expected = [_path_patch_loop(model, clean, caches, metric, s[0], receivers, site, [1, 2]) for s in senders]
    assert torch.allclose(got, torch.tensor(expected), atol=ATOL)


def test_path_patching_identical_senders_change_nothing(setup):
    _, model, clean, corrupted, _, metric = setup
    receivers = [Component.head(1, h, position=-1) for h in range(model.cfg.n_heads)]
    same = patching.path_patch(model, clean, clean.clone(), metric, receivers, "k")
    assert same.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(same, torch.ones_like(same), atol=ATOL)
    # senders at position 0 (BOS), identical in the clean and corrupted prompts
    at_bos = patching.path_patch(model, clean, corrupted, metric, receivers, "v", sender_positions=[0])
    assert torch.allclose(at_bos, torch.ones_like(at_bos), atol=ATOL)


# ---- attribution patching -----------------------------------------------------------------------------------------
def _interpolated_metric(model, clean, corrupted, metric, name, alpha):
    """The metric with activation `name` moved `alpha` of the way from corrupted to clean, by the engine (so that
    patterns go through hook_z where the model ignores hook_pattern)."""
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n == name)
    _, corrupt_cache = model.run_with_cache(corrupted, names_filter=lambda n: n == name)
    source = corrupt_cache[name] + alpha * (clean_cache[name] - corrupt_cache[name])
    sites = ([(name, (head,)) for head in range(model.cfg.n_heads)] if name.endswith("hook_pattern")
             else [(name, (slice(None),))])
    return float(patching.run_patched_variants(model, corrupted, {name: source}, [sites], metric)[0])


def test_attribution_patching_is_directional_derivative(setup):
    _, model, clean, corrupted, _, metric = setup
    heads = {site: patching.attribution_patch_heads(model, clean, corrupted, metric, site)
             for site in ("z", "k", "pattern")}
    neurons = patching.attribution_patch_neurons(model, clean, corrupted, metric)
    resid = patching.attribution_patch_layer_pos(model, clean, corrupted, metric, "resid_pre")
    assert heads["z"].shape == heads["pattern"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert heads["k"].shape == (model.cfg.n_layers, patching.n_kv_heads(model))
    assert neurons.shape == (model.cfg.n_layers, model.cfg.d_mlp)
    assert resid.shape == (model.cfg.n_layers, clean.shape[1])
    eps = 1e-3
    for name, estimate in [("blocks.1.attn.hook_z", heads["z"][1].sum()), ("blocks.0.attn.hook_k", heads["k"][0].sum()),
                           ("blocks.0.attn.hook_pattern", heads["pattern"][0].sum()),
                           ("blocks.0.mlp.hook_post", neurons[0].sum()), ("blocks.1.hook_resid_pre", resid[1].sum())]:
        plus = _interpolated_metric(model, clean, corrupted, metric, name, eps)
        minus = _interpolated_metric(model, clean, corrupted, metric, name, -eps)
        derivative = (plus - minus) / (2 * eps)
        assert estimate.item() == pytest.approx(derivative, rel=2e-2, abs=1e-3), name


def test_attribution_patching_needs_no_parameter_gradients(setup):
    """A frozen model gives the same estimates: the gradients start at the hooked activations (GPT-Neo's patterns'
    at hook_z, since the tensor its hook_pattern reports is then cut off from the output)."""
    _, model, clean, corrupted, _, metric = setup
    sites = ("z", "k", "pattern")
    expected = [patching.attribution_patch_heads(model, clean, corrupted, metric, site) for site in sites]
    model.requires_grad_(False)
    try:
        got = [patching.attribution_patch_heads(model, clean, corrupted, metric, site) for site in sites]
    finally:
        model.requires_grad_(True)
    for site, value, reference in zip(sites, got, expected):
        assert torch.allclose(value, reference, atol=1e-6), site
        assert reference.abs().max() > 1e-5, site


def test_attribution_by_position_sums_to_all_positions(setup):
    _, model, clean, corrupted, _, metric = setup
    for site in ("z", "v"):
        by_pos = patching.attribution_patch_heads(model, clean, corrupted, metric, site, by_position=True)
        total = patching.attribution_patch_heads(model, clean, corrupted, metric, site)
        assert torch.allclose(by_pos.sum(1), total, atol=1e-6)


def test_a_metric_that_declares_its_tokens_reads_only_their_logits():
    logits = torch.randn(3, 5, 11)

    def read(chosen):
        assert chosen.shape == (3, 2, 2)
        return chosen[..., 0].sum() - chosen[..., 1].sum()

    metric = patching.PositionalMetric([-1, 1], read, tokens=torch.tensor([7, 2]))
    expected = logits[:, [4, 1]][..., 7].sum() - logits[:, [4, 1]][..., 2].sum()
    assert torch.allclose(metric(logits), expected)
    assert metric.select(logits).shape == (3, 2, 2)


# ---- plain metrics: what they read learned from their gradient, checked -----------------------------------------
def _plain_metrics(model, clean):
    """Plain `metric(logits)` functions of several reads; the last depends on position 1 only through an argmax
    (no gradient), which equals the clean run's there."""
    clean_top = model(clean)[:, 1].argmax(-1)
    return {
        "logit difference at the last position": lambda logits: (logits[:, -1, 5] - logits[:, -1, 9]).mean(),
        "two positions": lambda logits: logits[:, 1, 3].mean() - logits[:, -1, 7].mean(),
        "log-probability (every entry of a position)": lambda logits: logits.log_softmax(-1)[:, -1, 5].mean(),
        "every logit": lambda logits: logits.logsumexp(-1).mean(),
        "not differentiable": lambda logits: (logits[:, -1].argmax(-1) == 5).float().mean(),
        "an argmax beside a gradient": lambda logits: (logits[:, -1, 5].mean()
                                                       + (logits[:, 1].argmax(-1) == clean_top).float().mean()),
    }


PLAIN_METRICS = ["logit difference at the last position", "two positions", "log-probability (every entry of a "
                 "position)", "every logit", "not differentiable", "an argmax beside a gradient"]


@pytest.mark.parametrize("which", PLAIN_METRICS)
def test_a_plain_metric_gives_transformer_lens_result(setup, which):
    """Whatever a plain metric reads, the sweep (which narrows the unembedding to what `learn_reads` finds) equals
    TransformerLens's, which computes every logit."""
    _, model, clean, corrupted, cache, _ = setup
    metric = _plain_metrics(model, clean)[which]
    got = patching.act_patch_resid_pre(model, corrupted, cache, metric)
    _assert_equal(got, tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric).float())
    got = patching.act_patch_heads(model, corrupted, cache, metric, "z", by_position=True)
    _assert_equal(got, tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric).float())


def test_learned_reads_are_the_narrowest_that_give_the_metric(setup):
    _, model, clean, corrupted, _, _ = setup
    metrics = _plain_metrics(model, clean)
    runs = [model(corrupted), model(clean)]
    learned = {which: patching.learn_reads(metric, runs) for which, metric in metrics.items()}
    n_pos = SEQ_LEN
    assert (learned["logit difference at the last position"].positions, learned["logit difference at the last "
            "position"].tokens) == ((n_pos - 1,), [5, 9])
    assert (learned["two positions"].positions, learned["two positions"].tokens) == ((1, n_pos - 1), [3, 7])
    log_probability = learned["log-probability (every entry of a position)"]
    assert (log_probability.positions, log_probability.tokens) == ((n_pos - 1,), None)
    for which in ("every logit", "not differentiable", "an argmax beside a gradient"):
        assert learned[which] is metrics[which], which  # falls back: every logit
    for which, metric in learned.items():
        for logits in runs:
            assert float(metric(logits)) == pytest.approx(float(metrics[which](logits)), abs=1e-6)


def test_learned_reads_fall_back_for_a_metric_that_changes_its_input():
    def clipping(logits):
        logits.clamp_(max=0.0)
        return logits[:, -1, 2].mean()

    assert patching.learn_reads(clipping, [torch.randn(2, 3, 11)]) is clipping


def test_path_patching_with_a_plain_metric_equals_the_declared_one(setup):
    _, model, clean, corrupted, _, metric = setup
    receivers = [Component("head", model.cfg.n_layers - 1, 0)]
    declared = patching.path_patch(model, clean, corrupted, metric, receivers, "q")
    plain = patching.path_patch(model, clean, corrupted, lambda logits: metric(logits), receivers, "q")
    _assert_equal(plain, declared)


# ---- screened sweeps (attribution patching ranks, exact patching verifies the top) -------------------------------
@pytest.mark.parametrize("site, by_position", [("z", True), ("pattern", False), ("v", True)])
def test_screened_sweep_is_exact_on_the_top_estimates_and_the_estimate_elsewhere(setup, reference, site, by_position):
    arch, model, clean, corrupted, cache, metric = setup
    sweep = patching.head_sweep(model, site, by_position, range(clean.shape[1]))
    top = max(1, len(sweep.sites) // 4)
    screened = patching.run_sweep(model, corrupted, cache, metric, sweep, exact_top=top)
    estimate = patching.attribution_patch_heads(model, clean, corrupted, metric, site, by_position)
    assert screened.baseline == pytest.approx(float(metric(model(corrupted))), abs=1e-6)
    assert torch.allclose(screened.estimate - screened.baseline, estimate, atol=1e-5)
    full = reference(site, by_position)
    exact = screened.exact
    assert int(exact.sum()) == top
    _assert_equal(screened.values[exact], full[exact])
    assert torch.equal(screened.values[~exact], screened.estimate[~exact])
    # the verified sites are those of largest estimated |effect|
    effect = (screened.estimate - screened.baseline).abs()
    assert effect[exact].min() >= effect[~exact].max() - 1e-7


def test_screened_sweep_agreement_is_spearman_and_pearson(setup, tl_block_every):
    _, model, clean, corrupted, cache, metric = setup
    sweep = patching.layer_pos_sweep(model, patching.BLOCK_HOOKS, range(clean.shape[1]))
    screened = patching.run_sweep(model, corrupted, cache, metric, sweep, exact_top=len(sweep.sites) // 2)
    exact = screened.exact
    _assert_equal(screened.values[exact], tl_block_every[exact])
    stats = pytest.importorskip("scipy.stats")
    estimated = (screened.estimate[exact] - screened.baseline).double().numpy()
    measured = (screened.values[exact] - screened.baseline).double().numpy()
    assert screened.agreement["rank_correlation"] == pytest.approx(stats.spearmanr(estimated, measured)[0], abs=1e-6)
    assert screened.agreement["correlation"] == pytest.approx(stats.pearsonr(estimated, measured)[0], abs=1e-6)
    assert "patched exactly" in screened.describe()


def test_a_sweep_without_screening_patches_every_site(setup, tl_block_every):
    _, model, clean, corrupted, cache, metric = setup
    sweep = patching.layer_pos_sweep(model, patching.BLOCK_HOOKS, range(clean.shape[1]))
    for exact_top in (None, len(sweep.sites)):
        result = patching.run_sweep(model, corrupted, cache, metric, sweep, exact_top=exact_top)
        assert result.estimate is None and bool(result.exact.all())
        _assert_equal(result.values, tl_block_every)
    with pytest.raises(ValueError, match="exact_top=0"):
        patching.run_sweep(model, corrupted, cache, metric, sweep, exact_top=0)

