"""The Colab setup cell: every notebook starts with it, it installs the project only inside Colab, and what it
installs is this project (its name, with the extra the SAE notebook needs, from the project's git URL)."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import types

import nbformat
import pytest
from packaging.requirements import Requirement

from helpers.notebook import colab, params
from helpers.core.paths import NOTEBOOKS_DIR, REPO_ROOT


def run_setup_cell(monkeypatch, in_colab: bool) -> list:
    """Execute the setup cell with pip, chdir and makedirs recorded instead of done; returns the calls."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append(("pip", args[0])))
    monkeypatch.setattr(os, "chdir", lambda path: calls.append(("chdir", path)))
    monkeypatch.setattr(os, "makedirs", lambda path, **kwargs: calls.append(("makedirs", path)))
    monkeypatch.delenv("MECHINTERP_HOME", raising=False)
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile(colab.SETUP_CELL, "setup-cell", "exec"), {})
    return calls


def test_outside_colab_the_cell_does_nothing(monkeypatch):
    assert run_setup_cell(monkeypatch, in_colab=False) == []


def test_in_colab_the_cell_installs_the_project_and_moves_to_the_working_folder(monkeypatch):
    calls = run_setup_cell(monkeypatch, in_colab=True)
    assert [kind for kind, _ in calls] == ["pip", "makedirs", "chdir"]
    command = calls[0][1]
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    requirement = Requirement(command[-1])
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert requirement.name == project["name"] and requirement.url == f"git+{colab.REPO_URL}"
    assert requirement.extras <= set(project["optional-dependencies"])
    assert calls[2][1] == colab.WORKING_FOLDER
    assert os.environ["MECHINTERP_HOME"] == colab.WORKING_FOLDER  # helpers.core.paths writes figures there


@pytest.mark.parametrize("stem", list(params.NOTEBOOKS))
def test_every_notebook_starts_with_the_setup_cell(stem):
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{stem}.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first.source == colab.SETUP_CELL
    assert colab.SETUP_TAG in first.metadata.get("tags", [])
    assert not first.get("outputs")  # outside Colab it prints nothing, so nbval compares nothing


def test_badge_opens_the_notebook_from_the_repository_in_colab():
    assert colab.badge("01_grokking") == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com"
        f"/github/{colab.REPO_URL.removeprefix('https://github.com/')}/blob/main/notebooks/01_grokking.ipynb)")
