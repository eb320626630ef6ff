"""The zoo's building blocks: tokenizer training, atomic checkpoint folders, the registry, the notebook runner."""
from __future__ import annotations

import argparse
import os
import time

import pytest

from helpers.core import folders
from helpers.models import zoo
from helpers.notebook.run_notebooks import parse_assignment
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
    folders.write_checkpoint_atomically(lambda tmp: (tmp / "config.json").write_text("old"), folder)

    def crash(tmp):
        (tmp / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        folders.write_checkpoint_atomically(crash, folder)
    assert (folder / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    folders.write_checkpoint_atomically(lambda tmp: (tmp / "config.json").write_text("new"), folder)
    assert (folder / "config.json").read_text() == "new"


def save_text(text):
    return lambda tmp: (tmp / "config.json").write_text(text)


def age(path):
    """Make `path` and everything in it look untouched for twice the staleness limit."""
    long_ago = time.time() - 2 * folders.STALE_AFTER_S
    for item in [path, *path.rglob("*")]:
        os.utime(item, (long_ago, long_ago))


def strand(folder):
    """What a kill between the two renames of `write_checkpoint_atomically` leaves: no `folder`, the previous
    checkpoint stranded as `.NAME-old-PID`, and the finished new one still in its temp folder."""
    folders.write_checkpoint_atomically(save_text("old"), folder)
    folder.rename(folder.with_name(f".{folder.name}-old-99999"))
    new = folder.with_name(f".{folder.name}-a1b2c3d4")
    new.mkdir()
    save_text("new")(new)
    return new


def test_reads_never_move_or_delete_and_repair_recovers_a_checkpoint_stranded_by_a_kill(tmp_path, monkeypatch):
    from helpers.models import load
    from helpers.models.source import ModelNotFoundError

    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    new = strand(tmp_path / "toy-stories")
    before = sorted(p.name for p in tmp_path.iterdir())
    folder = zoo.checkpoint_dir("toy-stories")
    assert folders.stranded(folder).name == ".toy-stories-old-99999"
    with pytest.raises(ModelNotFoundError, match="python -m helpers.models.zoo repair toy-stories"):
        load.load_model("toy-stories")
    assert sorted(p.name for p in tmp_path.iterdir()) == before                 # the reads left everything
    zoo.main(["repair", "toy-stories"])
    assert (folder / "config.json").read_text() == "old" and folders.stranded(folder) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [new.name, "toy-stories"]  # a young temp may be a live save
    age(new)
    zoo.main(["repair", "toy-stories"])
    assert [p.name for p in tmp_path.iterdir()] == ["toy-stories"]


def test_the_next_save_after_a_kill_recovers_then_replaces(tmp_path):
    folder = tmp_path / "toy"
    age(strand(folder))
    folders.write_checkpoint_atomically(save_text("newer"), folder)
    assert (folder / "config.json").read_text() == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_recovery_removes_superseded_and_stale_leftovers_of_this_folder_only(tmp_path):
    folder = tmp_path / "toy"
    folders.write_checkpoint_atomically(save_text("current"), folder)
    leftovers = {name: tmp_path / name for name in
                 [".toy-old-123", ".toy-k1ll3d00", ".toy-inflight", ".toy-stories-k1ll3d00", ".toy-stories-old-5"]}
    for name, path in leftovers.items():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        if name != ".toy-inflight":
            age(path)
    folders.recover_stranded(folder)
    assert (folder / "config.json").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy-inflight", ".toy-stories-k1ll3d00",
                                                           ".toy-stories-old-5", "toy"]


def test_every_zoo_entry_has_a_recipe_module_and_a_checkpoint():
    import importlib

    for model in zoo.ZOO.values():
        recipe = importlib.import_module(f"helpers.models.recipes.{model.recipe}")
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


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_a_training_seed_reaches_the_recipe(name, monkeypatch, tmp_path):
    import importlib

    recipe = importlib.import_module(f"helpers.models.recipes.{zoo.ZOO[name].recipe}")
    calls = []
    monkeypatch.setattr(recipe, "train", lambda *args, **kwargs: calls.append((args, kwargs)))
    zoo.train(name, tmp_path, seed=7)
    (folder, *rest), kwargs = calls[0]
    seed = rest[0].seed if rest else kwargs["seed"]
    assert folder == tmp_path and seed == 7
    zoo.train(name, tmp_path)
    assert calls[1] == ((tmp_path,), {})


def test_a_seeded_retrain_needs_its_own_folder():
    with pytest.raises(SystemExit):
        zoo.main(["train", "toy-stories", "--seed", "3"])
