"""The zoo's building blocks: tokenizer training, atomic checkpoint folders, the registry, the notebook runner."""
from __future__ import annotations

import argparse

import pytest

from helpers import zoo
from helpers.run_notebooks import parse_assignment
from tests.conftest import TOKENIZER_TEXTS


def test_forced_tokens_are_single_tokens_and_text_round_trips():
    tokenizer = zoo.train_bpe_tokenizer(TOKENIZER_TEXTS, 300, forced_tokens=('."', ' "'))
    for token in ('."', ' "'):
        assert len(tokenizer.encode(token)) == 1
    text = 'Tom said, "Let us go."'
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_is_prepended_only_when_asked():
    with_bos = zoo.train_bpe_tokenizer(TOKENIZER_TEXTS, 300, add_bos=True)
    without = zoo.train_bpe_tokenizer(TOKENIZER_TEXTS, 300)
    assert with_bos.encode("cats")[0] == with_bos.bos_token_id
    assert without.encode("cats")[0] != without.bos_token_id


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path):
    folder = tmp_path / "toy"
    zoo.write_checkpoint_atomically(lambda tmp: (tmp / "config.json").write_text("old"), folder)

    def crash(tmp):
        (tmp / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        zoo.write_checkpoint_atomically(crash, folder)
    assert (folder / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    zoo.write_checkpoint_atomically(lambda tmp: (tmp / "config.json").write_text("new"), folder)
    assert (folder / "config.json").read_text() == "new"


def test_every_zoo_entry_has_a_recipe_module_and_a_checkpoint():
    import importlib

    for model in zoo.ZOO.values():
        recipe = importlib.import_module(f"helpers.toys.{model.recipe}")
        assert callable(recipe.train)
        assert (zoo.checkpoint_dir(model.name) / "config.json").is_file(), f"{model.name} has no committed checkpoint"
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.checkpoint_dir("toy-nope")


def test_notebook_parameters_parse_as_literals():
    assert parse_assignment("p=113") == ("p", 113)
    assert parse_assignment("lr=1e-3") == ("lr", 1e-3)
    assert parse_assignment("task=addition") == ("task", "addition")
    assert parse_assignment("model_name=EleutherAI/pythia-70m") == ("model_name", "EleutherAI/pythia-70m")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_assignment("no-equals")
