"""Walking a model's training: load each checkpoint in turn, measure it, cache the measurement, find when things form.

A *revision* names one training checkpoint as Pythia's hub repositories do (`step0`, `step1000`, ..., `step143000`);
the project's toys ship theirs (`zoo.revisions("toy-bilingual")`), loaded through the same `load_model`. A walk
loads one checkpoint at a time (the previous one is freed first), hands it to a measuring callback and caches what
that returns under (model, revision, the callback's parameters), so a second walk over the same checkpoints only
reads files.

    walk = walk_training("toy-bilingual", zoo.revisions("toy-bilingual"), measure, key={"n_docs": 100})
    walk.steps                       # [0, 20, 29, ..., 12000]
    walk.values("context_f1")        # one float per checkpoint
    first_lasting_crossing(walk.steps, walk.values("context_f1"), 0.95)   # the step from which the bar holds

Pythia's checkpoints: `PYTHIA_REVISIONS` (all 154 the hub has) and `pythia_revisions(n)` (a log-spaced subset).
"""
from __future__ import annotations

import gc
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from helpers.core import cache
from helpers.core.components import Model
from helpers.models.source import PYTHIA_REVISIONS, ModelSource, resolve_model

Measurement = dict[str, Any]

_REVISION = re.compile(r"step(\d+)$")

def revision_step(revision: str) -> int:
    """The training step a revision names: `"step1000"` -> 1000."""
    match = _REVISION.fullmatch(revision)
    if match is None:
        raise ValueError(f"revision {revision!r} does not name a training step (expected 'step<N>', e.g. 'step1000')")
    return int(match.group(1))


def pythia_revisions(n: int) -> list[str]:
    """About `n` of Pythia's checkpoints, spread evenly in log(step) from step0 to step143000."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    steps = [revision_step(r) for r in PYTHIA_REVISIONS]
    targets = [math.exp(math.log(143000) * i / (n - 2)) for i in range(n - 1)] if n > 2 else [143000.0]
    chosen = {0} | {min(steps[1:], key=lambda s: abs(math.log(s) - math.log(t))) for t in targets}
    return [f"step{s}" for s in sorted(chosen)]


def default_revisions(source: ModelSource, n_pythia: int = 12) -> list[str]:
    """The checkpoints a notebook walks when none are given: all a toy ships, `n_pythia` of a Pythia model's
    log-spaced ones on the hub; none for any other model (which names its own, if it has any)."""
    if source.kind == "hub" and source.revisions == PYTHIA_REVISIONS:
        return pythia_revisions(n_pythia)
    return list(source.revisions)


@dataclass
class TrainingWalk:
    """What `walk_training` measured: one measurement dict per checkpoint, in training order."""

    model_name: str
    revisions: list[str]
    measurements: list[Measurement]

    @property
    def steps(self) -> list[int]:
        return [revision_step(r) for r in self.revisions]

    def values(self, name: str) -> list[Any]:
        """One measured quantity across the checkpoints."""
        return [m[name] for m in self.measurements]


def walk_training(
    name: str | ModelSource,
    revisions: Sequence[str],
    measure: Callable[[Model, str], Measurement],
    *,
    key: dict[str, Any],
    load: Callable[[ModelSource, str], Model] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainingWalk:
    """Load each of `revisions` of the model `name` in turn, call `measure(model, revision)` on it and cache the
    result.

    Args:
        name: a zoo name, a local folder or a hub id (the hub's revisions are `step0` ... `step143000`), or any of
            these resolved (`resolve_model`).
        revisions: checkpoints in training order (each `step<N>`).
        measure: `(model, revision) -> {name: value}`; values must be cacheable (numbers, strings, lists, tensors).
        key: everything else the measurement depends on (parameters, data seed, the final model's neurons it
            tracks); with the model, the revision and, for local checkpoints, the weights' hash, it keys the cache.
        load: `(source, revision) -> model`; `load_model` on CPU by default.
        cache_dir: where the cache lives (the project's `data/cache/` by default).
    """
    source = resolve_model(name)
    if not revisions:
        raise ValueError("revisions is empty: give at least one training checkpoint")
    steps = [revision_step(r) for r in revisions]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise ValueError(f"revisions must be distinct and in training order, got {list(revisions)}")
    if load is None:
        from helpers.models.load import load_model

        def load(source: ModelSource, revision: str):
            return load_model(source, device="cpu", revision=revision)

    measurements = []
    for revision in tqdm(revisions, desc=f"{source.name} checkpoints", disable=not progress):
        def compute(revision: str = revision) -> Measurement:
            loaded = load(source, revision)
            try:
                return measure(loaded, revision)
            finally:
                del loaded
                gc.collect()

        entry_key = {"model": source.name, "revision": revision, "weights": source.weight_files(revision), **key}
        measurements.append(cache.cached("training-walk", entry_key, compute, cache_dir=cache_dir))
    return TrainingWalk(source.name, list(revisions), measurements)


def first_lasting_crossing(steps: Sequence[int], values: Sequence[float], bar: float, *, above: bool = True
                           ) -> int | None:
    """The first step from which `values` meet `bar` (>= bar, or <= with `above=False`) at every later checkpoint
    too; None when the last checkpoint does not meet it. A bar met once and lost again does not count."""
    meets = [(v >= bar) if above else (v <= bar) for v in values]
    if not meets or not meets[-1]:
        return None
    first = len(meets) - 1
    while first > 0 and meets[first - 1]:
        first -= 1
    return steps[first]


def largest_jump_share(values: Sequence[float]) -> float:
    """The largest rise between two consecutive checkpoints as a share of the total rise from the first checkpoint
    to the maximum: 1.0 when everything happens in one interval (a phase change), small when it is spread out.
    NaN when the values never rise above the first."""
    total = max(values) - values[0]
    if total <= 0:
        return float("nan")
    jumps = [b - a for a, b in zip(values, values[1:])]
    return max(jumps) / total
