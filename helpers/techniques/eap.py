"""Automatic circuit discovery at the level of edges: edge attribution patching (EAP) and EAP with integrated
gradients (EAP-IG), exact edge patching to evaluate a circuit, and circuits chosen by an edge budget.

The graph (Syed, Rager & Conmy 2023; Hanna, Pezzelle & Belinkov 2024). The residual stream at any point is a sum of
what earlier components wrote into it: the input (token and position embeddings), each attention head's output
`z_h @ W_O[h]` and each MLP's output (plus biases, which are the same in every run). So every component that *reads*
the residual stream -- a head's query, key or value input, an MLP's input, the logits -- reads a sum over its
*senders*, and each term of that sum is an *edge* `sender -> receiver`:

    senders:   INPUT, L{l}H{h} (a head's output), MLP{l}
    receivers: L{l}H{h}.q, L{l}KV{g}.k / L{l}KV{g}.v (under grouped-query attention the key and value inputs belong to
               the key/value heads; without GQA KV{g} is head g), MLP{l} (its input), LOGITS (the final residual)

An edge exists when the sender runs before the receiver reads: heads and MLPs of earlier layers, and a layer's heads
into its own MLP unless attention and MLP run in parallel (GPT-NeoX). GPT-Neo's bridge exposes no per-head input, so
its attention is one receiver per layer (`ATTN{l}.in`), which the graph says in `per_head_inputs=False`.

Patching one edge means: the receiver reads, for that one sender, the sender's output from the *corrupted* run, and
everything else as in the current run. `edge_patched_logits` does that for any set of edges in one forward pass;
patching every edge gives the corrupted run, patching none the clean run.

EAP scores every edge from one forward and one backward pass: to first order, patching `u -> v` changes the metric by
`(a_u_corrupted - a_u_clean) . dM/dx_v`, summed over batch and positions, with the gradient taken on the clean run.
EAP-IG (inputs) averages that gradient over `ig_steps` runs whose input embeddings are interpolated from the
corrupted to the clean prompt, `alpha = k / ig_steps` for k = 1 .. ig_steps (so `ig_steps=1` is EAP).

Every function takes the notebooks' `metric(logits) -> scalar` callbacks (e.g. `patching.normalised_logit_diff`).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.components import hook_name, Model
from helpers.techniques.patching import PositionalMetric, learn_reads, unembedding_reads
from helpers.techniques.replay import hooked_logits

Metric = Callable[[Tensor], Tensor]

EDGE_PATCH_BUDGET = 2 ** 29  # bytes of sender differences (one `batch x pos x S x d_model` per circuit) per pass
GRADIENT_BUDGET = 2 ** 29  # bytes of receiver inputs and their gradients one backward pass may hold (about)


# ---- the graph ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A sender or receiver of the graph. `kind`: "input", "head", "kv_head", "attn", "mlp" or "logits"; `site`:
    "q" / "k" / "v" for a head's inputs, "in" for a whole attention layer's input, None otherwise."""

    kind: str
    layer: int | None = None
    index: int | None = None
    site: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "input":
            return "INPUT"
        if self.kind == "logits":
            return "LOGITS"
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        base = {"head": f"L{self.layer}H{self.index}", "kv_head": f"L{self.layer}KV{self.index}",
                "attn": f"ATTN{self.layer}"}[self.kind]
        return base if self.site is None else f"{base}.{self.site}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Graph:
    """A model's senders, receivers and the mask of which sender feeds which receiver.

    senders[s] and receivers[r] index the rows and columns of every score and circuit matrix `[n_senders,
    n_receivers]`; `edges[s, r]` is True where the edge exists. `receiver_layer[r]` is the layer the receiver reads in
    (`n_layers` for the logits), `sender_layer[s]` the layer that writes (-1 for the input).
    """

    senders: tuple[Node, ...]
    receivers: tuple[Node, ...]
    edges: Bool[Tensor, "n_senders n_receivers"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    per_head_inputs: bool

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_labels(self, mask: Bool[Tensor, "n_senders n_receivers"] | None = None) -> list[str]:
        """`"sender->receiver"` for every edge in `mask` (default: the whole graph), sender-major."""
        chosen = self.edges if mask is None else mask & self.edges
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in chosen.nonzero().tolist()]

    def sender_slice(self, layer: int) -> slice:
        """The senders written in `layer`: its heads then its MLP."""
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads + 1)


def _parallel_attn_mlp(model) -> bool:
    return bool(getattr(model.cfg, "parallel_attn_mlp", False))


def _kv_heads(model) -> int:
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def supports_per_head_inputs(model: Model) -> bool:
    """Whether the bridge can give every head its own q/k/v input (`use_split_qkv_input`)."""
    try:
        with _split_inputs(model, True):
            return True
    except NotImplementedError:
        return False


def build_graph(model: Model) -> Graph:
    """The edge graph of `model` (see the module docstring for its nodes and edges)."""
    n_layers, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, _kv_heads(model)
    per_head = supports_per_head_inputs(model)
    parallel = _parallel_attn_mlp(model)
    senders = [Node("input")]
    sender_layer, sender_is_head = [-1], [False]
    for layer in range(n_layers):
        senders += [Node("head", layer, head) for head in range(n_heads)] + [Node("mlp", layer)]
        sender_layer += [layer] * (n_heads + 1)
        sender_is_head += [True] * n_heads + [False]
    receivers, receiver_layer, receiver_is_mlp = [], [], []
    for layer in range(n_layers):
        if per_head:
            attention = ([Node("head", layer, head, "q") for head in range(n_heads)]
                         + [Node("kv_head", layer, group, site) for site in ("k", "v") for group in range(n_kv)])
        else:
            attention = [Node("attn", layer, site="in")]
        receivers += attention + [Node("mlp", layer)]
        receiver_layer += [layer] * (len(attention) + 1)
        receiver_is_mlp += [False] * len(attention) + [True]
    receivers.append(Node("logits"))
    receiver_layer.append(n_layers)
    receiver_is_mlp.append(False)

    s_layer = torch.tensor(sender_layer)[:, None]
    r_layer = torch.tensor(receiver_layer)[None, :]
    same_layer_head_to_mlp = (s_layer == r_layer) & torch.tensor(sender_is_head)[:, None] \
        & torch.tensor(receiver_is_mlp)[None, :]
    edges = (s_layer < r_layer) | (same_layer_head_to_mlp & (not parallel))
    return Graph(tuple(senders), tuple(receivers), edges, n_layers, n_heads, n_kv, per_head)


# ---- hooks --------------------------------------------------------------------------------------------------------
@contextmanager
def _split_inputs(model, enabled: bool) -> Iterator[None]:
    """Give every head its own copy of the residual input for the duration."""
    if not enabled:
        yield
        return
    model.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(False)


def _receiver_hooks(graph: Graph, layer: int) -> list[tuple[str, slice]]:
    """`(hook name, receiver columns)` of the receivers that read in `layer` (n_layers: the logits)."""
    if layer == graph.n_layers:
        return [(hook_name("resid_post", layer - 1), slice(len(graph.receivers) - 1, len(graph.receivers)))]
    n_attention = graph.n_heads + 2 * graph.n_kv_heads if graph.per_head_inputs else 1
    start = layer * (n_attention + 1)
    if graph.per_head_inputs:
        q, k = start + graph.n_heads, start + graph.n_heads + graph.n_kv_heads
        attention = [(hook_name("head", layer, "q_input"), slice(start, q)),
                     (hook_name("head", layer, "k_input"), slice(q, k)),
                     (hook_name("head", layer, "v_input"), slice(k, k + graph.n_kv_heads))]
    else:
        attention = [(hook_name("attn", layer, "in"), slice(start, start + 1))]
    return attention + [(hook_name("mlp", layer, "in"), slice(start + n_attention, start + n_attention + 1))]


def _as_receivers(act: Tensor) -> Tensor:
    """A receiver hook's activation as `[batch, pos, n_receivers_here, d_model]`."""
    return act if act.ndim == 4 else act[:, :, None]


def _senders_of_every_layer(model, cache_or_acts: dict[str, Tensor], graph: Graph) -> Tensor:
    """Every sender's output, `[batch, pos, n_senders, d_model]`: the input, then per layer each head's `z @ W_O`
    and the MLP's output."""
    w_o = model.W_O                                         # [layer, head, d_head, d_model]: the bridge stacks it
    parts = [cache_or_acts[hook_name("resid_pre", 0)][:, :, None]]
    for layer in range(graph.n_layers):
        z = cache_or_acts[hook_name("head", layer)]                                   # [batch, pos, head, d_head]
        parts += [torch.einsum("bphd,hdm->bphm", z, w_o[layer].to(z.dtype)),          # [batch, pos, head, d_model]
                  cache_or_acts[hook_name("mlp", layer)][:, :, None]]
    return torch.cat(parts, dim=2)


def _sender_hook_names(graph: Graph) -> list[str]:
    """The input's hook and each layer's head outputs and MLP output, in sender order."""
    return [hook_name("resid_pre", 0)] + [hook_name(kind, layer) for layer in range(graph.n_layers)
                                          for kind in ("head", "mlp")]


def sender_activations(model: Model, tokens: Int[Tensor, "batch pos"], graph: Graph
                       ) -> Float[Tensor, "batch pos n_senders d_model"]:
    """Every sender's output on `tokens`, from one forward pass."""
    names = _sender_hook_names(graph)
    with _split_inputs(model, graph.per_head_inputs), torch.no_grad():   # as the patched runs compute
        _, cache = model.run_with_cache(tokens, names_filter=names)
        return _senders_of_every_layer(model, cache, graph)


# ---- exact edge patching ------------------------------------------------------------------------------------------
def _patching_hooks(model, graph: Graph, corrupted: Tensor, patched: Tensor, alpha: float, n_copies: int,
                    first: int = 0):
    """Forward hooks that make each receiver read, on its patched edges, `alpha` of the way from the current
    sender output to the corrupted one. `corrupted [batch, pos, S, d]`; `patched [n_copies, S, R]` (the batch is
    `n_copies` stacked copies of the prompts, one per circuit). Positions before `first`, where the clean and
    corrupted prompts are the same tokens (so every sender's output is the same), are left as they are.

    Each sender's difference (corrupted - current) is written once, as the run reaches it, into
    `differences [c, S, batch * pos * d]` (positions `first:`); a receiver hook adds `patched[:, :S_written, its
    receivers]^T @ differences[:, :S_written]`, one batched matrix product for all its receivers and circuits."""
    corrupted = corrupted[:, first:]
    batch, n_pos, n_senders, d_model = corrupted.shape
    differences = corrupted.new_empty((n_copies, n_senders, batch * n_pos * d_model))
    written = [0, 0]                 # senders written so far, hooks that wrote them
    w_o = model.W_O                  # [layer, head, d_head, d_model], stacked once (the bridge stacks it per access)

    def write(now: Tensor, position: int, name: str) -> None:              # now: [c * batch, pos, n, d]
        if written[1] != position:
            raise RuntimeError(f"{name} ran out of order; edge patching needs senders written layer by layer")
        start, n = written[0], now.shape[2]
        change = corrupted[None, :, :, start:start + n].to(now.dtype) - now[:, first:].unflatten(0, (n_copies, -1))
        differences[:, start:start + n] = change.permute(0, 3, 1, 2, 4).reshape(n_copies, n, -1)
        written[0], written[1] = start + n, position + 1

    def record_input(act, hook):
        write(act[:, :, None], 0, hook.name)
        return act

    def record_heads(layer: int):
        def hook(z, hook):                                                   # z: [cb, pos, head, d_head]
            write(torch.einsum("bphd,hdm->bphm", z, w_o[layer].to(z.dtype)), 1 + 2 * layer, hook.name)
            return z
        return hook

    def record_mlp(layer: int):
        def hook(act, hook):
            write(act[:, :, None], 2 + 2 * layer, hook.name)
            return act
        return hook

    def changes(group: slice):
        """The change of the receivers in `group` (contiguous columns), computed once per set of written senders:
        a layer's q, k and v inputs read the same senders, so one product serves its three hooks."""
        kept: dict[str, object] = {}

        def change(columns: slice) -> Tensor:                                         # [c, b, pos, R_here, d]
            if kept.get("written") != written[0]:
                mask = patched[:, :written[0], group].to(differences.dtype)          # [c, S_written, R_group]
                product = torch.bmm(mask.transpose(1, 2), differences[:, :written[0]])   # [c, R_group, b*pos*d]
                value = product.view(n_copies, product.shape[1], batch, n_pos, d_model)
                kept.update(written=written[0], value=value)
            value = kept["value"][:, columns.start - group.start:columns.stop - group.start]
            return value.permute(0, 2, 3, 1, 4)

        return change

    def patch(columns: slice, change):
        def hook(act, hook):
            receivers = _as_receivers(act).unflatten(0, (n_copies, -1))                # [c, b, pos, R_here, d]
            out = torch.cat([receivers[:, :, :first],
                             receivers[:, :, first:] + alpha * change(columns).to(act.dtype)], dim=2).flatten(0, 1)
            return out if act.ndim == 4 else out[:, :, 0]
        return hook

    hooks = [(hook_name("resid_pre", 0), record_input)]
    for layer in range(graph.n_layers + 1):
        receivers = _receiver_hooks(graph, layer)
        attention, rest = receivers[:-1], receivers[-1:]      # the MLP (or the logits) reads the layer's heads too
        if attention:
            shared = changes(slice(attention[0][1].start, attention[-1][1].stop))
            hooks += [(name, patch(columns, shared)) for name, columns in attention]
        hooks += [(name, patch(columns, changes(columns))) for name, columns in rest]
        if layer < graph.n_layers:
            hooks += [(hook_name("head", layer), record_heads(layer)), (hook_name("mlp", layer), record_mlp(layer))]
    return hooks


def _edge_patched_passes(model, clean_tokens: Tensor, corrupted_tokens: Tensor, graph: Graph, masks: Tensor,
                         alpha: float, corrupted_senders: Tensor | None, read_hooks: Sequence = ()
                         ) -> Iterator[Tensor]:
    """`edge_patched_logits` of `masks [n, S, R]`, as many circuits per forward pass as `EDGE_PATCH_BUDGET` bytes
    of sender differences allow: `[circuits of the pass, batch, pos, d_vocab]` per pass (`read_hooks`: those of
    `patching.unembedding_reads`, which leave only the positions a metric reads)."""
    masks = masks & graph.edges
    if corrupted_senders is None:
        corrupted_senders = sender_activations(model, corrupted_tokens, graph)
    differing = (clean_tokens != corrupted_tokens.to(clean_tokens.device)).any(0).nonzero()
    first = int(differing[0]) if len(differing) else clean_tokens.shape[1]     # the prompts' first differing token
    patched_senders = corrupted_senders[:, first:]
    per_pass = max(1, EDGE_PATCH_BUDGET // max(1, patched_senders.numel() * patched_senders.element_size()))
    with _split_inputs(model, graph.per_head_inputs), torch.no_grad():
        for chunk in masks.split(per_pass):
            hooks = _patching_hooks(model, graph, corrupted_senders, chunk, alpha, len(chunk), first)
            logits = hooked_logits(model, clean_tokens.repeat(len(chunk), 1), [*hooks, *read_hooks])
            yield logits.unflatten(0, (len(chunk), -1))


def edge_patched_logits(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                        corrupted_tokens: Int[Tensor, "batch pos"], graph: Graph,
                        patched: Bool[Tensor, "... n_senders n_receivers"], *, alpha: float = 1.0,
                        corrupted_senders: Float[Tensor, "batch pos n_senders d_model"] | None = None
                        ) -> Float[Tensor, "... batch pos d_vocab"]:
    """Logits of the clean prompts with the edges in `patched` reading their sender's corrupted output.

    `patched` is one mask `[S, R]` or a stack `[n, S, R]` (batched: as many circuits per forward pass as
    `EDGE_PATCH_BUDGET` bytes of sender differences allow); edges not in the graph are ignored. `alpha` in [0, 1]
    moves patched edges only part of the way (1: exact edge patching). Returns `[batch, pos, d_vocab]` (or
    `[n, batch, pos, d_vocab]`; `edge_patched_metrics` keeps only each circuit's metric).
    """
    single = patched.ndim == 2
    logits = torch.cat(list(_edge_patched_passes(model, clean_tokens, corrupted_tokens, graph,
                                                 patched[None] if single else patched, alpha, corrupted_senders)))
    return logits[0] if single else logits


def edge_patched_metrics(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                         corrupted_tokens: Int[Tensor, "batch pos"], graph: Graph,
                         patched: Bool[Tensor, "n n_senders n_receivers"], metric: Metric, *,
                         corrupted_senders: Float[Tensor, "batch pos n_senders d_model"] | None = None) -> list[float]:
    """`metric` of each circuit's `edge_patched_logits`, keeping one pass's logits at a time, and of those only the
    positions the metric reads (declared, or learned from a plain metric: `patching.learn_reads`)."""
    read_hooks, value = unembedding_reads(model, _narrowed(model, clean_tokens, corrupted_tokens, metric),
                                          clean_tokens.shape[1])
    return [float(value(logits)) for chunk in _edge_patched_passes(model, clean_tokens, corrupted_tokens, graph,
                                                                   patched, 1.0, corrupted_senders, read_hooks)
            for logits in chunk]


def _narrowed(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric) -> Metric:
    """`metric` reading only what it reads: as declared (a `PositionalMetric`), or learned
    (`patching.learn_reads`, checked on the clean and corrupted runs)."""
    if isinstance(metric, PositionalMetric):
        return metric
    with torch.no_grad():
        return learn_reads(metric, [model(clean_tokens), model(corrupted_tokens)])


# ---- scores -------------------------------------------------------------------------------------------------------
def _receiver_gradients(model, tokens: Tensor, graph: Graph, metric: Metric, embed: Tensor | None,
                        with_senders: bool) -> Iterator[tuple[slice, list[Tensor], Tensor | None]]:
    """Forward and backward passes over `tokens`, a few rows at a time: for each pass `(rows, dM/dx per receiver
    hook of those rows, each [rows, pos, n_receivers_there, d], in receiver order; their sender outputs [rows, pos,
    S, d], or None without `with_senders`)`, with the token embedding replaced by `embed` when given (integrated
    gradients).

    Every receiver's own input and its gradient are alive during a backward pass, so the rows of one pass fit
    `GRADIENT_BUDGET`; the rows outside a pass enter `metric` as constants at their own values (a no-grad run of
    all of them), so any metric of the whole batch gets its exact gradient."""
    names = [name for layer in range(graph.n_layers + 1) for name, _ in _receiver_hooks(graph, layer)]
    sender_names = _sender_hook_names(graph)
    read_hooks, value = unembedding_reads(model, metric, tokens.shape[1])
    per_row = tokens.shape[1] * len(graph.receivers) * model.cfg.d_model * 4 * 4   # input, copy, gradient, norm
    rows = max(1, GRADIENT_BUDGET // per_row)
    everything = None
    if rows < len(tokens):
        embed_hooks = [] if embed is None else [(hook_name("embed"), lambda act, hook: embed.to(act.dtype))]
        with torch.no_grad():
            everything = hooked_logits(model, tokens, [*embed_hooks, *read_hooks])
    for start in range(0, len(tokens), rows):
        end = min(start + rows, len(tokens))
        inputs: dict[str, Tensor] = {}
        acts: dict[str, Tensor] = {}

        def keep(name: str):                  # by the name asked for: the bridge reports aliases by their own
            def hook(act, hook):              # a copy, so the gradient is the receiver's alone, not the skip path's
                inputs[name] = act.clone()
                return inputs[name]
            return hook

        def leaf_embedding(act, hook):       # the graph's one leaf: every receiver input depends on it
            return (act if embed is None else embed[start:end].to(act.dtype)).detach().requires_grad_(True)

        def record(name: str):
            def hook(act, hook):
                acts[name] = act.detach()
                return act
            return hook

        hooks = [(hook_name("embed"), leaf_embedding)] + [(name, keep(name)) for name in names] + read_hooks
        hooks += [(name, record(name)) for name in sender_names] if with_senders else []
        with _split_inputs(model, graph.per_head_inputs), torch.enable_grad():
            logits = hooked_logits(model, tokens[start:end], hooks)
            if everything is not None:
                logits = torch.cat([everything[:start], logits, everything[end:]])
            grads = torch.autograd.grad(value(logits).sum(), [inputs[name] for name in names])
        del logits, inputs
        senders = None
        if with_senders:
            with torch.no_grad():
                senders = _senders_of_every_layer(model, acts, graph)
        yield slice(start, end), [_as_receivers(grad) for grad in grads], senders


def edge_scores(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                metric: Metric, *, graph: Graph | None = None, ig_steps: int = 1
                ) -> Float[Tensor, "n_senders n_receivers"]:
    """The predicted change of `metric` when each edge alone is patched from the corrupted run: EAP for
    `ig_steps=1`, EAP-IG over the input embeddings for more (gradients averaged at `alpha = k / ig_steps`,
    k = 1 .. ig_steps, on inputs interpolated from corrupted to clean). Zero where there is no edge.

    Clean and corrupted prompts must have the same length (positions are compared one to one). The score of an
    edge is a sum over prompts of (corrupted - clean sender output) . (receiver gradient), so it is accumulated a
    few prompts at a time (`_receiver_gradients`): memory is the senders' outputs of the corrupted run, `batch x
    pos x n_senders x d_model` floats (0.4 GB for 32 prompts of 17 tokens on a 30-layer model), and one pass's.
    The first pass is at alpha = 1, whose sender outputs are the clean ones.
    """
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {ig_steps}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean and corrupted tokens differ in shape: {tuple(clean_tokens.shape)} vs "
                         f"{tuple(corrupted_tokens.shape)}")
    graph = graph or build_graph(model)
    metric = _narrowed(model, clean_tokens, corrupted_tokens, metric)  # the unembedding only where it is read
    delta = sender_activations(model, corrupted_tokens, graph)       # corrupted, then corrupted - clean, row by row
    embeds = [None]
    if ig_steps > 1:
        clean_embed, corrupt_embed = _embeddings(model, clean_tokens), _embeddings(model, corrupted_tokens)
        embeds = [corrupt_embed + step / ig_steps * (clean_embed - corrupt_embed) for step in range(ig_steps, 0, -1)]
    scores = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    for first, embed in enumerate(embeds):
        for rows, grads, clean in _receiver_gradients(model, clean_tokens, graph, metric, embed, first == 0):
            if clean is not None:
                delta[rows] -= clean
            flat = delta[rows].permute(2, 0, 1, 3).reshape(len(graph.senders), -1)       # [S, rows * pos * d]
            grad = torch.cat([g.permute(0, 1, 3, 2).reshape(-1, g.shape[2]) for g in grads], dim=1)  # [.., R]
            scores += (flat @ grad.to(flat.dtype)).double()
    return (scores / len(embeds)).float() * graph.edges


def _embeddings(model, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name("embed")])
    return cache[hook_name("embed")]


# ---- circuits -----------------------------------------------------------------------------------------------------
def prune_dangling(graph: Graph, circuit: Bool[Tensor, "n_senders n_receivers"]
                   ) -> Bool[Tensor, "n_senders n_receivers"]:
    """Drop edges that cannot carry anything from the input to the logits: edges out of a head or MLP none of whose
    inputs reads a circuit edge, and edges into a receiver whose component writes into no circuit edge. Repeats
    until nothing changes."""
    circuit = circuit & graph.edges
    owners = _receiver_owners(graph)
    while True:
        fed = torch.zeros(len(graph.senders), dtype=torch.bool)
        fed[0] = True                                    # the input is always there
        for r in circuit.any(0).nonzero().flatten().tolist():
            fed[owners[r]] = True
        writes = circuit.any(1)
        useful = torch.tensor([not owner or bool(writes[owner].any()) for owner in owners])
        pruned = circuit & fed[:, None] & useful[None, :]
        if torch.equal(pruned, circuit):
            return circuit
        circuit = pruned


def _receiver_owners(graph: Graph) -> list[list[int]]:
    """For each receiver, the sender rows whose computation reads it: a head's q input its head, a key/value head's
    inputs every query head of its group, a layer-level attention input every head of the layer, an MLP input the
    MLP; the logits none."""
    owners = []
    group = graph.n_heads // graph.n_kv_heads
    for node in graph.receivers:
        if node.kind == "logits":
            owners.append([])
            continue
        start = graph.sender_slice(node.layer).start
        if node.kind == "mlp":
            owners.append([start + graph.n_heads])
        elif node.kind == "head":
            owners.append([start + node.index])
        elif node.kind == "kv_head":
            owners.append(list(range(start + node.index * group, start + (node.index + 1) * group)))
        else:
            owners.append(list(range(start, start + graph.n_heads)))
    return owners


def top_edges(graph: Graph, scores: Float[Tensor, "n_senders n_receivers"], n_edges: int, *,
              absolute: bool = True, prune: bool = True) -> Bool[Tensor, "n_senders n_receivers"]:
    """The circuit of the `n_edges` highest-scoring edges (by |score| when `absolute`), then dangling edges pruned
    (so the result may hold fewer)."""
    if not 0 <= n_edges <= graph.n_edges:
        raise ValueError(f"n_edges must be between 0 and the graph's {graph.n_edges} edges, got {n_edges}")
    ranked = (scores.abs() if absolute else scores).masked_fill(~graph.edges, float("-inf")).flatten()
    circuit = torch.zeros(ranked.numel(), dtype=torch.bool)
    circuit[ranked.topk(n_edges).indices] = True
    circuit = circuit.view_as(graph.edges)
    return prune_dangling(graph, circuit) if prune else circuit


@dataclass(frozen=True)
class CircuitCurve:
    """Faithfulness of the top-n circuits: `sizes[i]` edges requested, `kept[i]` left after pruning,
    `faithfulness[i] = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted))`."""

    sizes: list[int]
    kept: list[int]
    faithfulness: list[float]
    clean_metric: float
    corrupted_metric: float


def size_grid(n_edges: int, n_points: int = 24) -> list[int]:
    """Circuit sizes for a faithfulness curve: 0, then about `n_points` log-spaced sizes up to every edge."""
    sizes = {0, n_edges} | {round(n_edges ** (i / (n_points - 1))) for i in range(n_points)}
    return sorted(size for size in sizes if size <= n_edges)


def smallest_faithful(curve: CircuitCurve, target: float) -> int | None:
    """Index into `curve` of the smallest circuit whose faithfulness reaches `target` (None if none does)."""
    return next((i for i, value in enumerate(curve.faithfulness) if value >= target), None)


def faithfulness_curve(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                       metric: Metric, graph: Graph, scores: Float[Tensor, "n_senders n_receivers"],
                       sizes: Sequence[int]) -> CircuitCurve:
    """Evaluate the top-n circuit for each n in `sizes` by exact edge patching: every edge outside the circuit reads
    the corrupted run. The full graph gives the clean metric, the empty circuit the corrupted one."""
    circuits = [top_edges(graph, scores, n) for n in sizes]
    corrupted = sender_activations(model, corrupted_tokens, graph)
    values = edge_patched_metrics(model, clean_tokens, corrupted_tokens, graph, ~torch.stack(circuits), metric,
                                  corrupted_senders=corrupted)
    clean_value, corrupted_value = _end_points(model, clean_tokens, corrupted_tokens, metric)
    span = clean_value - corrupted_value
    return CircuitCurve(list(sizes), [int(c.sum()) for c in circuits],
                        [(value - corrupted_value) / span for value in values], clean_value, corrupted_value)


def exact_edge_effects(model: Model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                       metric: Metric, graph: Graph, edges: Sequence[tuple[int, int]] | None = None, *,
                       batch_edges: int = 16) -> Float[Tensor, "n_senders n_receivers"]:
    """The change of `metric` when each edge alone is patched from the corrupted run (the quantity EAP estimates),
    one forward pass per `batch_edges` edges. `edges`: `(sender, receiver)` indices (default: every edge)."""
    chosen = graph.edges.nonzero().tolist() if edges is None else [tuple(edge) for edge in edges]
    corrupted = sender_activations(model, corrupted_tokens, graph)
    with torch.no_grad():
        clean_value = metric(model(clean_tokens))
    effects = torch.zeros(graph.edges.shape)
    for start in range(0, len(chosen), batch_edges):
        batch = chosen[start: start + batch_edges]
        masks = torch.zeros((len(batch),) + tuple(graph.edges.shape), dtype=torch.bool)
        for i, (s, r) in enumerate(batch):
            masks[i, s, r] = True
        values = edge_patched_metrics(model, clean_tokens, corrupted_tokens, graph, masks, metric,
                                      corrupted_senders=corrupted)
        for (s, r), value in zip(batch, values):
            effects[s, r] = value - float(clean_value)
    return effects


def warn_if_layer_level(graph: Graph, model_name: str = "this model") -> None:
    """Say once that attention receivers are whole layers (no per-head inputs in the bridge)."""
    if not graph.per_head_inputs:
        warnings.warn(f"{model_name}: the bridge gives heads no separate inputs, so each attention layer is one "
                      "receiver (ATTN{l}.in)", stacklevel=2)


# ---- reading a circuit ----------------------------------------------------------------------------------------------
def circuit_nodes(graph: Graph, circuit: Bool[Tensor, "n_senders n_receivers"]) -> set[str]:
    """The components a circuit uses, as labels (`INPUT`, `L1H3`, `MLP0`, `LOGITS`): every sender of a circuit edge
    and every component that reads one. A key/value input shared by a group of heads counts for the heads of the
    group that the circuit uses otherwise, or for the group's first head when it uses none."""
    return set(_edge_readers(graph, circuit)[0])


def _edge_readers(graph: Graph, circuit: Tensor) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """`(node labels, [(sender, receiver, labels of the components reading that edge)])` of a circuit."""
    owners = _receiver_owners(graph)
    edges = (circuit & graph.edges).nonzero().tolist()
    sending = {graph.senders[s].label for s, _ in edges}
    readers = []
    for s, r in edges:
        if graph.receivers[r].kind == "logits":
            readers.append((s, r, ["LOGITS"]))
            continue
        group = [graph.senders[owner].label for owner in owners[r]]
        used = [label for label in group if label in sending] if len(group) > 1 else group
        readers.append((s, r, used or group[:1]))
    nodes = sending | {label for _, _, labels in readers for label in labels}
    return sorted(nodes), readers


def circuit_from_nodes(graph: Graph, nodes: set[str] | Sequence[str]) -> Bool[Tensor, "n_senders n_receivers"]:
    """Every edge between the given components (labels as in `circuit_nodes`), with INPUT and LOGITS always in: the
    edge-level form of a node circuit, so a hand-built circuit can be evaluated by exact edge patching beside an
    automatic one."""
    chosen = set(nodes) | {"INPUT", "LOGITS"}
    owners = _receiver_owners(graph)
    sender_in = torch.tensor([node.label in chosen for node in graph.senders])
    receiver_in = torch.tensor([node.kind == "logits" or any(graph.senders[o].label in chosen for o in owners[r])
                                for r, node in enumerate(graph.receivers)])
    return graph.edges & sender_in[:, None] & receiver_in[None, :]


def circuit_faithfulness(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                         corrupted_tokens: Int[Tensor, "batch pos"], metric: Metric, graph: Graph,
                         circuits: Sequence[Bool[Tensor, "n_senders n_receivers"]]) -> list[float]:
    """Faithfulness of each circuit (edges outside it patched from the corrupted run), normalised so the clean run
    is 1 and the corrupted run 0, batched (`edge_patched_metrics`)."""
    values = edge_patched_metrics(model, clean_tokens, corrupted_tokens, graph, ~torch.stack(list(circuits)), metric)
    clean_value, corrupted_value = _end_points(model, clean_tokens, corrupted_tokens, metric)
    return [(value - corrupted_value) / (clean_value - corrupted_value) for value in values]


def _end_points(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric) -> tuple[float, float]:
    """The metric on the clean and on the corrupted run: faithfulness 1 and 0."""
    with torch.no_grad():
        return float(metric(model(clean_tokens))), float(metric(model(corrupted_tokens)))


def circuit_drawing(graph: Graph, circuit: Bool[Tensor, "n_senders n_receivers"],
                    scores: Float[Tensor, "n_senders n_receivers"]
                    ) -> tuple[list[str], list[tuple[float, float]], list[tuple[int, int, float]]]:
    """What `plotting.circuit_graph` draws: the circuit's components as `(labels, (x, y) positions, edges (from,
    to, score))`. Heads sit at `(head, layer)`, a layer's MLP above its heads, INPUT below and LOGITS above all; an
    edge into a head's q/k/v input is drawn to that head (a shared key/value input's to the heads reading it, as in
    `circuit_nodes`)."""
    middle = (graph.n_heads - 1) / 2

    def position(label: str) -> tuple[float, float]:
        if label == "INPUT":
            return middle, -1.0
        if label == "LOGITS":
            return middle, float(graph.n_layers)
        if label.startswith("MLP"):
            return middle, int(label[3:]) + 0.5
        layer, head = label[1:].split("H")
        return float(head), float(layer)

    nodes, readers = _edge_readers(graph, circuit)
    labels = sorted(nodes, key=lambda label: position(label)[::-1])
    index = {label: i for i, label in enumerate(labels)}
    drawn = [(index[graph.senders[s].label], index[target], float(scores[s, r]))
             for s, r, targets in readers for target in targets]
    return labels, [position(label) for label in labels], drawn


# ---- an automatic circuit beside a hand-built one -------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    """Clean prompts, their corrupted counterparts (same shape) and the metric normalised on them."""

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    metric: Metric


@dataclass(frozen=True)
class CircuitComparison:
    """An EAP(-IG) circuit found on discovery prompts and evaluated on held-out ones beside a hand-built circuit.

    Attributes:
        scores: `[S, R]` edge scores on the discovery prompts.
        curve: faithfulness of the top-n circuits on the held-out prompts.
        circuit: the smallest circuit of `curve` reaching the target (the largest tried when none does).
        reaches_target: whether it does.
        manual: the hand-built circuit as edges (`circuit_from_nodes`).
        manual_faithfulness / equal_size_faithfulness: held-out faithfulness of the hand-built circuit and of the
            top edges, as many as it has (unpruned).
        jaccard: |A & B| / |A | B| of the two circuits' components (INPUT and LOGITS left out).
    """

    scores: Float[Tensor, "n_senders n_receivers"]
    curve: CircuitCurve
    circuit: Bool[Tensor, "n_senders n_receivers"]
    reaches_target: bool
    manual: Bool[Tensor, "n_senders n_receivers"]
    manual_faithfulness: float
    equal_size_faithfulness: float
    jaccard: float

    @property
    def size(self) -> int:
        return int(self.circuit.sum())


def compare_with_manual(model: Model, graph: Graph, discovery: PromptSet, held_out: PromptSet, manual_nodes: set[str],
                        *, ig_steps: int = 5, target: float = 0.8, sizes: Sequence[int] | None = None
                        ) -> CircuitComparison:
    """Score every edge on `discovery` (EAP-IG with `ig_steps`), then on `held_out`: the faithfulness curve of the
    top-n circuits (`sizes`, default `size_grid`), the smallest reaching `target`, and the hand-built circuit of
    `manual_nodes` (component labels) beside the top edges of the same size, by exact edge patching."""
    scores = edge_scores(model, discovery.clean, discovery.corrupted, discovery.metric, graph=graph, ig_steps=ig_steps)
    curve = faithfulness_curve(model, held_out.clean, held_out.corrupted, held_out.metric, graph, scores,
                               size_grid(graph.n_edges) if sizes is None else sizes)
    smallest = smallest_faithful(curve, target)
    circuit = top_edges(graph, scores, curve.sizes[-1 if smallest is None else smallest])
    manual = circuit_from_nodes(graph, manual_nodes)
    equal_size = top_edges(graph, scores, int(manual.sum()), prune=False)
    manual_faith, equal_faith = circuit_faithfulness(model, held_out.clean, held_out.corrupted, held_out.metric, graph,
                                                     [manual, equal_size])
    ends = {"INPUT", "LOGITS"}
    found, built = circuit_nodes(graph, circuit) - ends, circuit_nodes(graph, manual) - ends
    jaccard = len(found & built) / len(found | built) if found | built else 1.0
    return CircuitComparison(scores, curve, circuit, smallest is not None, manual, manual_faith, equal_faith, jaccard)
