"""Build the transformer-lens 4 environment: everything but the SAE notebook must run on the newest TL 4.x.

    python .ci/tl4_env.py .venv .venv-tl4      # then: .venv-tl4/bin/python -m pytest tests --ignore=tests/realscale

sae-lens pins transformer-lens < 4, so the main environment stays at TL 3.x. This one is a venv that sees the main
venv's packages (one symlink per installed package, through a `.pth` file) except transformer-lens, sae-lens and the
project, then installs the newest transformer-lens 4.x and the project (editable, no dependencies) on top: a
pip install of one package instead of a second torch, so CI pays seconds, not minutes. Where TL 4 needs a newer
dependency, pip installs it into this venv, which comes first on its path.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HIDDEN = ("transformer_lens", "sae_lens", "__editable__", "mechinterp_notebooks", "pip", "setuptools",
          "_distutils_hack")
"""Entries of the main venv's site-packages that the TL 4 venv must not see (its own pip and setuptools serve it)."""

TL4 = "transformer-lens>=4,<5"


def site_packages(venv: Path) -> Path:
    python = venv / "bin" / "python"
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


def build(main: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
    shared = target / "main-venv-packages"
    shared.mkdir()
    for entry in sorted(site_packages(main).iterdir()):
        if not entry.name.startswith(HIDDEN) and entry.suffix != ".pth":
            (shared / entry.name).symlink_to(entry.resolve())
    (site_packages(target) / "zz_main_venv.pth").write_text(f"{shared.resolve()}\n")
    python = str(target / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", TL4], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(Path(__file__).parent.parent)],
                   check=True)
    probe = ("import importlib.metadata as m, importlib.util as u; "
             "print('transformer-lens', m.version('transformer-lens'), '| sae-lens installed:', "
             "u.find_spec('sae_lens') is not None)")
    print(subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
