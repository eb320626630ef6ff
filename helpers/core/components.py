"""One small type for a model component, used by patching, attribution, ablation and every notebook alike.

A `Component` names a place in the forward pass the TransformerLens way: an attention head `(layer, head)`, a whole
attention or MLP output, a single MLP neuron `(layer, neuron)`, the residual stream or the embedding, optionally at
one token position. It knows its hook name and how to index that hook's activation:

    >>> Component.head(3, 2).hook_name()            # 'blocks.3.attn.hook_z'
    >>> Component.head(3, 2).hook_name("k")         # 'blocks.3.attn.hook_k'
    >>> Component.neuron(3, 669).hook_name()        # 'blocks.3.mlp.hook_post'
    >>> Component.mlp(1, position=-1).label         # 'MLP1@-1'
    >>> Component.from_label("ATTN_BIAS2")          # Component(kind='attn_bias', layer=2, ...)

Labels, one format for the whole package (each optionally followed by `@pos`):

    head L3H2   neuron L3N669   attn ATTN3   mlp MLP3   resid_pre / resid_mid / resid_post RESID_PRE3 ...
    embed EMBED   pos_embed POS_EMBED   attn_bias ATTN_BIAS3   unembed_bias UNEMBED_BIAS

Two kinds are parameters rather than activations, so that direct logit attribution can name every term of its
exact split: `attn_bias` (the attention output bias `b_O[layer]`, shared by the heads) and `unembed_bias` (the
constant logit offset `b @ W_U + b_U`). No hook holds them; `hook_name` and `index_tuple` raise for them.

Per-layer hook names without a component: `hook_name("resid_pre", 3)`, `hook_name("head", 3, "pattern")`,
`hook_name("neuron", 3, "pre")`. The device a model's weights live on: `device_of(model)`. A run under hooks by
name: `run_with_hooks(model, tokens, fwd_hooks)` (or the context `hooks_on(model, fwd_hooks)`), the bridge's
`model.run_with_hooks` without its per-hook cost.

Activation shapes of the hooks (batch first):
    resid / attn / mlp / embed: [batch, pos, d_model]
    pos_embed:                  [batch, pos, d_model] (some models: [pos, d_model])
    head sites q, k, v, z:      [batch, pos, n_heads, d_head]  (k, v: n_key_value_heads heads under GQA)
    head site pattern:          [batch, n_heads, query_pos, key_pos]
    neuron (mlp.hook_post):     [batch, pos, d_mlp]
Not every model has every hook: `pos_embed` only with learned positions, `resid_mid` not where attention and MLP
run in parallel (GPT-NeoX, `cfg.parallel_attn_mlp`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeAlias
from weakref import WeakKeyDictionary

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:  # for type checkers only: importing transformer_lens takes about 3.7 s
    from transformer_lens.model_bridge import TransformerBridge

KINDS = ("head", "attn", "mlp", "neuron", "resid_pre", "resid_mid", "resid_post", "embed", "pos_embed",
         "attn_bias", "unembed_bias")
HEAD_SITES = ("z", "q", "k", "v", "pattern", "attn_scores", "q_input", "k_input", "v_input")
NEURON_SITES = ("post", "pre", "pre_linear")
_ALIASES = {"resid": "resid_pre", "attn_out": "attn", "mlp_out": "mlp"}
_LAYERLESS = ("embed", "pos_embed", "unembed_bias")
_INDEXED = ("head", "neuron")
_PARAMETERS = ("attn_bias", "unembed_bias")
_LAYERED_LABELS = {"MLP": "mlp", "ATTN": "attn", "ATTN_BIAS": "attn_bias", "RESID_PRE": "resid_pre",
                   "RESID_MID": "resid_mid", "RESID_POST": "resid_post"}
_LAYERLESS_LABELS = {"EMBED": "embed", "POS_EMBED": "pos_embed", "UNEMBED_BIAS": "unembed_bias"}

Model: TypeAlias = "TransformerBridge"
"""The model every function of the package takes: a `TransformerBridge` in compatibility mode (what
`helpers.models.load.load_model` and `build_native_model` return), which names its hooks the TransformerLens way.
A forward reference, so that importing the package does not import transformer_lens; annotations are not checked
at run time."""


def layers_needed(hook_names: Iterable[str]) -> int | None:
    """How many blocks a forward pass must run to reach every hook of `hook_names` (`blocks.{L}.…`): the last
    layer + 1, so a 30-layer model read at layer 3 runs 4 blocks (the embedding hooks need none); None (the whole
    model) for a hook after the blocks (the final norm, the unembedding), or when only embeddings are read."""
    needed = 0
    for name in hook_names:
        found = re.match(r"blocks\.(\d+)\.", name)
        if found:
            needed = max(needed, int(found.group(1)) + 1)
        elif name not in ("hook_embed", "hook_pos_embed"):
            return None
    return needed or None


def hook_name(kind: str, layer: int | None = None, site: str | None = None) -> str:
    """The TransformerLens hook name of an activation kind at a layer, the one way the package spells hook names.

        hook_name("resid_pre", 3)        'blocks.3.hook_resid_pre'   (also "resid_mid", "resid_post"; "resid")
        hook_name("attn", 3)             'blocks.3.hook_attn_out'    ("attn_out" accepted)
        hook_name("mlp", 3)              'blocks.3.hook_mlp_out'     ("mlp_out" accepted)
        hook_name("head", 3, "pattern")  'blocks.3.attn.hook_pattern' (site z by default, q, k, v, attn_scores)
        hook_name("neuron", 3, "pre")    'blocks.3.mlp.hook_pre'     (site post by default; "pre_linear" is
                                                                      a gated MLP's linear branch, e.g. Llama)
        hook_name("embed")               'hook_embed'                ("pos_embed": 'hook_pos_embed')

    Inputs, for edge-level methods: site "in" of "attn" / "mlp" is the block's un-normalised residual input to that
    sublayer (`blocks.3.ln1.hook_in` / `blocks.3.ln2.hook_in`); head sites "q_input" / "k_input" / "v_input"
    (`blocks.3.attn.hook_q_input`, ...) are each head's own copy of it, present only while
    `model.set_use_split_qkv_input(True)` (k/v: one per key/value head under GQA).
    """
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; use one of {KINDS}")
    if kind in _PARAMETERS:
        raise ValueError(f"{kind!r} is a parameter (b_O / b @ W_U + b_U), not an activation: no hook holds it")
    if kind == "head":
        site = site or "z"
        if site not in HEAD_SITES:
            raise ValueError(f"unknown head site {site!r}; use one of {HEAD_SITES}")
    elif kind == "neuron":
        site = site or "post"
        if site not in NEURON_SITES:
            raise ValueError(f"unknown neuron site {site!r}; use one of {NEURON_SITES}")
    elif kind in ("attn", "mlp") and site == "in":
        return f"blocks.{layer}.{'ln1' if kind == 'attn' else 'ln2'}.hook_in"
    elif site is not None:
        raise ValueError(f"site is only for heads, neurons and attn/mlp 'in', not {kind!r}")
    if kind in _LAYERLESS:
        return f"hook_{kind}"
    if layer is None:
        raise ValueError(f"a {kind!r} hook needs a layer")
    if kind == "head":
        return f"blocks.{layer}.attn.hook_{site}"
    if kind == "neuron":
        return f"blocks.{layer}.mlp.hook_{site}"
    if kind in ("attn", "mlp"):
        return f"blocks.{layer}.hook_{kind}_out"
    return f"blocks.{layer}.hook_{kind}"


def final_resid_hook_name(model: Model) -> str:
    """`blocks.{n_layers - 1}.hook_resid_post`: the residual stream the final norm and unembedding read."""
    return hook_name("resid_post", model.cfg.n_layers - 1)


def device_of(model: Model | torch.nn.Module) -> torch.device:
    """The device of the model's weights (its first parameter); CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


_HOOK_POINTS: WeakKeyDictionary = WeakKeyDictionary()  # model -> {hook name or alias: HookPoint}
_OWN_HOOK_LEVEL = -1  # the context level of hooks added here: removing them leaves every other hook alone
Hook = tuple[str, Callable]


def _hook_points(model, names: Sequence[str]) -> list:
    """The HookPoints of `names` (aliases included), from a map built once per model (again when a name is new)."""
    points = _HOOK_POINTS.get(model)
    if points is None or any(name not in points for name in names):
        points = _HOOK_POINTS[model] = model.hook_dict
    missing = [name for name in names if name not in points]
    if missing:
        raise ValueError(f"no hook named {missing[0]!r} in this model")
    return [points[name] for name in names]


@contextmanager
def hooks_on(model: Model, fwd_hooks: Sequence[Hook]) -> Iterator[None]:
    """`model.hooks(fwd_hooks=fwd_hooks)` for hooks given by name: the same hook points, called once each in list
    order, removed on exit. The bridge's own `hooks` / `run_with_hooks` rebuild its map of hook names, resolving
    every alias, once per hook: about 19 ms per hook on a 30-layer model (EAP-IG on SmolLM2 added 3,426)."""
    points = _hook_points(model, [name for name, _ in fwd_hooks])
    try:
        for point, (_, hook) in zip(points, fwd_hooks):
            point.add_hook(hook, level=_OWN_HOOK_LEVEL)
        yield
    finally:
        for point in points:
            point.remove_hooks("fwd", level=_OWN_HOOK_LEVEL)


def run_with_hooks(model: Model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook] = (), **forward_kwargs
                   ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"] | None:
    """`model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **forward_kwargs)` through `hooks_on` (a hook given by a
    name filter instead of a name goes to the bridge's own `run_with_hooks`): the logits, the residual stream with
    `stop_at_layer`, None with `return_type=None`."""
    if any(not isinstance(name, str) for name, _ in fwd_hooks):
        return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **forward_kwargs)
    with hooks_on(model, fwd_hooks):
        return model(tokens, **forward_kwargs)


@dataclass(frozen=True, order=True)
class Component:
    """A model component. Frozen and ordered, so sets and sorted lists of components work.

    Attributes:
        kind: one of `KINDS` ("head", "attn", "mlp", "neuron", "resid_pre", "resid_mid", "resid_post", "embed",
            "pos_embed", "attn_bias", "unembed_bias"; "resid" is accepted for "resid_pre", "attn_out" for "attn",
            "mlp_out" for "mlp").
        layer: block index (None for "embed", "pos_embed", "unembed_bias").
        index: head index for "head", neuron index for "neuron", else None.
        position: a token position (negative counts from the end), or None for every position.
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        kind = _ALIASES.get(self.kind, self.kind)
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; use one of {KINDS}")
        object.__setattr__(self, "kind", kind)
        if kind in _LAYERLESS and self.layer is not None:
            raise ValueError(f"a {kind!r} component takes no layer")
        if kind not in _LAYERLESS and self.layer is None:
            raise ValueError(f"a {kind!r} component needs a layer")
        if kind in _INDEXED and self.index is None:
            raise ValueError(f"a {kind!r} component needs an index (head or neuron number)")
        if kind not in _INDEXED and self.index is not None:
            raise ValueError(f"a {kind!r} component takes no index")

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def head(cls, layer: int, head: int, position: int | None = None) -> Component:
        return cls("head", int(layer), int(head), position)

    @classmethod
    def mlp(cls, layer: int, position: int | None = None) -> Component:
        return cls("mlp", int(layer), None, position)

    @classmethod
    def attn(cls, layer: int, position: int | None = None) -> Component:
        return cls("attn", int(layer), None, position)

    @classmethod
    def neuron(cls, layer: int, neuron: int, position: int | None = None) -> Component:
        return cls("neuron", int(layer), int(neuron), position)

    @classmethod
    def resid(cls, layer: int, position: int | None = None, where: str = "pre") -> Component:
        return cls(f"resid_{where}", int(layer), None, position)

    @classmethod
    def embed(cls, position: int | None = None) -> Component:
        return cls("embed", None, None, position)

    @classmethod
    def pos_embed(cls, position: int | None = None) -> Component:
        return cls("pos_embed", None, None, position)

    @classmethod
    def attn_bias(cls, layer: int, position: int | None = None) -> Component:
        """The attention output bias `b_O[layer]`: what the layer's attention writes besides its heads."""
        return cls("attn_bias", int(layer), None, position)

    @classmethod
    def unembed_bias(cls, position: int | None = None) -> Component:
        """The constant logit offset `b @ W_U + b_U` (final-norm bias and unembedding bias)."""
        return cls("unembed_bias", None, None, position)

    @classmethod
    def from_label(cls, label: str) -> Component:
        """Parse a label (`L3H2`, `L3N669`, `MLP3`, `ATTN3`, `ATTN_BIAS3`, `RESID_PRE3`, `EMBED`, `POS_EMBED`,
        `UNEMBED_BIAS`, each optionally followed by `@pos`): the inverse of `label`."""
        text, _, pos = label.strip().partition("@")
        position = int(pos) if pos else None
        if m := re.fullmatch(r"L(\d+)H(\d+)", text):
            return cls.head(int(m[1]), int(m[2]), position)
        if m := re.fullmatch(r"L(\d+)N(\d+)", text):
            return cls.neuron(int(m[1]), int(m[2]), position)
        upper = text.upper()
        if m := re.fullmatch(r"([A-Z_]+?)(\d+)", upper):
            if m[1] in _LAYERED_LABELS:
                return cls(_LAYERED_LABELS[m[1]], int(m[2]), None, position)
        if upper in _LAYERLESS_LABELS:
            return cls(_LAYERLESS_LABELS[upper], None, None, position)
        raise ValueError(f"cannot parse component label {label!r}")

    # ---- naming -------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Short name: `L3H2`, `L3N669`, `MLP3`, `ATTN3`, `ATTN_BIAS3`, `RESID_PRE3`, `EMBED`, `POS_EMBED`,
        `UNEMBED_BIAS`, plus `@pos` when positioned."""
        if self.kind == "head":
            text = f"L{self.layer}H{self.index}"
        elif self.kind == "neuron":
            text = f"L{self.layer}N{self.index}"
        elif self.layer is None:
            text = self.kind.upper()
        else:
            text = f"{self.kind.upper()}{self.layer}"
        return text if self.position is None else f"{text}@{self.position}"

    def __str__(self) -> str:
        return self.label

    def at(self, position: int | None) -> Component:
        """The same component restricted to `position` (None: every position)."""
        return Component(self.kind, self.layer, self.index, position)

    def hook_name(self, site: str | None = None) -> str:
        """The TransformerLens hook that holds this component's activation (see the module-level `hook_name`).

        For heads, `site` picks "z" (default), "q", "k", "v", "pattern" or "attn_scores". For "attn" and "mlp" the
        hook is the output (`hook_attn_out` / `hook_mlp_out`); for "neuron" it is `mlp.hook_post` (site "pre" gives
        `mlp.hook_pre`, "pre_linear" a gated MLP's linear branch). Raises ValueError for the parameter kinds
        "attn_bias" and "unembed_bias".
        """
        return hook_name(self.kind, self.layer, site)

    def index_tuple(self, site: str | None = None) -> tuple:
        """Index into the hook's activation after the batch dimension: `act[(slice(None),) + index_tuple()]`.

        Heads: `(pos, head)` for q/k/v/z and `(head, query_pos)` for pattern/attn_scores; neurons `(pos, neuron)`;
        everything else `(pos,)`. An unset position is `slice(None)` (all positions). Raises ValueError for the
        parameter kinds, which have no activation.
        """
        if self.kind in _PARAMETERS:
            raise ValueError(f"{self.kind!r} is a parameter, not an activation: there is nothing to index")
        pos = slice(None) if self.position is None else self.position
        if self.kind == "head":
            return (self.index, pos) if (site or "z") in ("pattern", "attn_scores") else (pos, self.index)
        if self.kind == "neuron":
            return (pos, self.index)
        return (pos,)


def all_heads(n_layers: int, n_heads: int, position: int | None = None) -> list[Component]:
    """Every head of the model, layer-major: `[L0H0, L0H1, ..., L{n-1}H{h-1}]`."""
    return [Component.head(layer, head, position) for layer in range(n_layers) for head in range(n_heads)]


def all_mlps(n_layers: int, position: int | None = None) -> list[Component]:
    return [Component.mlp(layer, position) for layer in range(n_layers)]


def heads_from_pairs(pairs: Iterable[tuple[int, int]], position: int | None = None) -> list[Component]:
    """`[(layer, head), ...]` (e.g. from `argwhere` of an [L, H] map) to head components."""
    return [Component.head(int(layer), int(head), position) for layer, head in pairs]


def labels(components: Iterable[Component]) -> list[str]:
    """Each component's `label`, e.g. for a plot's axis."""
    return [component.label for component in components]


def as_components(items: Iterable[Component | str]) -> list[Component]:
    """Components, or their labels (parsed with `Component.from_label`), as a list of components."""
    return [item if isinstance(item, Component) else Component.from_label(item) for item in items]


def unembed_only_at(model: Model, positions: Int[Tensor, "batch"]) -> list[tuple[str, Callable]]:
    """A hook handing the unembedding only each row's `positions` (`[batch, 1, d_model]`), so a run's logits are
    `[batch, 1, d_vocab]`: unembedding every position of a 49k vocabulary is a fifth of a small model's pass and
    most of its memory. None where the model has no `unembed.hook_in`."""
    if not hasattr(getattr(model, "unembed", None), "hook_in"):
        return []

    def select(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        return act[torch.arange(len(act), device=act.device), positions.to(act.device)][:, None]

    return [("unembed.hook_in", select)]


def circuit_hook_names(model: Model) -> list[str]:
    """The hooks a circuit analysis reads, one name per activation (a `names_filter` for `run_with_cache`): the
    embeddings, the residual stream before, between and after each block, every attention and MLP output, each
    head's q, k, v, z and pattern, and the norms' scales. The bridge also reports each activation under aliases
    (`ln1.hook_in`, `mlp.out.hook_in`, ...), so a cache of everything holds it several times: 1.8 GB for 32 prompts
    of 17 tokens on a 30-layer model, against about a fifth of that here. A name the model lacks is not cached."""
    names = [hook_name("embed"), hook_name("pos_embed"), "ln_final.hook_scale"]
    for layer in range(model.cfg.n_layers):
        names += [hook_name(kind, layer) for kind in ("resid_pre", "resid_mid", "resid_post", "attn", "mlp")]
        names += [hook_name("head", layer, site) for site in ("q", "k", "v", "z", "pattern")]
        names += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
    return names

