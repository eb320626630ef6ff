"""The heuristic scheme of Nikankin et al. ("Arithmetic Without Algorithms", ICLR 2025): which heuristics exist over
one operator's operand pairs, which prompts each concerns, and how a neuron's activation maps are classified into
them. Pure: operand pairs, integer results and maps in, heuristics and scores out; no model runs here (the maps come
from the model in `helpers.studies.heuristics`). Shapes: `pairs [N, 2]` long (op1, op2), `results [N]` long, maps
`[n_neurons, N]`.

A *direct* heuristic (one that promotes result tokens: `result_*`) is classified on a neuron's KV map (activation
times its value vector's logit of the answer), an *indirect* one (operand ranges, moduli, patterns, values,
identical operands) on its K map (the activation); this is the original notebook's "HYBRID" mode.

The heuristic scheme (digest §4.H), with the original notebook's inconsistencies resolved ONE way, used by the
classifier and by `Heuristic.matches` alike (so "which prompts does a heuristic concern" never disagrees with "what was
classified"):
- names: `op1_3mod7`, `op2_range_10_40`, `both_operands_2mod5`, `both_operands_range_0_10`, `same_operand`,
  `op1_pattern_.8.`, `op2_value_042`, `result_5mod9`, `result_range_100_130`, `result_pattern_..5`,
  `result_value_000`, `result_multi_value_3=[0, 1, 2]` (the original notebook emitted `*_range_*` but matched
  `*_region_*`; here it is `range` everywhere);
- ranges are half-open `[a, b)` everywhere (the original notebook mixed half-open and inclusive); starts step by
  `min(size, range_step)` for operands and results alike, so e.g. [10, 40) exists;
- results use integer division `x // y` everywhere (the caller passes integer `results`);
- moduli are the paper's n in {2..9, 11, 13, 15} (mod 10 is the `..d` digit pattern);
- digit patterns: every mask of the `pattern_width`-digit zero-padded number that fixes at least one digit, except
  the all-fixed mask (a `value`) and the prefix masks `d..`, `dd.` (ranges cover them); width 3 by default;
- each heuristic's k is the size of its own relevant set `R` (the number of valid pairs it concerns), not the original
  notebook's per-type formulas and caps; heuristics with fewer than `min_relevant` pairs, or that concern every pair,
  are left out;
- the score is chance-corrected: `(precision@k - |R|/N) / (1 - |R|/N)`, where precision@k is the fraction of the
  neuron's top-k pairs that lie in R (R-precision; ties in the map are shared out evenly). It is 1 for a neuron that
  fires exactly on R, about 0 for a neuron unrelated to H whatever the size of R. This replaces the original notebook's
  ad hoc fixes for heuristics that cover most prompts (÷'s deleted `result_range_0_*` / `[0, 1]` classes, ×'s zeroed
  mod-after-`result_value_000`), which fall to ~0 by themselves;
- K maps are checked from the top AND the bottom (gated SiLU activations are signed; a neuron that is most negative
  exactly on R implements H too), for every heuristic type; KV maps from the top only (promoting the answer);
- multi-value result heuristics (the original notebook's ÷-only `result_multi_value`): the n in `multi_value_sizes` most
  frequent results among the neuron's top `multi_value_top` KV pairs, scored like every other heuristic.
A neuron "implements" H when its score >= the threshold (0.6 in the paper).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.cache import storable

PAPER_MODULI: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15)
OPERAND_RANGE_SIZES: dict[str, tuple[int, ...]] = {"+": (10, 30, 50, 100), "-": (10, 30, 50, 100),
                                                   "*": (3, 5, 10), "/": (10, 30, 50, 100)}
RESULT_RANGE_SIZES: dict[str, tuple[int, ...]] = {"+": (10, 30, 50), "-": (10, 30, 50), "*": (10, 30, 50, 100),
                                                  "/": (2, 10, 100)}
TARGETS = ("op1", "op2", "result")
Neuron = tuple[int, int]


# ---- one heuristic --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heuristic:
    """One heuristic: a predicate over (op1, op2, result).

    Attributes:
        target: "op1", "op2", "result", "both_operands" or "same_operand".
        kind: "mod" (params (m, n): v % n == m), "range" ((a, b): a <= v < b), "pattern" ((mask,): digits of the
            zero-padded v match the mask, `.` a wildcard), "value" ((v,)), "multi_value" ((v1, ...)), "same".
    """

    target: str
    kind: str
    params: tuple

    @property
    def name(self) -> str:
        t, k, p = self.target, self.kind, self.params
        if k == "same":
            return "same_operand"
        if k == "mod":
            return f"{t}_{p[0]}mod{p[1]}"
        if k == "range":
            return f"{t}_range_{p[0]}_{p[1]}"
        if k == "pattern":
            return f"{t}_pattern_{p[0]}"
        if k == "value":
            return f"{t}_value_{p[0]:03d}"
        if k == "multi_value":
            return f"{t}_multi_value_{len(p)}=[{', '.join(str(v) for v in p)}]"
        raise ValueError(f"unknown heuristic kind {k!r}")

    @property
    def direct(self) -> bool:
        """Direct heuristics concern the result (classified on KV maps); indirect ones the operands (K maps)."""
        return self.target == "result"

    @property
    def group(self) -> str:
        """Coarse group for statistics: e.g. "operand mod", "result range", "same operand"."""
        if self.kind == "same":
            return "same operand"
        who = {"op1": "operand", "op2": "operand", "both_operands": "both operands", "result": "result"}[self.target]
        return f"{who} {self.kind.replace('_', '-')}"

    def values(self, pairs: Int[Tensor, "N 2"], results: Int[Tensor, " N"]) -> Int[Tensor, " N"]:
        """The measured quantity `[N]` (op1, op2 or result); not defined for both-operand heuristics."""
        if self.target == "op1":
            return pairs[:, 0]
        if self.target == "op2":
            return pairs[:, 1]
        if self.target == "result":
            return results
        raise ValueError(f"{self.name} looks at both operands")

    def matches(self, pairs: Int[Tensor, "N 2"], results: Int[Tensor, " N"]) -> Bool[Tensor, " N"]:
        """Bool `[N]`: which prompts (operand pairs `[N, 2]`, integer results `[N]`) this heuristic concerns."""
        pairs, results = torch.as_tensor(pairs).long(), torch.as_tensor(results).long()
        if self.kind == "same":
            return pairs[:, 0] == pairs[:, 1]
        if self.target == "both_operands":
            return self.__class__("op1", self.kind, self.params).matches(pairs, results) & \
                self.__class__("op2", self.kind, self.params).matches(pairs, results)
        v = self.values(pairs, results)
        if self.kind == "mod":
            return v % self.params[1] == self.params[0]
        if self.kind == "range":
            return (v >= self.params[0]) & (v < self.params[1])
        if self.kind == "value":
            return v == self.params[0]
        if self.kind == "multi_value":
            return torch.isin(v, torch.tensor(self.params, dtype=torch.long))
        if self.kind == "pattern":
            return pattern_matches(v, self.params[0])
        raise ValueError(f"unknown heuristic kind {self.kind!r}")


_NAME = re.compile(r"^(op1|op2|both_operands|result)_(?:(\d+)mod(\d+)|range_(\d+)_(\d+)|pattern_([\d.]+)|value_(\d+)"
                   r"|multi_value_\d+=\[([\d, ]*)\])$")


def parse(name: str) -> Heuristic:
    """The heuristic of a name produced by `Heuristic.name` (the inverse)."""
    if name == "same_operand":
        return Heuristic("same_operand", "same", ())
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"not a heuristic name: {name!r}")
    target = m[1]
    if m[2] is not None:
        return Heuristic(target, "mod", (int(m[2]), int(m[3])))
    if m[4] is not None:
        return Heuristic(target, "range", (int(m[4]), int(m[5])))
    if m[6] is not None:
        return Heuristic(target, "pattern", (m[6],))
    if m[7] is not None:
        return Heuristic(target, "value", (int(m[7]),))
    return Heuristic(target, "multi_value", tuple(int(v) for v in m[8].split(",") if v.strip()))


def is_associated(name: str, x: int, y: int, result: int) -> bool:
    """Does heuristic `name` concern the prompt with operands x, y and (integer) result?"""
    return bool(parse(name).matches(torch.tensor([[x, y]]), torch.tensor([result]))[0])


def relevant_mask(name: str, pairs: Int[Tensor, "N 2"], results: Int[Tensor, " N"]) -> Bool[Tensor, " N"]:
    """Bool `[N]`: the prompts a heuristic concerns (same predicate as the classifier)."""
    return parse(name).matches(pairs, results)


def pattern_matches(values: Int[Tensor, " N"], mask: str) -> Bool[Tensor, " N"]:
    """Bool `[N]`: the zero-padded values (width `len(mask)`) have the mask's fixed digits (`.` is a wildcard)."""
    out = values < 10 ** len(mask)
    for i, char in enumerate(mask):
        if char != ".":
            out &= (values // 10 ** (len(mask) - 1 - i)) % 10 == int(char)
    return out


def pattern_masks(width: int = 3) -> list[tuple[int, ...]]:
    """Positions fixed by each digit-pattern mask: at least one fixed, not all fixed (a value), and not a prefix
    followed only by wildcards (`d..`, `dd.`: ranges). Width 3 gives `.d.`, `..d`, `d.d`, `.dd`."""
    masks = []
    for fixed in itertools.chain.from_iterable(itertools.combinations(range(width), r) for r in range(1, width)):
        if fixed == tuple(range(len(fixed))):
            continue
        masks.append(fixed)
    return masks


# ---- the scheme: families of heuristics that share one integer feature ----------------------------------------------
@dataclass
class Family:
    """Heuristics `feature == j` for j = 0..len(names)-1 over the N pairs (feature -1: in none of them)."""

    feature: Tensor
    names: list[str]
    direct: bool


@dataclass
class Scheme:
    """Every heuristic of one operator over a fixed list of operand pairs.

    Attributes:
        pairs, results: `[N, 2]`, `[N]` the valid pairs the maps are computed on, and their integer results.
        families: the heuristics, grouped for fast scoring.
        names: all heuristic names, in family order; `sizes[i]` = |R| of `names[i]`.
    """

    pairs: Tensor
    results: Tensor
    operator: str
    families: list[Family]
    names: list[str] = field(default_factory=list)
    sizes: Tensor | None = None
    multi_value_sizes: tuple[int, ...] = ()
    multi_value_top: int = 1000

    def __post_init__(self) -> None:
        self.names = [n for f in self.families for n in f.names]
        self.sizes = torch.cat([torch.bincount(f.feature[f.feature >= 0], minlength=len(f.names))
                                for f in self.families]) if self.families else torch.zeros(0)
        self.index = {n: i for i, n in enumerate(self.names)}

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def direct_mask(self) -> Bool[Tensor, " H"]:
        return torch.tensor([f.direct for f in self.families for _ in f.names], dtype=torch.bool)


def _add_family(families: list[Family], feature: Tensor, names: Sequence[str], direct: bool, n: int,
                min_relevant: int, seen: set) -> None:
    """Keep the values with min_relevant <= |R| < n whose member set was not seen before; renumber."""
    feature = feature.long()
    counts = torch.bincount(feature[feature >= 0], minlength=len(names))
    keep = []
    for j, name in enumerate(names):
        size = int(counts[j])
        if size < min_relevant or size >= n:
            continue
        members = (feature == j).nonzero().flatten()
        signature = (direct, hashlib.sha1(members.numpy().tobytes()).hexdigest())
        if signature in seen:
            continue
        seen.add(signature)
        keep.append(j)
    if not keep:
        return
    remap = torch.full((len(names) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    families.append(Family(remap[torch.where(feature >= 0, feature, len(names))], [names[j] for j in keep], direct))


def build_scheme(pairs: Int[Tensor, "N 2"], results: Int[Tensor, "N"], operator: str, *,
                 moduli: Sequence[int] = PAPER_MODULI,
                 operand_range_sizes: Sequence[int] | None = None, result_range_sizes: Sequence[int] | None = None,
                 range_step: int = 10, pattern_width: int = 3, min_relevant: int = 10,
                 multi_value_sizes: Sequence[int] | None = None, multi_value_top: int = 1000) -> Scheme:
    """All heuristics of `operator` over the valid pairs `[N, 2]` with integer `results [N]`.

    Args:
        operand_range_sizes / result_range_sizes: range lengths (defaults: the original notebook's per operator,
            `OPERAND_RANGE_SIZES` / `RESULT_RANGE_SIZES`); starts step by `min(size, range_step)` from 0.
        pattern_width: digits of the zero-padded numbers the patterns look at (3: `.8.` is "tens digit 8").
        min_relevant: heuristics concerning fewer pairs are left out (their top-k is too short to mean anything).
        multi_value_sizes: sizes of the data-dependent multi-value result heuristics; default (2, 3, 4) for "/"
            (the paper's |S| in [2, 4]), none otherwise.
    """
    pairs, results = torch.as_tensor(pairs).long(), torch.as_tensor(results).long()
    n = len(pairs)
    x, y = pairs[:, 0], pairs[:, 1]
    operand_range_sizes = tuple(operand_range_sizes or OPERAND_RANGE_SIZES.get(operator, (10, 30, 50, 100)))
    result_range_sizes = tuple(result_range_sizes or RESULT_RANGE_SIZES.get(operator, (10, 30, 50)))
    if multi_value_sizes is None:
        multi_value_sizes = (2, 3, 4) if operator == "/" else ()
    families: list[Family] = []
    seen: set = set()
    values = {"op1": x, "op2": y, "result": results}
    for target in TARGETS:
        v = values[target]
        direct = target == "result"
        for mod in moduli:
            _add_family(families, v % mod, [f"{target}_{m}mod{mod}" for m in range(mod)], direct, n, min_relevant,
                        seen)
        sizes = result_range_sizes if direct else operand_range_sizes
        hi = int(v.max()) + 1 if n else 0
        for size in sizes:
            step = min(size, range_step)
            for phase in range(0, size, step):
                n_bins = (hi - phase + size - 1) // size + 1
                feature = torch.where(v >= phase, (v - phase) // size, torch.full_like(v, -1))
                names = [f"{target}_range_{phase + q * size}_{phase + (q + 1) * size}" for q in range(n_bins)]
                _add_family(families, feature, names, direct, n, min_relevant, seen)
        vmax = int(v.max()) + 1 if n else 0
        _add_family(families, v, [f"{target}_value_{j:03d}" for j in range(vmax)], direct, n, min_relevant, seen)
        for fixed in pattern_masks(pattern_width):
            feature = torch.zeros_like(v)
            for i in fixed:
                feature = feature * 10 + (v // 10 ** (pattern_width - 1 - i)) % 10
            feature = torch.where(v < 10 ** pattern_width, feature, torch.full_like(v, -1))
            names = []
            for code in range(10 ** len(fixed)):
                digits = str(code).zfill(len(fixed))
                mask = ["."] * pattern_width
                for i, d in zip(fixed, digits):
                    mask[i] = d
                names.append(f"{target}_pattern_{''.join(mask)}")
            _add_family(families, feature, names, direct, n, min_relevant, seen)
    for mod in moduli:
        feature = torch.where(x % mod == y % mod, x % mod, torch.full_like(x, -1))
        _add_family(families, feature, [f"both_operands_{m}mod{mod}" for m in range(mod)], False, n, min_relevant, seen)
    hi = int(pairs.max()) + 1 if n else 0
    for size in operand_range_sizes:
        step = min(size, range_step)
        for phase in range(0, size, step):
            qx = torch.where(x >= phase, (x - phase) // size, torch.full_like(x, -1))
            qy = torch.where(y >= phase, (y - phase) // size, torch.full_like(y, -2))
            feature = torch.where(qx == qy, qx, torch.full_like(qx, -1))
            n_bins = (hi - phase + size - 1) // size + 1
            names = [f"both_operands_range_{phase + q * size}_{phase + (q + 1) * size}" for q in range(n_bins)]
            _add_family(families, feature, names, False, n, min_relevant, seen)
    _add_family(families, torch.where(x == y, 0, -1), ["same_operand"], False, n, min_relevant, seen)
    return Scheme(pairs, results, operator, families, multi_value_sizes=tuple(multi_value_sizes),
                  multi_value_top=multi_value_top)


def value_scheme(values: Int[Tensor, "T"]) -> Scheme:
    """The operand heuristics (ranges, moduli, patterns, values) over single numbers, e.g. to classify how an early
    MLP neuron responds to a number token by itself: `build_scheme` with the number as op1 (op2 fixed at 0). A
    heuristic must concern 10 of the numbers, or half of them where there are fewer than 20 (one-digit operands:
    of 0-9, the odd or even ones, 0-4, 5-9; a smaller set matches a random response perfectly too often)."""
    values = torch.as_tensor(values).long()
    return build_scheme(torch.stack([values, torch.zeros_like(values)], dim=1), values, "+",
                        min_relevant=max(2, min(10, len(values) // 2)))


# ---- scoring --------------------------------------------------------------------------------------------------------
@dataclass
class _Ranks:
    """Rank statistics of maps `[m, N]`, stored transposed (`[N, m]`, pairs first) for fast scatter-adds:
    `greater[j, r]` = entries of row r strictly greater than entry j; with ties, `inv_equal` = 1 / (number of
    equal entries) and `greater` is pre-multiplied by it."""

    greater: Tensor
    inv_equal: Tensor | None


def _rank_stats(maps: Tensor) -> _Ranks:
    maps = maps.float().contiguous()
    ordered = maps.sort(dim=-1).values
    right = torch.searchsorted(ordered, maps, right=True)
    left = torch.searchsorted(ordered, maps, right=False)
    greater = (maps.shape[-1] - right).float().T.contiguous()
    equal = (right - left).float().T.contiguous()
    if bool((equal > 1).any()):
        inv_equal = equal.reciprocal_()
        return _Ranks(greater.mul_(inv_equal), inv_equal)
    return _Ranks(greater, None)


def _family_hits(feature: Tensor, sizes: Tensor, ranks: _Ranks) -> Tensor:
    """Expected number of each heuristic's members among the top-|R| entries of each map: `[m, V]`.

    feature `[N]` (-1: no heuristic of the family), sizes `[V]` = |R| per value. An entry with g strictly greater
    and e equal entries lies in the top k with probability `clamp((k - g) / e, 0, 1)` when ties are broken at
    random (exactly 1[g < k] without ties).
    """
    member = feature >= 0
    index = feature.clamp(min=0)
    k = torch.where(member, sizes[index].float(), torch.full_like(index, -1e9, dtype=torch.float32))[:, None]
    weight = k * ranks.inv_equal if ranks.inv_equal is not None else k.expand_as(ranks.greater)
    weight = (weight - ranks.greater).clamp_(0, 1)
    hits = torch.zeros(len(sizes), ranks.greater.shape[1])
    hits.index_add_(0, index, weight)
    return hits.T


def chance_corrected(hits: Float[Tensor, "m V"], sizes: Int[Tensor, " V"], n: int) -> Float[Tensor, "m V"]:
    """`(hits/|R| - |R|/N) / (1 - |R|/N)`: 1 for a perfect match, ~0 for an unrelated map."""
    sizes = sizes.to(hits.dtype)
    base = sizes / n
    return (hits / sizes - base) / (1 - base)


def precision_at_size(hits: Float[Tensor, "m V"], sizes: Int[Tensor, " V"], n: int  # noqa: ARG001 - as chance_corrected
                      ) -> Float[Tensor, "m V"]:
    """`hits/|R|`: the fraction of the top-|R| pairs that lie in R, the paper's statistic (Algorithm 1), not corrected
    for chance: a heuristic that concerns 60% of the pairs scores 0.6 on any map."""
    return hits / sizes.to(hits.dtype)


def score_maps(maps: Float[Tensor, "m N"], scheme: Scheme, check_bottom: bool, chance_correct: bool = True
               ) -> tuple[Float[Tensor, "m H"], Bool[Tensor, "m H"]]:
    """Score every heuristic of `scheme` on `maps [m, N]` (rows aligned with `scheme.pairs`).

    Returns `(scores [m, H], from_bottom [m, H] bool)`; with `check_bottom` the score is the max of the map and its
    negation (the bottom of the map). `chance_correct=False` gives the paper's uncorrected precision.
    """
    statistic = chance_corrected if chance_correct else precision_at_size
    maps = maps.float()
    n = scheme.n_pairs
    if maps.shape[-1] != n:
        raise ValueError(f"maps have {maps.shape[-1]} columns but the scheme has {n} pairs")
    stacked = torch.cat([maps, -maps]) if check_bottom else maps
    ranks = _rank_stats(stacked)
    per_family = []
    for family in scheme.families:
        sizes = torch.bincount(family.feature[family.feature >= 0], minlength=len(family.names))
        per_family.append(statistic(_family_hits(family.feature, sizes, ranks), sizes, n))
    scores = torch.cat(per_family, dim=1) if per_family else torch.zeros(len(stacked), 0)
    if not check_bottom:
        return scores, torch.zeros_like(scores, dtype=torch.bool)
    top, low = scores[: len(maps)], scores[len(maps):]
    bottom = low > top
    return torch.where(bottom, low, top), bottom


def multi_value_scores(kv_maps: Float[Tensor, "m N"], scheme: Scheme, chance_correct: bool = True
                       ) -> list[dict[str, float]]:
    """Data-dependent multi-value result heuristics per map: the n most frequent results among the top
    `scheme.multi_value_top` positive entries (those promoting the answer), for each n in
    `scheme.multi_value_sizes`, scored like any heuristic."""
    out: list[dict[str, float]] = []
    if not scheme.multi_value_sizes:
        return [{} for _ in range(len(kv_maps))]
    n = scheme.n_pairs
    top = min(scheme.multi_value_top, n)
    for row in range(len(kv_maps)):
        found = {}
        values_row = kv_maps[row].float()
        k_top = min(top, int((values_row > 0).sum()))
        if k_top == 0:
            out.append(found)
            continue
        top_results = scheme.results[values_row.topk(k_top).indices]
        values, counts = torch.unique(top_results, return_counts=True)
        order = values[counts.argsort(descending=True, stable=True)]
        for size in scheme.multi_value_sizes:
            if size > len(order):
                continue
            heuristic = Heuristic("result", "multi_value", tuple(sorted(int(v) for v in order[:size])))
            member = heuristic.matches(scheme.pairs, scheme.results)
            k = int(member.sum())
            if k < 1 or k >= n:
                continue
            feature = torch.where(member, 0, -1)
            hits = _family_hits(feature, torch.tensor([k]), _rank_stats(kv_maps[row : row + 1]))
            statistic = chance_corrected if chance_correct else precision_at_size
            found[heuristic.name] = float(statistic(hits, torch.tensor([k]), n)[0, 0])
        out.append(found)
    return out


@storable
@dataclass
class HeuristicScores:
    """Classification of neurons into heuristics.

    Attributes:
        neurons: `[(layer, neuron), ...]`, the rows.
        names: heuristic names, the columns of `scores`.
        scores: `[n_neurons, H]` chance-corrected match scores (direct heuristics from KV maps, indirect from K maps).
        from_bottom: `[n_neurons, H]` whether the match was at the bottom (most negative) of the K map.
        extra: per neuron, data-dependent heuristics (multi-value) `{name: score}`.
    """

    neurons: list[Neuron]
    names: list[str]
    scores: Tensor
    from_bottom: Tensor
    extra: list[dict[str, float]] = field(default_factory=list)

    def neuron_scores(self, i: int) -> dict[str, float]:
        out = dict(zip(self.names, self.scores[i].tolist()))
        out.update(self.extra[i] if self.extra else {})
        return out

    def by_neuron(self, threshold: float) -> dict[Neuron, list[tuple[str, float]]]:
        """`{(layer, neuron): [(name, score), ...]}` of scores >= threshold, best first ([] if none)."""
        out = {}
        for i, neuron in enumerate(self.neurons):
            row = self.scores[i]
            hit = (row >= threshold).nonzero().flatten().tolist()
            found = [(self.names[j], float(row[j])) for j in hit]
            found += [(name, s) for name, s in (self.extra[i] if self.extra else {}).items() if s >= threshold]
            out[neuron] = sorted(found, key=lambda t: (-t[1], t[0]))
        return out

    def classes(self, threshold: float) -> dict[str, list[tuple[int, int, float]]]:
        """`{heuristic: [(layer, neuron, score), ...]}` for scores >= threshold (the original notebook's
        `heuristic_classes`)."""
        out: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
        for neuron, found in self.by_neuron(threshold).items():
            for name, s in found:
                out[name].append((neuron[0], neuron[1], s))
        return dict(out)

    def best(self) -> list[tuple[str, float]]:
        """Each neuron's best heuristic and score."""
        out = []
        for i in range(len(self.neurons)):
            scores = self.neuron_scores(i)
            name = max(scores, key=lambda k: (scores[k], k)) if scores else ""
            out.append((name, scores.get(name, float("nan"))))
        return out

    def classified_fraction(self, threshold: float) -> float:
        """Fraction of the neurons with at least one heuristic at score >= threshold."""
        if not self.neurons:
            return float("nan")
        return sum(bool(v) for v in self.by_neuron(threshold).values()) / len(self.neurons)

    def group_counts(self, threshold: float) -> dict[str, dict[int, int]]:
        """`{group: {layer: number of (neuron, heuristic) matches}}` for the bar chart of heuristic types."""
        out: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for (layer, _), found in self.by_neuron(threshold).items():
            for name, _ in found:
                out[parse(name).group][layer] += 1
        return {g: dict(v) for g, v in out.items()}


def classify(k_maps: Float[Tensor, "n N"], kv_maps: Float[Tensor, "n N"], scheme: Scheme, neurons: Sequence[Neuron],
             check_bottom_k: bool = True, chance_correct: bool = True) -> HeuristicScores:
    """Classify neurons: indirect heuristics scored on the K maps `[n, N]`, direct (result) heuristics on the KV
    maps `[n, N]` (the original notebook's HYBRID mode), plus the data-dependent multi-value heuristics on the KV maps.
    `chance_correct=False` scores with the paper's uncorrected precision (`precision_at_size`)."""
    direct = scheme.direct_mask()
    k_scores, k_bottom = score_maps(k_maps, scheme, check_bottom_k, chance_correct)
    kv_scores, _ = score_maps(kv_maps, scheme, False, chance_correct)
    scores = torch.where(direct[None], kv_scores, k_scores)
    bottom = torch.where(direct[None], torch.zeros_like(k_bottom), k_bottom)
    extra = multi_value_scores(kv_maps, scheme, chance_correct)
    return HeuristicScores(list(map(tuple, neurons)), list(scheme.names), scores, bottom, extra)


def uncorrected(scores: HeuristicScores, scheme: Scheme) -> HeuristicScores:
    """The same classification scored with the paper's uncorrected precision instead of our chance-corrected score,
    without rescoring: per heuristic, precision = s (1 - |R|/N) + |R|/N, a monotone map, so the top/bottom choice is
    the same. Equal to `classify(..., chance_correct=False)` on the maps `scores` came from."""
    base = (scheme.sizes.float() / scheme.n_pairs)[None]
    extra = []
    for row in scores.extra or []:
        out = {}
        for name, value in row.items():
            share = float(parse(name).matches(scheme.pairs, scheme.results).float().mean())
            out[name] = value * (1 - share) + share
        extra.append(out)
    return HeuristicScores(list(scores.neurons), list(scores.names), scores.scores * (1 - base) + base,
                           scores.from_bottom.clone(), extra)


# ---- reading scores and maps ----------------------------------------------------------------------------------------
def top_neurons_per_layer(scores: Float[Tensor, "n_layers d_mlp"] | dict[int, Float[Tensor, " d_mlp"]], k: int,
                          layers: Iterable[int]) -> list[Neuron]:
    """The k highest-scoring neurons of each layer: scores `[n_layers, d_mlp]` (or `{layer: [d_mlp]}`)."""
    out = []
    for layer in layers:
        row = scores[layer]
        out += [(int(layer), int(n)) for n in torch.as_tensor(row).float().topk(min(k, len(row))).indices.tolist()]
    return out


def associated_neurons(scores: HeuristicScores, threshold: float, pairs: Int[Tensor, "N 2"], results: Int[Tensor, "N"]
                       ) -> tuple[Float[Tensor, "N n_neurons"], list[str]]:
    """Association of prompts with classified neurons: `best [N, n_neurons]` = the highest score of the neuron
    among heuristics (>= threshold) that concern the prompt (0 where none), and the heuristic names used."""
    classes = scores.classes(threshold)
    names = sorted(classes)
    row = {neuron: i for i, neuron in enumerate(scores.neurons)}
    best = torch.zeros(len(pairs), len(scores.neurons))
    for name in names:
        member = relevant_mask(name, pairs, results)
        if not member.any():
            continue
        for layer, neuron, s in classes[name]:
            col = row[(layer, neuron)]
            best[member, col] = torch.maximum(best[member, col], torch.tensor(s))
    return best, names


def value_lens_agreement(scores: "HeuristicScores", threshold: float, logits: Float[Tensor, "n_neurons T"],
                         top: int = 10) -> dict[Neuron, float]:
    """For each neuron classified (>= threshold) into a direct heuristic on numbers 0..T-1 (`logits` from
    `value_logits` over the number tokens, rows aligned with `scores.neurons`): the fraction of the `top` numbers
    its value vector promotes most that its best direct heuristic concerns as results (direct heuristics are
    classified on KV maps from the top, i.e. as promoting). 1: the value vector writes exactly the answers the
    neuron's heuristic is about."""
    numbers = torch.arange(logits.shape[1])
    out = {}
    for i, neuron in enumerate(scores.neurons):
        direct = [(name, s) for name, s in scores.by_neuron(threshold)[neuron] if parse(name).direct]
        if not direct:
            continue
        heuristic = parse(direct[0][0])
        promoted = logits[i].topk(min(top, len(numbers))).indices
        member = heuristic.matches(torch.zeros(len(numbers), 2, dtype=torch.long), numbers)
        out[neuron] = float(member[promoted].float().mean())
    return out


def grid_map(values: Float[Tensor, "N"], pairs: Int[Tensor, "N 2"], shape: tuple[int, int] | None = None,
             offset: tuple[int, int] = (0, 0)) -> Float[Tensor, "op1 op2"]:
    """Scatter values `[N]` over pairs `[N, 2]` into an image `[op1, op2]` (NaN where no valid pair)."""
    pairs = torch.as_tensor(pairs).long()
    if shape is None:
        shape = (int(pairs[:, 0].max()) + 1 - offset[0], int(pairs[:, 1].max()) + 1 - offset[1])
    image = torch.full(shape, float("nan"))
    image[pairs[:, 0] - offset[0], pairs[:, 1] - offset[1]] = values.float()
    return image
