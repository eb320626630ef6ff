"""Shared fixtures: offline mode, the CPU's two cores (one thread per worker under `pytest -n 2`), and tiny
real-architecture checkpoints saved to disk."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# two workers of two threads each on two cores would make every thread wait for a core (far slower than one worker)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

TOKENIZER_TEXTS = [
    "All cats are red, not blue. Kittens are cats. Therefore, kittens are red.",
    "Das ist ein kleiner Test mit vielen deutschen Wörtern und Vorschlägen.",
    'Tom said, "Let us go to the park." Mia asked, "Can we play?"',
    "12+34=46 99-5=94 7*8=56 81/9=9",
] * 30

ARCHITECTURES = ("gpt_neox", "gpt2", "llama", "gpt_neo")


def build_tiny_checkpoint(architecture: str, folder: Path, *, d_model: int = 32, n_layers: int = 2,
                          n_heads: int = 4, d_mlp: int = 64, vocab_size: int = 320, seed: int = 0) -> Path:
    """Write a randomly initialised Hugging Face checkpoint of `architecture` with a freshly trained tokenizer."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

    from helpers.models.zoo import save_hf_checkpoint, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TOKENIZER_TEXTS, vocab_size, add_bos=architecture == "llama")
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    if architecture == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=d_mlp, rotary_pct=0.25, use_parallel_residual=True, **common)
        model_class = GPTNeoXForCausalLM
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
                            n_positions=common.pop("max_position_embeddings"), **common)
        model_class = GPT2LMHeadModel
    elif architecture == "llama":  # grouped-query attention 4:1, as Llama-3 (twice the heads, half as wide)
        config = LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=2 * n_heads,
                             num_key_value_heads=n_heads // 2, intermediate_size=d_mlp, rope_theta=500000.0,
                             **common)
        model_class = LlamaForCausalLM
    elif architecture == "gpt_neo":
        config = GPTNeoConfig(hidden_size=d_model, num_layers=n_layers, num_heads=n_heads, intermediate_size=d_mlp,
                              attention_types=[[["global", "local"], n_layers // 2]], window_size=32, **common)
        model_class = GPTNeoForCausalLM
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    return save_hf_checkpoint(model, tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint("gpt_neox" | "gpt2" | "llama" | "gpt_neo") -> Path` of a saved tiny model (built once per session)."""
    built: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in built:
            built[architecture] = build_tiny_checkpoint(architecture, tmp_path_factory.mktemp(architecture))
        return built[architecture]

    return get


SYLLOGISM_PROMPTS = ["All cats are red, not blue. Kittens are", "All cats are blue, not red. Kittens are",
                     "All dogs are red, not blue. Puppies are", "All dogs are blue, not red. Puppies are"]


@pytest.fixture(scope="session")
def syllogism_batch(tiny_checkpoint):
    """`(model, tokens, answers)`: the tiny GPT-NeoX, four syllogism prompts and `[4, 2]` answer/distractor ids."""
    from helpers.models.load import load_model

    model = load_model(tiny_checkpoint("gpt_neox"), device="cpu")
    tokens = model.to_tokens(SYLLOGISM_PROMPTS)
    answers = torch.tensor([[5, 9], [9, 5], [5, 9], [9, 5]])
    return model, tokens, answers


def build_tiny_arithmetic(folder: Path, embed_scale: float = 1.0):
    """`(model, tokenizer)`: a tiny random Llama (2 layers, 4 query heads over 2 key/value heads, d_mlp 64) on the
    arithmetic toy's tokenizer (numbers 0..999 single tokens), saved to `folder` and loaded through `load_model`.
    `embed_scale` multiplies the token embeddings (an untrained init is ~0.02 per dimension)."""
    from helpers.models.load import load_model
    from helpers.models.recipes.arithmetic import build_model, build_tokenizer
    from helpers.models.zoo import save_hf_checkpoint

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_scale)
    return load_model(save_hf_checkpoint(model, tokenizer, folder), device="cpu"), tokenizer


@pytest.fixture(scope="session")
def tiny_arithmetic(tmp_path_factory):
    """`(model, tokenizer)` of `build_tiny_arithmetic`, built once per session."""
    return build_tiny_arithmetic(tmp_path_factory.mktemp("tiny_arithmetic") / "m")


def failed_bars(acceptance_checks, passing: dict, change: dict) -> list[str]:
    """The bars a study's `acceptance_checks` fails on the `passing` figures with `change` applied."""
    return [name for name, ok in acceptance_checks(**{**passing, **change}).items() if not ok]
