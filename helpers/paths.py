"""Where the project keeps things: everything is relative to the repository root."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"
CACHE_DIR = DATA_DIR / "cache"
FIGS_DIR = REPO_ROOT / "figs"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
