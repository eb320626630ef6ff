"""The project's own toy models: a registry of name -> task, architecture and training recipe.

Each toy is a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) under
`data/models/<name>/`, trained by the project. Its recipe lives in `helpers/models/recipes/<module>.py` and exposes
`train(out_dir: Path) -> None`. Retrain one with `python -m helpers.models.zoo train <name>`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TYPE_CHECKING

import torch
from jaxtyping import Shaped
from torch import Tensor

from helpers.core.folders import recover_stranded, write_checkpoint_atomically
from helpers.core.paths import MODELS_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedModel

@dataclass(frozen=True)
class ZooModel:
    """One toy model of the zoo.

    Attributes:
        name: the zoo name, also the folder name under `data/models/`.
        architecture: the Hugging Face architecture it shares with a real model (`GPTNeoXForCausalLM`, ...).
        stands_in_for: the real model the toy replaces in the notebook's default run.
        task: what it was trained on.
        recipe: module under `helpers.models.recipes` whose `train(out_dir)` rebuilds the checkpoint.
    """

    name: str
    architecture: str
    stands_in_for: str
    task: str
    recipe: str


ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in [
        ZooModel("toy-stories", "GPTNeoForCausalLM", "roneneldan/TinyStories-2Layers-33M",
                 "TinyStories-like generated stories with dialogue (quotation notebook)", "stories"),
        ZooModel("toy-arithmetic", "LlamaForCausalLM", "meta-llama/Meta-Llama-3-8B",
                 "single-token arithmetic prompts x+y=, x-y=, x*y=, x/y= (arithmetic heuristics notebook)", "arithmetic"),
        ZooModel("toy-syllogism", "GPTNeoXForCausalLM", "EleutherAI/pythia-410m",
                 "syllogisms with a negated alternative plus distractor sentences (syllogism circuit notebook)",
                 "syllogism"),
        ZooModel("toy-bilingual", "GPTNeoXForCausalLM", "EleutherAI/pythia-70m",
                 "generated German/English documents (German context neuron notebook)", "bilingual"),
    ]
}


def grokking_transformer_config(d_vocab: int, d_vocab_out: int, **overrides) -> dict:
    """TransformerLens-native config of the grokking transformer (Nanda et al.): 1 layer, d_model 128, 4 heads of 32,
    d_mlp 512, ReLU, no LayerNorm, learned positions, context 3. Build it with `models.build_native_model`."""
    config = dict(n_layers=1, n_heads=4, d_model=128, d_head=32, d_mlp=512, act_fn="relu",
                  normalization_type=None, positional_embedding_type="standard", n_ctx=3,
                  d_vocab=d_vocab, d_vocab_out=d_vocab_out)
    return {**config, **overrides}


def names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(ZOO)


def is_zoo_name(name: str) -> bool:
    return name in ZOO


def revisions(name: str) -> list[str]:
    """The training checkpoints zoo model `name` ships, by step (`["step0", "step30", ...]`); the final model is the
    last, `step{N}` of its recipe's N steps. Empty for a toy saved without them."""
    folder = checkpoint_dir(name) / REVISIONS
    if not folder.is_dir():
        return []
    steps = sorted(int(path.name[4:]) for path in folder.iterdir()
                   if path.name.startswith("step") and path.name[4:].isdigit())
    final = json.loads((checkpoint_dir(name) / "zoo.json").read_text())["recipe"]["steps"]
    return [f"step{step}" for step in steps] + [f"step{final}"]


def revision_dir(name: str, revision: str) -> Path:
    """The folder of zoo model `name` at training checkpoint `revision` (one of `revisions(name)`)."""
    available = revisions(name)
    if revision not in available:
        shipped = ", ".join(available) if available else "none"
        raise ValueError(f"revision {revision!r} is not a training checkpoint of {name!r}; it ships: {shipped}")
    if revision == available[-1]:
        return checkpoint_dir(name)
    return checkpoint_dir(name) / REVISIONS / revision


def checkpoint_dir(name: str) -> Path:
    """The folder that holds the checkpoint of zoo model `name`. A read: nothing is moved or deleted (a checkpoint a
    killed save stranded is put back by the next save, or `python -m helpers.models.zoo repair NAME`; see
    `helpers.core.folders.stranded`)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has: {', '.join(names())}")
    return MODELS_DIR / name


REVISIONS = "revisions"
"""Subfolder of a zoo checkpoint that holds its training checkpoints, one Hugging Face folder `step{N}` each."""


def save_hf_checkpoint(model: PreTrainedModel, tokenizer, folder: Path, metadata: dict | None = None,
                       training_checkpoints: dict[int, dict[str, Shaped[Tensor, "..."]]] | None = None) -> Path:
    """Save a Hugging Face model + tokenizer (safetensors) atomically, with an optional `zoo.json` of metadata.

    `training_checkpoints` maps a training step to the model's state dict at that step; each is saved beside the
    final model as `revisions/step{N}/` (the same config and tokenizer), which `load_model(name, revision="step{N}")`
    loads.
    """

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "zoo.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for step, state in sorted((training_checkpoints or {}).items()):
            model.save_pretrained(tmp / REVISIONS / f"step{step}", state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp / REVISIONS / f"step{step}")

    return write_checkpoint_atomically(save, folder)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
    forced_tokens: tuple[str, ...] = (),
    add_bos: bool = False,
):
    """Train a byte-level BPE tokenizer (GPT-2 style) and wrap it as a `PreTrainedTokenizerFast`.

    `special_tokens[0]` serves as BOS, EOS, UNK and PAD. `forced_tokens` are added as ordinary (non-special) tokens
    so each is guaranteed to be a single token (e.g. `."` for the quotation notebook). `add_bos=True` makes the
    tokenizer prepend BOS, as Llama's does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if forced_tokens:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(token, normalized=False) for token in forced_tokens])
    bos = special_tokens[0]
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=bos, unk_token=bos, pad_token=bos,
        add_bos_token=add_bos,
    )


def train(name: str, out_dir: Path | None = None, seed: int | None = None) -> Path:
    """Rebuild zoo model `name` with its recipe (with training seed `seed`; None: the committed toy's); returns the
    checkpoint folder."""
    folder = Path(out_dir) if out_dir is not None else checkpoint_dir(name)
    recipe = importlib.import_module(f"helpers.models.recipes.{ZOO[name].recipe}")
    if seed is None:
        recipe.train(folder)
    elif hasattr(recipe, "Recipe"):
        recipe.train(folder, recipe.Recipe(seed=seed))
    else:
        recipe.train(folder, seed=seed)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.models.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the zoo")
    repair_parser = sub.add_parser("repair", help="put back a checkpoint a killed save stranded, drop leftovers")
    repair_parser.add_argument("name", choices=names())
    train_parser = sub.add_parser("train", help="retrain one toy model")
    train_parser.add_argument("name", choices=names())
    train_parser.add_argument("--out", type=Path, default=None, help="write here instead of data/models/<name>")
    train_parser.add_argument("--seed", type=int, default=None,
                              help="training seed (default: the committed toy's); with another seed, pass --out")
    args = parser.parse_args(argv)
    if args.command == "train" and args.seed is not None and args.out is None:
        parser.error("--seed trains a variant of the toy: give it a folder with --out (the committed toy stays)")
    if args.command == "list":
        for model in ZOO.values():
            print(f"{model.name:16s} {model.architecture:22s} stands in for {model.stands_in_for}: {model.task}")
        return
    if args.command == "repair":
        print(f"{args.name}: {recover_stranded(checkpoint_dir(args.name))}")
        return
    start = time.perf_counter()
    folder = train(args.name, args.out, args.seed)
    print(f"trained {args.name} into {folder} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
