"""Activation patching, path patching and attribution patching, batched: many patched variants per forward pass.

Conventions (those of `transformer_lens.patching`, whose results these sweeps reproduce):
- Activation patching *denoises*: the model runs on `corrupted_tokens [batch, pos]` and one activation is replaced
  by its value from `clean_cache` (a cache of the clean run). `metric(logits [batch, pos, vocab]) -> scalar` is
  applied to each patched run; with a normalised logit difference, 0 = corrupted behaviour, 1 = clean behaviour.
- Result shapes follow TransformerLens: `[n_layers, pos]` for the residual stream, attention and MLP outputs;
  `[n_layers, n_heads]` for heads over all positions; `[n_layers, pos, n_heads]` for head q/k/v/z by position;
  `[n_layers, n_heads, dest_pos]` for attention patterns by position.
- Grouped-query attention (`model.cfg.n_key_value_heads` < `n_heads`, e.g. Llama-3): `hook_k` and `hook_v` hold
  `n_kv = n_key_value_heads` heads, each shared by a group of `n_heads // n_kv` query heads; query head h reads
  key/value head `kv_head(model, h) = h // (n_heads // n_kv)`. Key and value sweeps therefore have `n_kv` head
  columns (`[n_layers, n_kv]`, `[n_layers, pos, n_kv]`), as in TransformerLens, and a head `Component` patched
  or path-patched at "k" or "v" means the key/value head it reads (which the rest of its group reads too).

How a sweep runs: a patch cannot change what comes before it, neither the layers before its first layer nor
(attention being causal) the positions before its first position. So the corrupted tokens run once unpatched
through the blocks (`replay.Trace`, the bridge's own blocks with its processed weights and hooks), and each variant
starts at its first (layer, position): the residual stream there from that run, the run's keys and values for the
earlier positions, only the later positions recomputed. Variants sharing a start run batched (the corrupted batch
repeated once per variant, `[n_variants * batch, pos - start]`, one hook per hook point writing each variant's clean slice
into its own rows), and only the logits the metric reads are computed (those a `PositionalMetric` declares, or
those `learn_reads` finds a plain `metric(logits)` depends on, from its gradient, checked; else every logit).
`max_rows` bounds the rows of one pass; by default they fit `ACTIVATION_BUDGET`. Where a model's blocks cannot be
run that way exactly (`replay.fast_path`, probed once per model), every variant runs from the embedding instead,
with full logits, and a warning says so once.

Attention patterns are patched at `hook_pattern` where the model reads that hook back; where it only reports it
(transformer-lens 3.9's GPT-Neo bridge, see `pattern_route`), the same patch is applied exactly through each head's
output, `z = pattern @ v`.

Path patching (`path_patch`) sends the corrupted output of sender components to receiver heads' q, k or v inputs
only (all other heads frozen to their clean values), the IOI paper's definition; attribution patching
(`attribution_patch*`) is the first-order approximation `(clean - corrupted) . d metric / d act`, evaluated on the
corrupted run, per component or per neuron.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence
from weakref import WeakKeyDictionary

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from helpers.core import cache as result_cache
from helpers.core.components import Component, Model, all_heads, device_of, hook_name, run_with_hooks
from helpers.techniques.replay import (FAST_HOOKS, QUERY_AXIS_HOOKS, NoFastPath, Trace, block_calls,
                                       equal_up_to_rounding, fast_path, hooked_logits, logits_of, repeat_rows,
                                       sources_match_prefix)

Metric = Callable[[Tensor], Tensor]
Site = tuple[str, tuple]  # (hook name, index into the activation after the batch dimension)
Variant = Sequence[Site]
HEAD_SITES = ("z", "q", "k", "v", "pattern")
BLOCK_HOOKS = ("resid_pre", "attn_out", "mlp_out")
LOGIT_BUDGET = 2 ** 26  # floats of logits per forward pass (256 MB in float32) when max_rows is not given
ACTIVATION_BUDGET = 2 ** 25  # floats of activations and logits per pass (128 MB in float32) when max_rows is not given


def _default_rows(model, tokens: Tensor) -> int:
    return max(len(tokens), LOGIT_BUDGET // max(1, tokens.shape[1] * model.cfg.d_vocab))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


# ---- heads under grouped-query attention --------------------------------------------------------------------------
def n_kv_heads(model: Model) -> int:
    """Key/value heads per layer: `cfg.n_key_value_heads` under grouped-query attention, else `cfg.n_heads`."""
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def kv_head(model: Model, head: int) -> int:
    """The key/value head that query head `head` reads: `head // (n_heads // n_kv_heads)` (`head` without GQA)."""
    return head // (model.cfg.n_heads // n_kv_heads(model))


def _site_heads(model, site: str) -> int:
    return n_kv_heads(model) if site in ("k", "v") else model.cfg.n_heads


def _component_site(model, component: Component, site: str | None) -> Site:
    """`(hook name, index)` of a component at `site`; a head's "k"/"v" index is the key/value head it reads."""
    name = component.hook_name(site if component.kind in ("head", "neuron") else None)
    index = component.index_tuple(site)
    if component.kind == "head" and site in ("k", "v"):
        index = (index[0], kv_head(model, component.index))
    return name, index


# ---- attention patterns -------------------------------------------------------------------------------------------
_PATTERN_ROUTES: WeakKeyDictionary = WeakKeyDictionary()


def _is_pattern(name: str) -> bool:
    return name.endswith(".attn.hook_pattern")


def _attend(pattern: Tensor, v: Tensor) -> Tensor:
    """Head outputs `z [batch, query_pos, n_heads, d_head]` = pattern `[batch, n_heads, query_pos, key_pos]` times
    values `[batch, key_pos, n_kv, d_head]`, each query head reading its key/value head."""
    v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", pattern, v.to(pattern.dtype))


def _uniform_pattern(pattern: Tensor, hook=None) -> Tensor:  # noqa: ARG001
    causal = torch.ones_like(pattern).tril()
    return causal / causal.sum(-1, keepdim=True)


@torch.no_grad()
def pattern_route(model: Model) -> str:
    """Where this model's attention patterns can be patched; a probe on four tokens, run once per model.

    "pattern": writing `blocks.{L}.attn.hook_pattern` changes the output, so sweeps patch that hook, as
    TransformerLens does (the GPT-2, GPT-NeoX and Llama bridges compute attention themselves and read it back).
    "z": the hook fires, but what is written there is dropped, while each head's output is exactly
    `z = pattern @ v`. This is transformer-lens 3.9's GPT-Neo bridge: it runs the Hugging Face attention and fires
    the hook on the weights that attention returns, after they were used (so TransformerLens's own pattern sweeps
    change nothing there). A pattern patch is then written at `hook_z` instead: the patched heads' rows of z are
    recomputed from the new pattern and the run's own values, which is exact, since the pattern reaches the output
    only through z. Raises NotImplementedError, naming the architecture, when neither holds.
    """
    if model in _PATTERN_ROUTES:
        return _PATTERN_ROUTES[model]
    tokens = torch.arange(min(4, model.cfg.d_vocab), device=device_of(model))[None]
    logits, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name.endswith(("attn.hook_pattern", "attn.hook_v", "attn.hook_z")))
    layers = range(model.cfg.n_layers)
    patched = run_with_hooks(model, tokens, fwd_hooks=[(hook_name("head", layer, "pattern"), _uniform_pattern)
                                                      for layer in layers])
    if not torch.equal(patched, logits):
        route = "pattern"
    elif all(equal_up_to_rounding(
            _attend(cache[hook_name("head", layer, "pattern")], cache[hook_name("head", layer, "v")]),
            cache[hook_name("head", layer, "z")]) for layer in layers):
        route = "z"
    else:
        architecture = getattr(model.cfg, "architecture", None) or type(model).__name__
        raise NotImplementedError(
            f"attention patterns of {architecture} cannot be patched: writing blocks.L.attn.hook_pattern does not "
            "change its output, and its head outputs hook_z are not pattern @ v")
    _PATTERN_ROUTES[model] = route
    return route


def _patterns_through_z(model, variants: Sequence[Variant]) -> bool:
    """Whether the variants' pattern sites must be written at hook_z (see `pattern_route`), whose sites it checks."""
    indices = [index for variant in variants for name, index in variant if _is_pattern(name)]
    if not indices or pattern_route(model) == "pattern":
        return False
    if any(len(index) > 2 or not isinstance(index[0], int) for index in indices):
        raise ValueError("this model's patterns are patched through hook_z, by whole rows: give pattern sites as "
                         "(head,) or (head, dest_pos) with an integer head")
    return True


# ---- the batched engine -------------------------------------------------------------------------------------------
def _identity(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
    return act


def _copy_hook(source: Tensor, writes: list[tuple[int, tuple]], n: int, batch: int):
    """A hook on an activation `[n * batch, ...]` setting `act[slot block][:, *index] = source[:, *index]` for each
    `(slot, index)` in `writes`."""
    def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        view = act.view(n, batch, *act.shape[1:])
        for slot, index in writes:
            full = (slice(None),) + index
            view[slot][full] = source[full].to(act.device, act.dtype)
        return act

    return hook


def _pattern_hooks_at_z(model, pattern: Tensor, writes: list[tuple[int, tuple]], n: int, batch: int,
                        v_hook, z_hook) -> tuple:
    """The (hook_v, hook_z) hooks of one layer that write rows of `pattern [batch, n_heads, dest, src]` through
    the head outputs, for each `(slot, (head,))` (all rows) or `(slot, (head, dest))` in `writes`.

    hook_v applies `v_hook` (this layer's own value writes) and keeps the values `[n * batch, src, n_kv, d_head]`;
    hook_z sets `z[:, dest, head] = pattern[:, head, dest] @ v[:, :, kv_head(head)]`, then applies `z_hook` (this
    layer's own z writes, which come after the pattern in the model too).
    """
    values: dict[str, Tensor] = {}

    def keep_v(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        act = v_hook(act)
        values["v"] = act.view(n, batch, *act.shape[1:])
        return act

    def write_z(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        view = act.view(n, batch, *act.shape[1:])
        for slot, (head, *dest) in writes:
            rows = pattern[:, head][(slice(None), *dest)].to(act.device, act.dtype)  # [batch, (dest,) src]
            v = values["v"][slot][:, :, kv_head(model, head)]  # [batch, src, d_head]
            view[slot][(slice(None), *(dest or [slice(None)]), head)] = torch.einsum("b...k,bkd->b...d", rows, v)
        return z_hook(act)

    return keep_v, write_z


def _write_hooks(model, sources: dict[str, Tensor], by_hook: dict[str, list[tuple[int, tuple]]], n: int,
                 batch: int, patterns_at_z: bool) -> list[tuple[str, Callable]]:
    """One hook per hook point, writing each variant's sites (`by_hook[name] = [(slot, index), ...]`) into its own
    block of `batch` rows; with `patterns_at_z`, pattern sites are written through hook_v/hook_z instead."""
    rerouted = [name for name in by_hook if patterns_at_z and _is_pattern(name)]
    hooks = {name: _copy_hook(sources[name], writes, n, batch) for name, writes in by_hook.items()
             if name not in rerouted}
    for name in rerouted:
        layer = name.removesuffix("pattern")  # "blocks.{L}.attn.hook_"
        hooks[layer + "v"], hooks[layer + "z"] = _pattern_hooks_at_z(
            model, sources[name], by_hook[name], n, batch, hooks.get(layer + "v", _identity),
            hooks.get(layer + "z", _identity))
    return list(hooks.items())


# ---- metrics that read a few positions ----------------------------------------------------------------------------
class PositionalMetric:
    """A metric that reads the logits at a few positions only, and perhaps a few tokens' logits only, and says which:
    the engine then computes just those (the unembedding is most of a real model's arithmetic).

    `positions`: the positions read (negative counts from the end). `tokens`: the vocabulary ids read (None: the
    whole vocabulary). `read(logits [batch, len(positions), len(tokens) or vocab])` computes the metric from the
    logits at those positions and of those tokens, in that order. Called like any metric,
    `metric(logits [batch, pos, vocab])` selects them itself; `[batch, vocab]` is taken as the logits at the one
    position read. A plain callable metric is given every logit, so any metric stays correct.
    """

    def __init__(self, positions: Sequence[int],
                 read: Callable[[Float[Tensor, "batch read vocab_read"]], Float[Tensor, "*batch"]],
                 tokens: Sequence[int] | Int[Tensor, " tokens"] | None = None):
        self.positions, self.read = tuple(int(p) for p in positions), read
        self.tokens = None if tokens is None else [int(t) for t in (tokens.tolist() if isinstance(tokens, Tensor)
                                                                    else tokens)]

    def select(self, logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"]
               ) -> Float[Tensor, "batch read vocab_read"]:
        """The logits this metric reads, `[batch, len(positions), len(tokens) or vocab]`, from `[batch, pos, vocab]`."""
        chosen = logits[:, list(self.positions)] if logits.ndim == 3 else logits[:, None]
        return chosen if self.tokens is None else chosen[..., self.tokens]

    def __call__(self, logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"]
                 ) -> Float[Tensor, "*batch"]:
        return self.read(self.select(logits))


def _read_positions(metric: Metric, n_pos: int) -> list[int]:
    """The positions `metric` reads, in `[0, n_pos)`: those a `PositionalMetric` declares, else all of them."""
    if isinstance(metric, PositionalMetric):
        return [p % n_pos for p in metric.positions]
    return list(range(n_pos))


def _read_tokens(metric: Metric) -> list[int] | None:
    """The vocabulary ids `metric` reads (None: all)."""
    return metric.tokens if isinstance(metric, PositionalMetric) else None


def _score(metric: Metric, logits: Tensor) -> float:
    """`metric` on the logits it reads (`[batch, len(read), len(tokens) or vocab]`)."""
    return float(metric.read(logits) if isinstance(metric, PositionalMetric) else metric(logits))


class _LearnedReads(PositionalMetric):
    """A plain metric given only the logits it was found to read (`learn_reads`): the rest of its input is taken from
    the run being patched (`base [batch, pos, vocab]`), which the check showed changes nothing."""

    def __init__(self, metric: Metric, base: Tensor, positions: list[int], tokens: list[int] | None):
        super().__init__(positions, self._fill_and_call, tokens)
        self.metric, self.scratch = metric, base.clone()
        self._positions = torch.tensor(positions, device=base.device)
        self._tokens = None if tokens is None else torch.tensor(tokens, device=base.device)
        self._kept = self.scratch[self._index()].clone()

    def _index(self) -> tuple:
        if self._tokens is None:
            return (slice(None), self._positions)
        return (slice(None), self._positions[:, None], self._tokens[None, :])

    def _index_tensors(self) -> tuple[Tensor, ...]:
        """`_index` as index tensors only (what `torch.index_put` takes)."""
        rows = torch.arange(len(self.scratch), device=self.scratch.device)
        if self._tokens is None:
            return (rows[:, None], self._positions[None, :])
        return (rows[:, None, None], self._positions[None, :, None], self._tokens[None, None, :])

    def _fill_and_call(self, read: Tensor) -> Tensor:
        """The metric of `base` with the read entries replaced by `read [batch, len(positions), len(tokens) or
        vocab]`; the entries are put back afterwards (one scratch tensor, no copy of the logits per call). Where
        `read` needs a gradient, a copy is filled instead (autograd keeps what the metric saw)."""
        index = self._index()
        if read.requires_grad:
            return self.metric(torch.index_put(self.scratch, self._index_tensors(), read.to(self.scratch.dtype)))
        self.scratch[index] = read.to(self.scratch.dtype)
        try:
            return self.metric(self.scratch)
        finally:
            self.scratch[index] = self._kept


def _metric_reads(metric: Metric, logits: Tensor) -> Tensor | None:
    """`[batch, pos, vocab]`: where `d metric / d logits` is not zero; None where the metric is not a differentiable
    scalar, or changes its input."""
    probe = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            value = metric(probe)
        except Exception:  # noqa: BLE001 - a metric that cannot take a leaf tensor is given every logit
            return None
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
            return None
        (grad,) = torch.autograd.grad(value.reshape(()), probe, allow_unused=True)
    if grad is None or not torch.equal(probe.detach(), logits):
        return None
    return grad != 0  # a NaN gradient counts as read


def _mixed(read_from: Tensor, rest_from: Tensor, learned: _LearnedReads) -> Tensor:
    mixed = rest_from.clone()
    index = learned._index()
    mixed[index] = read_from[index]
    return mixed


def learn_reads(metric: Metric, runs: Sequence[Float[Tensor, "batch pos vocab"]]) -> Metric:
    """`metric` as a `PositionalMetric` reading only the positions and vocabulary entries it depends on, or `metric`
    itself where that cannot be shown. The engine then unembeds just those (see `PositionalMetric`).

    Detection: the gradient of `metric` with respect to the logits of each run in `runs` (the first is the run being
    patched, e.g. the corrupted run; others, e.g. the clean run, are checked too). The entries it reads are those of
    nonzero gradient: a logit difference reads two vocabulary entries at one position, a log-softmax every entry at
    its positions. The learned metric calls `metric` on the first run's logits with those entries replaced.
    Check: on every run, `metric` of that run equals `metric` of each other run, and of the run with every entry
    changed (`1 - 2 * logits`), with the read entries taken from it: no unread entry changes the value.
    Falls back to `metric` itself (every logit computed) where the metric is not a differentiable scalar, changes
    its input, reads nothing by its gradient (a piecewise-constant metric: an accuracy, an argmax), reads more than
    half the logits, or fails the check (it depends on an entry through a path without gradient)."""
    if isinstance(metric, PositionalMetric) or not runs:
        return metric
    reads = [_metric_reads(metric, logits) for logits in runs]
    if any(r is None for r in reads):
        return metric
    read = torch.stack(reads).any(0)  # [batch, pos, vocab]
    positions = read.any(2).any(0).nonzero().flatten().tolist()
    tokens = read.any(1).any(0).nonzero().flatten().tolist()
    n_pos, n_vocab = read.shape[1:]
    if not positions or len(positions) * (n_vocab if 2 * len(tokens) > n_vocab else len(tokens)) * 2 > n_pos * n_vocab:
        return metric
    learned = _LearnedReads(metric, runs[0], positions, None if 2 * len(tokens) > n_vocab else tokens)
    for i, logits in enumerate(runs):
        expected = float(metric(logits))
        others = [rest for j, rest in enumerate(runs) if j != i] + [1.0 - 2.0 * logits]  # every entry changed
        for rest in others:
            got = float(metric(_mixed(logits, rest, learned)))
            if not abs(got - expected) <= 1e-6 * max(1.0, abs(expected)):
                return metric
    return learned


def unembedding_reads(model: Model, metric: Metric, n_pos: int) -> tuple[list[tuple[str, Callable]], Metric]:
    """`(hooks, value)`: for a `PositionalMetric`, a hook that hands the unembedding only the positions the metric
    reads (`unembed.hook_in`), so a run's logits are `[batch, len(positions), d_vocab]`, and `value(those logits)`,
    the metric; otherwise (or for a model without that hook) no hooks and the metric itself, on full logits."""
    if not isinstance(metric, PositionalMetric) or not hasattr(getattr(model, "unembed", None), "hook_in"):
        return [], metric
    read = _read_positions(metric, n_pos)

    def select(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        return act[:, read]

    def value(logits: Tensor) -> Tensor:
        return metric.read(logits if metric.tokens is None else logits[..., metric.tokens])

    return [("unembed.hook_in", select)], value


def _position_axis(name: str) -> int:
    """The position axis of a hook's activation, after the batch: the query axis of patterns and scores."""
    return 1 if name.endswith(QUERY_AXIS_HOOKS) else 0


def _positions_written(index: tuple, axis: int, n_pos: int) -> range | None:
    """The positions a site index writes (None where it is not an int or a forward slice)."""
    position = index[axis] if len(index) > axis else slice(None)
    if isinstance(position, int):
        return range(position % n_pos, position % n_pos + 1)
    if isinstance(position, slice) and (position.step or 1) > 0:
        return range(n_pos)[position]
    return None


def _patch_start(variant: Variant, n_layers: int, n_pos: int) -> tuple[int, int] | None:
    """The first (layer, position) a variant's sites write: nothing before it can change (attention is causal).
    `(n_layers, n_pos)` for no sites; None where a site is outside `FAST_HOOKS` or its positions are not a range."""
    layers, positions = [n_layers], [n_pos]
    for name, index in variant:
        layer, _, hook = name.removeprefix("blocks.").partition(".")
        written = _positions_written(index, _position_axis(name), n_pos)
        if not name.startswith("blocks.") or hook not in FAST_HOOKS or written is None:
            return None
        layers.append(int(layer))
        positions.append(written.start if written else n_pos)
    return min(layers), min(positions)


def _suffix_index(index: tuple, axis: int, n_pos: int, start: int) -> tuple | None:
    """A site index in the coordinates of a run of positions `start:`, keeping the positions it writes from `start`
    on (None where it writes none). An index without a position writes every position of the run."""
    if len(index) <= axis:
        return index
    written = [p for p in _positions_written(index, axis, n_pos) if p >= start]
    if not written:
        return None
    if isinstance(index[axis], int):
        position = written[0] - start
    else:
        step = index[axis].step or 1
        position = slice(written[0] - start, written[-1] - start + 1, step)
    return index[:axis] + (position,) + index[axis + 1:]


def _rows_per_pass(model, n_pos: int, start: int, n_read: int) -> int:
    """Rows one pass may hold so that its activations (attention patterns included), the keys and values it repeats
    and its logits stay within `ACTIVATION_BUDGET` floats."""
    cfg, new = model.cfg, n_pos - start
    per_row = (new * (max(cfg.d_mlp or 0, 4 * cfg.d_model) + 2 * cfg.n_heads * n_pos)
               + 2 * start * n_kv_heads(model) * cfg.d_head + n_read * cfg.d_vocab)
    return max(1, ACTIVATION_BUDGET // per_row)


BLOCK_CALL_FLOPS = 5e7  # what one block call costs beyond its arithmetic (the bridge's Python), in CPU FLOPs


def _passes(model, starts: list[tuple[int, int]], batch: int, n_pos: int, per_pass) -> list[tuple[int, int, list]]:
    """`(first_layer, start_position, variant numbers)` of each pass: variants in (position, layer) order, up to
    `per_pass(start_position)` per pass. The variants sharing a start join the pass (one starting at an earlier or
    equal layer and position, the cheapest such) when recomputing the layers and positions between costs less arithmetic
    than the block calls of a pass of their own would cost (`BLOCK_CALL_FLOPS`; this batches a small model's sweeps,
    whose passes are mostly the bridge's overhead)."""
    cfg = model.cfg
    flops_per_token_layer = 2 * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * (cfg.d_mlp or 4 * cfg.d_model))
    by_start: dict[tuple[int, int], list[int]] = defaultdict(list)
    for v, start in enumerate(starts):
        by_start[start].append(v)
    passes: list[tuple[int, int, list]] = []
    for (layer, position), members in sorted(by_start.items(), key=lambda item: (item[0][1], item[0][0])):
        for i in range(0, len(members), per_pass(position)):
            group = members[i:i + per_pass(position)]
            own = (cfg.n_layers - layer) * (n_pos - position)
            extras = [(((cfg.n_layers - first) * (n_pos - first_position) - own) * len(group) * batch
                       * flops_per_token_layer, k)
                      for k, (first, first_position, joined) in enumerate(passes)
                      if layer < cfg.n_layers and first <= layer
                      and len(joined) + len(group) <= per_pass(first_position)]
            extra, k = min(extras, default=(float("inf"), -1))
            if extra < (cfg.n_layers - layer) * BLOCK_CALL_FLOPS:
                passes[k][2].extend(group)
            else:
                passes.append((layer, position, list(group)))
    return passes


def _run_from_starts(model, tokens: Tensor, sources: dict[str, Tensor], variants: Sequence[Variant],
                     starts: list[tuple[int, int]], metric: Metric, other_runs: Sequence[Tensor],
                     max_rows: int | None, progress: bool) -> Tensor:
    """The fast engine (see `run_patched_variants`): one unpatched trace (whose logits `learn_reads` reads a plain
    metric's reads from), then each pass runs the variants that share a start (layer, position) from there, with the
    trace's keys and values for the earlier positions."""
    batch, n_pos, n_layers = tokens.shape[0], tokens.shape[1], model.cfg.n_layers
    recorded = block_calls(model, tokens)
    metric = learn_reads(metric, [recorded[1], *other_runs])
    trace = Trace(model, tokens, _read_positions(metric, n_pos), _read_tokens(metric), recorded)

    def per_pass(start: int) -> int:
        return max(1, (max_rows or _rows_per_pass(model, n_pos, start, len(trace.read))) // batch)

    results = torch.empty(len(variants))
    for layer, start, chunk in tqdm(_passes(model, starts, batch, n_pos, per_pass), disable=not progress,
                                    desc="patching", mininterval=1.0):
        if layer == n_layers:  # no sites: the unpatched run
            logits = repeat_rows(trace.logits, len(chunk))
        else:
            by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
            for slot, v in enumerate(chunk):
                for name, index in variants[v]:
                    by_hook[name].append((slot, _suffix_index(index, _position_axis(name), n_pos, start)))
            later = {name: sources[name].narrow(_position_axis(name) + 1, start, n_pos - start) for name in by_hook}
            hooks = _write_hooks(model, later, by_hook, len(chunk), batch, patterns_at_z=False)
            logits = trace.logits_at_read(trace.run(layer, start, len(chunk), hooks), start, len(chunk))
        for slot, v in enumerate(chunk):
            results[v] = _score(metric, logits[slot * batch:(slot + 1) * batch])
    return results


@torch.no_grad()
def run_patched_variants(model: Model, tokens: Int[Tensor, "batch pos"],
                         sources: dict[str, Float[Tensor, "batch ..."]], variants: Sequence[Variant], metric: Metric, *,
                         other_runs: Sequence[Float[Tensor, "batch pos vocab"]] = (), max_rows: int | None = None,
                         progress: bool = False) -> Float[Tensor, " variant"]:
    """The metric for each variant, where a variant is a list of `(hook_name, index)` sites written from `sources`.

    tokens `[batch, pos]` (the run being patched); sources `{hook_name: [batch, ...]}` (the values written, e.g. a
    clean cache); each site writes `act[:, *index] = sources[hook_name][:, *index]`. Returns `[len(variants)]`.
    Pattern sites (`blocks.{L}.attn.hook_pattern`) work on every model `pattern_route` accepts (checked first).

    A patch cannot change what comes before it: the layers before its first layer, and (attention being causal)
    the positions before its first position. So the tokens are run once unpatched, and each variant whose sites
    are in `FAST_HOOKS` starts at its first (layer, position), attending to the unpatched run's keys and values
    for the earlier positions, batched with the variants that share that start; only the logits the metric reads
    are computed: those a `PositionalMetric` declares, or those `learn_reads` finds a plain metric reads (checked on
    the unpatched run and on `other_runs`, e.g. the clean run's logits `[batch, pos, vocab]`). `max_rows` bounds the
    rows of one pass (default: what fits `ACTIVATION_BUDGET`). Other variants, and models where `fast_path` is False,
    run from the embedding.
    """
    patterns_at_z = _patterns_through_z(model, variants)
    starts = [_patch_start(v, model.cfg.n_layers, tokens.shape[1]) for v in variants]
    fast = [] if patterns_at_z or not fast_path(model) else [v for v, start in enumerate(starts) if start]
    results = torch.empty(len(variants))
    if fast:
        try:
            results[fast] = _run_from_starts(model, tokens, sources, [variants[v] for v in fast],
                                             [starts[v] for v in fast], metric, other_runs, max_rows, progress)
        except NoFastPath as problem:
            warnings.warn(f"patching these tokens runs each variant from the embedding (slower): {problem}")
            fast = []
    slow = sorted(set(range(len(variants))) - set(fast))
    if slow:
        results[slow] = _run_from_embedding(model, tokens, sources, [variants[v] for v in slow], metric,
                                            max_rows, progress, patterns_at_z)
    return results


def _run_from_embedding(model, tokens: Tensor, sources: dict[str, Tensor], variants: Sequence[Variant],
                        metric: Metric, max_rows: int | None, progress: bool, patterns_at_z: bool) -> Tensor:
    """Every variant run from the embedding, the corrupted batch repeated once per variant of a pass, full logits
    (`max_rows` rows per pass; default: logits near `LOGIT_BUDGET` floats)."""
    batch = len(tokens)
    per_pass = max(1, (max_rows or _default_rows(model, tokens)) // batch)
    results = torch.empty(len(variants))
    chunks = list(_chunks(len(variants), per_pass))
    for chunk in tqdm(chunks, disable=not progress, desc="patching", mininterval=1.0):
        by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for slot, v in enumerate(chunk):
            for name, index in variants[v]:
                by_hook[name].append((slot, index))
        hooks = _write_hooks(model, sources, by_hook, len(chunk), batch, patterns_at_z)
        logits = run_with_hooks(model, tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        for slot, v in enumerate(chunk):
            results[v] = float(metric(logits[slot * batch:(slot + 1) * batch]))
        del logits
    return results


def _sources(cache, names) -> dict[str, Tensor]:
    return {name: cache[name] for name in set(names)}


def _positions(tokens: Tensor, positions: Sequence[int] | None) -> list[int]:
    return list(range(tokens.shape[1])) if positions is None else [int(p) for p in positions]


# ---- sweeps: every site patched exactly, or screened by attribution patching first ----------------------------
@dataclass(frozen=True)
class Sweep:
    """One patch per site; `arrange` lays the flat `[len(sites)]` results out as the sweep's tensor."""
    sites: list[Site]
    arrange: Callable[[Float[Tensor, " site"]], Float[Tensor, "..."]]


@result_cache.storable
@dataclass(frozen=True)
class SweepResult:
    """The metric after each site's patch, laid out as the sweep's tensor.

    values: exact where `exact` is True; elsewhere (a screened sweep) the attribution-patching estimate.
    estimate: the estimate at every site (None: not screened, every site patched exactly).
    baseline: the metric of the unpatched corrupted run (a patch's effect is its value minus this).
    agreement: on the exactly patched sites of a screened sweep, how the estimated effects compare with the exact
        ones: `rank_correlation` (Spearman), `correlation` (Pearson), `same_sign` (share); empty when not screened.
    """
    values: Float[Tensor, "..."]
    exact: Bool[Tensor, "..."]
    estimate: Float[Tensor, "..."] | None
    baseline: float
    agreement: dict[str, float]

    def describe(self) -> str:
        n_exact, n_sites = int(self.exact.sum()), self.exact.numel()
        if self.estimate is None:
            return f"all {n_sites} sites patched exactly"
        a = self.agreement
        return (f"{n_exact} of {n_sites} sites patched exactly (the largest attribution-patching estimates), the "
                f"estimate elsewhere; on those {n_exact} the estimate's rank correlation with exact patching is "
                f"{a['rank_correlation']:.2f}, its correlation {a['correlation']:.2f}, same sign "
                f"{a['same_sign']:.0%}")


def _ranks(values: Tensor) -> Tensor:
    return values.argsort().argsort().double()


def _correlation(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else float("nan")


def _agreement(estimated: Tensor, exact: Tensor) -> dict[str, float]:
    """Estimated against exact effects `[n]` (AtP* practice: how far the ranking can be trusted)."""
    return {"rank_correlation": _correlation(_ranks(estimated), _ranks(exact)),
            "correlation": _correlation(estimated, exact),
            "same_sign": (estimated.sign() == exact.sign()).double().mean().item()}


def _site_estimates(model, corrupted_tokens: Tensor, clean_cache, metric: Metric, sites: list[Site]
                    ) -> tuple[float, Tensor]:
    """The corrupted run's metric and each site's first-order effect `[len(sites)]` (one forward and one backward
    pass): `(clean - corrupted) . d metric / d act` over the site's elements and the batch."""
    names = list(dict.fromkeys(name for name, _ in sites))
    baseline, effects = _attribution(model, _sources(clean_cache, names), corrupted_tokens, metric, names)
    return baseline, torch.stack([effects[name][index].sum() for name, index in sites])


def _cached_logits(model, cache, metric: Metric) -> list[Tensor]:
    """The logits of a cached run `[batch, pos, vocab]` to check a plain metric's learned reads on, where the cache
    holds the last residual stream (else none; none for a metric that declares its reads)."""
    final = hook_name("resid_post", model.cfg.n_layers - 1)
    return [logits_of(model, cache[final])] if final in cache and not isinstance(metric, PositionalMetric) else []


def run_sweep(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric, sweep: Sweep, *,
              exact_top: int | None = None, max_rows: int | None = None, progress: bool = False) -> SweepResult:
    """Patch each site of `sweep` from `clean_cache` into the corrupted run and apply `metric`.

    exact_top: None patches every site exactly. A number n screens first (attribution patching, AtP: one forward
        and one backward pass estimate every site's effect), then patches exactly only the n sites of largest
        estimated |effect| (the AtP* practice: rank cheaply, verify the top); `values` holds the estimate elsewhere,
        and `agreement` says how well the estimate ranked the sites it could be checked on. On a 30-layer model a
        head-by-position sweep has thousands of sites; a first-order estimate misses effects that saturate (a
        patch that restores the whole answer at once), which is why the top is verified exactly.
    """
    n_sites = len(sweep.sites)
    clean_logits = _cached_logits(model, clean_cache, metric)
    if exact_top is None or exact_top >= n_sites:
        values = run_patched_variants(model, corrupted_tokens, _sources(clean_cache, [n for n, _ in sweep.sites]),
                                      [[site] for site in sweep.sites], metric, other_runs=clean_logits,
                                      max_rows=max_rows, progress=progress)
        return SweepResult(sweep.arrange(values), sweep.arrange(torch.ones(n_sites)).bool(), None, float("nan"), {})
    if exact_top < 1:
        raise ValueError(f"exact_top={exact_top}: patch at least one site exactly (None: every site)")
    baseline, effects = _site_estimates(model, corrupted_tokens, clean_cache, metric, sweep.sites)
    chosen = effects.abs().topk(exact_top).indices.sort().values
    chosen_sites = [sweep.sites[i] for i in chosen.tolist()]
    exact = run_patched_variants(model, corrupted_tokens, _sources(clean_cache, [n for n, _ in chosen_sites]),
                                 [[site] for site in chosen_sites], metric, other_runs=clean_logits,
                                 max_rows=max_rows, progress=progress)
    values, mask = baseline + effects.float(), torch.zeros(n_sites)
    values[chosen], mask[chosen] = exact, 1.0
    return SweepResult(sweep.arrange(values), sweep.arrange(mask).bool(), sweep.arrange(baseline + effects.float()),
                       baseline, _agreement(effects[chosen], exact.double() - baseline))


def layer_pos_sweep(model: Model, hooks: Sequence[str], positions: Sequence[int]) -> Sweep:
    """One site per (hook, layer, position) of `blocks.{L}.hook_{hook}`: `[len(hooks), n_layers, len(positions)]`
    (the hook axis dropped for a single hook)."""
    n_layers, pos = model.cfg.n_layers, list(positions)
    sites = [(hook_name(hook, layer), (p,)) for hook in hooks for layer in range(n_layers) for p in pos]
    shape = (n_layers, len(pos)) if len(hooks) == 1 else (len(hooks), n_layers, len(pos))
    return Sweep(sites, lambda flat: flat.view(*shape))


def head_sweep(model: Model, site: str, by_position: bool, positions: Sequence[int]) -> Sweep:
    """One site per head (and position) of `site`; laid out as `act_patch_heads` returns it."""
    if site not in HEAD_SITES:
        raise ValueError(f"unknown head site {site!r}; use one of {HEAD_SITES}")
    n_layers, n_heads, pos = model.cfg.n_layers, _site_heads(model, site), list(positions)
    names = [hook_name("head", layer, site) for layer in range(n_layers)]
    if not by_position:
        index = (lambda h: (h,)) if site == "pattern" else (lambda h: (slice(None), h))
        sites, shape = [(names[layer], index(h)) for layer in range(n_layers) for h in range(n_heads)], (n_layers,
                                                                                                     n_heads)
    elif site == "pattern":  # [layer, head, dest_pos], as TransformerLens
        sites = [(names[layer], (h, p)) for layer in range(n_layers) for h in range(n_heads) for p in pos]
        shape = (n_layers, n_heads, len(pos))
    else:
        sites = [(names[layer], (p, h)) for layer in range(n_layers) for p in pos for h in range(n_heads)]
        shape = (n_layers, len(pos), n_heads)
    return Sweep(sites, lambda flat: flat.view(*shape))


def heads_every_sweep(model: Model, by_position: bool, positions: Sequence[int]) -> Sweep:
    """Output (z), q, k, v (and, over all positions, pattern) of every head in one sweep, stacked on a first axis;
    the k and v slices padded to `n_heads` columns under grouped-query attention, as TransformerLens pads them."""
    parts = [head_sweep(model, site, by_position, positions)
             for site in (HEAD_SITES if not by_position else HEAD_SITES[:4])]
    sizes, n_heads = [len(part.sites) for part in parts], model.cfg.n_heads

    def arrange(flat: Tensor) -> Tensor:
        laid = [part.arrange(values) for part, values in zip(parts, flat.split(sizes))]
        return torch.stack([torch.nn.functional.pad(values, (0, n_heads - values.shape[-1])) for values in laid])

    return Sweep([site for part in parts for site in part.sites], arrange)


def act_patch_layer_pos(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                        hook: str = "resid_pre", *, positions: Sequence[int] | None = None,
                        max_rows: int | None = None, progress: bool = False) -> Float[Tensor, "layer pos"]:
    """Patch one (layer, position) of `blocks.{L}.hook_{hook}` at a time ("resid_pre", "resid_mid", "resid_post",
    "attn_out", "mlp_out"): `[n_layers, pos]` (or `[n_layers, len(positions)]`)."""
    sweep = layer_pos_sweep(model, [hook], _positions(corrupted_tokens, positions))
    return run_sweep(model, corrupted_tokens, clean_cache, metric, sweep, max_rows=max_rows, progress=progress).values


def act_patch_resid_pre(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                        **kwargs) -> Float[Tensor, "layer pos"]:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_resid_pre`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "resid_pre", **kwargs)


def act_patch_attn_out(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                       **kwargs) -> Float[Tensor, "layer pos"]:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_attn_out`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "attn_out", **kwargs)


def act_patch_mlp_out(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                      **kwargs) -> Float[Tensor, "layer pos"]:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_mlp_out`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "mlp_out", **kwargs)


def act_patch_block_every(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric, *,
                          positions: Sequence[int] | None = None, max_rows: int | None = None,
                          progress: bool = False) -> Float[Tensor, "3 layer pos"]:
    """`[3, n_layers, pos]`: resid_pre, attn_out, mlp_out (like `get_act_patch_block_every`), in one sweep."""
    sweep = layer_pos_sweep(model, BLOCK_HOOKS, _positions(corrupted_tokens, positions))
    return run_sweep(model, corrupted_tokens, clean_cache, metric, sweep, max_rows=max_rows, progress=progress).values


def act_patch_heads(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                    site: str = "z", *, by_position: bool = False, positions: Sequence[int] | None = None,
                    max_rows: int | None = None, progress: bool = False) -> Float[Tensor, "layer ..."]:
    """Patch each head's `site` ("z" = head output, "q", "k", "v", "pattern").

    All positions at once: `[n_layers, n_heads]`. By position: `[n_layers, pos, n_heads]` for q/k/v/z and
    `[n_layers, n_heads, dest_pos]` for the pattern (TransformerLens's layouts). Under grouped-query attention
    "k" and "v" sweep the key/value heads: `[n_layers, n_kv]` and `[n_layers, pos, n_kv]`, column g being the
    key/value head read by query heads `g * n_heads // n_kv` to `(g + 1) * n_heads // n_kv - 1` (as
    TransformerLens's `get_act_patch_attn_head_k_all_pos` etc.).
    """
    sweep = head_sweep(model, site, by_position, _positions(corrupted_tokens, positions))
    return run_sweep(model, corrupted_tokens, clean_cache, metric, sweep, max_rows=max_rows, progress=progress).values


def act_patch_heads_every(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric, *,
                          by_position: bool = False, max_rows: int | None = None,
                          progress: bool = False) -> Float[Tensor, "site layer ..."]:
    """`[5, n_layers, n_heads]` for output (z), q, k, v, pattern over all positions (one sweep), like
    `get_act_patch_attn_head_all_pos_every`; with `by_position`, `[4, n_layers, pos, n_heads]` for z, q, k, v
    (the first four of `get_act_patch_attn_head_by_pos_every`).

    Under grouped-query attention the k and v slices (`result[2]`, `result[3]`) hold the `n_kv` key/value heads in
    their first `n_kv` columns and zeros after them, exactly as TransformerLens pads them: columns `n_kv:` there are
    padding, not heads (`act_patch_heads(..., "k")` gives the unpadded `[n_layers, n_kv]`).
    """
    sweep = heads_every_sweep(model, by_position, _positions(corrupted_tokens, None))
    return run_sweep(model, corrupted_tokens, clean_cache, metric, sweep, max_rows=max_rows, progress=progress).values


def patch_components(model: Model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, metric: Metric,
                     variants: Sequence[Sequence[Component]], site: str | None = None, *,
                     max_rows: int | None = None, progress: bool = False) -> Float[Tensor, " variant"]:
    """Patch whole sets of components at once (e.g. candidate circuits): `[len(variants)]`. Heads are query heads;
    at "k" or "v" under grouped-query attention a head patches the key/value head it reads (`kv_head`)."""
    as_sites = [[_component_site(model, c, site) for c in v] for v in variants]
    names = [name for v in as_sites for name, _ in v]
    return run_patched_variants(model, corrupted_tokens, _sources(clean_cache, names), as_sites, metric,
                                other_runs=_cached_logits(model, clean_cache, metric), max_rows=max_rows,
                                progress=progress)


# ---- path patching ------------------------------------------------------------------------------------------------
class _Runner:
    """Patched runs of `repeats` copies of `tokens [batch, pos]` under hooks, from a start (layer, position) where
    `fast_path(model)` (an unpatched `Trace` to start from), else from the embedding (every start is then (0, 0))."""

    def __init__(self, model, tokens: Tensor, read: list[int], vocab: list[int] | None = None,
                 recorded: tuple[list[dict], Tensor] | None = None):
        self.model, self.tokens, self.read, self.vocab = model, tokens, read, vocab
        self.trace = Trace(model, tokens, read, vocab, recorded) if fast_path(model) else None

    def start(self, layer: int, position: int) -> tuple[int, int]:
        return (layer, position) if self.trace is not None else (0, 0)

    def rows(self, start: int) -> int:
        """Rows per pass by default."""
        if self.trace is None:
            return _default_rows(self.model, self.tokens)
        return _rows_per_pass(self.model, self.tokens.shape[1], start, len(self.read))

    def run(self, layer: int, start: int, repeats: int, hooks, last_layer: int) -> None:
        """Run blocks `layer..last_layer` for the hooks' sake (e.g. to record activations)."""
        if self.trace is not None:
            self.trace.run(layer, start, repeats, hooks, last_layer)
        else:
            run_with_hooks(self.model, self.tokens.repeat(repeats, 1), fwd_hooks=hooks, stop_at_layer=last_layer + 1)

    def logits(self, layer: int, start: int, repeats: int, hooks) -> Tensor:
        """`[repeats * batch, len(read), len(vocab) or d_vocab]` of a run from (`layer`, `start`) under `hooks`."""
        if self.trace is not None:
            if layer >= self.model.cfg.n_layers:
                return repeat_rows(self.trace.logits, repeats)
            return self.trace.logits_at_read(self.trace.run(layer, start, repeats, hooks), start, repeats)
        logits = run_with_hooks(self.model, self.tokens.repeat(repeats, 1), fwd_hooks=hooks)[:, self.read]
        return logits if self.vocab is None else logits[..., self.vocab]


def _sender_sets(model, senders) -> tuple[list, tuple | None]:
    """The sender sets and the result's shape: None means every single head, `[n_layers, n_heads]`."""
    if senders is not None:
        for sender in (s for group in senders for s in group):
            if sender.kind not in ("head", "mlp"):
                raise ValueError(f"senders must be heads or MLPs, not {sender.kind!r}")
        return list(senders), None
    return [[head] for head in all_heads(model.cfg.n_layers, model.cfg.n_heads)], (model.cfg.n_layers,
                                                                                     model.cfg.n_heads)


def _path_caches(model, clean_tokens, corrupted_tokens, clean_cache, corrupted_cache) -> tuple:
    """The clean and corrupted head outputs and MLP outputs (passes A and B), unless given."""
    names = [hook_name(kind, layer) for layer in range(model.cfg.n_layers) for kind in ("head", "mlp")]
    if clean_cache is None:
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
    if corrupted_cache is None:
        _, corrupted_cache = model.run_with_cache(corrupted_tokens, names_filter=names)
    return clean_cache, corrupted_cache


def _freeze_hook(clean: Tensor, corrupted: Tensor, writes: list[tuple[int, int | None]], positions: list[int],
                 n: int, freeze: bool):
    """Pass C's hook on a head or MLP output of a run of positions `start:` (`clean`, `corrupted` cut to them):
    everything to its clean value (if `freeze`), then each `(slot, head or None)` sender to its corrupted value at
    `positions` (run coordinates)."""
    def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        view = act.view(n, -1, *act.shape[1:])
        if freeze:
            view[:] = clean.to(act.dtype)
        for slot, head in writes:
            index = (slice(None), positions) if head is None else (slice(None), positions, head)
            view[slot][index] = corrupted[index].to(act.dtype)
        return act

    return hook


def _record_hook(recorded: dict[str, Tensor], name: str):
    def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        recorded[name] = act.clone()
        return act

    return hook


def _write_recorded_hook(recorded: Tensor, indices: list[tuple]):
    def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        for index in indices:
            act[(slice(None),) + index] = recorded[(slice(None),) + index]
        return act

    return hook


def _path_pass(runner: _Runner, caches: tuple, sender_sets: list, sender_positions: list[int],
               receiver_sites: list[Site], layer: int, start: int, freeze_mlps: bool) -> Tensor:
    """The logits (read positions) of one pass over `sender_sets`, all starting at (`layer`, `start`).

    Pass C: the clean run from there with every head output frozen to its clean value except the senders' at
    `sender_positions`, corrupted; it records the receivers' inputs (only those from `layer` on can change).
    Pass D: the clean run with the receivers' inputs (from `start` on) replaced by those records."""
    model, (clean_cache, corrupted_cache), n = runner.model, caches, len(sender_sets)
    n_pos = runner.tokens.shape[1]
    sender_writes: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for slot, group in enumerate(sender_sets):
        for sender in group:
            sender_writes[sender.hook_name()].append((slot, sender.index if sender.kind == "head" else None))
    receivers = [(name, _suffix_index(index, 0, n_pos, start)) for name, index in receiver_sites
                 if int(name.split(".")[1]) >= layer]
    receivers = [(name, index) for name, index in receivers if index is not None]
    if not receivers:
        return runner.logits(model.cfg.n_layers, n_pos, n, [])
    last = max(int(name.split(".")[1]) for name, _ in receivers)
    positions = [p - start for p in sender_positions]
    hooks = []
    for later in range(layer, last + 1):
        for name, freeze in ((hook_name("head", later), True), (hook_name("mlp", later), freeze_mlps)):
            if freeze or name in sender_writes:
                hooks.append((name, _freeze_hook(clean_cache[name][:, start:], corrupted_cache[name][:, start:],
                                                 sender_writes.get(name, []), positions, n, freeze)))
    recorded: dict[str, Tensor] = {}
    by_name: dict[str, list[tuple]] = defaultdict(list)
    for name, index in receivers:
        by_name[name].append(index)
    runner.run(layer, start, n, hooks + [(name, _record_hook(recorded, name)) for name in by_name], last)
    first = min(int(name.split(".")[1]) for name in by_name)
    writes = [(name, _write_recorded_hook(recorded[name], indices)) for name, indices in by_name.items()]
    return runner.logits(first, start, n, writes)


@torch.no_grad()
def path_patch(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
               metric: Metric, receivers: Sequence[Component], receiver_site: str = "k",
               senders: Sequence[Sequence[Component]] | None = None, *,
               sender_positions: Sequence[int] | None = None, freeze_mlps: bool = False, clean_cache=None,
               corrupted_cache=None, max_rows: int | None = None, progress: bool = False
               ) -> Float[Tensor, "..."]:
    """Path patching from senders to receiver heads' `receiver_site` ("q", "k" or "v") inputs.

    For each sender set: (pass C) run the clean tokens with every head's output frozen to its clean value except the
    senders, whose outputs (`hook_z` for heads, `hook_mlp_out` for MLPs) at `sender_positions` (None: all) are
    their corrupted values; MLPs are recomputed unless `freeze_mlps`. Record the receivers' q/k/v. (Pass D) run the
    clean tokens again with only the receivers' q/k/v at their `position` (None: all) replaced by those records,
    and apply `metric`. The clean and corrupted caches are computed once (or passed in).

    Passes C and D run batched over the sender sets that share a first layer and first sender position, and (where
    `fast_path(model)`) start there: before the senders' first layer and first position the frozen run is the clean
    run, so pass C starts at that (layer, position) from the clean run's keys and values and stops at the last
    receiver's layer, and pass D starts at the first receiver's layer; only the logits `metric` reads are computed
    (declared, or learned from a plain metric by `learn_reads` on the clean run).

    receivers: head components (their `position`, if set, is the receiving position). Under grouped-query attention
        a receiver's k or v input is that of the key/value head it reads, `kv_head(model, head)`, which its whole
        group of `n_heads // n_kv` query heads shares: patching it reaches them all.
    senders: a list of sender sets; None means every single head, and the result is then `[n_layers, n_heads]`.
    Returns `[len(senders)]` (or `[n_layers, n_heads]`): the metric after each path patch (clean = no effect).
    """
    if receiver_site not in ("q", "k", "v"):
        raise ValueError("receiver_site must be 'q', 'k' or 'v'")
    if any(r.kind != "head" for r in receivers):
        raise ValueError("receivers must be head components")
    sender_sets, grid_shape = _sender_sets(model, senders)
    caches = _path_caches(model, clean_tokens, corrupted_tokens, clean_cache, corrupted_cache)
    batch, n_pos = clean_tokens.shape
    recorded = block_calls(model, clean_tokens) if fast_path(model) else None
    if recorded is not None:
        metric = learn_reads(metric, [recorded[1]])
    runner = _Runner(model, clean_tokens, _read_positions(metric, n_pos), _read_tokens(metric), recorded)
    positions = sorted({p % n_pos for p in _positions(clean_tokens, sender_positions)})
    receiver_sites = [_component_site(model, r, receiver_site) for r in receivers]
    starts = [runner.start(min(s.layer for s in group), positions[0]) if group else
              runner.start(model.cfg.n_layers, n_pos) for group in sender_sets]
    results = torch.empty(len(sender_sets))
    passes = _passes(model, starts, batch, n_pos, lambda start: max(1, (max_rows or runner.rows(start)) // batch))
    for layer, start, chunk in tqdm(passes, disable=not progress, desc="path patching"):
        logits = _path_pass(runner, caches, [sender_sets[v] for v in chunk], positions, receiver_sites, layer, start,
                            freeze_mlps)
        for slot, v in enumerate(chunk):
            results[v] = _score(metric, logits[slot * batch:(slot + 1) * batch])
    return results.view(*grid_shape) if grid_shape is not None else results


# ---- attribution patching -----------------------------------------------------------------------------------------
def _pattern_grad(grad_z: Tensor | None, v: Tensor) -> Tensor | None:
    """`d metric / d pattern [batch, n_heads, dest, src]` from `grad_z [batch, dest, n_heads, d_head]` and the values
    `v [batch, src, n_kv, d_head]`, where the pattern reaches the output only through `z = pattern @ v`."""
    if grad_z is None:
        return None
    return torch.einsum("bqhd,bkhd->bhqk", grad_z, v.repeat_interleave(grad_z.shape[2] // v.shape[2], dim=2))


def _read_metric(model, metric: Metric, logits: Tensor, final_resid: Tensor) -> Tensor:
    """`metric(logits)`, computed for a `PositionalMetric` from the final residual stream at the positions (and of the
    tokens) it reads, so the backward pass skips the rest of the unembedding; the full value where the two differ."""
    value = metric(logits)
    if not isinstance(metric, PositionalMetric):
        return value
    read = _read_positions(metric, final_resid.shape[1])
    narrow = metric.read(logits_of(model, final_resid[:, read], _read_tokens(metric)))
    return narrow if equal_up_to_rounding(narrow.detach(), value.detach()) else value


def _attribution(model, sources: dict[str, Tensor], tokens: Tensor, metric: Metric, names: Sequence[str]
                 ) -> tuple[float, dict[str, Tensor]]:
    """The metric of the run on `tokens` and, per hook name, `(sources[name] - act) * d metric / d act` summed over
    the batch (one forward and one backward pass; after a shared prefix, where one is registered and `sources` hold
    its clean activations, so that its positions count 0: `replay.share_prefix`). Where the model does not read
    `hook_pattern` back (`pattern_route` "z"), a pattern's gradient is taken through `z = pattern @ v`."""
    names = list(dict.fromkeys(names))
    rerouted = [name for name in names if _is_pattern(name)]
    if rerouted and pattern_route(model) == "pattern":
        rerouted = []
    kept = list(dict.fromkeys(names + [name.removesuffix("pattern") + s for name in rerouted for s in ("z", "v")]))
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            acts[name] = act
            return act

        return hook

    final = hook_name("resid_post", model.cfg.n_layers - 1)
    hooks = [(name, keep(name)) for name in kept]
    if final not in kept:
        hooks.append((final, keep(final)))
    after_prefix = sources_match_prefix(model, tokens, {name: sources[name] for name in names})
    with torch.enable_grad():
        logits = hooked_logits(model, tokens, hooks) if after_prefix else run_with_hooks(model, tokens, fwd_hooks=hooks)
        value = _read_metric(model, metric, logits, acts[final])
        grads = dict(zip(kept, torch.autograd.grad(value, [acts[name] for name in kept], allow_unused=True)))
    for name in rerouted:
        layer = name.removesuffix("pattern")  # "blocks.{L}.attn.hook_"
        grads[name] = _pattern_grad(grads[layer + "z"], acts[layer + "v"].detach())
    out = {}
    for name in names:
        delta = sources[name].to(acts[name].dtype) - acts[name].detach()
        out[name] = (delta * grads[name]).sum(0) if grads[name] is not None else torch.zeros_like(delta[0])
    model.zero_grad(set_to_none=True)
    return float(value), out


def attribution_patch(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                      metric: Metric, hook_names: Sequence[str]) -> dict[str, Float[Tensor, "..."]]:
    """First-order estimate of patching each activation element from the clean into the corrupted run.

    Returns `{hook_name: (clean_act - corrupted_act) * d metric / d act}` summed over the batch, shape
    `act.shape[1:]` (e.g. `[pos, n_heads, d_head]` for `hook_z`). Summing over the trailing dimensions estimates the
    metric change of the corresponding activation patch (which, for a normalised metric, is the patched value
    itself, since the corrupted run scores 0). Two forward passes and one backward pass in all. Where the model
    does not read `hook_pattern` back (`pattern_route` "z"), a pattern's gradient is taken through `z = pattern @ v`
    (the tensor that hook reports is then connected to the output only while the parameters require gradients).
    """
    names = list(dict.fromkeys(hook_names))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
    return _attribution(model, _sources(clean_cache, names), corrupted_tokens, metric, names)[1]


def attribution_patch_layer_pos(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                                corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, hook: str = "resid_pre"
                                ) -> Float[Tensor, "layer pos"]:
    """Attribution-patching estimate for `blocks.{L}.hook_{hook}` per (layer, position): `[n_layers, pos]`."""
    names = [hook_name(hook, layer) for layer in range(model.cfg.n_layers)]
    out = attribution_patch(model, clean_tokens, corrupted_tokens, metric, names)
    return torch.stack([out[name].sum(-1) for name in names])


def attribution_patch_heads(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                            corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, site: str = "z",
                            by_position: bool = False) -> Float[Tensor, "layer ..."]:
    """Attribution-patching estimate per head: `[n_layers, n_heads]`, or by position `[n_layers, pos, n_heads]`
    (q/k/v/z) / `[n_layers, n_heads, dest_pos]` (pattern). Under grouped-query attention "k" and "v" have one
    column per key/value head, `[n_layers, n_kv]` / `[n_layers, pos, n_kv]`, as `act_patch_heads`."""
    names = [hook_name("head", layer, site) for layer in range(model.cfg.n_layers)]
    out = attribution_patch(model, clean_tokens, corrupted_tokens, metric, names)
    rows = []
    for name in names:
        value = out[name]
        if site == "pattern":  # [head, dest, src]
            value = value.sum(-1)
            rows.append(value if by_position else value.sum(-1))
        else:  # [pos, head, d_head]
            value = value.sum(-1)
            rows.append(value if by_position else value.sum(0))
    return torch.stack(rows)


def attribution_patch_neurons(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                              corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, by_position: bool = False,
                              layers: Sequence[int] | None = None) -> Float[Tensor, "layer ... d_mlp"]:
    """Attribution-patching estimate per MLP neuron (`blocks.{L}.mlp.hook_post`): `[n_layers, d_mlp]`, or
    `[n_layers, pos, d_mlp]` by position (rows follow `layers` when given)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    names = [hook_name("neuron", layer) for layer in layers]
    out = attribution_patch(model, clean_tokens, corrupted_tokens, metric, names)
    return torch.stack([out[name] if by_position else out[name].sum(0) for name in names])


# ---- metrics ------------------------------------------------------------------------------------------------------
def normalised_logit_diff(answer_tokens: Int[Tensor, "batch 2"], clean_value: float, corrupted_value: float,
                          pos: int = -1) -> Metric:
    """`metric(logits)` = (mean logit difference - corrupted) / (clean - corrupted): 1 = clean, 0 = corrupted.

    Works on any batch that is a whole number of copies of `answer_tokens [batch, 2]` (as in batched sweeps). It reads
    position `pos` and the answer tokens' logits only (a `PositionalMetric`), so sweeps unembed just those."""
    denominator = clean_value - corrupted_value
    if math.isclose(denominator, 0.0, abs_tol=1e-12):
        raise ValueError("clean and corrupted logit differences are equal; the metric is undefined")
    tokens = answer_tokens[:, :2].unique()                                   # the only logits it reads
    columns = torch.searchsorted(tokens, answer_tokens[:, :2].contiguous())  # [batch, 2]: their places in `tokens`

    def read(logits: Tensor) -> Tensor:  # [batch, 1, len(tokens)]: the answer tokens' logits at pos
        last = logits[:, 0]
        answers = columns.to(last.device).repeat(len(last) // len(columns), 1)
        diff = last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:2])
        return (diff.mean() - corrupted_value) / denominator

    return PositionalMetric([pos], read, tokens=tokens)

