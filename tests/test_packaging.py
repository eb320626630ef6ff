"""The package installs anywhere: every subpackage and every toy checkpoint is in the wheel, and an installed copy
(outside a checkout) reads the shipped checkpoints and writes into the working folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

from helpers.models import zoo
from helpers.core.paths import MODELS_DIR, PACKAGE_DIR, REPO_ROOT


def test_every_subpackage_of_helpers_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPO_ROOT).parts) for path in PACKAGE_DIR.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_wheel_ships_every_toy_checkpoint(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout and sees nothing stale
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / part, source / part)
    shutil.copytree(PACKAGE_DIR, source / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(MODELS_DIR, source / "data" / "models")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for name in zoo.names():
        for file in sorted(path for path in (MODELS_DIR / name).rglob("*") if path.is_file()):
            assert f"helpers/checkpoints/{name}/{file.relative_to(MODELS_DIR / name).as_posix()}" in shipped
        assert f"helpers/checkpoints/{name}/model.safetensors" in shipped


def test_an_installed_copy_reads_its_own_checkpoints_and_writes_to_the_working_folder(tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    (site / "helpers" / "core").mkdir(parents=True)
    (site / "helpers" / "core" / "paths.py").write_text((PACKAGE_DIR / "core" / "paths.py").read_text())
    for package in (site / "helpers", site / "helpers" / "core"):
        (package / "__init__.py").write_text("")
    work.mkdir()
    probe = "from helpers.core import paths; print(paths.IN_CHECKOUT, paths.MODELS_DIR, paths.FIGS_DIR, sep='|')"
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MECHINTERP_HOME", None)
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         check=True).stdout.strip().split("|")
    assert out == ["False", str(site.resolve() / "helpers" / "checkpoints"), str(work.resolve() / "figs")]
    env["MECHINTERP_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         check=True).stdout.strip().split("|")
    assert out[2] == str(tmp_path.resolve() / "figs")
