"""Syllogism prompts with a negated alternative, and their clean/corrupted pairs.

    All {category} are {A}, not {B}. {Noun} are {category}. Therefore, {noun} are   ->  " A" (first token)

The corrupted prompt swaps A and B, which flips the answer; both orders of every descriptor pair are in a data set,
so the mean corrupted logit difference is minus the clean one. Word lists are fixed in this module (no generated
text, no network); descriptor pairs are explicit tuples (the original notebook paired them by list parity, §6.8).

Token positions are derived from the tokenizer, not hard-coded: each prompt's slots (category, A, B, Noun, ...) are
located through the fast tokenizer's character offsets, and a data set keeps only prompts with one common
token-count signature, so all prompts of a batch have equal length with A and B at known positions (`positions`).
For Pythia's BPE and the original notebook's lists that is the 22-token layout with A at 4, B at 9 and the final " are"
at 21.
"""
from __future__ import annotations

import itertools
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import Model, run_with_hooks, unembed_only_at

TEMPLATE = "All {category} are {A}, not {B}. {Noun} are {category}. Therefore, {noun} are"
# the original notebook's variant (also in the toy's training corpus): the negated descriptor comes first
TEMPLATE_NOT_FIRST = "All {category} are not {B}, but {A}. {Noun} are {category}. Therefore, {noun} are"

CATEGORIES = (
    "birds", "fish", "insects", "mammals", "primates", "rodents", "predators", "prey", "game", "reptiles",
    "amphibians", "animals", "creatures", "beasts", "pets", "livestock", "vertebrates", "critters", "wildlife",
    "invertebrates",
)
# explicit (descriptor, opposite) tuples; the original notebook's five pairs come first
DESCRIPTOR_PAIRS = (
    ("endothermic", "ectothermic"), ("herbivorous", "carnivorous"), ("bipedal", "quadrupedal"),
    ("exoskeletal", "endoskeletal"), ("digitigrade", "plantigrade"), ("nocturnal", "diurnal"),
    ("terrestrial", "aquatic"), ("solitary", "gregarious"), ("migratory", "sedentary"), ("arboreal", "fossorial"),
    ("oviparous", "viviparous"), ("domestic", "feral"), ("venomous", "harmless"), ("territorial", "nomadic"),
    ("furry", "scaly"), ("predatory", "docile"),
)
# capitalised plural nouns (the original notebook's list without its duplicate "Pigs", plus ten more)
NOUNS = (
    "Dogs", "Elephants", "Lions", "Zebras", "Cows", "Horses", "Pigs", "Monkeys", "Wolves", "Deer", "Foxes", "Bears",
    "Mice", "Bats", "Snakes", "Lizards", "Seals", "Whales", "Cats", "Squid", "Dolphins", "Crabs", "Snails", "Bees",
    "Wasps", "Emus", "Ducks", "Owls", "Goats", "Sheep", "Rats", "Frogs", "Toads", "Hawks", "Eagles", "Moles",
    "Otters", "Tigers", "Camels", "Geese",
)
SLOTS = ("category", "A", "B", "Noun", "category2", "noun")


@dataclass(frozen=True)
class Syllogism:
    """One prompt: `correct` is the asserted descriptor A, `wrong` the negated one B."""

    category: str
    correct: str
    wrong: str
    noun: str  # capitalised plural, e.g. "Dogs"; the conclusion uses noun.lower()
    template: str = TEMPLATE

    @property
    def text(self) -> str:
        return self.template.format(category=self.category, A=self.correct, B=self.wrong, Noun=self.noun,
                                    noun=self.noun.lower())

    @property
    def flipped(self) -> "Syllogism":
        """The corrupted prompt: A and B swapped."""
        return Syllogism(self.category, self.wrong, self.correct, self.noun, self.template)

    def slot_spans(self) -> dict[str, tuple[int, int]]:
        """Character spans of each slot in `text`, each including its leading space (where BPE puts it)."""
        values = {"category": self.category, "A": self.correct, "B": self.wrong, "Noun": self.noun,
                  "noun": self.noun.lower()}
        spans: dict[str, tuple[int, int]] = {}
        text, seen_category = "", False
        for literal, name, _, _ in string.Formatter().parse(self.template):
            text += literal
            if name is None:
                continue
            start = len(text) - (1 if text.endswith(" ") else 0)
            text += values[name]
            key = "category2" if name == "category" and seen_category else name
            seen_category |= name == "category"
            spans[key] = (start, len(text))
        return spans


def make_syllogisms(categories=CATEGORIES, pairs=DESCRIPTOR_PAIRS, nouns=NOUNS, template: str = TEMPLATE,
                    n: int | None = None, seed: int = 0) -> list[Syllogism]:
    """Every (category, pair, noun) combination in both orders of the pair, or a seeded sample of `n` of them
    (a sample keeps orders together: item 2k+1 is item 2k flipped)."""
    combos = list(itertools.product(categories, pairs, nouns))
    if n is not None:
        combos = random.Random(seed).sample(combos, min(len(combos), (n + 1) // 2))
    out: list[Syllogism] = []
    for category, (a, b), noun in combos:
        first = Syllogism(category, a, b, noun, template)
        out += [first, first.flipped]
    return out if n is None else out[:n]


def tokenize_with_slots(tokenizer, syllogism: Syllogism, prepend_bos: bool = True) -> tuple[list[int], dict[str, list[int]]]:
    """Token ids of the prompt (BOS first when `prepend_bos`) and the token positions of each slot."""
    encoding = tokenizer(syllogism.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    shift = 0
    if prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids, shift = [bos] + ids, 1
    spans = syllogism.slot_spans()
    text = syllogism.text
    spans["not"] = (text.index(" not ") + 1, text.index(" not ") + 4)
    slots: dict[str, list[int]] = {}
    for slot, (start, end) in spans.items():
        word_start = start + 1 if text[start] == " " else start
        # a token belongs to the slot if it overlaps the slot's word (its leading space does not count)
        slots[slot] = [i + shift for i, (s, e) in enumerate(offsets) if e > s and s < end and e > word_start]
    return ids, slots


@dataclass
class SyllogismData:
    """A batch of equal-length prompts.

    Attributes:
        clean_tokens, corrupted_tokens: `[batch, pos]`; corrupted row i is clean row i with A and B swapped.
        answers: `[batch, 2]` first tokens of (A, B) for the clean prompts.
        positions: slot -> token position shared by every prompt (`A`, `B` = first tokens of the descriptors,
            `final` = last position, plus `category`, `not`, `Noun`, `noun`, ... = first token of each slot).
        items: the prompts.
        signature: the first position of each slot and the prompt length, the filter that made all prompts share
            one layout.
        pool_size: how many prompts were generated before filtering.
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch 2"]
    positions: dict[str, int]
    items: list[Syllogism]
    signature: tuple[int, ...]
    pool_size: int
    str_tokens: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index: Int[Tensor, " k"] | Sequence[int]) -> "SyllogismData":
        index = torch.as_tensor(index, dtype=torch.long)
        return SyllogismData(self.clean_tokens[index], self.corrupted_tokens[index], self.answers[index],
                             dict(self.positions), [self.items[i] for i in index.tolist()], self.signature,
                             self.pool_size, list(self.str_tokens))

    def to(self, device: torch.device | str) -> "SyllogismData":
        return SyllogismData(self.clean_tokens.to(device), self.corrupted_tokens.to(device), self.answers.to(device),
                             self.positions, self.items, self.signature, self.pool_size, self.str_tokens)


def build_dataset(tokenizer, items: list[Syllogism], prepend_bos: bool = True,
                  signature: tuple[int, ...] | None = None) -> SyllogismData:
    """Tokenise prompts and their flips and keep those of one layout signature (the most common one unless
    `signature` is given) whose A and B start with different tokens and whose flip has the same layout.

    Raises ValueError if nothing survives. Prompts are kept in the order given.
    """
    rows = []
    for item in items:
        ids, slots = tokenize_with_slots(tokenizer, item, prepend_bos)
        flip_ids, flip_slots = tokenize_with_slots(tokenizer, item.flipped, prepend_bos)
        sig = tuple(slots[s][0] for s in SLOTS) + (len(ids),)
        flip_sig = tuple(flip_slots[s][0] for s in SLOTS) + (len(flip_ids),)
        if (sig != flip_sig or len(ids) != len(flip_ids) or any(len(v) == 0 for v in slots.values())
                or slots["not"] != flip_slots["not"]):
            continue
        a, b = ids[slots["A"][0]], ids[slots["B"][0]]
        if a == b:
            continue
        rows.append((item, sig, ids, flip_ids, slots, (a, b)))
    if not rows:
        raise ValueError("no prompt survived tokenisation; check the tokenizer and word lists")
    if signature is None:
        signature = Counter(row[1] for row in rows).most_common(1)[0][0]
    rows = [row for row in rows if row[1] == tuple(signature)]
    if not rows:
        raise ValueError(f"no prompt has the token signature {signature}")
    slots = rows[0][4]
    positions = {slot: slots[slot][0] for slot in SLOTS}
    positions["not"] = slots["not"][0]
    positions["final"] = len(rows[0][2]) - 1
    clean = torch.tensor([row[2] for row in rows])
    corrupted = torch.tensor([row[3] for row in rows])
    answers = torch.tensor([row[5] for row in rows])
    str_tokens = [tokenizer.decode([t]) for t in rows[0][2]]
    return SyllogismData(clean, corrupted, answers, positions, [row[0] for row in rows], tuple(signature),
                         len(items), str_tokens)


@torch.no_grad()
def logit_diffs(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"], batch_size: int = 64
                ) -> Float[Tensor, " batch"]:
    """Per-prompt logit difference (A minus B) at the final position: tokens `[batch, pos]` -> `[batch]`."""
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        last = torch.full((len(chunk),), chunk.shape[1] - 1)
        logits = run_with_hooks(model, chunk, fwd_hooks=unembed_only_at(model, last))[:, -1]
        ans = answers[start:start + batch_size].to(logits.device)
        out.append((logits.gather(1, ans[:, :1]) - logits.gather(1, ans[:, 1:])).squeeze(1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def accuracy(model: Model, data: SyllogismData, batch_size: int = 64) -> dict[str, float]:
    """`top1`: share of clean prompts whose argmax over the whole vocabulary is A's first token;
    `pairwise`: share with logit(A) > logit(B)."""
    top1, pairwise = [], []
    for start in range(0, len(data), batch_size):
        chunk = data.clean_tokens[start:start + batch_size]
        last = torch.full((len(chunk),), chunk.shape[1] - 1)
        logits = run_with_hooks(model, chunk, fwd_hooks=unembed_only_at(model, last))[:, -1]
        ans = data.answers[start:start + batch_size].to(logits.device)
        top1.append((logits.argmax(-1) == ans[:, 0]).float().cpu())
        pairwise.append((logits.gather(1, ans[:, :1]) > logits.gather(1, ans[:, 1:])).squeeze(1).float().cpu())
    return {"top1": torch.cat(top1).mean().item(), "pairwise": torch.cat(pairwise).mean().item()}


def filter_by_logit_diff(model: Model, data: SyllogismData, threshold: float | None = 2.0,
                         batch_size: int = 64) -> tuple[SyllogismData, float]:
    """Keep prompts whose clean logit difference exceeds `threshold` and whose flip's is below `-threshold` (the
    original notebook's filter, batched). Returns the kept data and the pass rate (the filter favours easy items;
    report it). `threshold=None` keeps every prompt, right or wrong: only to exercise the code on an untrained model,
    whose answers share one sign whatever the order of A and B."""
    if threshold is None:
        return data, 1.0
    clean = logit_diffs(model, data.clean_tokens, data.answers, batch_size)
    corrupted = logit_diffs(model, data.corrupted_tokens, data.answers, batch_size)
    keep = torch.nonzero((clean > threshold) & (corrupted < -threshold)).flatten()
    return data.subset(keep), len(keep) / max(1, len(data))


def flip_pairs(data: SyllogismData) -> list[tuple[int, int]]:
    """Row pairs `(i, j)`, `i < j`, where prompt `j` is prompt `i` with A and B swapped; a prompt whose flip is not in
    `data` belongs to no pair."""
    row_of = {item: row for row, item in enumerate(data.items)}
    return [(i, row_of[item.flipped]) for i, item in enumerate(data.items) if row_of.get(item.flipped, -1) > i]


def sample_pairs(data: SyllogismData, n: int, seed: int = 0) -> SyllogismData:
    """A seeded sample of `n / 2` flip pairs, both orders of each kept together: rows `2k` and `2k + 1` are one
    prompt and its flip.

    So the corrupted batch is the clean batch with the rows of each pair swapped: the mean corrupted logit difference
    is exactly minus the clean one, and every answer token is the correct answer as often as it is the distractor
    (a random subset of single prompts loses both). Raises ValueError for an odd `n` or too few pairs.
    """
    if n % 2:
        raise ValueError(f"n={n} is odd: both orders of each pair are kept together, so n must be even")
    pairs = flip_pairs(data)
    if len(pairs) < n // 2:
        raise ValueError(f"only {len(pairs)} flip pairs in {len(data)} prompts, fewer than n/2 = {n // 2}")
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[: n // 2]
    return data.subset([row for k in chosen.tolist() for row in pairs[k]])


def held_out_pairs(data: SyllogismData, used: SyllogismData, n: int, seed: int = 0) -> SyllogismData | None:
    """Up to `n` prompts of `data` (both orders of each pair, as `sample_pairs`) that are not in `used`: prompts to
    evaluate on that the analysis never saw. None when `data` has no pair left."""
    seen = set(used.items)
    rest = data.subset([row for row, item in enumerate(data.items) if item not in seen])
    n_pairs = min(n // 2, len(flip_pairs(rest)))
    return sample_pairs(rest, 2 * n_pairs, seed) if n_pairs else None


def replace_marker(data: SyllogismData, tokenizer, slot: str = "not", replacement: str = " but"
                   ) -> Int[Tensor, "batch pos"]:
    """Clean prompts with the token at `data.positions[slot]` replaced by `replacement` (one token), e.g.
    "All birds are A, not B." -> "All birds are A, but B.": the words stay where they are, only the marker of which
    descriptor is negated changes. `[batch, pos]`."""
    ids = tokenizer(replacement, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{replacement!r} is {len(ids)} tokens for this tokenizer; pick a single-token marker")
    tokens = data.clean_tokens.clone()
    tokens[:, data.positions[slot]] = ids[0]
    return tokens
