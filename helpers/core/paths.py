"""Where the project keeps things.

In a checkout (the repository, installed editable or not at all) everything is relative to the repository root.
Installed as a package (`pip install .` or from the git URL, as the Colab cell does), the root is the working
folder (`MECHINTERP_HOME` if set, else the current directory at import): figures, caches and runs go there, and the
toy checkpoints are read from the copy that ships inside the package (`helpers/checkpoints/`).

`MECHINTERP_CACHE_DIR` moves the cache of expensive results elsewhere (default `data/cache/`): the reproducibility
check (`make nbtest-threads`) runs the notebooks on an empty cache per thread count, so nothing computed at one
reduction order is read back at another.
"""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _is_checkout(folder: Path) -> bool:
    """True when `folder` is the repository: its pyproject, notebooks and checkpoints sit beside `helpers/`."""
    return (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir() and (folder / "data").is_dir()


IN_CHECKOUT = _is_checkout(PACKAGE_DIR.parent)
REPO_ROOT = PACKAGE_DIR.parent if IN_CHECKOUT else Path(os.environ.get("MECHINTERP_HOME") or Path.cwd()).resolve()
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models" if IN_CHECKOUT else PACKAGE_DIR / "checkpoints"
CACHE_DIR = Path(os.environ.get("MECHINTERP_CACHE_DIR") or DATA_DIR / "cache").resolve()
FIGS_DIR = REPO_ROOT / "figs"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
