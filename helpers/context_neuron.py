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

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers import ablation, attribution, neurons
from helpers.ablation import Hook
from helpers.components import Component, device_of, final_resid_hook_name
from helpers.tasks.bilingual import tokenize_documents


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

    def batches(self, mask: str = "scored") -> Iterator[tuple[Tensor, Tensor]]:
        """`(tokens [b, pos], mask [b, pos])` with `mask` "scored" or "present"."""
        chosen = self.scored if mask == "scored" else self.present
        for start in range(0, len(self.tokens), self.batch_size):
            yield self.tokens[start:start + self.batch_size], chosen[start:start + self.batch_size]

    def rows(self, rows: Sequence[int]) -> Documents:
        return Documents(self.tokens[list(rows)], self.scored[list(rows)], self.present[list(rows)], self.batch_size)

    @property
    def n_scored_targets(self) -> int:
        return int(self.scored[:, 1:].sum())


def labelled_batches(german: Documents, english: Documents) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """`(tokens, scored mask, labels [b])` over both languages, German labelled 1 and English 0."""
    for documents, label in ((german, 1), (english, 0)):
        for tokens, mask in documents.batches():
            yield tokens, mask, torch.full((len(tokens),), label)


def both_languages(german: Documents, english: Documents) -> Iterator[tuple[Tensor, Tensor]]:
    yield from german.batches()
    yield from english.batches()


# ---- losses --------------------------------------------------------------------------------------------------------
def mean_loss(model, documents: Documents, hooks: Sequence[Hook] = ()) -> float:
    """Token-weighted mean next-token loss over the scored targets (the seed averaged per-document means)."""
    total, count = 0.0, 0
    for tokens, mask in documents.batches():
        losses = ablation.token_losses(model, tokens, hooks)
        targets = mask[:, 1:].to(losses.device)
        total += float(losses[targets].double().sum())
        count += int(targets.sum())
    return total / count


def percent_change(value: float, clean: float) -> float:
    return 100 * (value - clean) / clean


def neuron_means(model, batches: Iterable[tuple[Tensor, Tensor]], chosen: Sequence[tuple[int, int]], *,
                 hook: str = "post", fwd_hooks: Sequence[Hook] = ()) -> dict[tuple[int, int], float]:
    """Mean activation of each `(layer, neuron)` over the masked positions of `batches`, one forward pass per batch
    for all of them (under `fwd_hooks`)."""
    layers = sorted({layer for layer, _ in chosen})
    stats = {layer: neurons.RunningStats() for layer in layers}
    for tokens, mask in batches:
        acts = neurons.mlp_activations(model, tokens, layers, hook=hook, fwd_hooks=fwd_hooks)
        for layer in layers:
            stats[layer].update(acts[layer][mask.to(acts[layer].device)].cpu())      # [tokens, d_mlp]
    return {(layer, neuron): float(stats[layer].mean[neuron]) for layer, neuron in chosen}


def pin_means(model, documents: Documents, pinned: Sequence[tuple[int, int]], mask: str = "present"
              ) -> dict[tuple[int, int], float]:
    """Mean post-GELU activation of each `(layer, neuron)` over `documents` at the `mask` positions ("present":
    every position a pin writes, BOS included)."""
    return neuron_means(model, documents.batches(mask), pinned)


def pin_hooks(means: dict[tuple[int, int], float], pinned: Sequence[tuple[int, int]]) -> list[Hook]:
    """Hooks pinning each of `pinned` to its value in `means` at every position."""
    return ablation.neuron_value_hooks({key: means[key] for key in pinned})


@dataclass
class LossChange:
    german: float   # percent change of the German loss
    english: float  # percent change of the English loss


def loss_changes(model, german: Documents, english: Documents, hooks: Sequence[Hook],
                 clean: tuple[float, float]) -> LossChange:
    """Percent loss change on each language under `hooks`, against the clean `(german, english)` losses."""
    return LossChange(percent_change(mean_loss(model, german, hooks), clean[0]),
                      percent_change(mean_loss(model, english, hooks), clean[1]))


@dataclass
class BackupTest:
    """The other language neurons ablated one by one and together (the seed's joint-ablation test, without its
    scoping bug: each neuron pinned to its own English mean, in its own layer).

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


def backup_test(model, german: Documents, english: Documents, others: Sequence[tuple[int, int]],
                context: tuple[int, int], means: dict[tuple[int, int], float], clean: tuple[float, float]
                ) -> BackupTest:
    single = {key: loss_changes(model, german, english, pin_hooks(means, [key]), clean) for key in others}
    return BackupTest(single, loss_changes(model, german, english, pin_hooks(means, others), clean),
                      percent_change(mean_loss(model, german, pin_hooks(means, [*others, context])), clean[0]))


# ---- where the damage goes -----------------------------------------------------------------------------------------
@dataclass
class DirectPatching:
    """Per-component direct effect of an intervention on the scored German loss: `change [n_components]` percent,
    `components`, and the clean / fully hooked mean losses."""

    change: Float[Tensor, "component"]
    components: list[Component]
    clean: float
    hooked: float


def direct_patching(model, documents: Documents, hooks: Sequence[Hook], components: Sequence[Component]
                    ) -> DirectPatching:
    """`attribution.direct_patch_losses` over every batch, token-weighted over the scored targets."""
    patched_sum = torch.zeros(len(components), dtype=torch.float64)
    clean_sum = hooked_sum = 0.0
    count = 0
    for tokens, mask in documents.batches():
        patched, _, clean, hooked = attribution.direct_patch_losses(model, tokens, hooks, components=list(components))
        targets = mask[:, 1:].to(clean.device)
        patched_sum += patched[:, targets].double().sum(-1).cpu()
        clean_sum += float(clean[targets].double().sum())
        hooked_sum += float(hooked[targets].double().sum())
        count += int(targets.sum())
    clean_mean = clean_sum / count
    return DirectPatching(100 * (patched_sum / count - clean_mean) / clean_mean, list(components), clean_mean,
                          hooked_sum / count)


def dla_difference(model, documents: Documents, hooks: Sequence[Hook]
                   ) -> tuple[Float[Tensor, "component"], list[Component]]:
    """Mean over scored targets of each writer's direct logit attribution to the correct next token, clean minus
    under `hooks`: `(difference [n_components], components)`."""
    sums = {}
    for tokens, mask in documents.batches():
        for which, run_hooks in (("clean", ()), ("hooked", hooks)):
            with model.hooks(fwd_hooks=list(run_hooks)):
                _, cache = model.run_with_cache(tokens)
            values, components = attribution.next_token_dla(model, cache, tokens)
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
def sampled_features(model, german: Documents, english: Documents, *, fwd_hooks: Sequence[Hook] = (),
                     per_doc: int = 8, seed: int = 0) -> tuple[Tensor, np.ndarray, np.ndarray]:
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
def shift_histogram_values(model, german: Documents, english: Documents, chosen: Sequence[tuple[int, int]],
                           on_hooks: Sequence[Hook], off_hooks: Sequence[Hook]
                           ) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Neurons' pre-activations at the scored positions of both languages with the context neuron pinned on and
    off (the seed's activated / deactivated histograms): `{(layer, neuron): {"on": [n], "off": [n]}}`."""
    layers = sorted({layer for layer, _ in chosen})
    values: dict[tuple[int, int], dict[str, list[Tensor]]] = {key: {"on": [], "off": []} for key in chosen}
    for tokens, mask in both_languages(german, english):
        for which, hooks in (("on", on_hooks), ("off", off_hooks)):
            acts = neurons.mlp_activations(model, tokens, layers, hook="pre", fwd_hooks=hooks)
            for layer, neuron in chosen:
                values[(layer, neuron)][which].append(acts[layer][..., neuron][mask.to(tokens.device)].cpu())
    return {key: {which: torch.cat(parts) for which, parts in runs.items()} for key, runs in values.items()}


def downstream_unembed(model, german: Documents, chosen: Sequence[tuple[int, int]], context_hooks: Sequence[Hook]
                       ) -> dict[tuple[int, int], Float[Tensor, "d_vocab"]]:
    """Downstream neurons' direct effect on the logits when the context neuron is on rather than ablated: each
    one's post-GELU mean on German text, clean minus with the context neuron ablated, times `W_out @ W_U` (the seed
    fed pre-GELU means here)."""
    on = neuron_means(model, german.batches(), chosen)
    off = neuron_means(model, german.batches(), chosen, fwd_hooks=context_hooks)
    return {key: neurons.neuron_unembed_effect(model, *key, on[key], off[key]) for key in chosen}


# ---- who writes the language direction -----------------------------------------------------------------------------
def masked_mean(model, documents: Documents, hook: str, select=lambda act: act, mask: str = "scored"
                ) -> Float[Tensor, "..."]:
    """Streaming mean of `select(activation)` at the `mask` positions ("scored" or "present"): `[d]` (e.g.
    `d_model`, or `d_head` for one head's `z`)."""
    stats = neurons.RunningStats()
    for tokens, mask in documents.batches(mask):
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        stats.update(select(cache[hook])[mask.to(tokens.device)].cpu())
    return stats.mean.float()


def language_direction(model, german: Documents, english: Documents) -> Float[Tensor, "d_model"]:
    """Unit vector of mean final residual stream on German minus English scored tokens."""
    final = final_resid_hook_name(model)
    direction = masked_mean(model, german, final) - masked_mean(model, english, final)
    return direction / direction.norm()


def writer_separation(model, german: Documents, english: Documents, direction: Float[Tensor, "d_model"]
                      ) -> tuple[Float[Tensor, "component"], list[Component]]:
    """Each writer's projection on `direction` (`attribution.direction_writes`): (mean German - mean English) /
    pooled std, `(separation [n_components], components)`."""
    stats = {}
    for name, documents in (("de", german), ("en", english)):
        stats[name] = neurons.RunningStats()
        for tokens, mask in documents.batches():
            _, cache = model.run_with_cache(tokens)
            values, components = attribution.direction_writes(model, cache, direction)
            stats[name].update(values[:, mask.to(values.device)].T.cpu())      # [tokens, components]
    pooled = ((stats["de"].var + stats["en"].var) / 2).sqrt()
    separation = torch.where(pooled > 1e-6, (stats["de"].mean - stats["en"].mean) / pooled.clamp_min(1e-6),
                             torch.zeros_like(pooled))
    return separation, components


def english_mean_hooks(model, english: Documents, writer: Component) -> list[Hook] | None:
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
def example_loss_changes(model, tokenizer, sentences: Sequence[str], hooks: Sequence[Hook], n_ctx: int
                         ) -> list[tuple[list[int], Float[Tensor, "n_minus_1"]]]:
    """Hand-written sentences (BOS + tokens, no EOS): each one's token ids after BOS and the loss change under
    `hooks` of predicting each of them (`change[j]` belongs to `ids[j]`)."""
    tokens, present = tokenize_documents(tokenizer, sentences, n_ctx, append_eos=False)
    tokens = tokens.to(device_of(model))
    change = (ablation.token_losses(model, tokens, hooks) - ablation.token_losses(model, tokens)).cpu()
    return [(tokens[i, 1:int(present[i].sum())].tolist(), change[i, :int(present[i].sum()) - 1])
            for i in range(len(sentences))]


def findings_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """`(what, paper's figure, this run)` rows as aligned text columns, with a header."""
    rows = [("", "paper (Pythia-70m)", "this run"), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
