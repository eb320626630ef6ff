"""Contextual n-grams: words from byte-level tokens (toy and real GPT-NeoX tokenizers), a planted neuron that
completes a word only with context (and a planted suppressed one), and the model-facing pieces on every
architecture (a shift moves exactly one pre-activation; no intervention, no loss change)."""
from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from helpers.techniques.losses import token_losses
from helpers.studies import ngrams
from helpers.sources import realsize
from helpers.core.paths import MODELS_DIR
from tests.conftest import ARCHITECTURES


@pytest.fixture(scope="module")
def toy_tokenizer():
    return PreTrainedTokenizerFast(tokenizer_file=str(MODELS_DIR / "toy-bilingual" / "tokenizer.json"))


@pytest.fixture(scope="module")
def neox_tokenizer():
    try:
        return realsize.load_tokenizer("gpt-neox-20b")
    except realsize.FixtureError as error:
        pytest.fail(f"{error}\nFetch the real tokenizers with: python -m helpers.sources.realsize fetch")


TEXTS = [" Vorschläge für die Größe", " Zürich ist schön, über alles", " 5 € und 😀 dazu"]


@pytest.mark.parametrize("which", ["toy", "neox"])
def test_token_texts_keep_characters_whole_and_join_to_the_text(request, which):
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        texts = ngrams.token_texts(tokenizer, ids)
        assert len(texts) == len(ids)
        assert "".join(texts) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in texts)
    # the toy splits umlauts into two byte tokens: one carries the character, the other is empty
    if which == "toy":
        ids = tokenizer(" Vorschläge", add_special_tokens=False)["input_ids"]
        assert "ä" in ngrams.token_texts(tokenizer, ids) and "" in ngrams.token_texts(tokenizer, ids)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)      # what decoding one by one showed


@pytest.mark.parametrize("which", ["toy", "neox"])
def test_a_word_with_an_umlaut_is_one_word(request, which):
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    ids = tokenizer(" die Vorschläge kommen", add_special_tokens=False)["input_ids"]
    words = ngrams.word_index(tokenizer, torch.tensor([ids]))
    found = {words.word_at(0, pos).replace("|", "").strip() for pos in range(len(ids))} - {""}
    assert found == {"die", "Vorschläge", "kommen"}        # (the toy gives some spaces a token of their own)


def test_continuation_needs_letters_on_both_sides():
    assert ngrams.continuation_flags([" V", "orsch", "lä", "ge", ",", " und", "5", "x"]) == [
        False, True, True, True, False, False, False, False]
    assert ngrams.continuation_flags([" l", "ä", "", "ge"]) == [False, True, True, True]


# ---- a planted contextual n-gram ------------------------------------------------------------------------------------

def _planted_documents(n_docs: int = 8):
    """Documents `" ab|cd xy|zw ab|cd ..."`: texts, continuation flags, and a loss change that the planted neuron
    causes only at `cd`, the completion of `ab|cd` (the `zw` completion loses a little, everything else nothing)."""
    row = [" ab", "cd", " xy", "zw", " ab", "cd", " q", " xy", "zw"]
    texts = [list(row) for _ in range(n_docs)]
    flags = [ngrams.continuation_flags(r) for r in texts]
    words = ngrams.WordIndex(texts, torch.tensor(flags), [ngrams._words(t, f) for t, f in zip(texts, flags)])
    diff = torch.zeros(n_docs, len(row) - 1)            # entry i: predicting token i + 1
    diff[:, 0] = diff[:, 4] = 2.0                       # predicting "cd" after " ab"
    diff[:, 2] = diff[:, 7] = 0.25                      # predicting "zw" after " xy"
    inside = words.continuation[:, 1:].clone()
    return words, diff, inside


def test_the_planted_word_is_chosen_on_one_half_and_found_on_the_other():
    words, diff, inside = _planted_documents()
    search = (torch.arange(8) % 2 == 0)[:, None]
    assert words.word_at(0, 1) == " ab|cd" and words.word_at(0, 3) == " xy|zw" and words.word_at(0, 6) == " q"
    assert ngrams.choose_word(diff, inside, search, words) == " ab|cd"
    positions = ngrams.word_positions(words, inside, ~search, " ab|cd", max_rows=2)
    assert positions == [(1, 0), (1, 4), (3, 0), (3, 4)]
    assert ngrams.word_losses(diff, inside & search, words) == {" ab|cd": [2.0] * 8, " xy|zw": [0.25] * 8}
    # a word that occurs only in the search half cannot be chosen
    assert ngrams.choose_word(diff, inside & search, search, words) is None


def _test(shift: float, on: float, off: float, english: float, shift_loss: float) -> ngrams.NgramTest:
    return ngrams.NgramTest(5, 8, shift, " ab|cd", [(1, 0), (1, 4), (3, 0)], on, off, english, shift_loss,
                            diff=torch.zeros(1))


def test_only_with_context_means_on_in_german_off_without_the_context_and_off_in_english():
    assert _test(+1.0, on=1.6, off=0.2, english=0.0, shift_loss=6.0).passes            # the planted neuron
    assert not _test(+1.0, on=1.6, off=1.0, english=0.0, shift_loss=6.0).passes        # does not need the context
    assert not _test(+1.0, on=1.6, off=0.2, english=2.0, shift_loss=6.0).passes        # fires on English too
    assert not _test(+1.0, on=1.6, off=0.2, english=0.0, shift_loss=0.05).passes       # does not matter for the loss
    assert not _test(+1.0, on=-0.1, off=-0.1, english=-0.2, shift_loss=6.0).passes     # never on
    # the mirror image for a neuron the context suppresses
    assert _test(-1.0, on=-0.1, off=0.4, english=0.3, shift_loss=0.5).passes
    assert not _test(-1.0, on=0.3, off=0.4, english=0.5, shift_loss=0.5).passes        # barely suppressed
    assert not _test(-1.0, on=-0.1, off=0.4, english=-0.2, shift_loss=0.5).passes      # off in English too
    assert _test(+1.0, 1, 0, 0, 1).switched_on and not _test(-1.0, 0, 1, 1, 1).switched_on


def test_mean_at_reads_rows_by_document_number():
    values = torch.arange(12.0).reshape(3, 4)           # rows are documents 4, 7, 9
    assert ngrams.mean_at(values, [4, 7, 9], [(7, 1), (9, 3)]) == pytest.approx((5.0 + 11.0) / 2)


def test_candidates_rank_by_consistent_shift():
    from helpers.techniques.neurons import RunningStats

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen) * 0.1
    x[:, 2] += 3.0                  # large, consistent
    x[:, 4] -= 2.0                  # large, consistent, negative (suppressed)
    x[:, 5] = torch.randn(500, generator=gen) * 5        # large but noisy
    candidates = ngrams.rank_candidates({3: RunningStats().update(x)}, per_layer=3, total=2)
    assert [(c.layer, c.neuron) for c in candidates] == [(3, 2), (3, 4)]
    assert candidates[0].switched_on and not candidates[1].switched_on


# ---- on every architecture ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_checkpoint):
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint(request.param), device="cpu")
    tokens = model.to_tokens(["Das ist ein kleiner Test mit vielen deutschen", "All cats are red, not blue."])[:, :9]
    return model, tokens


def test_shift_moves_one_pre_activation_by_the_shift(tiny):
    model, tokens = tiny
    name = "blocks.1.mlp.hook_pre"
    with torch.no_grad():
        clean = model.run_with_cache(tokens, names_filter=name)[1][name]
        with model.hooks(fwd_hooks=ngrams.shift_hooks(1, 3, 0.75)):
            shifted = model.run_with_cache(tokens, names_filter=name)[1][name]
    assert torch.allclose(shifted[..., 3] - clean[..., 3], torch.full_like(clean[..., 3], 0.75), atol=1e-5)
    assert torch.equal(torch.cat([shifted[..., :3], shifted[..., 4:]], -1), torch.cat([clean[..., :3], clean[..., 4:]], -1))


def test_no_intervention_no_loss_change_and_a_shift_changes_the_loss(tiny):
    model, tokens = tiny
    none, change = ngrams.loss_changes(model, tokens, [[], ngrams.shift_hooks(1, 3, 50.0)], batch_size=1)
    assert torch.all(none == 0)
    assert change.shape == (2, tokens.shape[1] - 1) and change.abs().max() > 0
    expected = token_losses(model, tokens, ngrams.shift_hooks(1, 3, 50.0)) - token_losses(model, tokens)
    torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-5)
    activation = ngrams.neuron_activation(model, tokens, 1, 3, batch_size=1)
    assert activation.shape == tokens.shape


def test_prediction_difference_of_one_run_with_itself_is_zero(tiny):
    model, tokens = tiny
    same = ngrams.prediction_difference(model, tokens[:1], 4, [], [], k=3)
    assert same.top_a == same.top_b and all(v == 0 for _, v in same.raised + same.lowered)
    logprobs = torch.log_softmax(model(tokens[:1])[0, 4].float(), -1)
    assert [i for i, _ in same.top_a] == torch.topk(logprobs, 3).indices.tolist()
    moved = ngrams.prediction_difference(model, tokens[:1], 4, [], ngrams.shift_hooks(1, 3, 50.0), k=3)
    assert moved.raised[0][1] >= 0 >= moved.lowered[0][1]
    # only tokens above the log-probability floor in either run are listed, however few they are
    hooks = ngrams.shift_hooks(1, 3, 50.0)
    shifted = torch.log_softmax(model.run_with_hooks(tokens[:1], fwd_hooks=hooks)[0, 4].float(), -1)
    floor = float(logprobs.max()) - 1e-4
    plausible = {int(i) for i in torch.nonzero(torch.maximum(logprobs, shifted) > floor).flatten()}
    strict = ngrams.prediction_difference(model, tokens[:1], 4, [], hooks, k=3, min_logprob=floor)
    assert {i for i, _ in strict.raised} == {i for i, _ in strict.lowered} == plausible or len(plausible) > 3
    assert all(i in plausible for i, _ in strict.raised + strict.lowered)
