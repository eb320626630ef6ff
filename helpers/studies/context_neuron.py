"""The German context neuron study (notebook 04): documents of two languages, losses under pinned neurons, the
damage per component, the language direction's writers, unigram boosts and the probes' features.

A `Documents` holds one language's tokenised documents (one per row: BOS, tokens, EOS, padding) with two masks:
`scored`, the positions every statistic counts (from `skip_positions` on, where the language is established), and
`present`, every real token (BOS included). Everything streams over batches of `batch_size` rows.

Pins are measured where they are applied: a neuron pinned "to its English mean" at every position is set to its
mean over every position of English documents (`pin_means`, `present` mask), so the intervention writes the value it
was measured at. The scan's means (over `scored` positions) describe the neuron once the language is established.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.techniques import ablation, dla, neurons, replay
from helpers.techniques.ablation import Hook
from helpers.techniques.losses import token_losses, token_losses_each
from helpers.core.components import Component, device_of, final_resid_hook_name, hooks_on, layers_needed, Model
from helpers.tasks.bilingual import tokenize_documents
from helpers.core.uncertainty import Interval, bootstrap_interval, f1_statistic, percent_change_statistic
from helpers.models.source import ModelSource


@dataclass
class Documents:
    """One language's documents: `tokens [doc, pos]`, `scored [doc, pos]` (positions that count), `present
    [doc, pos]` (real tokens, BOS included)."""

    tokens: Int[Tensor, "doc pos"]
    scored: Bool[Tensor, "doc pos"]
    present: Bool[Tensor, "doc pos"]
    batch_size: int = 50

    @classmethod
    def from_tokens(cls, tokens: Int[Tensor, "doc pos"], present: Bool[Tensor, "doc pos"], skip_positions: int,
                    batch_size: int, device=None) -> Documents:
        scored = present.clone()
        scored[:, :skip_positions] = False
        return cls(tokens.to(device) if device is not None else tokens, scored, present, batch_size)

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, mask: str = "scored") -> Iterator[tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"]]]:
        """`(tokens [b, pos], mask [b, pos])` with `mask` "scored" or "present"."""
        chosen = self.scored if mask == "scored" else self.present
        for start in range(0, len(self.tokens), self.batch_size):
            yield self.tokens[start:start + self.batch_size], chosen[start:start + self.batch_size]

    def rows(self, rows: Sequence[int]) -> Documents:
        return Documents(self.tokens[list(rows)], self.scored[list(rows)], self.present[list(rows)], self.batch_size)

    @property
    def n_scored_targets(self) -> int:
        return int(self.scored[:, 1:].sum())


def labelled_batches(german: Documents, english: Documents
                     ) -> Iterator[tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"], Int[Tensor, " b"]]]:
    """`(tokens, scored mask, labels [b])` over both languages, German labelled 1 and English 0."""
    for documents, label in ((german, 1), (english, 0)):
        for tokens, mask in documents.batches():
            yield tokens, mask, torch.full((len(tokens),), label)


def both_languages(german: Documents, english: Documents
                   ) -> Iterator[tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"]]]:
    yield from german.batches()
    yield from english.batches()


# ---- losses --------------------------------------------------------------------------------------------------------
def document_loss_sums(model: Model, documents: Documents, hooks: Sequence[Hook] = ()) -> Float[Tensor, " doc"]:
    """Each document's summed next-token loss over its scored targets, float64 on the CPU."""
    sums = []
    for tokens, mask in documents.batches():
        losses = token_losses(model, tokens, hooks)                                # [b, pos - 1]
        targets = mask[:, 1:].to(losses.device)
        sums.append((losses.double() * targets).sum(1).cpu())
    return torch.cat(sums)


def mean_loss(model: Model, documents: Documents, hooks: Sequence[Hook] = ()) -> float:
    """Token-weighted mean next-token loss over the scored targets (the original notebook averaged per-document
    means)."""
    return float(document_loss_sums(model, documents, hooks).sum()) / documents.n_scored_targets


def percent_change(value: float, clean: float) -> float:
    return 100 * (value - clean) / clean


def neuron_means(model: Model, batches: Iterable[tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"]]],
                 chosen: Sequence[tuple[int, int]], *, hook: str = "post", fwd_hooks: Sequence[Hook] = ()
                 ) -> dict[tuple[int, int], float]:
    """Mean activation of each `(layer, neuron)` over the masked positions of `batches`, one forward pass per batch
    for all of them (under `fwd_hooks`)."""
    layers = sorted({layer for layer, _ in chosen})
    stats = {layer: neurons.RunningStats() for layer in layers}
    for tokens, mask in batches:
        acts = neurons.mlp_activations(model, tokens, layers, hook=hook, fwd_hooks=fwd_hooks)
        for layer in layers:
            stats[layer].update(acts[layer][mask.to(acts[layer].device)].cpu())      # [tokens, d_mlp]
    return {(layer, neuron): float(stats[layer].mean[neuron]) for layer, neuron in chosen}


def pin_means(model: Model, documents: Documents, pinned: Sequence[tuple[int, int]], mask: str = "present"
              ) -> dict[tuple[int, int], float]:
    """Mean post-activation value of each `(layer, neuron)` over `documents` at the `mask` positions ("present":
    every position a pin writes, BOS included)."""
    return neuron_means(model, documents.batches(mask), pinned)


def pin_hooks(means: dict[tuple[int, int], float], pinned: Sequence[tuple[int, int]]) -> list[Hook]:
    """Hooks pinning each of `pinned` to its value in `means` at every position."""
    return ablation.neuron_value_hooks({key: means[key] for key in pinned})


@dataclass
class LossChange:
    german: float   # percent change of the German loss
    english: float  # percent change of the English loss


def loss_changes(model: Model, german: Documents, english: Documents, hooks: Sequence[Hook],
                 clean: tuple[float, float]) -> LossChange:
    """Percent loss change on each language under `hooks`, against the clean `(german, english)` losses."""
    return LossChange(percent_change(mean_loss(model, german, hooks), clean[0]),
                      percent_change(mean_loss(model, english, hooks), clean[1]))


@dataclass
class VariantLosses:
    """Each document's summed loss over its scored targets, clean and under named variants of hooks, for both
    languages: `clean` and `hooked[name]` are `(german [doc], english [doc])` float64 sums."""

    clean: tuple[Float[Tensor, " doc_de"], Float[Tensor, " doc_en"]]
    hooked: dict
    n_targets: tuple[int, int]

    @property
    def clean_means(self) -> tuple[float, float]:
        """The token-weighted mean clean loss of each language (as `mean_loss`)."""
        return tuple(float(sums.sum()) / n for sums, n in zip(self.clean, self.n_targets))

    def change(self, name) -> LossChange:
        """Percent change of each language's mean loss under variant `name`."""
        return LossChange(*(percent_change(float(hooked.sum()) / n, clean)
                            for hooked, n, clean in zip(self.hooked[name], self.n_targets, self.clean_means)))

    def intervals(self, name, *, confidence: float = 0.95, seed: int = 0) -> tuple[Interval, Interval]:
        """`change(name)` of each language with its bootstrap interval over the documents: `(german, english)`."""
        return tuple(bootstrap_interval(percent_change_statistic, hooked, clean, confidence=confidence, seed=seed)
                     for hooked, clean in zip(self.hooked[name], self.clean))


def variant_losses(model: Model, german: Documents, english: Documents, variants: dict) -> VariantLosses:
    """Per-document loss sums of both languages, clean and under each `variants[name]` (a list of hooks), from one
    clean pass per batch: each variant's run starts at the first block its hooks sit in
    (`losses.token_losses_each`), so pins in late layers cost a fraction of a pass each."""
    names = list(variants)
    per_language = []
    for documents in (german, english):
        sums = []
        for tokens, mask in documents.batches():
            losses = token_losses_each(model, tokens, [variants[name] for name in names])         # [1 + n, b, pos-1]
            sums.append((losses.double() * mask[:, 1:].to(losses.device)).sum(-1).cpu())          # [1 + n, b]
        per_language.append(torch.cat(sums, dim=1))
    german_sums, english_sums = per_language
    return VariantLosses((german_sums[0], english_sums[0]),
                         {name: (german_sums[i + 1], english_sums[i + 1]) for i, name in enumerate(names)},
                         (german.n_scored_targets, english.n_scored_targets))


def pin_variants(means: dict[tuple[int, int], float], pinned_sets: Sequence[Sequence[tuple[int, int]]]) -> dict:
    """`{tuple(pinned): hooks}`: each set of neurons pinned to its values in `means` (`pin_hooks`)."""
    return {tuple(pinned): pin_hooks(means, list(pinned)) for pinned in pinned_sets}


def detector_counts(german: Documents, english: Documents,
                    activations: tuple[Float[Tensor, "doc pos"], Float[Tensor, "doc pos"]], threshold: float,
                    direction: int) -> tuple[Int[Tensor, " doc"], Int[Tensor, " doc"], Int[Tensor, " doc"]]:
    """Per-document `(true positives, false positives, false negatives)` of a neuron read as a German detector at
    the scan's rule (`activation >= threshold` for `direction` +1, `<=` for -1) over the scored positions, from its
    `activations` at every position of each language's documents (e.g. `ngrams.neuron_activation`, the values the
    notebook also plots); each `[n_german + n_english]`, German documents first."""
    fired = [((acts.cpu() * direction >= threshold * direction) & docs.scored).sum(1)
             for acts, docs in zip(activations, (german, english))]
    scored = [docs.scored.sum(1) for docs in (german, english)]
    zero = [torch.zeros_like(f) for f in fired]
    return (torch.cat([fired[0], zero[1]]), torch.cat([zero[0], fired[1]]), torch.cat([scored[0] - fired[0], zero[1]]))


def f1_interval(german: Documents, english: Documents,
                activations: tuple[Float[Tensor, "doc pos"], Float[Tensor, "doc pos"]], threshold: float,
                direction: int, *, confidence: float = 0.95, seed: int = 0) -> Interval:
    """A neuron's detector F1 at a fixed rule (`detector_counts`) with its bootstrap interval over documents (each
    language's documents resampled together with the other's, so the German share varies as a resample's would)."""
    counts = detector_counts(german, english, activations, threshold, direction)
    return bootstrap_interval(f1_statistic, *counts, confidence=confidence, seed=seed)


@dataclass
class BackupTest:
    """The other language neurons ablated one by one and together (the original notebook's joint-ablation test, without
    its scoping bug: each neuron pinned to its own English mean, in its own layer).

    `single`: `{(layer, neuron): LossChange}`; `joint`: all of them at once; `with_context`: the German percent change
    with all of them and the context neuron pinned. Backups for each other when `joint.german` exceeds the
    sum of the single German changes (a neuron's loss shows only when the others are gone too).
    """

    single: dict[tuple[int, int], LossChange]
    joint: LossChange
    with_context: float

    @property
    def sum_of_single(self) -> float:
        return sum(change.german for change in self.single.values())

    @property
    def backup_share(self) -> float:
        """(joint - sum of single) / joint on German: the share of the joint damage no single ablation shows."""
        return (self.joint.german - self.sum_of_single) / self.joint.german if self.joint.german else float("nan")


def backup_test(losses: VariantLosses, others: Sequence[tuple[int, int]], context: tuple[int, int]) -> BackupTest:
    """The backup test from `losses` that hold the pin variants `backup_pins(context, others)`."""
    return BackupTest({key: losses.change((key,)) for key in others}, losses.change(tuple(others)),
                      losses.change((*others, context)).german)


def backup_pins(context: tuple[int, int], others: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
    """The sets of neurons pinned by the pinning and backup tests: the context neuron, each other one, the others
    together, and all of them."""
    return [(context,), *((key,) for key in others), tuple(others), (*others, context)]


# ---- where the damage goes -----------------------------------------------------------------------------------------
@dataclass
class DirectPatching:
    """Per-component direct effect of an intervention on the scored German loss: `change [n_components]` percent,
    `components`, and the clean / fully hooked mean losses."""

    change: Float[Tensor, "component"]
    components: list[Component]
    clean: float
    hooked: float


def direct_patching(model: Model, documents: Documents, hooks: Sequence[Hook], components: Sequence[Component]
                    ) -> DirectPatching:
    """`dla.direct_patch_losses` over every batch, token-weighted over the scored targets."""
    patched_sum = torch.zeros(len(components), dtype=torch.float64)
    clean_sum = hooked_sum = 0.0
    count = 0
    for tokens, mask in documents.batches():
        patched, _, clean, hooked = dla.direct_patch_losses(model, tokens, hooks, components=list(components))
        targets = mask[:, 1:].to(clean.device)
        patched_sum += patched[:, targets].double().sum(-1).cpu()
        clean_sum += float(clean[targets].double().sum())
        hooked_sum += float(hooked[targets].double().sum())
        count += int(targets.sum())
    clean_mean = clean_sum / count
    return DirectPatching(100 * (patched_sum / count - clean_mean) / clean_mean, list(components), clean_mean,
                          hooked_sum / count)


def dla_difference(model: Model, documents: Documents, hooks: Sequence[Hook]
                   ) -> tuple[Float[Tensor, "component"], list[Component]]:
    """Mean over scored targets of each writer's direct logit attribution to the correct next token, clean minus
    under `hooks`: `(difference [n_components], components)`."""
    sums = {}
    needed = dla.dla_hook_names(model)
    for tokens, mask in documents.batches():
        for which, run_hooks in (("clean", ()), ("hooked", hooks)):
            with hooks_on(model, list(run_hooks)):
                _, cache = model.run_with_cache(tokens, names_filter=needed)
            values, components = dla.next_token_dla(model, cache, tokens)
            del cache
            summed = values[:, mask[:, 1:].to(values.device)].double().sum(-1).cpu()
            sums[which] = summed if which not in sums else sums[which] + summed
    return (sums["clean"] - sums["hooked"]) / documents.n_scored_targets, components


# ---- the neuron's direct effect on the unigrams --------------------------------------------------------------------
def language_unigrams(german: Documents, english: Documents, d_vocab: int, n: int, special: Sequence[int]
                      ) -> tuple[Int[Tensor, "n_de"], Int[Tensor, "n_en"]]:
    """Each language's top-`n` tokens by occurrences on the scored positions, less the other language's top `n`
    (and the `special` tokens), so each list is specific to its language: `(german ids, english ids)`, sorted."""
    tops = []
    for documents in (german, english):
        counts = neurons.token_counts(documents.tokens.cpu(), d_vocab, documents.scored)
        counts[list(special)] = 0
        tops.append(set(torch.topk(counts, n).indices.tolist()))
    return torch.tensor(sorted(tops[0] - tops[1])), torch.tensor(sorted(tops[1] - tops[0]))


# ---- probes ------------------------------------------------------------------------------------------------------
def sampled_features(model: Model, german: Documents, english: Documents, *, fwd_hooks: Sequence[Hook] = (),
                     per_doc: int = 8, seed: int = 0
                     ) -> tuple[Float[Tensor, "n features"], np.ndarray, np.ndarray]:
    """A few seeded scored positions per document, every layer's neurons: `(features [n_docs * per_doc,
    n_layers * d_mlp], labels [n] (German 1), document ids [n])` for a document-level probe split."""
    generator = torch.Generator().manual_seed(seed)
    n_layers = model.cfg.n_layers
    feats, labels, groups, doc = [], [], [], 0
    for tokens, mask, label in labelled_batches(german, english):
        acts = neurons.mlp_activations(model, tokens, range(n_layers), fwd_hooks=fwd_hooks)
        stacked = torch.cat([acts[layer] for layer in range(n_layers)], dim=-1).cpu()   # [b, pos, L * d_mlp]
        for i in range(len(tokens)):
            positions = torch.nonzero(mask[i]).flatten()
            chosen = positions[torch.randperm(len(positions), generator=generator)[:per_doc]]
            feats.append(stacked[i, chosen])
            labels += [int(label[i])] * len(chosen)
            groups += [doc] * len(chosen)
            doc += 1
    return torch.cat(feats), np.array(labels), np.array(groups)


# ---- downstream neurons ------------------------------------------------------------------------------------------
def shift_histogram_values(model: Model, german: Documents, english: Documents, chosen: Sequence[tuple[int, int]],
                           on_hooks: Sequence[Hook], off_hooks: Sequence[Hook]
                           ) -> dict[tuple[int, int], dict[str, Float[Tensor, " n"]]]:
    """Neurons' pre-activations at the scored positions of both languages with the context neuron pinned on and
    off (the original notebook's activated / deactivated histograms): `{(layer, neuron): {"on": [n], "off": [n]}}`."""
    layers = sorted({layer for layer, _ in chosen})
    values: dict[tuple[int, int], dict[str, list[Tensor]]] = {key: {"on": [], "off": []} for key in chosen}
    for tokens, mask in both_languages(german, english):
        runs = neurons.mlp_activations_each(model, tokens, layers, [on_hooks, off_hooks], hook="pre")
        for which, acts in zip(("on", "off"), runs):
            for layer, neuron in chosen:
                values[(layer, neuron)][which].append(acts[layer][..., neuron][mask.to(tokens.device)].cpu())
    return {key: {which: torch.cat(parts) for which, parts in runs.items()} for key, runs in values.items()}


def downstream_unembed(model: Model, german: Documents, chosen: Sequence[tuple[int, int]], context_hooks: Sequence[Hook]
                       ) -> dict[tuple[int, int], Float[Tensor, "d_vocab"]]:
    """Downstream neurons' direct effect on the logits when the context neuron is on rather than ablated: each
    one's post-activation mean on German text, clean minus with the context neuron ablated, times `W_out @ W_U` (the
    original notebook fed pre-GELU means here)."""
    layers = sorted({layer for layer, _ in chosen})
    stats = {(which, layer): neurons.RunningStats() for which in ("on", "off") for layer in layers}
    for tokens, mask in german.batches():
        runs = neurons.mlp_activations_each(model, tokens, layers, [[], context_hooks])
        for which, acts in zip(("on", "off"), runs):
            for layer in layers:
                stats[(which, layer)].update(acts[layer][mask.to(acts[layer].device)].cpu())   # [tokens, d_mlp]
    return {(layer, neuron): neurons.neuron_unembed_effect(model, layer, neuron,
                                                           float(stats[("on", layer)].mean[neuron]),
                                                           float(stats[("off", layer)].mean[neuron]))
            for layer, neuron in chosen}


# ---- who writes the language direction -----------------------------------------------------------------------------
def masked_mean(model: Model, documents: Documents, hook: str, select=lambda act: act, mask: str = "scored"
                ) -> Float[Tensor, "..."]:
    """Streaming mean of `select(activation)` at the `mask` positions ("scored" or "present"): `[d]` (e.g.
    `d_model`, or `d_head` for one head's `z`)."""
    stats = neurons.RunningStats()
    for tokens, mask in documents.batches(mask):
        act = replay.activations(model, tokens, [hook])[hook]
        stats.update(select(act)[mask.to(tokens.device)].cpu())
    return stats.mean.float()


def language_direction(model: Model, german: Documents, english: Documents) -> Float[Tensor, "d_model"]:
    """Unit vector of mean final residual stream on German minus English scored tokens."""
    final = final_resid_hook_name(model)
    direction = masked_mean(model, german, final) - masked_mean(model, english, final)
    return direction / direction.norm()


def writer_separation(model: Model, german: Documents, english: Documents, direction: Float[Tensor, "d_model"]
                      ) -> tuple[Float[Tensor, "component"], list[Component]]:
    """Each writer's projection on `direction` (`dla.direction_writes`): (mean German - mean English) /
    pooled std, `(separation [n_components], components)`."""
    stats = {}
    for name, documents in (("de", german), ("en", english)):
        stats[name] = neurons.RunningStats()
        for tokens, mask in documents.batches():
            names = dla.direction_write_hook_names(model)
            _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=layers_needed(names))
            values, components = dla.direction_writes(model, cache, direction)
            stats[name].update(values[:, mask.to(values.device)].T.cpu())      # [tokens, components]
    pooled = ((stats["de"].var + stats["en"].var) / 2).sqrt()
    separation = torch.where(pooled > 1e-6, (stats["de"].mean - stats["en"].mean) / pooled.clamp_min(1e-6),
                             torch.zeros_like(pooled))
    return separation, components


def english_mean_hooks(model: Model, english: Documents, writer: Component) -> list[Hook] | None:
    """Hooks pinning a writer of the residual stream to its English mean at every position (measured over every
    position, as the pin writes): an MLP through its output, a head through its `z`; None for other kinds (the
    embedding, biases)."""
    if writer.kind == "mlp":
        name = writer.hook_name()
        mean = masked_mean(model, english, name, mask="present")
        return [(name, lambda act, hook=None: mean.to(act.device, act.dtype).expand_as(act))]
    if writer.kind == "head":
        mean = masked_mean(model, english, writer.hook_name(), lambda z: z[:, :, writer.index], mask="present")
        return ablation.head_value_hooks({(writer.layer, writer.index): mean})
    return None


# ---- examples and the closing table --------------------------------------------------------------------------------
def example_loss_changes(model: Model, tokenizer, sentences: Sequence[str], hooks: Sequence[Hook], n_ctx: int
                         ) -> list[tuple[list[int], Float[Tensor, "n_minus_1"]]]:
    """Hand-written sentences (BOS where the model takes one, then the tokens; no EOS): each one's predicted token ids
    (all after the first position) and the loss change under `hooks` of predicting each (`change[j]` belongs to
    `ids[j]`)."""
    tokens, present = tokenize_documents(tokenizer, sentences, n_ctx, append_eos=False,
                                         prepend_bos=model.cfg.default_prepend_bos)
    tokens = tokens.to(device_of(model))
    change = (token_losses(model, tokens, hooks) - token_losses(model, tokens)).cpu()
    return [(tokens[i, 1:int(present[i].sum())].tolist(), change[i, :int(present[i].sum()) - 1])
            for i in range(len(sentences))]


REFERENCE: dict[str, dict[str, str]] = {
    # Quirke et al. 2023 and the original notebook, Pythia-70m on KDE4 English vs WMT German; keyed like the closing
    # table's rows, plus the figures the sections print beside their own
    "EleutherAI/pythia-70m": {
        "context neuron": "L3N669",
        "F1 (runner-up)": "0.99",
        "mean activation English / German": "-0.07 / 3.82",
        "pinned to its English mean: German, English loss": "+11.57%, +0.00%",
        "other language neurons, each alone (largest)": "at most +0.60%",
        # the original notebook's hook pinned all 7 indices in both layers, so its joint figure is not a valid one
        "other language neurons together": "+1.98% (invalid)",
        "largest direct path": "MLP5 +7.93%",
        "direct paths MLP3, ATTN4, MLP4, ATTN5, MLP5": "+4.96%, +0.39%, +3.17%, +0.86%, +7.93%",
        "unigram boost German / English": "+1.80 / +0.33",
        "contextual n-gram neuron": "L5N1336 (V|orsch|lä|ge)",
        "its completion: best rank in its unembedding effect": "not measured",
        "context-suppressed neuron": "L5N213 ( w|obe|i), not tested",
        "hand-written sentences, ablated: German / English": "not measured",
        "best later language neuron's F1, context neuron ablated": "L5N1336 0.95 -> 0.78",
        "over training: detector, then the n-gram neuron's need of it": "early; later and gradually",
        "over training": "the German detector and the n-gram circuits form early, each with its own function; only "
                         "then do they combine into the second-order circuit, gradually, not in a sudden phase "
                         "transition (abstract; no step numbers quoted here)",
    },
}
"""The paper's figures, by the model they were measured on: shown beside a run's, never used in its place."""


def acceptance_checks(best_f1: float, runner_up_f1: float, german_change: float, english_change: float,
                      boost_german: float, boost_english: float, ngram_found: bool) -> dict[str, bool]:
    """The notebook's bars (asserted on the toy): a detector clearly above the runner-up (its error 1 - F1 at most
    half the runner-up's), a German-specific loss rise when it is pinned (percent changes), a direct boost of German
    unigrams, and a downstream neuron that completes a German word only with context."""
    return {
        "F1 >= 0.95 and clearly above the runner-up": best_f1 >= DETECTOR_F1_BAR
        and (1 - runner_up_f1) >= 2 * (1 - best_f1),
        "German loss +5% or more": german_change >= GERMAN_LOSS_BAR,
        "English loss within 0.5% while German rises (a German-specific effect)":
            abs(english_change) <= ENGLISH_LOSS_BAR and german_change >= GERMAN_LOSS_BAR,
        "direct boost larger on German unigrams": boost_german > boost_english,
        "downstream neuron completes a German word only with context": ngram_found,
    }


# ---- over training -------------------------------------------------------------------------------------------------
DETECTOR_F1_BAR = 0.95
"""The context neuron's F1 that counts as a detector (the final model's acceptance bar)."""
GERMAN_LOSS_BAR = 5.0
"""Percent rise of the German loss with the context neuron pinned to its English mean that counts as depended on."""
ENGLISH_LOSS_BAR = 0.5
"""... while English moves by at most this many percent (German-specific)."""
UNIGRAM_BOOST_BAR = 0.1
"""Logits by which the context neuron's mean direct boost of German unigrams must exceed that of English ones (the
final model's bar asks only for more; at initialisation both are within 0.01 of zero)."""
DEPENDENCE_BAR = 0.5
"""Share of the n-gram neuron's activation that goes when the context neuron is ablated (`NgramTest.passes`: off at
most half of on)."""


@dataclass(frozen=True)
class TrackedCircuit:
    """What a walk over training follows: the final model's context neuron; its contextual n-gram neuron (None when
    the final model has none) with the German documents `ngram_tokens` and the completion positions `(row, pos)` in
    them where the final model's test found it; and each language's top unigrams (token ids) for the direct effect.
    """

    context: tuple[int, int]
    ngram: tuple[int, int] | None
    ngram_tokens: Int[Tensor, "doc pos"] | None
    ngram_positions: tuple[tuple[int, int], ...]
    german_unigrams: tuple[int, ...]
    english_unigrams: tuple[int, ...]

    @classmethod
    def of_final_model(cls, context: tuple[int, int], ngram_test, german: Documents, german_unigrams: Sequence[int],
                       english_unigrams: Sequence[int]) -> TrackedCircuit:
        """Track `context` and the n-gram neuron of `ngram_test` (an `ngrams.NgramTest` on `german`, or None)."""
        unigrams = (tuple(int(i) for i in german_unigrams), tuple(int(i) for i in english_unigrams))
        if ngram_test is None:
            return cls(tuple(context), None, None, (), *unigrams)
        index = {row: i for i, row in enumerate(ngram_test.docs)}
        return cls(tuple(context), (ngram_test.layer, ngram_test.neuron), german.tokens[ngram_test.docs].cpu(),
                   tuple((index[row], pos) for row, pos in ngram_test.positions), *unigrams)


def checkpoint_measurement(model: Model, german: Documents, english: Documents, tracked: TrackedCircuit, *,
                           bins: int = 1024) -> dict[str, float | str]:
    """The study's headline figures on one training checkpoint, for the final model's neurons in `tracked`.

    Returns `best` (the label of this checkpoint's best German/English neuron) and `best_f1`, `runner_up_f1`;
    `context_f1`; `german_change` / `english_change` (percent loss change with the context neuron pinned to this
    checkpoint's English mean); `boost_de` / `boost_en` (its mean direct logit effect on each language's unigrams);
    and, when an n-gram neuron is tracked, its mean activation at the completions with the context neuron as it is
    (`ngram_on`) and ablated (`ngram_off`) and `dependence = 1 - off / on` (0 when it is not on).
    """
    scan = neurons.scan_neurons(model, labelled_batches(german, english), bins=bins)
    (best_layer, best_neuron, best_f1), (_, _, runner_up_f1) = scan.ranking(2)
    layer, neuron = tracked.context
    row = scan.layers.index(layer)
    de_mean, en_mean = float(scan.mean_pos[row, neuron]), float(scan.mean_neg[row, neuron])
    hooks = pin_hooks(pin_means(model, english, [tracked.context]), [tracked.context])
    clean = (mean_loss(model, german), mean_loss(model, english))
    change = loss_changes(model, german, english, hooks, clean)
    effect = neurons.neuron_unembed_effect(model, layer, neuron, de_mean, en_mean).cpu()
    measured = {
        "best": Component.neuron(best_layer, best_neuron).label, "best_f1": best_f1, "runner_up_f1": runner_up_f1,
        "context_f1": float(scan.f1[row, neuron]), "german_change": change.german, "english_change": change.english,
        "boost_de": float(effect[list(tracked.german_unigrams)].mean()),
        "boost_en": float(effect[list(tracked.english_unigrams)].mean()),
    }
    if tracked.ngram is not None:
        from helpers.studies import ngrams

        tokens = tracked.ngram_tokens.to(device_of(model))
        rows = list(range(len(tokens)))
        on, off = (ngrams.mean_at(ngrams.neuron_activation(model, tokens, *tracked.ngram, german.batch_size, pin),
                                  rows, tracked.ngram_positions)
                   for pin in ((), hooks))
        measured.update(ngram_on=on, ngram_off=off, dependence=1 - off / on if on > 0 else 0.0)
    return measured


@dataclass
class Timeline:
    """When each phenomenon of the study formed over a walk (`TrainingWalk`): the first step from which its bar
    holds to the end of training (None: it does not hold at the end), and whether the n-gram circuit's dependence on
    the context neuron grew gradually."""

    detector: int | None          # the context neuron's F1 >= DETECTOR_F1_BAR
    best_is_context: int | None   # the scan's best neuron is the final context neuron
    german_specific: int | None   # German loss >= GERMAN_LOSS_BAR and English within ENGLISH_LOSS_BAR
    unigram_boost: int | None     # direct boost larger on German unigrams than English ones, by UNIGRAM_BOOST_BAR
    dependence: int | None        # the n-gram neuron's dependence >= DEPENDENCE_BAR
    largest_jump_share: float     # the largest rise of the dependence between checkpoints, share of its whole rise

    @property
    def detector_first(self) -> bool | None:
        """Did the detector form before the n-gram neuron depended on it? None when either never did."""
        if self.detector is None or self.dependence is None:
            return None
        return self.detector < self.dependence

    @property
    def gradual(self) -> bool | None:
        """The dependence rose over several checkpoints: no single interval holds half of its rise."""
        return None if math.isnan(self.largest_jump_share) else self.largest_jump_share < 0.5

    def finding(self) -> str:
        """One line for the findings table: the detector's step, the dependence's step, gradual or not."""
        return (f"detector from step {self.detector}, dependence from step {self.dependence}; "
                f"gradual: {_yes_no(self.gradual)}")

    def summary_lines(self, context_label: str, ngram_label: str | None) -> list[str]:
        """What the walk found, in words: the step from which each bar holds, and the paper's two claims."""
        def at(step: int | None) -> str:
            return "not by the end" if step is None else f"step {step}"

        ngram = ngram_label or "no n-gram neuron"
        return [
            f"{context_label} is a detector (F1 >= {DETECTOR_F1_BAR}) from {at(self.detector)}; the scan's best "
            f"neuron from {at(self.best_is_context)}",
            f"pinning it raises German loss >= {GERMAN_LOSS_BAR:.0f}% (English within {ENGLISH_LOSS_BAR}%) from "
            f"{at(self.german_specific)}; its direct boost favours German unigrams (by {UNIGRAM_BOOST_BAR}) from "
            f"{at(self.unigram_boost)}",
            f"{ngram} depends on it (>= {DEPENDENCE_BAR}) from {at(self.dependence)}",
            f"detector before the dependence: {_yes_no(self.detector_first)}; the dependence grew gradually: "
            f"{_yes_no(self.gradual)} (largest rise between two checkpoints: {self.largest_jump_share:.0%} of it)",
        ]


def _yes_no(value: bool | None) -> str:
    return "undecided" if value is None else ("yes" if value else "no")


def training_timeline(steps: Sequence[int], measurements: Sequence[dict], context_label: str) -> Timeline:
    """Read the bars off `checkpoint_measurement`s taken at `steps`."""
    from helpers.models.training_walk import first_lasting_crossing, largest_jump_share

    def crossing(values: Sequence[float], bar: float) -> int | None:
        return first_lasting_crossing(steps, values, bar)

    def flags(condition) -> list[float]:
        return [1.0 if condition(m) else 0.0 for m in measurements]

    dependence = [m.get("dependence", 0.0) for m in measurements]
    has_ngram = all("dependence" in m for m in measurements)
    return Timeline(
        detector=crossing([m["context_f1"] for m in measurements], DETECTOR_F1_BAR),
        best_is_context=crossing(flags(lambda m: m["best"] == context_label), 1.0),
        german_specific=crossing(flags(lambda m: m["german_change"] >= GERMAN_LOSS_BAR
                                       and abs(m["english_change"]) <= ENGLISH_LOSS_BAR), 1.0),
        unigram_boost=crossing([m["boost_de"] - m["boost_en"] for m in measurements], UNIGRAM_BOOST_BAR),
        dependence=crossing(dependence, DEPENDENCE_BAR) if has_ngram else None,
        largest_jump_share=largest_jump_share(dependence) if has_ngram else float("nan"),
    )


def walk_study(source: ModelSource, revisions: Sequence[str], german: Documents, english: Documents,
               tracked: TrackedCircuit, *, device="cpu", cache_dir=None, progress: bool = True):
    """`checkpoint_measurement` on each of `revisions` of the model (a `training_walk.TrainingWalk`), cached per
    checkpoint under the documents and the tracked neurons."""
    from dataclasses import asdict

    from helpers.models.load import load_model
    from helpers.models.training_walk import walk_training

    return walk_training(
        source, revisions, lambda model, revision: checkpoint_measurement(model, german, english, tracked),
        key={"german": german.tokens, "english": english.tokens, "scored": (german.scored, english.scored),
             "tracked": asdict(tracked)},
        load=lambda source, revision: load_model(source, device=device, revision=revision), cache_dir=cache_dir,
        progress=progress)


def walk_table(walk) -> str:
    """One row per checkpoint of a `walk_study`: the best neuron, the tracked neurons' figures."""
    lines = ["step     best neuron (F1)  context F1  German / English loss, pinned  boost De / En   n-gram on / off"
             " (dependence)"]
    for step, m in zip(walk.steps, walk.measurements):
        ngram = (f"{m['ngram_on']:+.2f} / {m['ngram_off']:+.2f} ({m['dependence']:.2f})" if "dependence" in m
                 else "-")
        lines.append(f"{step:<8d} {m['best']:>8s} ({m['best_f1']:.2f})   {m['context_f1']:.2f}        "
                     f"{m['german_change']:+8.1f}% / {m['english_change']:+6.2f}%     "
                     f"{m['boost_de']:+.2f} / {m['boost_en']:+.2f}   {ngram}")
    return "\n".join(lines)
