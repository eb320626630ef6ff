"""One small type for a model component, used by patching, attribution and ablation alike.

A `Component` names a place in the forward pass the TransformerLens way: an attention head `(layer, head)`, a whole
attention or MLP output, a single MLP neuron `(layer, neuron)`, the residual stream or the embedding, optionally at
one token position. It knows its hook name and how to index that hook's activation:

    >>> Component.head(3, 2).hook_name()            # 'blocks.3.attn.hook_z'
    >>> Component.head(3, 2).hook_name("k")         # 'blocks.3.attn.hook_k'
    >>> Component.neuron(3, 669).hook_name()        # 'blocks.3.mlp.hook_post'
    >>> Component.mlp(1, position=-1).label         # 'MLP1@-1'

Activation shapes of the hooks (batch first):
    resid / attn / mlp / embed: [batch, pos, d_model]
    head sites q, k, v, z:      [batch, pos, n_heads, d_head]
    head site pattern:          [batch, n_heads, query_pos, key_pos]
    neuron (mlp.hook_post):     [batch, pos, d_mlp]
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

KINDS = ("head", "attn", "mlp", "neuron", "resid_pre", "resid_mid", "resid_post", "embed")
HEAD_SITES = ("z", "q", "k", "v", "pattern", "attn_scores")
_ALIASES = {"resid": "resid_pre", "attn_out": "attn", "mlp_out": "mlp"}


@dataclass(frozen=True, order=True)
class Component:
    """A model component. Frozen and ordered, so sets and sorted lists of components work.

    Attributes:
        kind: one of `KINDS` ("head", "attn", "mlp", "neuron", "resid_pre", "resid_mid", "resid_post", "embed";
            "resid" is accepted for "resid_pre").
        layer: block index (None for "embed").
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
        if kind != "embed" and self.layer is None:
            raise ValueError(f"a {kind!r} component needs a layer")
        if kind in ("head", "neuron") and self.index is None:
            raise ValueError(f"a {kind!r} component needs an index (head or neuron number)")
        if kind not in ("head", "neuron") and self.index is not None:
            raise ValueError(f"a {kind!r} component takes no index")

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def head(cls, layer: int, head: int, position: int | None = None) -> "Component":
        return cls("head", int(layer), int(head), position)

    @classmethod
    def mlp(cls, layer: int, position: int | None = None) -> "Component":
        return cls("mlp", int(layer), None, position)

    @classmethod
    def attn(cls, layer: int, position: int | None = None) -> "Component":
        return cls("attn", int(layer), None, position)

    @classmethod
    def neuron(cls, layer: int, neuron: int, position: int | None = None) -> "Component":
        return cls("neuron", int(layer), int(neuron), position)

    @classmethod
    def resid(cls, layer: int, position: int | None = None, where: str = "pre") -> "Component":
        return cls(f"resid_{where}", int(layer), None, position)

    @classmethod
    def from_label(cls, label: str) -> "Component":
        """Parse `L3H2`, `L3N669`, `MLP3`, `ATTN3`, `RESID_PRE3`, `EMBED`, each optionally followed by `@pos`."""
        text, _, pos = label.strip().partition("@")
        position = int(pos) if pos else None
        if m := re.fullmatch(r"L(\d+)H(\d+)", text):
            return cls.head(int(m[1]), int(m[2]), position)
        if m := re.fullmatch(r"L(\d+)N(\d+)", text):
            return cls.neuron(int(m[1]), int(m[2]), position)
        if m := re.fullmatch(r"(MLP|ATTN|RESID_PRE|RESID_MID|RESID_POST)(\d+)", text.upper()):
            return cls(m[1].lower() if m[1] != "ATTN" else "attn", int(m[2]), None, position)
        if text.upper() == "EMBED":
            return cls("embed", None, None, position)
        raise ValueError(f"cannot parse component label {label!r}")

    # ---- naming -------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Short name: `L3H2`, `L3N669`, `MLP3`, `ATTN3`, `RESID_PRE3`, `EMBED`, plus `@pos` when positioned."""
        if self.kind == "head":
            text = f"L{self.layer}H{self.index}"
        elif self.kind == "neuron":
            text = f"L{self.layer}N{self.index}"
        elif self.kind == "embed":
            text = "EMBED"
        else:
            text = f"{self.kind.upper()}{self.layer}"
        return text if self.position is None else f"{text}@{self.position}"

    def __str__(self) -> str:
        return self.label

    def at(self, position: int | None) -> "Component":
        """The same component restricted to `position` (None: every position)."""
        return Component(self.kind, self.layer, self.index, position)

    def hook_name(self, site: str | None = None) -> str:
        """The TransformerLens hook that holds this component's activation.

        For heads, `site` picks "z" (default), "q", "k", "v", "pattern" or "attn_scores". For "attn" and "mlp",
        site None gives the output (`hook_attn_out` / `hook_mlp_out`); for "neuron" it gives `mlp.hook_post`
        (site "pre" gives `mlp.hook_pre`).
        """
        layer = self.layer
        if self.kind == "head":
            site = site or "z"
            if site not in HEAD_SITES:
                raise ValueError(f"unknown head site {site!r}; use one of {HEAD_SITES}")
            return f"blocks.{layer}.attn.hook_{site}"
        if site is not None and self.kind != "neuron":
            raise ValueError(f"site is only for heads and neurons, not {self.kind!r}")
        if self.kind == "neuron":
            return f"blocks.{layer}.mlp.hook_{site or 'post'}"
        if self.kind == "attn":
            return f"blocks.{layer}.hook_attn_out"
        if self.kind == "mlp":
            return f"blocks.{layer}.hook_mlp_out"
        if self.kind == "embed":
            return "hook_embed"
        return f"blocks.{layer}.hook_{self.kind}"

    def index_tuple(self, site: str | None = None) -> tuple:
        """Index into the hook's activation after the batch dimension: `act[(slice(None),) + index_tuple()]`.

        Heads: `(pos, head)` for q/k/v/z and `(head, query_pos)` for pattern/attn_scores; neurons `(pos, neuron)`;
        everything else `(pos,)`. An unset position is `slice(None)` (all positions).
        """
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
    return [component.label for component in components]
