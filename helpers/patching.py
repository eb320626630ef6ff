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

How the batching works: the corrupted batch is repeated once per patch variant (`[n_variants * batch, pos]`), and one
hook per hook point writes each variant's clean slice into its own block of rows. A sweep of N patches therefore
costs about N / chunk forward passes instead of N; `max_rows` bounds the rows of one pass (memory), by default so
the logits of one pass stay near 256 MB.

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
from collections import defaultdict
from typing import Callable, Sequence
from weakref import WeakKeyDictionary

import torch
from torch import Tensor
from tqdm.auto import tqdm

from helpers.components import Component, all_heads

Metric = Callable[[Tensor], Tensor]
Site = tuple[str, tuple]  # (hook name, index into the activation after the batch dimension)
Variant = Sequence[Site]
HEAD_SITES = ("z", "q", "k", "v", "pattern")
LOGIT_BUDGET = 2 ** 26  # floats of logits per forward pass (256 MB in float32) when max_rows is not given


def _default_rows(model, tokens: Tensor) -> int:
    return max(len(tokens), LOGIT_BUDGET // max(1, tokens.shape[1] * model.cfg.d_vocab))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


# ---- heads under grouped-query attention --------------------------------------------------------------------------
def n_kv_heads(model) -> int:
    """Key/value heads per layer: `cfg.n_key_value_heads` under grouped-query attention, else `cfg.n_heads`."""
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def kv_head(model, head: int) -> int:
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


def _close(value: Tensor, reference: Tensor) -> bool:
    """Equal up to rounding in the reference's dtype."""
    scale = float(reference.abs().max().clamp(min=1.0))
    return float((value - reference).abs().max()) <= 64 * torch.finfo(reference.dtype).eps * scale


def _uniform_pattern(pattern: Tensor, hook=None) -> Tensor:  # noqa: ARG001
    causal = torch.ones_like(pattern).tril()
    return causal / causal.sum(-1, keepdim=True)


@torch.no_grad()
def pattern_route(model) -> str:
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
    tokens = torch.arange(min(4, model.cfg.d_vocab), device=model.cfg.device)[None]
    logits, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name.endswith(("attn.hook_pattern", "attn.hook_v", "attn.hook_z")))
    layers = [f"blocks.{layer}.attn.hook_" for layer in range(model.cfg.n_layers)]
    patched = model.run_with_hooks(tokens, fwd_hooks=[(layer + "pattern", _uniform_pattern) for layer in layers])
    if not torch.equal(patched, logits):
        route = "pattern"
    elif all(_close(_attend(cache[layer + "pattern"], cache[layer + "v"]), cache[layer + "z"]) for layer in layers):
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


@torch.no_grad()
def run_patched_variants(model, tokens: Tensor, sources: dict[str, Tensor], variants: Sequence[Variant],
                         metric: Metric, *, max_rows: int | None = None, progress: bool = False) -> Tensor:
    """The metric for each variant, where a variant is a list of `(hook_name, index)` sites written from `sources`.

    tokens `[batch, pos]` (the run being patched); sources `{hook_name: [batch, ...]}` (the values written, e.g. a
    clean cache); each site writes `act[:, *index] = sources[hook_name][:, *index]`. Returns `[len(variants)]`.
    Pattern sites (`blocks.{L}.attn.hook_pattern`) work on every model `pattern_route` accepts (checked first).
    """
    batch = len(tokens)
    per_pass = max(1, (max_rows or _default_rows(model, tokens)) // batch)
    patterns_at_z = _patterns_through_z(model, variants)
    results = torch.empty(len(variants))
    chunks = list(_chunks(len(variants), per_pass))
    for chunk in tqdm(chunks, disable=not progress, desc="patching", mininterval=1.0):
        by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for slot, v in enumerate(chunk):
            for name, index in variants[v]:
                by_hook[name].append((slot, index))
        hooks = _write_hooks(model, sources, by_hook, len(chunk), batch, patterns_at_z)
        logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        for slot, v in enumerate(chunk):
            results[v] = float(metric(logits[slot * batch:(slot + 1) * batch]))
        del logits
    return results


def _sources(cache, names) -> dict[str, Tensor]:
    return {name: cache[name] for name in set(names)}


def _sweep(model, corrupted_tokens, clean_cache, metric, grid: list[Site], shape, max_rows, progress) -> Tensor:
    variants = [[site] for site in grid]
    values = run_patched_variants(model, corrupted_tokens, _sources(clean_cache, [n for n, _ in grid]), variants,
                                  metric, max_rows=max_rows, progress=progress)
    return values.view(*shape)


def _positions(tokens: Tensor, positions: Sequence[int] | None) -> list[int]:
    return list(range(tokens.shape[1])) if positions is None else [int(p) for p in positions]


# ---- activation patching sweeps -------------------------------------------------------------------------------
def act_patch_layer_pos(model, corrupted_tokens: Tensor, clean_cache, metric: Metric, hook: str = "resid_pre", *,
                        positions: Sequence[int] | None = None, max_rows: int | None = None,
                        progress: bool = False) -> Tensor:
    """Patch one (layer, position) of `blocks.{L}.hook_{hook}` at a time ("resid_pre", "resid_mid", "resid_post",
    "attn_out", "mlp_out"): `[n_layers, pos]` (or `[n_layers, len(positions)]`)."""
    pos = _positions(corrupted_tokens, positions)
    grid = [(f"blocks.{layer}.hook_{hook}", (p,)) for layer in range(model.cfg.n_layers) for p in pos]
    return _sweep(model, corrupted_tokens, clean_cache, metric, grid, (model.cfg.n_layers, len(pos)), max_rows,
                  progress)


def act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_resid_pre`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "resid_pre", **kwargs)


def act_patch_attn_out(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_attn_out`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "attn_out", **kwargs)


def act_patch_mlp_out(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """`[n_layers, pos]`; equals `transformer_lens.patching.get_act_patch_mlp_out`."""
    return act_patch_layer_pos(model, corrupted_tokens, clean_cache, metric, "mlp_out", **kwargs)


def act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Tensor:
    """`[3, n_layers, pos]`: resid_pre, attn_out, mlp_out (like `get_act_patch_block_every`), in one sweep."""
    pos = _positions(corrupted_tokens, kwargs.pop("positions", None))
    grid = [(f"blocks.{layer}.hook_{hook}", (p,)) for hook in ("resid_pre", "attn_out", "mlp_out")
            for layer in range(model.cfg.n_layers) for p in pos]
    return _sweep(model, corrupted_tokens, clean_cache, metric, grid, (3, model.cfg.n_layers, len(pos)),
                  kwargs.get("max_rows"), kwargs.get("progress", False))


def _head_grid(model, site: str, by_position: bool, pos: list[int]) -> tuple[list[Site], tuple[int, ...]]:
    """The sites of one head sweep and its result shape; k/v sweeps have `n_kv_heads(model)` head columns."""
    if site not in HEAD_SITES:
        raise ValueError(f"unknown head site {site!r}; use one of {HEAD_SITES}")
    n_layers, n_heads = model.cfg.n_layers, _site_heads(model, site)
    name = "blocks.{}.attn.hook_" + site
    if not by_position:
        index = (lambda h: (h,)) if site == "pattern" else (lambda h: (slice(None), h))
        grid = [(name.format(layer), index(h)) for layer in range(n_layers) for h in range(n_heads)]
        return grid, (n_layers, n_heads)
    if site == "pattern":  # [layer, head, dest_pos], as TransformerLens
        grid = [(name.format(layer), (h, p)) for layer in range(n_layers) for h in range(n_heads) for p in pos]
        return grid, (n_layers, n_heads, len(pos))
    grid = [(name.format(layer), (p, h)) for layer in range(n_layers) for p in pos for h in range(n_heads)]
    return grid, (n_layers, len(pos), n_heads)


def act_patch_heads(model, corrupted_tokens: Tensor, clean_cache, metric: Metric, site: str = "z", *,
                    by_position: bool = False, positions: Sequence[int] | None = None, max_rows: int | None = None,
                    progress: bool = False) -> Tensor:
    """Patch each head's `site` ("z" = head output, "q", "k", "v", "pattern").

    All positions at once: `[n_layers, n_heads]`. By position: `[n_layers, pos, n_heads]` for q/k/v/z and
    `[n_layers, n_heads, dest_pos]` for the pattern (TransformerLens's layouts). Under grouped-query attention
    "k" and "v" sweep the key/value heads: `[n_layers, n_kv]` and `[n_layers, pos, n_kv]`, column g being the
    key/value head read by query heads `g * n_heads // n_kv` to `(g + 1) * n_heads // n_kv - 1` (as
    TransformerLens's `get_act_patch_attn_head_k_all_pos` etc.).
    """
    grid, shape = _head_grid(model, site, by_position, _positions(corrupted_tokens, positions))
    return _sweep(model, corrupted_tokens, clean_cache, metric, grid, shape, max_rows, progress)


def act_patch_heads_every(model, corrupted_tokens: Tensor, clean_cache, metric: Metric, *,
                          by_position: bool = False, max_rows: int | None = None, progress: bool = False) -> Tensor:
    """`[5, n_layers, n_heads]` for output (z), q, k, v, pattern over all positions (one sweep), like
    `get_act_patch_attn_head_all_pos_every`; with `by_position`, `[4, n_layers, pos, n_heads]` for z, q, k, v
    (the first four of `get_act_patch_attn_head_by_pos_every`).

    Under grouped-query attention the k and v slices (`result[2]`, `result[3]`) hold the `n_kv` key/value heads in
    their first `n_kv` columns and zeros after them, exactly as TransformerLens pads them: columns `n_kv:` there are
    padding, not heads (`act_patch_heads(..., "k")` gives the unpadded `[n_layers, n_kv]`).
    """
    pos = _positions(corrupted_tokens, None)
    sites = HEAD_SITES if not by_position else HEAD_SITES[:4]
    grids = [_head_grid(model, site, by_position, pos) for site in sites]
    values = _sweep(model, corrupted_tokens, clean_cache, metric, [s for grid, _ in grids for s in grid], (-1,),
                    max_rows, progress)
    parts = values.split([len(grid) for grid, _ in grids])
    return torch.stack([torch.nn.functional.pad(part.view(shape), (0, model.cfg.n_heads - shape[-1]))
                        for part, (_, shape) in zip(parts, grids)])


def patch_components(model, corrupted_tokens: Tensor, clean_cache, metric: Metric,
                     variants: Sequence[Sequence[Component]], site: str | None = None, *,
                     max_rows: int | None = None, progress: bool = False) -> Tensor:
    """Patch whole sets of components at once (e.g. candidate circuits): `[len(variants)]`. Heads are query heads;
    at "k" or "v" under grouped-query attention a head patches the key/value head it reads (`kv_head`)."""
    as_sites = [[_component_site(model, c, site) for c in v] for v in variants]
    names = [name for v in as_sites for name, _ in v]
    return run_patched_variants(model, corrupted_tokens, _sources(clean_cache, names), as_sites, metric,
                                max_rows=max_rows, progress=progress)


# ---- path patching ------------------------------------------------------------------------------------------------
@torch.no_grad()
def path_patch(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric,
               receivers: Sequence[Component], receiver_site: str = "k", senders: Sequence[Sequence[Component]] | None = None,
               *, sender_positions: Sequence[int] | None = None, freeze_mlps: bool = False,
               clean_cache=None, corrupted_cache=None, max_rows: int | None = None, progress: bool = False) -> Tensor:
    """Path patching from senders to receiver heads' `receiver_site` ("q", "k" or "v") inputs.

    For each sender set: (pass C) run the clean tokens with every head's output frozen to its clean value except the
    senders, whose outputs (`hook_z` for heads, `hook_mlp_out` for MLPs) at `sender_positions` (None: all) are
    their corrupted values; MLPs are recomputed unless `freeze_mlps`. Record the receivers' q/k/v. (Pass D) run the
    clean tokens again with only the receivers' q/k/v at their `position` (None: all) replaced by those records,
    and apply `metric`. Passes C and D run batched over sender sets; the clean and corrupted caches are computed
    once (or passed in).

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
    grid_shape = None
    if senders is None:
        senders = [[head] for head in all_heads(model.cfg.n_layers, model.cfg.n_heads)]
        grid_shape = (model.cfg.n_layers, model.cfg.n_heads)
    n_layers, batch = model.cfg.n_layers, len(clean_tokens)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    if clean_cache is None:
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in z_names or n in mlp_names)
    if corrupted_cache is None:
        _, corrupted_cache = model.run_with_cache(corrupted_tokens,
                                                  names_filter=lambda n: n in z_names or n in mlp_names)
    sender_pos = slice(None) if sender_positions is None else torch.as_tensor(list(sender_positions))
    receiver_sites = [_component_site(model, r, receiver_site) for r in receivers]
    receiver_names = sorted({name for name, _ in receiver_sites})
    per_pass = max(1, (max_rows or _default_rows(model, clean_tokens)) // batch)
    results = torch.empty(len(senders))
    for chunk in tqdm(list(_chunks(len(senders), per_pass)), disable=not progress, desc="path patching"):
        n = len(chunk)
        # ---- pass C: freeze heads to clean, senders to corrupted; record receiver inputs
        sender_writes: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
        for slot, v in enumerate(chunk):
            for sender in senders[v]:
                if sender.kind == "head":
                    sender_writes[sender.hook_name()].append((slot, sender.index))
                elif sender.kind == "mlp":
                    sender_writes[sender.hook_name()].append((slot, None))
                else:
                    raise ValueError(f"senders must be heads or MLPs, not {sender.kind!r}")

        def freeze_hook(name: str, freeze: bool):
            clean, corrupt, writes = clean_cache[name], corrupted_cache[name], sender_writes.get(name, [])

            def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
                view = act.view(n, batch, *act.shape[1:])
                if freeze:
                    view[:] = clean.to(act.dtype)
                for slot, head in writes:
                    if head is None:
                        view[slot][:, sender_pos] = corrupt[:, sender_pos].to(act.dtype)
                    else:
                        view[slot][:, sender_pos, head] = corrupt[:, sender_pos, head].to(act.dtype)
                return act

            return hook

        recorded: dict[str, Tensor] = {}

        def record(name: str):
            def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
                recorded[name] = act.clone()
                return act

            return hook

        hooks = [(name, freeze_hook(name, True)) for name in z_names]
        hooks += [(name, freeze_hook(name, freeze_mlps)) for name in mlp_names if freeze_mlps or name in sender_writes]
        hooks += [(name, record(name)) for name in receiver_names]
        repeated = clean_tokens.repeat(n, 1)
        model.run_with_hooks(repeated, fwd_hooks=hooks)
        # ---- pass D: clean run with only the receivers' inputs patched
        by_name: dict[str, list[tuple]] = defaultdict(list)
        for name, index in receiver_sites:
            by_name[name].append(index)

        def write(name: str, indices: list[tuple]):
            def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
                for index in indices:
                    full = (slice(None),) + index
                    act[full] = recorded[name][full]
                return act

            return hook

        logits = model.run_with_hooks(repeated, fwd_hooks=[(name, write(name, idx)) for name, idx in by_name.items()])
        for slot, v in enumerate(chunk):
            results[v] = float(metric(logits[slot * batch:(slot + 1) * batch]))
        del logits, recorded
    return results.view(*grid_shape) if grid_shape is not None else results


# ---- attribution patching -----------------------------------------------------------------------------------------
def _pattern_grad(grad_z: Tensor | None, v: Tensor) -> Tensor | None:
    """`d metric / d pattern [batch, n_heads, dest, src]` from `grad_z [batch, dest, n_heads, d_head]` and the values
    `v [batch, src, n_kv, d_head]`, where the pattern reaches the output only through `z = pattern @ v`."""
    if grad_z is None:
        return None
    return torch.einsum("bqhd,bkhd->bhqk", grad_z, v.repeat_interleave(grad_z.shape[2] // v.shape[2], dim=2))


def attribution_patch(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric,
                      hook_names: Sequence[str]) -> dict[str, Tensor]:
    """First-order estimate of patching each activation element from the clean into the corrupted run.

    Returns `{hook_name: (clean_act - corrupted_act) * d metric / d act}` summed over the batch, shape
    `act.shape[1:]` (e.g. `[pos, n_heads, d_head]` for `hook_z`). Summing over the trailing dimensions estimates the
    metric change of the corresponding activation patch (which, for a normalised metric, is the patched value
    itself, since the corrupted run scores 0). Two forward passes and one backward pass in all. Where the model
    does not read `hook_pattern` back (`pattern_route` "z"), a pattern's gradient is taken through `z = pattern @ v`
    (the tensor that hook reports is then connected to the output only while the parameters require gradients).
    """
    names = list(dict.fromkeys(hook_names))
    rerouted = [name for name in names if _is_pattern(name)]
    if rerouted and pattern_route(model) == "pattern":
        rerouted = []
    kept = list(dict.fromkeys(names + [name.removesuffix("pattern") + s for name in rerouted for s in ("z", "v")]))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            acts[name] = act
            return act

        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, keep(name)) for name in kept])
        value = metric(logits)
        grads = dict(zip(kept, torch.autograd.grad(value, [acts[name] for name in kept], allow_unused=True)))
    for name in rerouted:
        layer = name.removesuffix("pattern")  # "blocks.{L}.attn.hook_"
        grads[name] = _pattern_grad(grads[layer + "z"], acts[layer + "v"].detach())
    out = {}
    for name in names:
        delta = clean_cache[name] - acts[name].detach()
        out[name] = (delta * grads[name]).sum(0) if grads[name] is not None else torch.zeros_like(delta[0])
    model.zero_grad(set_to_none=True)
    return out


def attribution_patch_layer_pos(model, clean_tokens, corrupted_tokens, metric, hook: str = "resid_pre") -> Tensor:
    """Attribution-patching estimate for `blocks.{L}.hook_{hook}` per (layer, position): `[n_layers, pos]`."""
    names = [f"blocks.{layer}.hook_{hook}" for layer in range(model.cfg.n_layers)]
    out = attribution_patch(model, clean_tokens, corrupted_tokens, metric, names)
    return torch.stack([out[name].sum(-1) for name in names])


def attribution_patch_heads(model, clean_tokens, corrupted_tokens, metric, site: str = "z",
                            by_position: bool = False) -> Tensor:
    """Attribution-patching estimate per head: `[n_layers, n_heads]`, or by position `[n_layers, pos, n_heads]`
    (q/k/v/z) / `[n_layers, n_heads, dest_pos]` (pattern). Under grouped-query attention "k" and "v" have one
    column per key/value head, `[n_layers, n_kv]` / `[n_layers, pos, n_kv]`, as `act_patch_heads`."""
    names = [f"blocks.{layer}.attn.hook_{site}" for layer in range(model.cfg.n_layers)]
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


def attribution_patch_neurons(model, clean_tokens, corrupted_tokens, metric, by_position: bool = False,
                              layers: Sequence[int] | None = None) -> Tensor:
    """Attribution-patching estimate per MLP neuron (`blocks.{L}.mlp.hook_post`): `[n_layers, d_mlp]`, or
    `[n_layers, pos, d_mlp]` by position (rows follow `layers` when given)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    names = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    out = attribution_patch(model, clean_tokens, corrupted_tokens, metric, names)
    return torch.stack([out[name] if by_position else out[name].sum(0) for name in names])


# ---- metrics ------------------------------------------------------------------------------------------------------
def normalised_logit_diff(answer_tokens: Tensor, clean_value: float, corrupted_value: float,
                          pos: int = -1) -> Metric:
    """`metric(logits)` = (mean logit difference - corrupted) / (clean - corrupted): 1 = clean, 0 = corrupted.

    Works on any batch that is a whole number of copies of `answer_tokens [batch, 2]` (as in batched sweeps)."""
    denominator = clean_value - corrupted_value
    if math.isclose(denominator, 0.0, abs_tol=1e-12):
        raise ValueError("clean and corrupted logit differences are equal; the metric is undefined")

    def metric(logits: Tensor) -> Tensor:
        last = logits[:, pos] if logits.ndim == 3 else logits
        answers = answer_tokens.to(last.device).repeat(len(last) // len(answer_tokens), 1)
        diff = last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:2])
        return (diff.mean() - corrupted_value) / denominator

    return metric


# ---- indirect effect (arithmetic heuristics notebook) -------------------------------------------------------------
def indirect_effect(pre: Tensor, post: Tensor, clean_answers: Tensor, corrupt_answers: Tensor) -> Tensor:
    """The indirect effect of Stolfo et al. / Nikankin et al. (Eq. 1), per prompt: `[batch]`.

    `0.5 * ((post[r'] - pre[r']) / pre[r'] + (pre[r] - post[r]) / post[r])`, where `pre` and `post` are the
    next-token distributions `[batch, vocab]` of the clean run and of the run with one component patched from the
    counterfactual prompt, r the clean answer and r' the counterfactual answer (`[batch]` token ids). 0 when the
    patch changes nothing; large when it moves probability from r to r'.
    """
    r, r_prime = clean_answers.to(pre.device)[:, None], corrupt_answers.to(pre.device)[:, None]
    pre_r, pre_rp = pre.gather(1, r)[:, 0], pre.gather(1, r_prime)[:, 0]
    post_r, post_rp = post.gather(1, r)[:, 0], post.gather(1, r_prime)[:, 0]
    return 0.5 * ((post_rp - pre_rp) / pre_rp + (pre_r - post_r) / post_r)


def signed_log(values: Tensor) -> Tensor:
    """`sign * log(1 + |values|)`, elementwise: a log scale that keeps negative effects (log1p alone gives NaN
    below -1)."""
    return torch.sign(values) * torch.log1p(values.abs())


def indirect_effect_metric(clean_logits: Tensor, clean_answers: Tensor, corrupt_answers: Tensor,
                           pos: int = -1, log_scale: bool = False) -> Metric:
    """`metric(logits)` = mean indirect effect (probabilities) of a patched run of the CLEAN prompts against their
    unpatched distribution `clean_logits` (`[batch, pos, vocab]` or `[batch, vocab]`); with `log_scale`, the mean of
    `signed_log(IE)` over prompts, so that one prompt's exploding IE cannot dominate. Use it with noising: run the
    clean tokens and write activations of the counterfactual run (e.g. `run_patched_variants(model, clean_tokens,
    corrupt_cache, ...)`); differentiable, so `attribution_patch(model, corrupt_tokens, clean_tokens, metric, ...)`
    gives its first-order estimate `(corrupt - clean) . dIE/dact` at the clean run (the same for both scales, as
    `signed_log` has slope 1 at 0)."""
    pre = torch.softmax((clean_logits[:, pos] if clean_logits.ndim == 3 else clean_logits).float(), dim=-1).detach()

    def metric(logits: Tensor) -> Tensor:
        post = torch.softmax((logits[:, pos] if logits.ndim == 3 else logits).float(), dim=-1)
        effect = indirect_effect(pre.to(post.device), post, clean_answers, corrupt_answers)
        return (signed_log(effect) if log_scale else effect).mean()

    return metric
