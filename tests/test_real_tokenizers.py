"""The task generators on the real models' tokenizers (fetched by `python -m helpers.sources.realsize fetch`)."""
from __future__ import annotations

import pytest
import torch

from helpers.sources import realsize
from helpers.tasks import arithmetic, stories, syllogisms


@pytest.fixture(scope="module")
def real_tokenizer():
    """`real_tokenizer(name)`: a real tokenizer, fetched (pinned, checksummed) if missing; fails, never skips."""

    def get(name: str):
        try:
            return realsize.load_tokenizer(name)
        except realsize.FixtureError as error:
            pytest.fail(f"{error}\nFetch the real tokenizers with: python -m helpers.sources.realsize fetch")

    return get


@pytest.mark.parametrize("name", list(realsize.TOKENIZERS))
def test_real_tokenizers_are_the_pinned_ones(real_tokenizer, name):
    tokenizer = real_tokenizer(name)
    for text, ids in realsize.TOKENIZERS[name].known_ids.items():
        assert tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids
    for target, digest in realsize.TOKENIZERS[name].files.values():
        assert realsize.sha256(realsize.tokenizer_dir(name) / target) == digest


def test_only_llama_3_prepends_bos_like_the_hub_tokenizers(real_tokenizer):
    assert real_tokenizer("llama-3")("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert real_tokenizer("gpt-neox-20b")("Hello world")["input_ids"] == [12092, 1533]
    assert real_tokenizer("gpt2")("Hello world")["input_ids"] == [15496, 995]


def test_syllogisms_on_the_gpt_neox_tokenizer_have_one_layout(real_tokenizer):
    tokenizer = real_tokenizer("gpt-neox-20b")
    data = syllogisms.build_dataset(tokenizer, syllogisms.make_syllogisms(n=400, seed=0))
    # the modal layout keeps 1 in 10 Pythia-tokenised prompts (the original notebook: 104 of a pool of 1440)
    assert len(data) >= 40
    assert data.clean_tokens.shape == data.corrupted_tokens.shape
    pos = data.positions
    assert torch.equal(data.clean_tokens[:, 0], torch.full((len(data),), tokenizer.bos_token_id))
    assert torch.equal(data.clean_tokens[:, pos["A"]], data.answers[:, 0])
    assert torch.equal(data.corrupted_tokens[:, pos["A"]], data.answers[:, 1])
    assert tokenizer.decode(data.clean_tokens[0, pos["final"]]) == " are"
    assert pos["final"] == data.clean_tokens.shape[1] - 1


def test_arithmetic_answers_are_single_llama_3_tokens(real_tokenizer):
    tokenizer = real_tokenizer("llama-3")
    assert arithmetic.max_single_token_number(tokenizer) == 999
    numbers = arithmetic.number_token_ids(tokenizer, 999)
    assert len(set(numbers.tolist())) == 1000
    assert [tokenizer.decode(int(numbers[n])) for n in (0, 7, 42, 999)] == ["0", "7", "42", "999"]
    prompts = arithmetic.all_prompts("+", max_op=50)
    tokens = arithmetic.prompt_tokens(tokenizer, prompts)
    assert tokens.shape == (len(prompts), 5) and (tokens[:, 0] == 128000).all()
    with pytest.raises(ValueError, match="1000 is not a single token"):
        arithmetic.number_token_ids(tokenizer, 1000)


def test_a_few_shot_prefix_comes_first_and_the_prompt_stays_last(real_tokenizer):
    """BOS, the prefix's own tokens, then the prompt's four (the same tokens as the whole text tokenized at once);
    a position name for each; a prefix that would merge into the prompt is refused, naming the parameter."""
    tokenizer = real_tokenizer("llama-3")
    prompts = arithmetic.all_prompts("+", max_op=10, max_single_token=9)
    for prepend_bos in (True, False):
        prompt_format = arithmetic.PromptFormat("3+4=7\n1+5=6\n", prepend_bos=prepend_bos)
        tokens = arithmetic.prompt_tokens(tokenizer, prompts, prompt_format)
        bare = arithmetic.prompt_tokens(tokenizer, prompts, arithmetic.PromptFormat(prepend_bos=False))
        assert bare.shape == (len(prompts), 4) and torch.equal(tokens[:, -4:], bare)
        whole = tokenizer(prompt_format.prefix + prompts.texts[5], add_special_tokens=False)["input_ids"]
        assert tokens[5, int(prepend_bos):].tolist() == whole
        names = prompt_format.position_names(tokenizer)
        assert len(names) == tokens.shape[1] and names[-4:] == arithmetic.PROMPT_POSITION_NAMES
        assert (names[0] == "BOS") == prepend_bos and (tokens[:, 0] == 128000).all() == prepend_bos
    with pytest.raises(ValueError, match="few_shot_prefix"):  # "=7" + "3+..." tokenizes as "=", "73", "+"
        arithmetic.prompt_tokens(tokenizer, prompts.subset([30]), arithmetic.PromptFormat("1+6=7"))


def test_closing_quote_is_one_gpt2_token(real_tokenizer):
    tokenizer = real_tokenizer("gpt2")
    for closing in stories.CLOSING_QUOTES:
        assert len(tokenizer.tokenize(closing)) == 1, closing
    prompts = stories.closing_quote_prompts(stories.generate_stories(40, seed=0), tokenizer)
    assert len(prompts.tokens) > 0
    assert (prompts.answers == tokenizer.convert_tokens_to_ids(tokenizer.tokenize('."'))[0]).all()
    assert (prompts.tokens[:, 0] == tokenizer.bos_token_id).all()
