"""Notebook parameters: every notebook's parameters are declared, its defaults pass, and each bad value a user might
type fails at once with a message naming it (no notebook is run)."""
from __future__ import annotations

import ast
import importlib
from types import SimpleNamespace

import nbformat
import pytest

from helpers.notebook import colab, params
from helpers.core.paths import NOTEBOOKS_DIR


def defaults(stem: str) -> dict:
    """The values assigned in the notebook's `parameters` cell."""
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    tree = ast.parse(cell.source)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("stem", list(params.NOTEBOOKS))
def test_every_parameter_is_declared_and_the_defaults_pass(stem):
    values = defaults(stem)
    assert set(values) == set(params.NOTEBOOKS[stem].rules)
    params.NOTEBOOKS[stem].check(values)


@pytest.mark.parametrize("stem", list(params.NOTEBOOKS))
def test_the_notebook_checks_its_parameters_right_after_the_parameters_cell(stem):
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code" and colab.SETUP_TAG not in c.metadata.get("tags", [])]
    assert "parameters" in code[0].metadata.get("tags", [])  # only the Colab setup cell may come before it
    assert ".check(globals())" in code[1].source


BAD = [  # (notebook, parameter, value, words the message must contain)
    ("03_syllogism_circuit", "knockout_method", "bogus", "one of 'zero', 'mean'"),
    ("03_syllogism_circuit", "n_prompts", 0, "an integer >= 2"),
    ("03_syllogism_circuit", "n_prompts", 7, "n_prompts even"),
    ("03_syllogism_circuit", "ld_threshold", -1.0, "admits prompts whose answer the model gets wrong"),
    ("04_german_context_neuron", "german_source", "debian-reference-fr", "debian-reference-de"),
    ("02_arithmetic_heuristics", "max_op", 0, "an integer >= 2"),
    ("02_arithmetic_heuristics", "n_discovery", 0, "an integer >= 1"),
    ("02_arithmetic_heuristics", "operators", ["+", "%"], "one of '+', '-', '*', '/'"),
    ("02_arithmetic_heuristics", "dtype", "float8_e4m3fn", "'bfloat16'"),
    ("04_german_context_neuron", "n_docs", 0, "an integer >= 1"),
    ("04_german_context_neuron", "max_tokens", 5, "max_tokens > skip_positions + 1"),
    ("04_german_context_neuron", "german_source", "/nonexistent/de.txt", "existing file"),
    ("05_sae_quote_features", "story_source", "/nonexistent", "'generated', or 'tinystories', or the path"),
    ("05_sae_quote_features", "sae_layers", [], "at least 1 item"),
    ("01_grokking", "p", 0, "an integer >= 2"),
    ("01_grokking", "lr", 0, "a finite number > 0"),
    ("01_grokking", "p", None, "an integer >= 2"),
    ("01_grokking", "device", "gpu", "'cuda'"),
    ("01_grokking", "betas", (0.9, 0.98, 0.999), "exactly two betas"),
    ("01b_plain_addition", "p", 1, "an integer >= 2"),
    ("01b_plain_addition", "num_epochs", 0, "an integer >= 1"),
    ("01b_plain_addition", "frac_train", 0.0, "a finite number > 0 and <= 1"),
]


@pytest.mark.parametrize("stem, name, value, words", BAD)
def test_bad_value_names_the_parameter_and_what_is_allowed(stem, name, value, words):
    values = {**defaults(stem), name: value}
    with pytest.raises(params.ParameterError) as error:
        params.NOTEBOOKS[stem].check(values)
    message = str(error.value)
    assert f"{name}={value!r}" in message and words in message


@pytest.mark.parametrize("stem, study", [("01_grokking", "fourier"), ("01b_plain_addition", "plain_addition")])
def test_the_grokking_notebooks_default_to_the_recipe_their_bars_are_asserted_on(stem, study):
    recipe = importlib.import_module(f"helpers.studies.{study}").RECIPE
    values = defaults(stem)
    assert {name: values[name] for name in recipe} == recipe


def test_layers_are_checked_against_the_loaded_model():
    two_layers = SimpleNamespace(cfg=SimpleNamespace(n_layers=2))
    spec = params.SAE_QUOTE_FEATURES
    spec.check_model({**defaults("05_sae_quote_features"), "sae_layers": [0, 1]}, two_layers)
    spec.check_model(defaults("05_sae_quote_features"), two_layers)  # None: every layer
    with pytest.raises(params.ParameterError, match=r"sae_layers=\[7\] names layer\(s\) \[7\], but the model has 2"):
        spec.check_model({**defaults("05_sae_quote_features"), "sae_layers": [7]}, two_layers)


def test_a_missing_parameter_is_named():
    values = defaults("04_german_context_neuron")
    del values["n_docs"]
    with pytest.raises(params.ParameterError, match="parameters not set: n_docs"):
        params.GERMAN_CONTEXT_NEURON.check(values)


def test_rules_tell_booleans_from_numbers():
    assert not params.integer(0).accepts(True) and not params.number().accepts(False)
    assert params.flag(optional=True).accepts(None) and not params.flag().accepts(1)
    assert params.existing_file_or(hub_ids=True).accepts("EleutherAI/pythia-70m")
    assert not params.existing_file_or(hub_ids=True).accepts("./missing.txt")
