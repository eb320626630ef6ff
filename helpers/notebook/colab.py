"""The Colab path: the first cell of every notebook installs the project when, and only when, it runs in Colab.

A notebook opened from GitHub in Colab has neither `helpers` nor the toy checkpoints. `SETUP_CELL` (the source of
each notebook's first code cell, before the `parameters` cell) then pip-installs the project from its git URL (the
wheel ships the checkpoints, see `helpers.core.paths`) and makes `/content/mechinterp` the working folder, where
figures, caches and runs go. Everywhere else (JupyterLab on a checkout, papermill, nbval) the cell does nothing and prints
nothing. This is the TransformerLens demos' and ARENA's pattern: detect Colab, install, carry on.

The cell cannot import this module (it runs before the install), so it is self-contained; `tests/test_colab.py`
checks that every notebook starts with exactly this source and that it installs only in Colab.
"""
from __future__ import annotations

REPO_URL = "https://github.com/mechinterp-notebooks/mechinterp-notebooks"
"""Where the project's git repository is published; the Colab cell and the README's badges point here."""

WORKING_FOLDER = "/content/mechinterp"

SETUP_CELL = f'''# Colab only: install the project (helpers + toy checkpoints) and work in {WORKING_FOLDER}. Elsewhere: nothing.
import os, subprocess, sys
if "google.colab" in sys.modules and os.environ.get("MECHINTERP_HOME") != "{WORKING_FOLDER}":
    package = "mechinterp-notebooks[sae] @ git+{REPO_URL}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    os.makedirs("{WORKING_FOLDER}", exist_ok=True)
    os.environ["MECHINTERP_HOME"] = "{WORKING_FOLDER}"
    os.chdir("{WORKING_FOLDER}")'''

SETUP_TAG = "colab-setup"
"""The tag on the setup cell, so tools can tell it from the notebook's own cells."""


def badge(notebook: str, branch: str = "main") -> str:
    """Markdown for an "Open in Colab" badge that opens `notebooks/<notebook>.ipynb` of `REPO_URL` in Colab."""
    path = REPO_URL.removeprefix("https://github.com/")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{path}/blob/{branch}/notebooks/{notebook}.ipynb)")

