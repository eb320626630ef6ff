"""Sparse autoencoders: shapes, splice/ablation hooks, training, caching, and the SAELens on-disk format."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sae_lens")  # the SAE notebook's stack; absent in the transformer-lens 4 environment

from helpers.techniques import sae as S  # noqa: E402
from helpers.techniques import sae_training as T  # noqa: E402
from tests.conftest import ARCHITECTURES  # noqa: E402

HOOK = "blocks.1.mlp.hook_post"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from helpers.models.load import load_model

    return load_model(tiny_checkpoint("gpt_neo"), device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(1, model.cfg.d_vocab, (24, 16), generator=generator)
    rows[:, 0] = 0  # BOS
    return rows


@pytest.fixture(scope="module")
def trained(model, tokens):
    config = T.SAETrainConfig(expansion_factor=2, l1_coefficient=0.5, steps=40, batch_size=64, model_batch_size=24,
                              buffer_rows=24, resample_steps=(20,), dead_window=10, seed=1)
    saes, stats = T.train_saes(model, tokens, ["blocks.0.mlp.hook_post", HOOK], config, model_name="tiny",
                               progress=False)
    return saes, stats, config


def test_encode_decode_shapes():
    sae = T.new_sae(64, 256, hook_name=HOOK, model_name="tiny")
    x = torch.randn(3, 7, 64)
    acts = sae.encode(x)
    assert acts.shape == (3, 7, 256) and (acts >= 0).all()
    assert sae.decode(acts).shape == (3, 7, 64)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(256), atol=1e-5)


def test_training_one_sae_per_hook(trained, model):
    saes, stats, config = trained
    d_mlp = model.cfg.d_mlp
    for name, sae in saes.items():
        assert sae.cfg.d_in == d_mlp and sae.cfg.d_sae == 2 * d_mlp
        assert sae.cfg.metadata.hook_name == name
        assert len(stats[name].mse) == config.steps
        assert stats[name].mse[-1] < stats[name].mse[0]  # it learns
        assert 20 in stats[name].resampled
        # decoder rows had unit norm on the scaled inputs; folding the scale leaves them all equal
        norms = sae.W_dec.norm(dim=-1)
        assert torch.allclose(norms, torch.full_like(norms, 1 / stats[name].scale), rtol=1e-4)


def test_training_is_deterministic(model, tokens):
    config = T.SAETrainConfig(expansion_factor=1, steps=6, batch_size=64, model_batch_size=24, buffer_rows=24,
                              resample_steps=(3,), dead_window=1, seed=4)
    once, _ = T.train_saes(model, tokens, [HOOK], config, progress=False)
    twice, _ = T.train_saes(model, tokens, [HOOK], config, progress=False)
    assert torch.equal(once[HOOK].W_enc, twice[HOOK].W_enc) and torch.equal(once[HOOK].b_dec, twice[HOOK].b_dec)


def test_reconstruction_with_error_term_leaves_logits_unchanged(trained, model, tokens):
    saes, _, _ = trained
    clean = model(tokens)
    for name, sae in saes.items():
        patched = model.run_with_hooks(tokens, fwd_hooks=[(name, S.splice_hook(sae, error_term=True))])
        assert torch.allclose(patched, clean, atol=1e-4, rtol=1e-4)
        # without the error term the logits do change
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(name, S.splice_hook(sae))])
        assert not torch.allclose(spliced, clean, atol=1e-4)


def test_ablating_a_zero_feature_changes_nothing(trained, model, tokens):
    saes, _, _ = trained
    sae = saes[HOOK]
    acts = S.feature_activations(model, sae, tokens)
    peak = acts.amax(dim=(0, 1))
    silent = int((peak == 0).nonzero()[0]) if (peak == 0).any() else None
    if silent is None:  # make one silent
        silent = 0
        with torch.no_grad():
            sae.b_enc[silent] = -1e6
    clean = model(tokens)
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, S.feature_ablation_hook(sae, [silent]))])
    assert torch.equal(ablated, clean)
    # ablating the most active feature does change the logits, and only from its position on
    busy = int(peak.argmax())
    row, pos = divmod(int(acts[..., busy].flatten().argmax()), tokens.shape[1])
    changed = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, S.feature_ablation_hook(sae, [busy]))])
    assert not torch.allclose(changed, clean)
    only_there = model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, S.feature_ablation_hook(sae, [busy], positions=torch.full((len(tokens),), pos)))])
    assert torch.equal(only_there[:, :pos], clean[:, :pos])


def test_save_load_round_trip_through_sae_lens(trained, tmp_path):
    from sae_lens import SAE

    saes, _, _ = trained
    sae = saes[HOOK]
    folder = S.save_sae(sae, tmp_path / "sae")
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    loaded = SAE.load_from_disk(folder)
    assert type(loaded).__name__ == "StandardSAE"
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.d_sae == sae.cfg.d_sae
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(5, sae.cfg.d_in).abs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(S.load_sae(folder).decode(sae.encode(x)), sae.decode(sae.encode(x)))


def test_published_release_needs_network():
    from helpers.core.hub import HubUnreachableError

    with pytest.raises(HubUnreachableError, match="offline"):
        S.load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    with pytest.raises(ValueError, match="sae_id"):
        S.load_sae("gpt2-small-res-jb")


def test_cached_saes_train_once(model, tokens, tmp_path, monkeypatch):
    config = T.SAETrainConfig(expansion_factor=1, steps=5, batch_size=32, model_batch_size=8, buffer_rows=8,
                              resample_steps=())
    calls = []
    real = T.train_saes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_saes", counting)
    first, stats = T.cached_saes(model, tokens, [HOOK], config, cache_dir=tmp_path, progress=False)
    second, stats2 = T.cached_saes(model, tokens, [HOOK], config, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    assert torch.equal(first[HOOK].W_enc, second[HOOK].W_enc) and stats.keys() == stats2.keys()
    T.cached_saes(model, tokens, [HOOK], T.SAETrainConfig(**{**config.__dict__, "seed": 9}), cache_dir=tmp_path,
                  progress=False)
    assert len(calls) == 2  # a different config is a different key


def test_metrics_and_loss_recovered(trained, model, tokens):
    saes, _, _ = trained
    metrics = S.sae_metrics(model, saes[HOOK], tokens)
    assert 0 <= metrics.dead_fraction <= 1 and metrics.l0 > 0 and metrics.mse >= 0
    assert metrics.loss_recovered == pytest.approx(
        S.loss_recovered(metrics.loss_clean, metrics.loss_spliced, metrics.loss_zero))
    assert S.loss_recovered(2.0, 2.0, 3.0) == 1.0 and S.loss_recovered(2.0, 3.0, 3.0) == 0.0
    # loss at one position per prompt, zero-ablating only there
    last = torch.full((len(tokens),), tokens.shape[1] - 2)
    answers = tokens[:, -1]
    clean = S.answer_losses(S.logprobs_at(model, tokens, last), answers)
    zero = S.answer_losses(S.logprobs_at(model, tokens, last, lambda rows, pos: [(HOOK, S.replace_hook(0.0, pos))]),
                           answers)
    assert clean.shape == (len(tokens),) and not torch.allclose(clean, zero)


def test_measures_at_one_position(trained, model, tokens):
    """`logits_at` under a hook at each prompt's position, the answer's logprob / logit / rank, and the original
    notebook's original-minus-ablated changes with intervals from the prompts actually used."""
    saes, _, _ = trained
    sae = saes[HOOK]
    positions = torch.arange(len(tokens)) % (tokens.shape[1] - 2) + 1
    answers = tokens[torch.arange(len(tokens)), positions + 1]
    clean_logits = S.logits_at(model, tokens, positions, batch_size=5)
    full = model(tokens)[torch.arange(len(tokens)), positions]
    assert torch.allclose(clean_logits, full, atol=1e-4)
    assert torch.allclose(S.logprobs_at(model, tokens, positions), clean_logits.log_softmax(-1), atol=1e-5)
    clean = S.answer_measures(clean_logits, answers)
    expected_rank = torch.tensor([(row > row[a]).sum().item() for row, a in zip(clean_logits, answers)]).float()
    assert torch.equal(clean["rank"], expected_rank)
    assert torch.allclose(clean["logit"], clean_logits[torch.arange(len(tokens)), answers])
    assert torch.allclose(-clean["logprob"], S.answer_losses(clean_logits.log_softmax(-1), answers))
    zero = S.answer_measures(S.logits_at(model, tokens, positions, S.at_positions(
        HOOK, lambda pos: S.replace_hook(0.0, pos))), answers)
    assert not torch.allclose(zero["logit"], clean["logit"])
    changes = S.measure_changes(clean, zero)
    difference = clean["logit"] - zero["logit"]
    assert changes["logit"][0] == pytest.approx(difference.mean().item(), abs=1e-5)
    assert changes["logit"][1] == pytest.approx(1.96 * difference.std().item() / len(tokens) ** 0.5, abs=1e-5)
    assert S.measure_changes(clean, clean)["rank"] == (0.0, 0.0)
    kept = S.logits_at(model, tokens, positions, S.at_positions(HOOK, lambda pos: S.splice_hook(
        sae, positions=pos, error_term=True)))
    assert torch.allclose(kept, clean_logits, atol=1e-4)


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2", "llama", "gpt_neo"])
def test_logits_at_unembed_only_the_positions_asked_and_equal_the_full_run(architecture, tiny_checkpoint):
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([8, 2, 5, 8, 0, 3])
    seen = []
    model.unembed.hook_out.add_hook(lambda act, hook: seen.append(act.shape))
    try:
        logits = S.logits_at(model, tokens, positions, batch_size=4)
    finally:
        model.unembed.hook_out.remove_hooks()
    torch.testing.assert_close(logits, model(tokens)[torch.arange(6), positions], rtol=1e-5, atol=1e-5)
    assert all(shape[1] == 1 for shape in seen)   # one position per row reached the unembedding


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt2", "llama", "gpt_neo"])
def test_logits_at_each_equal_logits_at_under_each_intervention(architecture, tiny_checkpoint):
    """The suffix replay (one clean run per chunk, each intervention rerun from its prompt's position and its
    layer on) gives `logits_at`'s logits, prompts of different lengths in one chunk included."""
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (7, 10), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([9, 4, 6, 9, 5, 7, 8])
    hook = "blocks.1.mlp.hook_post"
    variants = [None, S.at_positions(hook, lambda pos: S.replace_hook(0.0, pos)),
                S.at_positions("blocks.0.mlp.hook_post", lambda pos: S.replace_hook(1.5, pos)),
                S.at_positions("hook_embed", lambda pos: S.replace_hook(0.0, pos))]   # not replayable: a full run
    each = S.logits_at_each(model, tokens, positions, variants, batch_size=4)
    for hooks_for, logits in zip(variants, each):
        torch.testing.assert_close(logits, S.logits_at(model, tokens, positions, hooks_for), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(each[1], each[0])


def test_token_attribution_at_sums_to_the_answer_logit(model, tokens):
    from helpers.techniques.dla import token_attribution_at

    positions = torch.arange(len(tokens)) % (tokens.shape[1] - 1)
    answers = tokens[torch.arange(len(tokens)), positions + 1]
    logits, cache = model.run_with_cache(tokens)
    attribution = token_attribution_at(model, cache, answers, positions)
    expected = logits[torch.arange(len(tokens)), positions, answers]
    assert attribution.per_prompt.shape == (len(attribution.labels), len(tokens))
    assert "L1H0" in attribution.labels and "MLP1" in attribution.labels
    assert torch.allclose(attribution.per_prompt.sum(0), expected, atol=1e-3)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activations_are_collected_from_a_pass_that_stops_after_the_last_hooked_layer(tiny_checkpoint, architecture):
    from helpers.core.components import hook_name, layers_needed
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = model.to_tokens(["All cats are red, not blue.", "Tom said, \"Let us go to the park.\""])
    first = hook_name("neuron", 0)
    _, full = model.run_with_cache(tokens)
    collected = S.collect_activations(model, tokens, [first])[first]
    assert torch.allclose(collected, full[first][:, 1:].reshape(-1, model.cfg.d_mlp).float(), atol=1e-6)
    assert layers_needed([first, hook_name("neuron", 1)]) == 2
    assert layers_needed([first, "hook_embed"]) == 1          # the embedding needs no block
    assert layers_needed([first, "ln_final.hook_scale"]) is None and layers_needed(["hook_embed"]) is None
