"""Ablations: zero, mean and resample knockouts of heads, MLP outputs and single neurons; circuits and faithfulness.

Hooks are returned as `[(hook_name, fn), ...]` lists for `components.run_with_hooks(model, tokens, hooks)` or the
context manager `with components.hooks_on(model, hooks): model.run_with_cache(tokens)`; nothing is left attached to
the model (the original notebook's global `add_hook` state is gone).

Reference activations (`reference_activations`) are what mean and resample ablation write:
    mean:      the average over a reference batch, per position: `[1, pos, ...]`
    resample:  the reference batch's own activations in a seeded random order: `[batch, pos, ...]`
A component with `position=None` is ablated at every position, otherwise only at its position.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.components import all_heads, all_mlps, Component, Hook, Model, run_with_hooks
from helpers.techniques.patching import PositionalMetric, unembedding_reads
from helpers.techniques.replay import activations, hooked_logits
from helpers.core.uncertainty import Interval, bootstrap_interval, faithfulness_statistic

Metric = Callable[[Tensor], Tensor]
METHODS = ("zero", "mean", "resample")


def _hook_names(components: Iterable[Component]) -> list[str]:
    return sorted({component.hook_name() for component in components})


@torch.no_grad()
def reference_activations(model: Model, tokens: Int[Tensor, "batch pos"], components: Iterable[Component],
                          method: str = "mean", seed: int = 0) -> dict[str, Float[Tensor, "#batch pos ..."]]:
    """Activations that `ablation_hooks` writes, for every hook the components use.

    tokens `[batch, pos]` (the reference distribution) -> `{hook_name: [1, pos, ...]}` for "mean", or
    `{hook_name: [batch, pos, ...]}` rows permuted with `torch.Generator().manual_seed(seed)` for "resample".
    """
    if method not in ("mean", "resample"):
        raise ValueError(f"reference activations are for 'mean' or 'resample', not {method!r}")
    names = _hook_names(components)
    if method == "mean":
        return _streamed_means(model, tokens, names)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    return {name: cache[name][order.to(cache[name].device)] for name in names}


REFERENCE_BUDGET = 2 ** 27  # floats of cached activations per chunk of reference prompts (512 MB in float32)


def _streamed_means(model, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """`{name: [1, pos, ...]}`: each hook's mean over the rows of `tokens`, a chunk of rows at a time (no more than
    about `REFERENCE_BUDGET` floats cached at once), summed in float64 where there is more than one chunk. The clean
    runs are `replay.activations`' (after a shared prefix, where one is registered)."""
    if not names:
        return {}
    cfg = model.cfg
    widest = max(cfg.d_model, cfg.d_mlp or 0, cfg.n_heads * cfg.d_head)
    rows = max(1, REFERENCE_BUDGET // (tokens.shape[1] * len(names) * widest))
    if rows >= len(tokens):
        cache = activations(model, tokens, names)
        return {name: cache[name].mean(0, keepdim=True) for name in names}
    sums: dict[str, Tensor] = {}
    for chunk in tokens.split(rows):
        cache = activations(model, chunk, names)
        dtype = cache[names[0]].dtype
        for name in names:
            part = cache[name].sum(0, keepdim=True, dtype=torch.float64)
            sums[name] = part if name not in sums else sums[name] + part
        del cache
    return {name: (total / len(tokens)).to(dtype) for name, total in sums.items()}


def _writer(sites: list[tuple], reference: Tensor | None) -> Callable:
    def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001 - TransformerLens passes the hook point
        act = act.clone()
        for index in sites:
            full = (slice(None),) + index
            if reference is None:
                act[full] = 0.0
            else:
                source = reference
                if source.shape[0] > act.shape[0]:
                    source = source[: act.shape[0]]
                if source.shape[0] not in (1, act.shape[0]) or source.shape[1:] != act.shape[1:]:
                    raise ValueError(f"reference activation shape {tuple(source.shape)} does not fit the run's "
                                     f"{tuple(act.shape)}; use reference tokens of the same length (and, for "
                                     "resampling, at least as many rows)")
                act[full] = source[full].to(act.dtype)
        return act

    return hook


def ablation_hooks(components: Iterable[Component], method: str = "zero",
                   reference: dict[str, Float[Tensor, "#batch pos ..."]] | None = None) -> list[Hook]:
    """Hooks that knock out `components` (heads via `hook_z`, MLPs via `hook_mlp_out`, neurons via `mlp.hook_post`,
    attention layers via `hook_attn_out`, residual stream) at their positions.

    `method` "zero" writes 0; "mean" and "resample" write `reference[hook_name]` from `reference_activations`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {METHODS}")
    if method != "zero" and reference is None:
        raise ValueError(f"{method} ablation needs reference activations (see reference_activations)")
    grouped: dict[str, list[tuple]] = defaultdict(list)
    for component in components:
        grouped[component.hook_name()].append(component.index_tuple())
    return [(name, _writer(sites, None if method == "zero" else reference[name])) for name, sites in grouped.items()]


@torch.no_grad()
def run_ablated(model: Model, tokens: Int[Tensor, "batch pos"], components: Iterable[Component], method: str = "zero",
                reference_tokens: Int[Tensor, "ref pos"] | None = None, seed: int = 0
                ) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits `[batch, pos, vocab]` of the run on `tokens` with `components` ablated (mean/resample over
    `reference_tokens`, default `tokens` itself)."""
    components = list(components)
    reference = None
    if method != "zero":
        reference = reference_activations(model, tokens if reference_tokens is None else reference_tokens,
                                          components, method, seed)
    return run_with_hooks(model, tokens, fwd_hooks=ablation_hooks(components, method, reference))


def knockout(model: Model, tokens: Int[Tensor, "batch pos"], components: Iterable[Component], metric: Metric,
             method: str = "zero", reference_tokens: Int[Tensor, "ref pos"] | None = None, seed: int = 0) -> float:
    """`metric(logits)` of the ablated run (e.g. the normalised logit difference: 1 = intact, 0 = corrupted)."""
    return float(metric(run_ablated(model, tokens, components, method, reference_tokens, seed)))


@torch.no_grad()
def knockout_each(model: Model, tokens: Int[Tensor, "batch pos"], components: Sequence[Component], metric: Metric,
                  method: str = "zero", reference_tokens: Int[Tensor, "ref pos"] | None = None, seed: int = 0
                  ) -> Float[Tensor, " component"]:
    """The metric with each component ablated on its own: `[len(components)]`."""
    components = list(components)
    reference = None
    if method != "zero":
        reference = reference_activations(model, tokens if reference_tokens is None else reference_tokens,
                                          components, method, seed)
    values = [float(metric(run_with_hooks(model, tokens, fwd_hooks=ablation_hooks([c], method, reference))))
              for c in components]
    return torch.tensor(values)


# ---- circuits ----------------------------------------------------------------------------------------------------
def circuit_universe(model: Model, include_mlps: bool = True) -> list[Component]:
    """The components a circuit is carved from: every head, and every MLP layer when `include_mlps`."""
    universe = all_heads(model.cfg.n_layers, model.cfg.n_heads)
    return universe + (all_mlps(model.cfg.n_layers) if include_mlps else [])


def complement(circuit: Iterable[Component], universe: Iterable[Component], seq_len: int) -> list[Component]:
    """Everything in `universe` not in `circuit`, as positioned components.

    A circuit component with `position=None` keeps that component at every position; with a position, only there
    (the rest of its positions are ablated). Returns a list of components with explicit positions (0..seq_len-1),
    or position None where a component is ablated everywhere.
    """
    kept: dict[Component, set[int] | None] = {}
    for component in circuit:
        base = component.at(None)
        if component.position is None:
            kept[base] = None
        elif kept.get(base, set()) is not None:
            kept.setdefault(base, set()).add(component.position % seq_len)
    out: list[Component] = []
    for component in universe:
        base = component.at(None)
        if base not in kept:
            out.append(base)
        elif kept[base] is not None:
            out += [base.at(pos) for pos in range(seq_len) if pos not in kept[base]]
    return out


def circuit_hooks(model: Model, circuit: Iterable[Component], seq_len: int, method: str = "mean",
                  reference: dict[str, Float[Tensor, "#batch pos ..."]] | None = None,
                  universe: Iterable[Component] | None = None) -> list[Hook]:
    """Hooks that keep only `circuit` and ablate (by default mean-ablate) everything else in `universe`."""
    universe = circuit_universe(model) if universe is None else list(universe)
    return ablation_hooks(complement(circuit, universe, seq_len), method, reference)


@torch.no_grad()
def faithfulness(model: Model, tokens: Int[Tensor, "batch pos"], circuit: Iterable[Component], metric: Metric,
                 method: str = "mean", reference_tokens: Int[Tensor, "ref pos"] | None = None,
                 universe: Iterable[Component] | None = None, seed: int = 0) -> dict[str, float]:
    """How much of the model's behaviour a circuit keeps, with everything outside it ablated.

    Returns `{"full": m(model), "empty": m(all of universe ablated), "circuit": m(only circuit kept),
    "faithfulness": (circuit - empty) / (full - empty)}`; the last is 1 for the full model and 0 for the empty
    circuit.
    """
    universe = circuit_universe(model) if universe is None else list(universe)
    seq_len = tokens.shape[1]
    reference = None
    if method != "zero":
        reference = reference_activations(model, tokens if reference_tokens is None else reference_tokens,
                                          universe, method, seed)
    full = float(metric(model(tokens)))
    empty = float(metric(run_with_hooks(model, tokens, fwd_hooks=ablation_hooks(universe, method, reference))))
    kept = float(metric(run_with_hooks(model, tokens, fwd_hooks=circuit_hooks(model, circuit, seq_len, method,
                                                                              reference, universe))))
    denominator = full - empty
    return {"full": full, "empty": empty, "circuit": kept,
            "faithfulness": (kept - empty) / denominator if denominator != 0 else float("nan")}


# ---- neurons overwritten: masks, pinned values ------------------------------------------------------------------
def _overwrite_neurons(act: Float[Tensor, "batch pos d_mlp"], mask: Bool[Tensor, "*batch d_mlp"],
                       value: Float[Tensor, "*pos d_mlp"] | None, from_position: int
                       ) -> Float[Tensor, "batch pos d_mlp"]:
    """`act` with the masked neurons set to `value` (0 when None) at positions `>= from_position`. `mask` is
    `[d_mlp]` (every prompt) or `[batch, d_mlp]` (per prompt); `value` `[d_mlp]` or `[pos, d_mlp]` (per position)."""
    where = mask.to(act.device)
    where = where[None, None] if where.dim() == 1 else where[:, None]            # [batch | 1, 1, d_mlp]
    if from_position:
        where = where & (torch.arange(act.shape[1], device=act.device) >= from_position)[None, :, None]
    if value is None:
        return act.masked_fill(where, 0.0)
    value = value.to(act.device, act.dtype)
    value = value[None, None] if value.dim() == 1 else value[None]               # [1, pos | 1, d_mlp]
    return torch.where(where, value.expand_as(act), act)


def neuron_mask_hooks(masks: dict[int, Bool[Tensor, "*batch d_mlp"]],
                      fill: dict[int, Float[Tensor, "*pos d_mlp"]] | None = None, from_position: int = 0) -> list[Hook]:
    """Hooks that ablate chosen MLP neurons (`blocks.{layer}.mlp.hook_post`), the same ones for every prompt or a
    different set per prompt.

    masks: `{layer: bool [d_mlp] or [batch, d_mlp]}`, True = ablate. fill: None writes 0 (zero ablation), else
    `{layer: [pos, d_mlp] or [d_mlp]}`, e.g. a mean from `reference_activations` (`reference[name][0]`). Positions
    before `from_position` are left alone.
    """
    def make(layer: int) -> Callable:
        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001 - TransformerLens passes the hook point
            return _overwrite_neurons(act, masks[layer], None if fill is None else fill[layer], from_position)

        return hook

    return [(Component.neuron(layer, 0).hook_name(), make(layer)) for layer in sorted(masks)]


def neuron_value_hooks(values: dict, from_position: int = 0) -> list[Hook]:
    """Hooks that pin single MLP neurons to fixed values at every position `>= from_position` (the original notebook's
    "mean ablation": a neuron set to its mean over a reference distribution, e.g. English text).

    `values` maps `Component.neuron(layer, index)` or `(layer, index)` to a float (or 0-d tensor). Each layer's
    neurons are written by one hook on `blocks.{layer}.mlp.hook_post`, each with its own value (the same writer as
    `neuron_mask_hooks`, with a mask of the pinned neurons).
    """
    grouped: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, value in values.items():
        component = key if isinstance(key, Component) else Component.neuron(*key)
        if component.kind != "neuron":
            raise ValueError(f"neuron_value_hooks pins neurons, got {component}")
        grouped[component.hook_name()].append((component.index, float(value)))

    def make(pairs: list[tuple[int, float]]) -> Callable:
        index = torch.tensor([i for i, _ in pairs])
        pinned = torch.tensor([v for _, v in pairs])

        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            mask = torch.zeros(act.shape[-1], dtype=torch.bool)
            mask[index] = True
            value = torch.zeros(act.shape[-1])
            value[index] = pinned
            return _overwrite_neurons(act, mask, value, from_position)

        return hook

    return [(name, make(pairs)) for name, pairs in grouped.items()]


# ---- normalised logit (Nikankin et al. Eq. 2) ---------------------------------------------------------------------
def normalized_logits(answer_tokens: Int[Tensor, "batch"], pos: int = -1) -> PositionalMetric:
    """`metric(logits)` = per prompt `logit[answer] / max(logit)` at `pos`: `[batch]` (Nikankin et al. Eq. 2's NL).

    Works on logits `[batch, pos, vocab]` or `[batch, vocab]`, and on batches that are several copies of the prompts
    (as in batched sweeps: the answers are repeated). A `PositionalMetric` reading `pos` only, so runs for it
    unembed that position alone."""
    def read(logits: Float[Tensor, "batch 1 vocab"]) -> Float[Tensor, "batch"]:
        last = logits[:, 0].float()
        answers = answer_tokens.to(last.device).repeat(len(last) // len(answer_tokens))
        return last.gather(1, answers[:, None])[:, 0] / last.max(dim=-1).values

    return PositionalMetric([pos], read)


def normalized_logit(answer_tokens: Int[Tensor, "batch"], pos: int = -1) -> Metric:
    """`metric(logits)` = the mean over prompts of `normalized_logits`: a scalar, for `faithfulness` (which then
    gives the normalised-logit faithfulness as a ratio of means)."""
    per_prompt = normalized_logits(answer_tokens, pos)
    return lambda logits: per_prompt(logits).mean()


# ---- a circuit evaluator: many circuits, one prompt set --------------------------------------------------------
@dataclass
class Faithfulness:
    """How much of the model's behaviour one circuit keeps, on an evaluator's prompts.

    Attributes:
        ratio_of_means: `(mean m_circuit - mean m_empty) / (mean m_full - mean m_empty)`: 1 for the full model, 0
            for the empty circuit; stable when some prompt's full and empty values are close.
        mean_of_ratios: the mean over prompts of `(m_circuit - m_empty) / (m_full - m_empty)` (Nikankin et al.
            Eq. 2): the paper's figure; one prompt with `m_full ~ m_empty` can move it arbitrarily. Prompts with
            `m_full == m_empty` (e.g. the answer still the top logit with everything ablated, NL = 1 in both runs),
            where Eq. 2 is undefined, are left out of the mean and counted in `undefined_prompts` (NaN if every
            prompt is).
        circuit: `[batch]` the per-prompt metric of the circuit's run.
        undefined_prompts: how many prompts Eq. 2 could not use.
        full, empty: `[batch]` the per-prompt metric of the full model and of the empty circuit.
    """

    ratio_of_means: float
    mean_of_ratios: float
    circuit: Float[Tensor, "batch"]
    undefined_prompts: int = 0
    full: Float[Tensor, "batch"] | None = None
    empty: Float[Tensor, "batch"] | None = None

    def interval(self, confidence: float = 0.95, seed: int = 0) -> Interval:
        """`ratio_of_means` with its bootstrap interval over the prompts (see `helpers.core.uncertainty`)."""
        if self.full is None or self.empty is None:
            raise ValueError("this Faithfulness holds no per-prompt full and empty values")
        return bootstrap_interval(faithfulness_statistic, self.circuit, self.full, self.empty,
                                  confidence=confidence, seed=seed)


class CircuitEvaluator:
    """Faithfulness of many circuits on one prompt set, with the full and empty runs made once.

    A circuit is a set of components (heads, MLPs, positioned or not, see `complement`) kept intact while the rest
    of `universe` is ablated; `kept_neurons={layer: [neuron, ...]}` also ablates every other neuron of those MLP
    layers (`blocks.{layer}.mlp.hook_post`, every position), e.g. "the top-k neurons of each late MLP".

        evaluate = CircuitEvaluator(model, tokens, normalized_logits(answers), reference=means)
        evaluate([Component.head(2, 1), *all_mlps(n_layers)])            # ratio of means, a float
        evaluate.faithfulness(circuit, kept_neurons={3: [5, 17]}).mean_of_ratios

    Args:
        tokens: `[batch, pos]` the prompts.
        metric: per-prompt metric of the logits, `[batch]` (e.g. `normalized_logits(answers)`).
        reference: `{hook_name: [1, pos, ...]}` mean (or resampled) activations from `reference_activations`, for
            every hook of `universe` and, where neurons are kept, `blocks.{layer}.mlp.hook_post`; default computed
            from `reference_tokens` (default `tokens`).
    """

    def __init__(self, model: Model, tokens: Int[Tensor, "batch pos"],
                 metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]], *,
                 method: str = "mean", reference: dict[str, Float[Tensor, "#batch pos ..."]] | None = None,
                 reference_tokens: Int[Tensor, "ref pos"] | None = None, universe: Iterable[Component] | None = None,
                 neuron_layers: Iterable[int] = (), seed: int = 0):
        self.model, self.tokens, self.metric, self.method = model, tokens, metric, method
        self.universe = circuit_universe(model) if universe is None else list(universe)
        if method != "zero" and reference is None:
            sites = self.universe + [Component.neuron(layer, 0) for layer in neuron_layers]
            reference = reference_activations(model, tokens if reference_tokens is None else reference_tokens, sites,
                                              method, seed)
        self.reference = reference
        self.full = self._run([])
        self.empty = self._run(ablation_hooks(self.universe, method, reference))

    @torch.no_grad()
    def _run(self, hooks: list[Hook]) -> Float[Tensor, "batch"]:
        """The metric under `hooks`, unembedding only the positions it reads (`patching.unembedding_reads`), after
        a prefix the prompts share where one is registered (`replay.share_prefix`)."""
        reads, value = unembedding_reads(self.model, self.metric, self.tokens.shape[1])
        return value(hooked_logits(self.model, self.tokens, [*hooks, *reads])).float().cpu()

    def neuron_hooks(self, kept_neurons: dict[int, Sequence[int]]) -> list[Hook]:
        """Hooks that ablate every neuron of each layer in `kept_neurons` except the listed ones."""
        masks = {}
        for layer, keep in kept_neurons.items():
            mask = torch.ones(self.model.cfg.d_mlp, dtype=torch.bool)
            mask[list(keep)] = False
            masks[layer] = mask
        fill = None
        if self.method != "zero":
            fill = {layer: self.reference[Component.neuron(layer, 0).hook_name()][0] for layer in masks}
        return neuron_mask_hooks(masks, fill)

    def faithfulness(self, circuit: Iterable[Component],
                     kept_neurons: dict[int, Sequence[int]] | None = None) -> Faithfulness:
        """Both faithfulness figures of `circuit` (plus the kept neurons, if any); see `Faithfulness`."""
        hooks = circuit_hooks(self.model, circuit, self.tokens.shape[1], self.method, self.reference, self.universe)
        if kept_neurons:
            hooks = hooks + self.neuron_hooks(kept_neurons)
        kept = self._run(hooks)
        full, empty = float(self.full.mean()), float(self.empty.mean())
        denominator = full - empty
        ratio = (float(kept.mean()) - empty) / denominator if denominator != 0 else float("nan")
        defined = self.full != self.empty
        per_prompt = (kept - self.empty)[defined] / (self.full - self.empty)[defined]
        mean_of_ratios = float(per_prompt.mean()) if defined.any() else float("nan")
        return Faithfulness(ratio, mean_of_ratios, kept, int((~defined).sum()), self.full, self.empty)

    def __call__(self, circuit: Iterable[Component], kept_neurons: dict[int, Sequence[int]] | None = None) -> float:
        """The ratio-of-means faithfulness of `circuit`."""
        return self.faithfulness(circuit, kept_neurons).ratio_of_means


def head_value_hooks(values: dict, from_position: int = 0) -> list[Hook]:
    """Hooks that pin attention heads' `z` (`blocks.{layer}.attn.hook_z`, `[batch, pos, head, d_head]`) to fixed
    vectors at every position `>= from_position`: the head-level analogue of `neuron_value_hooks`, e.g. a head set to
    its mean over English text.

    `values` maps `Component.head(layer, head)` or `(layer, head)` to a `[d_head]` tensor.
    """
    grouped: dict[str, list[tuple[int, Tensor]]] = defaultdict(list)
    for key, value in values.items():
        component = key if isinstance(key, Component) else Component.head(*key)
        if component.kind != "head":
            raise ValueError(f"head_value_hooks pins heads, got {component}")
        grouped[component.hook_name()].append((component.index, torch.as_tensor(value)))

    def make(pairs: list[tuple[int, Tensor]]) -> Callable:
        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            act = act.clone()
            for head, value in pairs:
                act[:, from_position:, head] = value.to(act.device, act.dtype)
            return act

        return hook

    return [(name, make(pairs)) for name, pairs in grouped.items()]
