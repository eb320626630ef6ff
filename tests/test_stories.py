"""The dialogue story generator, quote-closing prompts, the toy's tokenizer and the TinyStories loader."""
from __future__ import annotations

import re

import pytest

from helpers.core.paths import MODELS_DIR
from helpers.tasks.stories import (CLOSING_QUOTES, FORCED_TOKENS, closing_quote_prompts, generate_stories,
                                   load_tinystories, pack_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    from helpers.models.recipes.stories import build_tokenizer

    return build_tokenizer()


def test_generator_is_deterministic_and_seeded():
    assert generate_stories(20, seed=3) == generate_stories(20, seed=3)
    assert generate_stories(20, seed=3) != generate_stories(20, seed=4)
    # story i does not depend on how many stories were asked for
    assert generate_stories(5, seed=3) == generate_stories(20, seed=3)[:5]


def _quote_spans(text: str) -> list[tuple[int, int]]:
    """(open, close) character indices of every quote; asserts the quoting is well formed."""
    spans, open_at = [], None
    for i, char in enumerate(text):
        if char != '"':
            continue
        if open_at is None:
            assert i == 0 or text[i - 1] == " ", f"opening quote not after a space: {text[max(0, i - 20): i + 5]!r}"
            open_at = i
        else:
            assert text[i - 1] in ".!?,", f"closing quote not after punctuation: {text[max(0, i - 20): i + 5]!r}"
            spans.append((open_at, i))
            open_at = None
    assert open_at is None, "a quote is never closed"
    return spans


def test_stories_have_dialogue_and_narration_never_closes_a_quote():
    stories = generate_stories(300, seed=0)
    n_said_period = 0
    for story in stories:
        spans = _quote_spans(story)
        assert len(spans) >= 3
        outside = "".join(story[a:b] for a, b in zip([0] + [c + 1 for _, c in spans], [o for o, _ in spans] + [None]))
        assert '"' not in outside
        # narration sentences end in a plain "." outside the quotes
        assert re.search(r"[a-z]\.( |$)", outside)
        n_said_period += len(re.findall(r'said, "[^"]*\."', story))
    assert n_said_period >= 250  # on average almost one `said, "...."` per story
    # multi-sentence quotes exist
    assert any(re.search(r'"[^"]*[a-z][.!] [A-Z][^"]*"', story) for story in stories)


def test_forced_quote_tokens_are_single_tokens(tokenizer):
    for text in FORCED_TOKENS:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text
    pieces = tokenizer.tokenize('Tom said, "I love my ball." "Hi," Mia said. Ben asked, "Can I play?" "Wow!"')
    assert ' "' in pieces and '."' in pieces and ',"' in pieces and '?"' in pieces and '!"' in pieces


def test_committed_toy_tokenizer_has_single_quote_tokens():
    folder = MODELS_DIR / "toy-stories"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("toy-stories checkpoint not built")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for text in FORCED_TOKENS:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text


def test_pack_tokens_rows_start_with_bos(tokenizer):
    rows = pack_tokens(generate_stories(50, seed=1), tokenizer, 64)
    assert rows.shape[1] == 64 and len(rows) > 10
    assert (rows[:, 0] == tokenizer.bos_token_id).all()


def test_closing_quote_prompts_end_before_the_quote_opened_by_said(tokenizer):
    stories = generate_stories(200, seed=5)
    prompts = closing_quote_prompts(stories, tokenizer)
    period_quote = tokenizer.convert_tokens_to_ids('."')
    open_quote = tokenizer.convert_tokens_to_ids(' "')
    closing_ids = {tokenizer.convert_tokens_to_ids(c) for c in CLOSING_QUOTES}
    assert len(prompts) >= 150
    assert (prompts.answers == period_quote).all()
    for i in range(len(prompts)):
        row = prompts.tokens[i, : prompts.last_pos[i] + 1].tolist()
        assert row[0] == tokenizer.bos_token_id
        # the text continues with `."` right after the prompt
        story = stories[prompts.story_index[i]]
        assert story.startswith(prompts.texts[i] + '."')
        # the last quote opened in the prompt is still open and was opened by `said, "`
        last_open = max(p for p, t in enumerate(row) if t == open_quote)
        assert not any(t in closing_ids for t in row[last_open + 1:])
        assert prompts.texts[i][: prompts.texts[i].rindex('"')].endswith("said, ")
    # padding after the last position
    assert prompts.tokens.shape[1] == int(prompts.last_pos.max()) + 1


def test_other_closings_and_openers(tokenizer):
    stories = generate_stories(200, seed=5)
    question = closing_quote_prompts(stories, tokenizer, closings=('?"',), openers=("asked",))
    assert (question.answers == tokenizer.convert_tokens_to_ids('?"')).all() and len(question) > 20
    capped = closing_quote_prompts(stories, tokenizer, closings=CLOSING_QUOTES, openers=None, max_prompts=37)
    assert len(capped) == 37


def test_load_tinystories_from_local_files(tmp_path):
    import pandas as pd

    stories = ['Tom said, "Hi."', "Once upon a time, there was a cat.", 'Mia asked, "Why?"']
    parquet = tmp_path / "validation.parquet"
    pd.DataFrame({"text": stories}).to_parquet(parquet)
    assert load_tinystories(parquet) == stories
    assert load_tinystories(parquet, limit=2) == stories[:2]
    text = tmp_path / "valid.txt"
    text.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n", encoding="utf-8")
    assert load_tinystories(text) == stories
    with pytest.raises(ValueError):
        load_tinystories(tmp_path / "stories.csv")


def test_load_tinystories_from_hub_fails_clearly_offline():
    from helpers.core.hub import HubUnreachableError

    with pytest.raises(HubUnreachableError, match="offline"):
        load_tinystories()
