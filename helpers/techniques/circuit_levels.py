"""Sketching a circuit level by level, the IOI way (Wang et al. 2022): each level is found from the one it feeds.

    level 1     heads that write the answer directly: ranked by direct logit attribution (DLA), kept as the shortest
                top-ranked prefix whose knockout removes a target share of the behaviour (`smallest_knockout_set`);
    backup      heads that write *more* once level 1 is knocked out: DLA of the knocked-out run beside the
                original (`dla_under_knockout`), and where those heads look then (`attention_from` on its cache);
    level n+1   heads whose corrupted output, sent only to level n's query, key or value inputs, moves the metric
                (`upstream_path_patch`: path patching from the heads that can reach the receivers).

A knockout writes zero or the mean over a reference batch (`helpers.techniques.ablation`) into a head's output
`hook_z`, at one position or all. The metric is any `logits -> scalar` where 1 is the intact behaviour, e.g. the logit difference as
a fraction of the clean one (`patching.normalised_logit_diff(answers, clean_ld, 0.0)`).

A head in layer `l` can only reach heads in later layers, so a receiver in layer 0 has no upstream heads: what it
reads is the embedding (and, in a model without parallel attention, nothing else). `upstream_path_patch` returns
exact zeros for heads that cannot reach any receiver, without running them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.techniques import ablation, dla, patching
from helpers.core.components import circuit_hook_names, Component, hook_name, hooks_on, Model

Metric = Callable[[Tensor], Tensor]
Head = tuple[int, int]


@torch.no_grad()
def smallest_knockout_set(model: Model, tokens: Int[Tensor, "batch pos"], ranked: Sequence[Head], metric: Metric,
                          target: float, method: str = "zero", position: int | None = -1,
                          reference_tokens: Int[Tensor, "ref pos"] | None = None) -> tuple[list[Component], float]:
    """The shortest prefix of `ranked` heads whose knockout at `position` lowers `metric` by at least `target`
    (from 1, the intact model): `1 - metric(knocked-out run) >= target`.

    Returns `(heads as components at position, metric of their knockout)`; when no prefix reaches the target,
    `([], metric with every ranked head knocked out)` (the metric of the intact run if `ranked` is empty).
    """
    value = None
    for k in range(1, len(ranked) + 1):
        candidate = [Component.head(layer, head, position) for layer, head in ranked[:k]]
        value = ablation.knockout(model, tokens, candidate, metric, method, reference_tokens)
        if 1 - value >= target:
            return candidate, value
    return [], ablation.knockout(model, tokens, [], metric) if value is None else value


@dataclass
class KnockoutDLA:
    """Head DLA of the intact run and of the run with `knocked_out` ablated, on the same prompts.

    Attributes:
        original, ablated: `[n_layers, n_heads]` mean DLA along the logit-difference direction at the read position.
        knocked_out: the ablated heads.
        logits, cache: the ablated run (its cache holds every activation, patterns included).
    """

    original: Float[Tensor, "layer head"]
    ablated: Float[Tensor, "layer head"]
    knocked_out: list[Component]
    logits: Float[Tensor, "batch pos vocab"]
    cache: object

    @property
    def change(self) -> Float[Tensor, "layer head"]:
        """`ablated - original`, zero at the knocked-out heads (their change is the knockout, not compensation)."""
        change = self.ablated - self.original
        for component in self.knocked_out:
            change[component.layer, component.index] = 0.0
        return change

    def backup(self, threshold: float, k: int | None = None) -> list[Head]:
        """Heads whose DLA rose by more than `threshold` under the knockout, largest rise first (at most `k`)."""
        change = self.change
        ranked = dla.top_components(change, change.numel() if k is None else k)
        return [head for head, value in ranked if value > threshold]

    @property
    def total_rise(self) -> float:
        """Sum of the positive changes: the DLA the other heads make up for."""
        return self.change.clamp(min=0).sum().item()


@torch.no_grad()
def dla_under_knockout(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"],
                       knocked_out: Sequence[Component], method: str = "zero", clean_cache=None,
                       reference_tokens: Int[Tensor, "ref pos"] | None = None, pos: int = -1) -> KnockoutDLA:
    """Knock out `knocked_out` (zero, or mean over `reference_tokens`, default `tokens`) and attribute the logit
    difference at `pos` to every head, beside the intact run's attribution (from `clean_cache` if given)."""
    knocked_out = list(knocked_out)
    if clean_cache is None:
        _, clean_cache = model.run_with_cache(tokens, names_filter=circuit_hook_names(model))
    hooks = []
    if knocked_out:
        reference = None
        if method != "zero":
            source = tokens if reference_tokens is None else reference_tokens
            reference = ablation.reference_activations(model, source, knocked_out, method)
        hooks = ablation.ablation_hooks(knocked_out, method, reference)
    with hooks_on(model, hooks):
        logits, cache = model.run_with_cache(tokens, names_filter=circuit_hook_names(model))
    return KnockoutDLA(dla.head_attribution(model, clean_cache, answers, pos),
                       dla.head_attribution(model, cache, answers, pos), knocked_out, logits, cache)


def attention_from(cache, heads: Sequence[Head], query_pos: int) -> Float[Tensor, "head key_pos"]:
    """Each head's attention from `query_pos` to every key position, mean over the batch: `[len(heads), key_pos]`
    (rows sum to 1; keys after `query_pos` get 0 under the causal mask).

    Reads a cache already made, such as a knocked-out run's (`KnockoutDLA.cache`);
    `helpers.techniques.attention.mean_patterns` runs the model itself for the whole mean pattern."""
    rows = [cache[hook_name("head", layer, "pattern")][:, head, query_pos].mean(0) for layer, head in heads]
    if rows:
        return torch.stack(rows)
    return torch.zeros(0, cache[hook_name("head", 0, "pattern")].shape[-1])


@torch.no_grad()
def upstream_path_patch(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                        corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, receivers: Sequence[Component],
                        receiver_site: str = "v", senders: Sequence[tuple[int, int]] | None = None,
                        **path_patch_options) -> Float[Tensor, "layer head"]:
    """Path patching from every head that can reach `receivers` (layer below the last receiver's) into their
    `receiver_site` ("q", "k" or "v") inputs, each sender alone: `[n_layers, n_heads]` change of `metric` from the
    clean run's value (0 = the path carries nothing; exactly 0 for heads that cannot reach a receiver, and for heads
    left out of `senders` (layer, head) when it is given, e.g. by `screened_senders`).

    Receivers are head components whose `position` (None: every position) is where their input is patched; options
    go to `patching.path_patch` (e.g. `sender_positions`, `freeze_mlps`, `max_rows`).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    change = torch.zeros(n_layers, n_heads)
    last_layer = max((r.layer for r in receivers), default=0)
    pairs = [(layer, head) for layer in range(last_layer) for head in range(n_heads)] if senders is None else \
        [(layer, head) for layer, head in senders if layer < last_layer]
    if not pairs:
        return change
    clean_value = float(metric(model(clean_tokens)))
    values = patching.path_patch(model, clean_tokens, corrupted_tokens, metric, receivers, receiver_site,
                                 [[Component.head(layer, head)] for layer, head in pairs], **path_patch_options)
    change[tuple(torch.tensor(pairs).T)] = values - clean_value
    return change


def screened_senders(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                     metric: Metric, below_layer: int, top: int) -> list[tuple[int, int]]:
    """The `top` heads below `below_layer` whose output, patched from the corrupted into the clean run, has the
    largest estimated |effect| on `metric` (attribution patching: one forward and one backward pass): the senders
    to path-patch exactly on a deep model, where every head of 30 layers would cost hundreds of passes. A head's
    whole effect is the sum of its paths, so one with a large path through the receivers but a small whole effect
    (other paths cancelling it) can be missed: the AtP* caveat, which the notebook states where it screens."""
    estimate = patching.attribution_patch_heads(model, corrupted_tokens, clean_tokens, metric, "z")[:below_layer]
    order = estimate.abs().flatten().argsort(descending=True)[:top]
    return sorted((int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in order)
