"""Contextual n-grams: downstream neurons that complete multi-token words only when a context neuron is on.

Quirke et al. (2023) found in Pythia-70m that the German context neuron L3N669 feeds later MLP neurons which
complete German words split into several tokens (`V|orsch|lä|ge`) only when the context is German: an AND of "the
document is German" and "the previous tokens start this word". The test, as in the original notebook:

1. *candidates*: pin the context neuron to its German mean ("on") and to its English mean ("off"); later neurons
   whose pre-activation moves most consistently (`|mean shift| - std`) read it (`rank_candidates`).
2. *path-specific shift*: keep the context neuron as it is and move only the candidate's pre-activation by the mean
   on -> off shift (`shift_hooks`): the per-token loss change (`loss_change`) isolates the path context neuron ->
   candidate -> output.
3. *word choice*: among words that occur in both halves of the documents, the word whose completion tokens lose
   most on the first half (`choose_word`); tested on the second half only, so a word that is bad by chance on the
   documents that chose it does not pass.
4. *the test* (`NgramTest`): where the candidate predicts that word's completion tokens, its (post-activation)
   activation with the context neuron on and ablated, its mean on English text, and the loss change of the shift.

A candidate that the German context switches *on* completes a word only with context when it is on there, falls by
at least half with the context neuron ablated, is lower on English text, and its shift raises the completion's loss
by at least 0.1 nats. A candidate that the context switches *off* (context-suppressed: the original notebook's L5N213
before ` w|obe|i`) passes the mirror image: ablating the context neuron at least doubles it, it is higher on English
text, and its shift (turning it on) raises the completion's loss by at least 0.1 nats.

Words are found from token strings with whole characters: a byte-level BPE tokenizer splits "ä" into two tokens
that decode alone to "\\ufffd", so `token_texts` gives a character to the token where it starts and "" to the rest.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from helpers.techniques.ablation import Hook
from helpers.techniques.losses import token_losses_each
from helpers.core.components import hook_name, Model, run_with_hooks
from helpers.techniques.neurons import RunningStats, mlp_activations, mlp_activations_each

MAX_CHARACTER_TOKENS = 4  # the longest UTF-8 character is 4 bytes, so at most 4 byte-level tokens
SHIFT_LOSS_BAR = 0.1      # nats the path-specific shift must cost the completion


# ---- words from tokens -------------------------------------------------------------------------------------------
def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text with multi-byte characters whole: `[len(ids)]` strings.

    Consecutive tokens whose bytes form one character (their joint decoding has no replacement character "\\ufffd")
    are decoded together; the text goes to the first of them and the others get "". `"".join(token_texts(...))`
    equals `tokenizer.decode(ids)` wherever the bytes are valid UTF-8.
    """
    ids = [int(i) for i in ids]
    texts, start = [], 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[start:end])
        if "\ufffd" in text and end - start < MAX_CHARACTER_TOKENS and end < len(ids):
            continue
        if "\ufffd" in text and end - start > 1:       # no whole character within reach: decode one by one
            texts += [tokenizer.decode([i]) for i in ids[start:end]]
        else:
            texts += [text] + [""] * (end - start - 1)
        start = end
    return texts


def continuation_flags(texts: Sequence[str]) -> list[bool]:
    """`flags[i]`: token `i` continues the word of token `i - 1` (no leading space, letters on both sides; a token
    that only completes a character, text "", always continues)."""
    flags, previous = [False], texts[0] if texts else ""
    for current in texts[1:]:
        flags.append(current == "" or (current[0].isalpha() and previous[-1:].isalpha()))
        previous = current or previous
    return flags


@dataclass
class WordIndex:
    """The words of a batch of documents: per-token texts, which tokens continue the previous token's word, and the
    word each token belongs to (its tokens joined by "|", a character split over several tokens shown once)."""

    texts: list[list[str]]
    continuation: Bool[Tensor, "doc pos"]
    words: list[list[str]]

    def word_at(self, row: int, pos: int) -> str:
        return self.words[row][pos]


def _words(texts: Sequence[str], continuation: Sequence[bool]) -> list[str]:
    """The word of every token: tokens from one non-continuation to the next share one word."""
    words, start = [], 0
    for end in range(1, len(texts) + 1):
        if end == len(texts) or not continuation[end]:
            word = "|".join(text for text in texts[start:end] if text)
            words += [word] * (end - start)
            start = end
    return words


def word_index(tokenizer, tokens: Int[Tensor, "doc pos"]) -> WordIndex:
    texts = [token_texts(tokenizer, row.tolist()) for row in tokens.cpu()]
    flags = [continuation_flags(row) for row in texts]
    return WordIndex(texts, torch.tensor(flags, dtype=torch.bool), [_words(t, f) for t, f in zip(texts, flags)])


# ---- candidates and the path-specific shift ----------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Candidate:
    """A downstream neuron whose pre-activation the context neuron moves: `shift` is mean(on) - mean(off)."""

    significance: float
    layer: int
    neuron: int
    shift: float

    @property
    def switched_on(self) -> bool:
        """True when the context switches this neuron on (on - off > 0), False when it suppresses it."""
        return self.shift > 0


def rank_candidates(shift_stats: dict[int, RunningStats], per_layer: int, total: int) -> list[Candidate]:
    """The `per_layer` most significant neurons of each layer (`|mean| - std` of the on - off pre-activation
    difference), then the `total` most significant overall, best first."""
    found = []
    for layer, stats in shift_stats.items():
        significance = stats.mean.abs() - stats.std
        for neuron in torch.topk(significance, min(per_layer, len(significance))).indices.tolist():
            found.append(Candidate(float(significance[neuron]), layer, neuron, float(stats.mean[neuron])))
    return sorted(found, reverse=True)[:total]


def shift_hooks(layer: int, neuron: int, shift: float) -> list[Hook]:
    """Add `shift` to one neuron's pre-activation (`blocks.{layer}.mlp.hook_pre`) at every position."""
    def hook(act: Float[Tensor, "batch pos d_mlp"], hook=None) -> Tensor:  # noqa: ARG001
        act = act.clone()
        act[:, :, neuron] += shift
        return act

    return [(hook_name("neuron", layer, "pre"), hook)]


def over_rows(fn: Callable[[Int[Tensor, "b pos"]], Shaped[Tensor, "b *rest"]], tokens: Int[Tensor, "doc pos"],
              batch_size: int) -> Shaped[Tensor, "doc *rest"]:
    """`fn(tokens[b, pos]) -> [b, ...]` over the rows of `tokens` in batches, on the CPU: `[doc, ...]`."""
    return torch.cat([fn(tokens[start:start + batch_size]).cpu() for start in range(0, len(tokens), batch_size)])


def loss_changes(model: Model, tokens: Int[Tensor, "doc pos"], variants: Sequence[Sequence[Hook]], batch_size: int
                 ) -> Float[Tensor, "variant doc pos_minus_1"]:
    """Per-token next-token loss under each variant's hooks minus the clean loss (entry `[v, doc, i]`: predicting
    token `i + 1`), from one clean pass per batch (`losses.token_losses_each`)."""
    each = torch.cat([token_losses_each(model, tokens[start:start + batch_size], variants).cpu()
                      for start in range(0, len(tokens), batch_size)], dim=1)    # [1 + n, doc, pos - 1]
    return each[1:] - each[:1]


def neuron_activation(model: Model, tokens: Int[Tensor, "doc pos"], layer: int, neuron: int, batch_size: int,
                      hooks: Sequence[Hook] = ()) -> Float[Tensor, "doc pos"]:
    """One neuron's post-activation value at every position, under `hooks`."""
    return over_rows(lambda t: mlp_activations(model, t, [layer], neurons=[neuron], fwd_hooks=hooks)[layer][..., 0],
                     tokens, batch_size)


def neuron_activation_each(model: Model, tokens: Int[Tensor, "doc pos"], layer: int, neuron: int, batch_size: int,
                           variants: Sequence[Sequence[Hook]]) -> Float[Tensor, "variant doc pos"]:
    """`neuron_activation` under each of `variants`, sharing the blocks before each one's first hook
    (`neurons.mlp_activations_each`)."""
    def each(rows: Tensor) -> Tensor:
        runs = mlp_activations_each(model, rows, [layer], variants, neurons=[neuron])
        return torch.stack([acts[layer][..., 0] for acts in runs], dim=1)        # [b, variant, pos]

    return over_rows(each, tokens, batch_size).transpose(0, 1)


# ---- choosing a word and testing it ------------------------------------------------------------------------------
def word_losses(diff: Float[Tensor, "doc pos_minus_1"], targets: Bool[Tensor, "doc pos_minus_1"],
                words: WordIndex) -> dict[str, list[float]]:
    """The loss change at each word's completion tokens (the `targets` inside a word): `{word: [changes]}`."""
    by_word: dict[str, list[float]] = defaultdict(list)
    for row, pos in torch.nonzero(targets).tolist():
        by_word[words.word_at(row, pos + 1)].append(float(diff[row, pos]))
    return dict(by_word)


def choose_word(diff: Float[Tensor, "doc pos_minus_1"], inside: Bool[Tensor, "doc pos_minus_1"],
                search: Bool[Tensor, "doc 1"], words: WordIndex, min_tokens: int = 3) -> str | None:
    """The word whose completion tokens lose most (mean of `diff`) on the `search` rows, among words with at least
    `min_tokens` completion tokens there and on the other rows; None if there is none."""
    held_out = {w for w, v in word_losses(diff, inside & ~search, words).items() if len(v) >= min_tokens}
    scored = [(float(np.mean(v)), w) for w, v in word_losses(diff, inside & search, words).items()
              if len(v) >= min_tokens and w in held_out]
    return max(scored)[1] if scored else None


@dataclass
class NgramTest:
    """A candidate at its word's completion tokens on the held-out documents.

    `shift` is the candidate's mean on - off pre-activation change. `positions` are `(row, pos)` on the target axis: the neuron acts at `pos` to predict token `pos + 1`. `on` /
    `off`: its mean post-activation value there with the context neuron as it is / ablated; `english`: its mean on
    English text; `shift_loss`: the mean loss change of the path-specific shift there.
    """

    layer: int
    neuron: int
    shift: float
    word: str
    positions: list[tuple[int, int]]
    on: float
    off: float
    english: float
    shift_loss: float
    diff: Tensor = field(repr=False)

    @property
    def switched_on(self) -> bool:
        return self.shift > 0

    def shift_hooks(self) -> list[Hook]:
        """The path-specific shift of this test: the neuron's pre-activation moved by off - on."""
        return shift_hooks(self.layer, self.neuron, -self.shift)

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def docs(self) -> list[int]:
        return sorted({row for row, _ in self.positions})

    @property
    def passes(self) -> bool:
        """Completes the word only with context (switched-on neurons) or only without it (suppressed ones)."""
        if self.switched_on:
            return (self.on > 0 and self.off <= 0.5 * self.on and self.english < self.on
                    and self.shift_loss >= SHIFT_LOSS_BAR)
        return (self.off > 0 and self.on <= 0.5 * self.off and self.english > self.on
                and self.shift_loss >= SHIFT_LOSS_BAR)


def word_positions(words: WordIndex, inside: Bool[Tensor, "doc pos_minus_1"], rows: Bool[Tensor, "doc 1"],
                   word: str, max_rows: int) -> list[tuple[int, int]]:
    """Target positions `(row, pos)` of `word`'s completion tokens on `rows`, in at most `max_rows` documents."""
    positions = [(row, pos) for row, pos in torch.nonzero(inside & rows).tolist()
                 if words.word_at(row, pos + 1) == word]
    docs = sorted({row for row, _ in positions})[:max_rows]
    return [(row, pos) for row, pos in positions if row in docs]


def mean_at(values: Float[Tensor, "n_docs pos"], docs: Sequence[int], positions: Iterable[tuple[int, int]]) -> float:
    """Mean of `values [len(docs), pos]` (rows are `docs`, in order) at the `(row, pos)` pairs."""
    index = {row: i for i, row in enumerate(docs)}
    return float(np.mean([float(values[index[row], pos]) for row, pos in positions]))


def examine_candidate(model: Model, tokens: Int[Tensor, "doc pos"], words: WordIndex,
                      inside: Bool[Tensor, "doc pos_minus_1"], search: Bool[Tensor, "doc 1"], candidate: Candidate,
                      diff: Float[Tensor, "doc pos_minus_1"], context_hooks: Sequence[Hook], english_mean: float, *,
                      max_rows: int, batch_size: int) -> NgramTest | None:
    """Choose the candidate's word on the `search` rows and test it on the others (`NgramTest`); None when no word
    has 3 completion tokens in both halves (or 3 in the held-out documents examined)."""
    word = choose_word(diff, inside, search, words)
    positions = [] if word is None else word_positions(words, inside, ~search, word, max_rows)
    if len(positions) < 3:
        return None
    docs = sorted({row for row, _ in positions})
    rows = tokens[docs]
    on, off = neuron_activation_each(model, rows, candidate.layer, candidate.neuron, batch_size, [[], context_hooks])
    return NgramTest(candidate.layer, candidate.neuron, candidate.shift, word, positions,
                     on=mean_at(on, docs, positions), off=mean_at(off, docs, positions), english=english_mean,
                     shift_loss=float(np.mean([float(diff[row, pos]) for row, pos in positions])), diff=diff)


# ---- what one prediction looks like -------------------------------------------------------------------------------
@dataclass
class PredictionDifference:
    """At one position: the top predictions of two runs and the tokens whose log-probability moved most.

    Lists hold `(token id, value)`: `top_a` / `top_b` log-probabilities of each run, `raised` / `lowered` the
    log-probability difference a - b.
    """

    position: int
    top_a: list[tuple[int, float]]
    top_b: list[tuple[int, float]]
    raised: list[tuple[int, float]]
    lowered: list[tuple[int, float]]


@torch.no_grad()
def prediction_difference(model: Model, tokens: Int[Tensor, "1 pos"], position: int, hooks_a: Sequence[Hook],
                          hooks_b: Sequence[Hook], k: int = 5, min_logprob: float = -7.0) -> PredictionDifference:
    """The original notebook's `get_top_differences_at_position`: the next-token distributions at `position` of runs
    under `hooks_a` and `hooks_b`, their top `k`, and the `k` tokens whose log-probability is most raised / lowered in a
    relative to b, among the tokens with log-probability above `min_logprob` in either run (the original notebook's -7
    filter; fewer than `k` when fewer tokens are that likely)."""
    def logprobs(hooks):
        logits = run_with_hooks(model, tokens, fwd_hooks=list(hooks)) if hooks else model(tokens)
        return torch.log_softmax(logits[0, position].float(), dim=-1).cpu()

    a, b = logprobs(hooks_a), logprobs(hooks_b)
    plausible = torch.maximum(a, b) > min_logprob
    n_plausible = int(plausible.sum())

    def top(values: Tensor, largest: bool = True, n: int = k) -> list[tuple[int, float]]:
        found = torch.topk(values, min(k, n), largest=largest)
        return [(int(i), float(v)) for v, i in zip(found.values, found.indices)]

    outside = torch.full_like(a, float("inf"))
    return PredictionDifference(position, top(a), top(b), top(torch.where(plausible, a - b, -outside), n=n_plausible),
                                top(torch.where(plausible, a - b, outside), largest=False, n=n_plausible))
