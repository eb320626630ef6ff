"""Stories with dialogue: a deterministic TinyStories-like generator, quote-closing prompts, and a TinyStories loader.

The generator writes short past-tense stories about a small cast of children and animals with many dialogue turns:
`Tom said, "Look at the big kite."`, `Mia asked, "Can we play?"`, `"Thank you, Spot," Lily said.`, multi-sentence
quotes (`Ben replied, "Thank you, Mia. I clean it every day."`) and narration sentences that end in a plain `.`
and never close a quote (`Mom said that they could go.`). It guarantees thousands of `said, "...."` closing
positions, the object of the quotation notebook.

`closing_quote_prompts` turns token sequences into prompts that end just before a closing-quote token, checking
that the quote being closed is the one opened after a speech verb (the original notebook matched the first `."` after
`said, "`, which could close a different quote). `load_tinystories` reads the real corpus from a local parquet or
text file, or from the Hugging Face hub for users with network.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary of the generator
# ----------------------------------------------------------------------------------------------------------------
GIRLS = ("Lily", "Mia", "Anna", "Sue", "Lucy", "Zoe", "Amy", "Kate", "Ella", "Rose")
BOYS = ("Tom", "Ben", "Sam", "Max", "Tim", "Jack", "Leo", "Bob", "Dan", "Joe")
PETS = (("Spot", "dog"), ("Kitty", "cat"), ("Fluffy", "bunny"), ("Tweety", "bird"), ("Hoppy", "frog"),
        ("Buzz", "bee"), ("Daisy", "duck"), ("Bruno", "bear"))
PARENTS = ("Mom", "Dad", "Grandma", "Grandpa")
OBJECTS = ("ball", "toy", "kite", "car", "box", "hat", "cake", "book", "doll", "truck", "boat", "drum", "cup",
           "shoe", "apple", "flower", "rock", "stick", "bike", "treasure", "cheese", "shell", "key", "map")
PLACES = ("park", "garden", "house", "forest", "school", "pond", "beach", "hill", "farm", "shop", "river", "yard")
SPOTS = ("door", "hive", "tree", "bed", "table", "fence", "mud", "sand", "grass", "bush", "chair", "window")
ADJECTIVES = ("big", "red", "shiny", "little", "soft", "blue", "new", "pretty", "old", "funny", "green", "bright")
FEELINGS = ("happy", "sad", "scared", "excited", "tired", "hungry", "angry", "proud", "sorry", "glad")
ADVERBS = ("here", "today", "now", "there", "again", "too", "outside", "inside", "later", "soon")
PLAY_VERBS = ("play", "run", "jump", "dance", "swim", "sing", "read", "draw", "hide", "climb")
PAST_VERBS = ("played", "ran", "jumped", "danced", "swam", "sang", "read", "drew", "hid", "climbed")
SPEECH_VERBS = ("said", "replied", "shouted", "whispered", "answered", "cried")
QUESTION_VERBS = ("asked", "wondered")


@dataclass(frozen=True)
class _Character:
    name: str
    pronoun: str  # he / she / it
    possessive: str  # his / her / its
    kind: str  # girl / boy / dog ...


def _cast(rng: random.Random) -> list[_Character]:
    girl = rng.choice(GIRLS)
    boy = rng.choice(BOYS)
    pet_name, pet_kind = rng.choice(PETS)
    people = [_Character(girl, "she", "her", "girl"), _Character(boy, "he", "his", "boy"),
              _Character(pet_name, "it", "its", pet_kind)]
    rng.shuffle(people)
    return people


# ----------------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------------
def _statement(rng: random.Random, me: _Character, you: _Character) -> str:
    """One spoken sentence without its final punctuation (present tense, first/second person)."""
    obj, adj, place, spot, adv = (rng.choice(OBJECTS), rng.choice(ADJECTIVES), rng.choice(PLACES),
                                  rng.choice(SPOTS), rng.choice(ADVERBS))
    feeling, play = rng.choice(FEELINGS), rng.choice(PLAY_VERBS)
    templates = (
        f"I want to {play} with the {obj}",
        f"Look at the {adj} {obj}",
        f"Let's go to the {place}",
        f"Thank you, {you.name}",
        f"I love my {adj} {obj}",
        f"The {obj} is under the {spot}",
        f"I found the {obj} {adv}",
        f"Don't go near the {spot}",
        f"We can share the {obj}",
        f"I am so {feeling}",
        f"You are my best friend, {you.name}",
        f"I clean it every day",
        f"Please give me the {obj}",
        f"My {obj} fell in the {spot}",
        f"It is time to {play}",
        f"We will {play} {adv}",
        f"I see a {adj} {obj} by the {spot}",
        f"Come {adv}",
        f"I like your {obj}",
        f"This is the best day ever",
        f"I can {play} all day",
        f"Wait for me at the {spot}",
    )
    return rng.choice(templates)


def _exclamation(rng: random.Random, me: _Character, you: _Character) -> str:
    obj, adj = rng.choice(OBJECTS), rng.choice(ADJECTIVES)
    templates = (f"Wow, {you.name}, your {obj} is so {adj}", "Yay", f"Help me, {you.name}", "Watch out",
                 f"What a {adj} {obj}", f"Come and {rng.choice(PLAY_VERBS)} with me", "Hooray", "Stop",
                 f"I did it", f"Give back my {obj}")
    return rng.choice(templates)


def _question(rng: random.Random, me: _Character, you: _Character) -> str:
    obj, place, play, spot = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(PLAY_VERBS), rng.choice(SPOTS)
    templates = (f"Can I {play} with you", f"Where is my {obj}", f"Do you want to go to the {place}",
                 f"What is in the {spot}", f"Can you help me, {you.name}", f"Is this your {obj}",
                 f"Why are you {rng.choice(FEELINGS)}", f"Will you share your {obj}", "Are you okay",
                 f"Who took my {obj}")
    return rng.choice(templates)


def _quote_body(rng: random.Random, me: _Character, you: _Character, end: str) -> str:
    """The inside of a quote: 1-3 sentences; the last one ends with `end` (".", "!", "?"); earlier ones with . or !"""
    sentences = []
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
        sentences.append(_statement(rng, me, you) + rng.choice((".", ".", ".", "!")))
    last = {"." : _statement, "!": _exclamation, "?": _question}[end](rng, me, you)
    sentences.append(last + end)
    return " ".join(sentences)


def _narration(rng: random.Random, cast: list[_Character], place: str) -> str:
    """A narration sentence ending in a plain `.`: it never opens or closes a quote."""
    a, b = rng.sample(cast, 2)
    obj, adj, spot, feeling = rng.choice(OBJECTS), rng.choice(ADJECTIVES), rng.choice(SPOTS), rng.choice(FEELINGS)
    parent = rng.choice(PARENTS)
    templates = (
        f"{a.name} smiled and ran to the {spot}.",
        f"{a.name} and {b.name} {rng.choice(PAST_VERBS)} all day.",
        f"{a.name} felt very {feeling}.",
        f"{a.name} saw a {adj} {obj} near the {spot}.",
        f"They went to the {place} together.",
        f"{a.name} gave the {obj} to {b.name}.",
        f"{parent} said that they could go to the {place}.",
        f"{a.name} said sorry to {b.name}.",
        f"{a.name} asked {parent} for a {obj}.",
        f"{a.pronoun.capitalize()} looked at the {obj} and laughed.",
        f"The sun was warm and the sky was blue.",
        f"{b.name} hugged {a.name}.",
        f"{a.name} put the {obj} on the {spot}.",
        f"{a.name} did not know what to say.",
        f"Then {a.name} had an idea.",
        f"{a.name} told {b.name} about the {adj} {obj}.",
    )
    return rng.choice(templates)


def _dialogue_turn(rng: random.Random, cast: list[_Character]) -> str:
    me, you = rng.sample(cast, 2)
    end = rng.choice((".", ".", ".", ".", "!", "?"))
    if end == "?":
        verb = rng.choice(QUESTION_VERBS)
    else:  # "said" as often as all the others together, as in TinyStories
        verb = "said" if rng.random() < 0.5 else rng.choice(SPEECH_VERBS[1:])
    body = _quote_body(rng, me, you, end)
    form = rng.random()
    if form < 0.6:  # Tom said, "....".
        return f'{me.name} {verb}, "{body}"'
    if form < 0.75:  # Then Tom said, "...."
        return f'Then {me.name} {verb}, "{body}"'
    if end == ".":  # "....," Tom said.
        return f'"{body[:-1]}," {me.name} {verb}.'
    # "....!" Tom said.  /  "....?" Tom asked.
    return f'"{body}" {me.name} {verb}.'


def generate_story(seed: int) -> str:
    """One deterministic story: an opening, then narration and dialogue turns (at least three quotes)."""
    rng = random.Random(seed)
    cast = _cast(rng)
    place = rng.choice(PLACES)
    hero = cast[0]
    opening = rng.choice((
        f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {hero.kind} named {hero.name}.",
        f"One day, {hero.name} went to the {place}.",
        f"{hero.name} was a {rng.choice(ADJECTIVES)} {hero.kind} who liked to {rng.choice(PLAY_VERBS)}.",
    ))
    parts = [opening]
    n_turns = rng.randint(3, 7)
    quotes = 0
    while quotes < n_turns:
        if rng.random() < 0.4:
            parts.append(_narration(rng, cast, place))
        else:
            parts.append(_dialogue_turn(rng, cast))
            quotes += 1
    parts.append(rng.choice((f"{hero.name} was very happy.", "They were best friends forever.",
                             f"From that day on, {hero.name} always shared.", "The end.")))
    return " ".join(parts)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """`n` deterministic stories; story `i` depends only on (`seed`, `i`)."""
    return [generate_story(seed * 1_000_003 + i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Tokens and prompts
# ----------------------------------------------------------------------------------------------------------------
CLOSING_QUOTES = ('."', '!"', '?"', ',"')
OPENING_QUOTE = ' "'
FORCED_TOKENS = CLOSING_QUOTES + (OPENING_QUOTE,)


def pack_tokens(texts: Sequence[str], tokenizer, seq_len: int, bos_token_id: int | None = None,
                prepend_bos: bool = True) -> Int[Tensor, "n_rows seq_len"]:
    """Tokenise `texts`, join them with BOS separators and cut into rows `[n_rows, seq_len]` that each start with
    BOS (the original notebook's `batch_prompts` recipe). With `prepend_bos=False` (a model trained without BOS) the
    texts are joined with EOS and the rows start wherever the cut falls. The tail that does not fill a row is
    dropped."""
    bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
    separator = bos if prepend_bos else tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.append(separator)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = seq_len - 1 if prepend_bos else seq_len
    n_rows = len(stream) // width
    body = torch.tensor(stream[: n_rows * width], dtype=torch.long).view(n_rows, width)
    if not prepend_bos:
        return body
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), body], dim=1)


@dataclass
class QuotePrompts:
    """Prompts that end just before a closing-quote token.

    Attributes:
        tokens: `[n, max_len]` token ids, BOS first, right-padded with `pad_id` (causal model: padding after the
            last position never affects it).
        last_pos: `[n]` index of each prompt's last real token (the predicting position).
        answers: `[n]` id of the closing token that follows (`."` unless other closings were asked for).
        texts: the prompts as strings (without BOS).
        story_index: `[n]` which input text each prompt was cut from.
    """

    tokens: Int[Tensor, "n max_len"]
    last_pos: Int[Tensor, " n"]
    answers: Int[Tensor, " n"]
    texts: list[str]
    story_index: Int[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.texts)


def closing_quote_prompts(texts: Sequence[str], tokenizer, *, closings: Sequence[str] = ('."',),
                          openers: Sequence[str] | None = ("said",), max_prompts: int | None = None,
                          max_len: int = 256, one_per_text: bool = False, prepend_bos: bool = True) -> QuotePrompts:
    """Cut prompts that end right before a closing quote.

    A quote opens at ` "` (or `"` at a text's start) and closes at the first closing-quote token after it. A prompt
    is kept when the quote's closing token is one of `closings` and (if `openers` is given) the word before the
    `, "` that opened it is one of `openers` (the original notebook used `said, "`). Each prompt is BOS (when
    `prepend_bos`) + tokens up to (not including) the closing token; prompts longer than `max_len` are skipped.
    """
    ids = {tok: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(tok)) for tok in FORCED_TOKENS}
    for tok, found in ids.items():
        if len(found) != 1:
            raise ValueError(f"{tok!r} is not a single token in this tokenizer ({found}); quote prompts need it")
    close_ids = {ids[c][0] for c in CLOSING_QUOTES}
    wanted = {ids[c][0] for c in closings}
    open_id = ids[OPENING_QUOTE][0]
    comma_id = tokenizer.convert_tokens_to_ids(",")
    opener_ids = None
    if openers is not None:
        opener_ids = set()
        for word in openers:
            found = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(found) == 1:
                opener_ids.add(found[0])
    bos = tokenizer.bos_token_id
    prefix = [bos] if prepend_bos else []
    rows, last, answers, prompt_texts, source = [], [], [], [], []
    for index, text in enumerate(texts):
        seq = tokenizer(text, add_special_tokens=False)["input_ids"]
        open_at = None
        for pos, tok in enumerate(seq):
            if tok == open_id:
                open_at = pos
            elif tok in close_ids and open_at is not None:
                opened_ok = opener_ids is None or (
                    open_at >= 2 and seq[open_at - 1] == comma_id and seq[open_at - 2] in opener_ids)
                if tok in wanted and opened_ok and pos + 1 <= max_len:
                    rows.append(prefix + seq[:pos])
                    last.append(pos - 1 + len(prefix))  # the prompt's last token is seq[pos-1]
                    answers.append(tok)
                    prompt_texts.append(tokenizer.decode(seq[:pos]))
                    source.append(index)
                    if one_per_text:
                        open_at = None
                        break
                open_at = None
        if max_prompts is not None and len(rows) >= max_prompts:
            break
    if max_prompts is not None:
        rows, last, answers, prompt_texts, source = (rows[:max_prompts], last[:max_prompts], answers[:max_prompts],
                                                     prompt_texts[:max_prompts], source[:max_prompts])
    if not rows:
        raise ValueError("no closing-quote prompts found")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos if bos is not None else 0)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return QuotePrompts(tokens, torch.tensor(last), torch.tensor(answers), prompt_texts, torch.tensor(source))


# ----------------------------------------------------------------------------------------------------------------
# The real corpus
# ----------------------------------------------------------------------------------------------------------------
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_VALIDATION_PARQUET = "data/validation-00000-of-00001-869c898b519ad725.parquet"


def load_tinystories(source: str | Path | None = None, *, limit: int | None = None,
                     text_column: str = "text") -> list[str]:
    """TinyStories stories as a list of strings.

    Args:
        source: a local `.parquet` file (column `text_column`), or a `.txt` file of stories separated by
            `<|endoftext|>` lines (the format of `TinyStoriesV2-GPT4-valid.txt`), or None to download the validation
            parquet from the Hugging Face hub (needs network; the original notebook's 21990 validation stories).
        limit: keep only the first `limit` stories.
    """
    if source is None:
        from huggingface_hub import hf_hub_download

        from helpers.core.hub import HubUnreachableError, hub_offline

        if hub_offline():
            raise HubUnreachableError(
                "load_tinystories() downloads the TinyStories validation parquet from the hub, but offline mode is on; "
                "pass the path of a local parquet or text file, or use generate_stories() instead")
        try:
            source = hf_hub_download(TINYSTORIES_REPO, TINYSTORIES_VALIDATION_PARQUET, repo_type="dataset")
        except Exception as error:  # network errors come in many types
            raise HubUnreachableError(f"could not download TinyStories ({type(error).__name__}: {error})") from error
    path = Path(source)
    if path.suffix == ".parquet":
        import pandas as pd

        stories = [str(s) for s in pd.read_parquet(path, columns=[text_column])[text_column].tolist()]
    elif path.suffix in {".txt", ".text"}:
        raw = path.read_text(encoding="utf-8")
        stories = [s.strip() for s in raw.split("<|endoftext|>")]
    else:
        raise ValueError(f"unsupported TinyStories file {path} (expected .parquet or .txt)")
    stories = [s for s in stories if s]
    return stories[:limit] if limit is not None else stories
