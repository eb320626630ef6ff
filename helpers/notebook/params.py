"""Notebook parameters, declared once and checked before any heavy work.

Each notebook's parameters cell is followed by one cell that checks every value against its declaration here
(`GROKKING.check(globals())`), and again against the model once it is loaded (`check_model`), so a bad value fails
within seconds with a message naming the parameter, its value and what is allowed:

    ParameterError: n_docs=0 is not allowed: an integer >= 1

`0` is a value, never "use the default": parameters that have a default computed in the notebook take `None` for it.
The declarations are plain data, so tests check them without running a notebook.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from helpers.core.components import Model
from helpers.core.hub import HubUnreachableError
from helpers.models.source import ModelNotFoundError, resolve_model
from helpers.sources import realdata


class ParameterError(ValueError):
    """A notebook parameter has a value the notebook cannot use."""


@dataclass(frozen=True)
class Rule:
    """What one parameter may be: `accepts(value)` says whether it is allowed, `allowed` says what is, in words."""

    accepts: Callable[[Any], bool]
    allowed: str


def _optional(rule: Rule, optional: bool) -> Rule:
    if not optional:
        return rule
    return Rule(lambda v: v is None or rule.accepts(v), f"None or {rule.allowed}")


def _bounds(low: float | None, high: float | None, low_open: bool) -> tuple[Callable[[float], bool], str]:
    words = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
             f"<= {high}" if high is not None else ""]
    inside = lambda v: ((low is None or (v > low if low_open else v >= low))  # noqa: E731
                        and (high is None or v <= high))
    return inside, " and ".join(w for w in words if w)


def integer(low: int | None = None, high: int | None = None, *, optional: bool = False) -> Rule:
    inside, words = _bounds(low, high, False)
    rule = Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and inside(v),
                f"an integer {words}".rstrip())
    return _optional(rule, optional)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           optional: bool = False) -> Rule:
    inside, words = _bounds(low, high, low_open)
    rule = Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and inside(v),
                f"a finite number {words}".rstrip())
    return _optional(rule, optional)


def flag(*, optional: bool = False) -> Rule:
    return _optional(Rule(lambda v: isinstance(v, bool), "True or False"), optional)


def choice(*options: Any) -> Rule:
    return Rule(lambda v: any(v == o and type(v) is type(o) for o in options),
                "one of " + ", ".join(repr(o) for o in options))


def text(*, optional: bool = False) -> Rule:
    return _optional(Rule(lambda v: isinstance(v, (str, Path)) and str(v) != "", "a non-empty string"), optional)


def worked_examples() -> Rule:
    """A few-shot prefix: arithmetic examples `{x}{op}{y}={result}`, each ending in a newline ("" for none)."""
    lines = re.compile(r"(\d+[+\-*/]\d+=\d+\n)*")
    return Rule(lambda v: isinstance(v, str) and lines.fullmatch(v) is not None,
                'worked examples "{x}{op}{y}={result}", each ending in a newline ("" for none), e.g. "3+4=7\\n"')


def sequence(each: Rule, *, min_items: int = 1, unique: bool = False, optional: bool = False) -> Rule:
    def accepts(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) < min_items or not all(each.accepts(x) for x in v):
            return False
        return not unique or len(set(map(repr, v))) == len(v)

    words = f"a list of at least {min_items} item(s){', no repeats' if unique else ''}, each {each.allowed}"
    return _optional(Rule(accepts, words), optional)


def existing_file_or(*keywords: str, optional: bool = False, hub_ids: bool = False) -> Rule:
    """One of `keywords`, the path of an existing file, or (with `hub_ids`) an `owner/name` hub id."""
    def accepts(v: Any) -> bool:
        if not isinstance(v, (str, Path)) or str(v) == "":
            return False
        if str(v) in keywords or Path(v).expanduser().is_file():
            return True
        looks_like_path = str(v).startswith(("/", ".", "~")) or Path(v).suffix != ""
        return hub_ids and not looks_like_path and str(v).count("/") == 1

    options = [repr(k) for k in keywords] + ["the path of an existing file"] + (["a hub id (owner/name)"] if hub_ids
                                                                                else [])
    return _optional(Rule(accepts, ", or ".join(options)), optional)


def device() -> Rule:
    """"auto", "cpu", "cuda", "cuda:N" or "mps" (availability is checked by the loader)."""
    def accepts(v: Any) -> bool:
        try:
            return isinstance(v, (str, torch.device)) and (str(v) == "auto" or torch.device(v).type in
                                                           ("cpu", "cuda", "mps"))
        except (RuntimeError, TypeError):
            return False

    return Rule(accepts, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def dtype() -> Rule:
    from helpers.models.load import resolve_dtype

    def accepts(v: Any) -> bool:
        try:
            resolve_dtype(v)
            return True
        except (ValueError, TypeError):
            return False

    return Rule(accepts, "None, 'float32', 'bfloat16', 'float16' or 'float64'")


@dataclass(frozen=True)
class Relation:
    """A condition between parameters, e.g. `max_tokens > skip_positions`; `names` are those it mentions."""

    description: str
    names: tuple[str, ...]
    holds: Callable[..., bool]


@dataclass(frozen=True)
class NotebookParameters:
    """The declared parameters of one notebook: a rule per parameter, relations between them, and the parameters
    that name layers or heads of the model (checked once it is loaded)."""

    rules: dict[str, Rule]
    relations: tuple[Relation, ...] = ()
    layer_lists: tuple[str, ...] = ()

    def check(self, values: Mapping[str, Any]) -> None:
        """Raise `ParameterError` for the first parameter (in declaration order) or relation that does not hold."""
        missing = [name for name in self.rules if name not in values]
        if missing:
            raise ParameterError(f"parameters not set: {', '.join(missing)}")
        for name, rule in self.rules.items():
            if not rule.accepts(values[name]):
                raise ParameterError(f"{name}={values[name]!r} is not allowed: {rule.allowed}")
        for relation in self.relations:
            if not relation.holds(*(values[name] for name in relation.names)):
                shown = ", ".join(f"{name}={values[name]!r}" for name in relation.names)
                raise ParameterError(f"{shown}: needs {relation.description}")

    def check_model(self, values: Mapping[str, Any], model: Model) -> None:
        """The checks that need the loaded model: layer indices below `model.cfg.n_layers`."""
        n_layers = model.cfg.n_layers
        for name in self.layer_lists:
            bad = [layer for layer in values[name] or () if not 0 <= layer < n_layers]
            if bad:
                raise ParameterError(f"{name}={values[name]!r} names layer(s) {bad}, but the model has "
                                     f"{n_layers} layers (0 to {n_layers - 1})")


def _common(model_default: bool = True) -> dict[str, Rule]:
    rules = {"device": device(), "output_dir": text(optional=True)}
    if model_default:
        rules.update(model_name=text(), reference=text(optional=True), strict=flag(optional=True))
    return rules


def _training_recipe() -> dict[str, Rule]:
    """The grokking transformer's training recipe, shared by notebooks 01 and 01b."""
    return dict(p=integer(2), frac_train=number(0, 1, low_open=True), lr=number(0, low_open=True),
                weight_decay=number(0), betas=sequence(number(0, 1), min_items=2), num_epochs=integer(1),
                checkpoint_every=integer(1), data_seed=integer(0), model_seed=integer(0))


_TWO_BETAS = Relation("exactly two betas", ("betas",), lambda betas: len(betas) == 2)

GROKKING = NotebookParameters(
    rules=dict(
        **_training_recipe(), key_frequency_threshold=number(0, 1, low_open=True),
        key_frequency_share=number(0, 1, low_open=True), strict=flag(optional=True), **_common(model_default=False)),
    relations=(_TWO_BETAS,),
)

PLAIN_ADDITION = NotebookParameters(
    rules=dict(**_training_recipe(), strict=flag(optional=True), **_common(model_default=False)),
    relations=(_TWO_BETAS,),
)

OPERATORS = ("+", "-", "*", "/")

ARITHMETIC_HEURISTICS = NotebookParameters(
    rules=dict(
        model_name=text(), device=device(), dtype=dtype(), device_map=text(optional=True),
        operators=sequence(choice(*OPERATORS), unique=True), max_op=integer(2), max_single_token=integer(1),
        few_shot_prefix=worked_examples(),
        n_discovery=integer(1), n_eval=integer(1), require_correct=flag(), exact_top=integer(1, optional=True),
        n_mean_reference=integer(1),
        faithfulness_target=number(0, 1, low_open=True), max_circuit_head_fraction=number(0, 1, low_open=True),
        probe_operators=sequence(choice(*OPERATORS), unique=True), probe_prompts=integer(2),
        n_attribution_check=integer(1), top_neuron_fraction=number(0, 1, low_open=True),
        topk_fractions=sequence(number(0, 1), min_items=2), heuristic_threshold=number(0, 1, low_open=True),
        min_neurons_per_heuristic=integer(1), n_knockout_prompts=integer(1), max_knockout_heuristics=integer(1),
        prompt_knockout_limits=sequence(integer(0)), qk_max_op=integer(2), n_early_neurons=integer(1),
        interactive_views=flag(), eap_ig_steps=integer(1), eap_target=number(0, 1, low_open=True),
        eap_operators=sequence(choice(*OPERATORS), unique=True),
        batch_size=integer(1), seed=integer(0),
        reference=text(optional=True), strict=flag(optional=True), output_dir=text(optional=True)),
    relations=(
        Relation("every probe operator among the operators", ("probe_operators", "operators"),
                 lambda probe, ops: set(probe) <= set(ops)),
        Relation("every EAP-IG operator among the operators", ("eap_operators", "operators"),
                 lambda eap_ops, ops: set(eap_ops) <= set(ops)),
        Relation("topk_fractions ending at 1.0 (all neurons)", ("topk_fractions",), lambda f: f[-1] == 1.0),
        Relation("max_op - 1 <= max_single_token (operands are single tokens too)", ("max_op", "max_single_token"),
                 lambda max_op, single: max_op - 1 <= single),
    ),
)

SYLLOGISM_CIRCUIT = NotebookParameters(
    rules=dict(
        seed=integer(0), pool_size=integer(2), n_prompts=integer(2), ld_threshold=number(optional=True),
        knockout_method=choice("zero", "mean"), max_movers=integer(1), knockout_target=number(0, 1, low_open=True),
        marker_replacement=text(), path_threshold=number(0), exact_top=integer(1, optional=True),
        path_senders=integer(1, optional=True), eap_ig_steps=integer(1), eap_curve_points=integer(2),
        eap_target=number(0, 1, low_open=True), run_benchmark=flag(), benchmark_prompts=integer(2), **_common()),
    relations=(
        Relation("n_prompts even (both orders of each pair are kept together)", ("n_prompts",), lambda n: n % 2 == 0),
        Relation("ld_threshold >= 0 (a negative threshold admits prompts whose answer the model gets wrong; None "
                 "turns the filter off, only to exercise the notebook on an untrained model)",
                 ("ld_threshold",), lambda threshold: threshold is None or threshold >= 0),
        Relation("n_prompts <= pool_size", ("n_prompts", "pool_size"), lambda n, pool: n <= pool),
        Relation("benchmark_prompts <= n_prompts when run_benchmark", ("run_benchmark", "benchmark_prompts", "n_prompts"),
                 lambda run, b, n: not run or b <= n),
    ),
)

def _is_step_revision(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("step") and value[4:].isdigit()


def _revisions_shipped(model_name: Any, revisions: Any) -> bool:
    """A toy's training checkpoints are the ones it ships; a model that does not resolve is left to the loader,
    whose error names what is missing."""
    if not revisions:
        return True
    try:
        source = resolve_model(model_name)
    except (ModelNotFoundError, HubUnreachableError):
        return True
    return not source.is_toy or set(revisions) <= set(source.revisions)


GERMAN_CONTEXT_NEURON = NotebookParameters(
    rules=dict(
        seed=integer(0), n_docs=integer(1), max_tokens=integer(2), skip_positions=integer(0), batch_size=integer(1),
        german_source=existing_file_or(*realdata.TEXTS, optional=True, hub_ids=True),
        english_source=existing_file_or(*realdata.TEXTS, optional=True, hub_ids=True),
        doc_chars=sequence(integer(1), min_items=2), code_switch=number(0, 1), n_backups=integer(1),
        n_candidates=integer(1), n_unigrams=integer(1), max_rows=integer(1),
        german_examples=sequence(text()), english_examples=sequence(text()),
        training_revisions=sequence(Rule(_is_step_revision, "'step<N>'"), min_items=0, unique=True, optional=True),
        walk_docs=integer(1), **_common()),
    relations=(
        Relation("max_tokens > skip_positions + 1 (some scored positions)", ("max_tokens", "skip_positions"),
                 lambda max_tokens, skip: max_tokens > skip + 1),
        Relation("doc_chars = (shortest, longest) with shortest <= longest", ("doc_chars",),
                 lambda chars: len(chars) == 2 and chars[0] <= chars[1]),
        Relation("german_source and english_source both given or both None", ("german_source", "english_source"),
                 lambda de, en: (de is None) == (en is None)),
        Relation("training_revisions of a zoo model are among the checkpoints it ships (zoo.revisions)",
                 ("model_name", "training_revisions"), _revisions_shipped),
    ),
)

SAE_QUOTE_FEATURES = NotebookParameters(
    rules=dict(
        seed=integer(0), story_source=existing_file_or("generated", "tinystories"), n_stories=integer(2),
        n_prompts=integer(1), n_eval_sequences=integer(1), sae_layers=sequence(integer(0), unique=True,
                                                                               optional=True),
        expansion_factor=integer(1), l1_coefficient=number(0), sae_steps=integer(1), sae_batch_size=integer(1),
        sae_releases=Rule(lambda v: v is None or isinstance(v, dict), "None or {layer: (release, sae_id)}"),
        n_candidates=integer(1), top_k=integer(1), **_common()),
    relations=(Relation("top_k <= n_candidates", ("top_k", "n_candidates"), lambda k, n: k <= n),),
    layer_lists=("sae_layers",),
)

NOTEBOOKS: dict[str, NotebookParameters] = {
    "01_grokking": GROKKING,
    "01b_plain_addition": PLAIN_ADDITION,
    "02_arithmetic_heuristics": ARITHMETIC_HEURISTICS,
    "03_syllogism_circuit": SYLLOGISM_CIRCUIT,
    "04_german_context_neuron": GERMAN_CONTEXT_NEURON,
    "05_sae_quote_features": SAE_QUOTE_FEATURES,
}

