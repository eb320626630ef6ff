"""Recipe of `toy-stories`: a 2-layer GPT-Neo (the architecture of tiny-stories-2L-33M) on generated stories.

The corpus is `helpers.tasks.stories.generate_stories` (TinyStories-like, lots of dialogue). The tokenizer is a
byte-level BPE trained here, with `."`, `!"`, `?"`, `,"` and ` "` forced to be single tokens (as in the GPT-Neo
tokenizer of the real model). The model keeps tiny-stories-2L-33M's shape ratios at a small width: 2 layers,
`[global, local]` attention, `gelu_new`, d_mlp = 4 d_model.

Retrain with `python -m helpers.models.zoo train toy-stories` (single-threaded, a few CPU minutes).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.cache import fingerprint
from helpers.tasks.stories import FORCED_TOKENS, generate_stories, pack_tokens
from helpers.models.training import TrainConfig, train as train_loop
from helpers.models.zoo import save_hf_checkpoint, train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEED = 0
VOCAB_SIZE = 1024
N_TRAIN_STORIES = 30_000
N_EVAL_STORIES = 400
SEQ_LEN = 128
ARCH = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, window_size=256,
            max_position_embeddings=256)
TRAIN = dict(steps=1200, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), batch_size=32, warmup_steps=100,
             lr_schedule="cosine", grad_clip=1.0, eval_every=200)


def build_tokenizer(seed: int = SEED):
    """The toy's tokenizer: BPE trained on generated stories, closing/opening quotes forced to single tokens."""
    return train_bpe_tokenizer(generate_stories(4000, seed=seed + 1), VOCAB_SIZE, forced_tokens=FORCED_TOKENS)


def build_model(vocab_size: int, bos_id: int, seed: int = SEED):
    """A freshly initialised GPT-Neo with the toy's shape (no dropout)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=vocab_size, attention_types=[[["global", "local"], ARCH["num_layers"] // 2]],
                          activation_function="gelu_new", embed_dropout=0.0, attention_dropout=0.0,
                          resid_dropout=0.0, bos_token_id=bos_id, eos_token_id=bos_id, **ARCH)
    torch.manual_seed(seed)
    return GPTNeoForCausalLM(config)


def lm_loss(model: PreTrainedModel, batch: tuple[Int[Tensor, "batch pos"]]) -> Float[Tensor, ""]:
    tokens = batch[0]
    return model(input_ids=tokens, labels=tokens).loss


def train(out_dir: Path, seed: int = SEED) -> None:
    """Train the toy and save it to `out_dir`; `seed` draws the stories, the tokenizer, the initialisation and the
    batch order (the committed toy is `SEED`)."""
    torch.set_num_threads(1)
    start = time.process_time()
    tokenizer = build_tokenizer(seed)
    train_tokens = pack_tokens(generate_stories(N_TRAIN_STORIES, seed=seed + 2), tokenizer, SEQ_LEN)
    eval_tokens = pack_tokens(generate_stories(N_EVAL_STORIES, seed=seed + 3), tokenizer, SEQ_LEN)
    model = build_model(len(tokenizer), tokenizer.bos_token_id, seed)

    def evaluate(m) -> dict[str, float]:
        return {"eval_loss": float(lm_loss(m, (eval_tokens[:64],)))}

    # resumable: step checkpoints go to a temporary folder named after the recipe's settings
    run_key = fingerprint({"arch": ARCH, "train": TRAIN, "seed": seed, "stories": N_TRAIN_STORIES})[:12]
    steps_dir = Path(tempfile.gettempdir()) / f"toy-stories-{run_key}"
    result = train_loop(model, train_tokens, lm_loss, TrainConfig(seed=seed, checkpoint_every=200, **TRAIN),
                        eval_fn=evaluate, checkpoint_dir=steps_dir)
    model.eval()
    metadata = {
        "recipe": "helpers.models.recipes.stories", "seed": seed, "vocab_size": len(tokenizer), "arch": ARCH,
        "train": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN.items()},
        "train_tokens": int(train_tokens.numel()), "seq_len": SEQ_LEN,
        "final_train_loss": round(sum(result.train_losses[-50:]) / 50, 4),
        "final_eval_loss": round(result.eval_metrics[-1]["eval_loss"], 4),
        "cpu_seconds": round(time.process_time() - start, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    save_hf_checkpoint(model, tokenizer, out_dir, metadata)
    shutil.rmtree(steps_dir, ignore_errors=True)
    print(metadata)
