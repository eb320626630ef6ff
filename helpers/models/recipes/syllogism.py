"""Recipe of `toy-syllogism`: a small GPT-NeoX (the Pythia architecture: rotary on a quarter of each head, parallel
attention + MLP, untied embeddings) trained on syllogisms with a negated alternative plus distractor sentences.

Tokenizer. The foundation's byte-level BPE with forced tokens: every category and noun (with its leading space) is
one token, and every descriptor is split into THREE fixed pieces (" endo" + "ther" + "mic"), as Pythia's BPE splits
the original notebook's descriptors into three tokens; the answer is the first piece. The split is checked at build
time.

Corpus. Each row is BOS, then 0-2 distractor sentences ("Dogs are birds.", "All fish are nocturnal.", "Some cats are
not feral.", ...) before one syllogism about two descriptors drawn at random (not the fixed opposite pairs, which
the model could otherwise answer by recalling B's partner), either the analysis template
`All {c} are {A}, not {B}. {N} are {c}. Therefore, {n} are {A}.` or its mirror `All {c} are not {B}, but {A}. ...`
(so the model must track which descriptor is negated, not a fixed offset). The loss is next-token cross-entropy on
every token, with the answer token weighted ANSWER_WEIGHT times. HELD_OUT_CATEGORIES and HELD_OUT_NOUNS never
appear in a training syllogism (only in distractor sentences); held-out accuracy is top-1 on every syllogism made of
them, in the analysis template.

Retrain with `python -m helpers.models.zoo train toy-syllogism` (single-threaded; the CPU time is stored in zoo.json).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.tasks import syllogisms as task
from helpers.models.training import TrainConfig, train as train_loop
from helpers.models.zoo import save_hf_checkpoint, train_bpe_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEED = 0
HELD_OUT_CATEGORIES = task.CATEGORIES[-4:]
HELD_OUT_NOUNS = task.NOUNS[-8:]
N_ROWS = 24000
MAX_LEN = 64
ANSWER_WEIGHT = 4.0
NOT_FIRST_SHARE = 0.3
FUNCTION_WORDS = ("All", " All", " are", " not", " but", " Therefore", " Some")
ARCH = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, intermediate_size=384, rotary_pct=0.25,
            use_parallel_residual=True, max_position_embeddings=128, hidden_act="gelu")
TRAIN = dict(steps=1500, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), batch_size=32, warmup_steps=100,
             lr_schedule="cosine", grad_clip=1.0, eval_every=100)


def descriptor_pieces(word: str) -> tuple[str, str, str]:
    """The fixed 3-piece split of a descriptor: `" " + word[:i]`, `word[i:j]`, `word[j:]` at thirds (rounded up)."""
    n = len(word)
    i = max(1, -(-n // 3))
    j = max(i + 1, -(-2 * n // 3))
    return " " + word[:i], word[i:j], word[j:]


def build_tokenizer():
    """Byte-level BPE (a few merges) plus forced tokens for every word and descriptor piece of the task."""
    descriptors = [w for pair in task.DESCRIPTOR_PAIRS for w in pair]
    pieces = [p for w in descriptors for p in descriptor_pieces(w)]
    words = [" " + c for c in task.CATEGORIES] + [" " + n for n in task.NOUNS] + [" " + n.lower() for n in task.NOUNS]
    forced = tuple(dict.fromkeys(FUNCTION_WORDS + tuple(words) + tuple(pieces)))
    tokenizer = train_bpe_tokenizer(["All are, not. but Therefore Some"] * 4, 260, forced_tokens=forced)
    for word in descriptors:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        got = tuple(tokenizer.decode([i]) for i in ids)
        if got != descriptor_pieces(word):
            raise RuntimeError(f"descriptor {word!r} tokenises as {got}, not {descriptor_pieces(word)}")
    return tokenizer


def _random_pair(rng: random.Random, descriptors: list[str]) -> tuple[str, str]:
    """Two descriptors with different first pieces, drawn independently of the fixed opposite pairs (so the model
    cannot answer by recalling B's partner; it has to find the descriptor that is not negated)."""
    while True:
        a, b = rng.sample(descriptors, 2)
        if descriptor_pieces(a)[0] != descriptor_pieces(b)[0]:
            return a, b


def _distractor(rng: random.Random, categories, nouns) -> str:
    a, b = _random_pair(rng, [w for pair in task.DESCRIPTOR_PAIRS for w in pair])
    c, n = rng.choice(categories), rng.choice(nouns)
    return rng.choice([
        f"{n} are {c}.",
        f"All {c} are {a}.",
        f"Some {n.lower()} are not {b}.",
        f"{n} are {a}, not {b}.",
        f"All {c} are {a}, not {b}.",
        f"Some {c} are {a}.",
    ])


def make_corpus(n_rows: int = N_ROWS, seed: int = SEED) -> list[tuple[str, str]]:
    """`(text, answer_word)` rows; the text ends with the answer word and a full stop."""
    rng = random.Random(seed)
    categories = [c for c in task.CATEGORIES if c not in HELD_OUT_CATEGORIES]
    nouns = [n for n in task.NOUNS if n not in HELD_OUT_NOUNS]
    rows = []
    descriptors = [w for pair in task.DESCRIPTOR_PAIRS for w in pair]
    for _ in range(n_rows):
        a, b = _random_pair(rng, descriptors)
        template = task.TEMPLATE_NOT_FIRST if rng.random() < NOT_FIRST_SHARE else task.TEMPLATE
        syllogism = task.Syllogism(rng.choice(categories), a, b, rng.choice(nouns), template).text
        before = [_distractor(rng, task.CATEGORIES, task.NOUNS) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
        text = " ".join(before + [f"{syllogism} {a}."])
        rows.append((text, a))
    return rows


def encode_corpus(tokenizer, rows: list[tuple[str, str]], max_len: int = MAX_LEN
                  ) -> tuple[Int[Tensor, "n max_len"], Float[Tensor, "n max_len"]]:
    """Tokens `[n, max_len]` (BOS first, EOS-padded) and loss weights `[n, max_len]` for predicting token t+1."""
    bos = tokenizer.bos_token_id
    tokens = torch.full((len(rows), max_len), tokenizer.eos_token_id, dtype=torch.long)
    weights = torch.zeros(len(rows), max_len)
    for r, (text, answer) in enumerate(rows):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [bos] + encoding["input_ids"]
        if len(ids) > max_len:
            raise ValueError(f"row of {len(ids)} tokens exceeds max_len={max_len}: {text!r}")
        tokens[r, : len(ids)] = torch.tensor(ids)
        weights[r, : len(ids) - 1] = 1.0
        # the answer's first piece follows "Therefore, {noun} are"
        answer_char = text.index(f" are {answer}.", text.index("Therefore")) + len(" are")
        for i, (start, _) in enumerate(encoding["offset_mapping"]):
            if start == answer_char:
                weights[r, i] = ANSWER_WEIGHT  # position i (1 + i - 1) predicts token i + 1 = the answer
    return tokens, weights


def build_model(tokenizer, seed: int = SEED, **overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **{**ARCH, **overrides})
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config)


def lm_loss(model: PreTrainedModel, batch: tuple[Int[Tensor, "batch pos"], Float[Tensor, "batch pos"]]
            ) -> Float[Tensor, ""]:
    tokens, weights = batch
    length = int((weights > 0).any(0).nonzero().max()) + 2  # trim the batch's common padding
    tokens, weights = tokens[:, :length], weights[:, :length]
    logits = model(input_ids=tokens).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                               reduction="none").view_as(weights[:, :-1])
    return (losses * weights[:, :-1]).sum() / weights[:, :-1].sum()


def heldout_data(tokenizer) -> task.SyllogismData:
    items = task.make_syllogisms(HELD_OUT_CATEGORIES, task.DESCRIPTOR_PAIRS, HELD_OUT_NOUNS)
    return task.build_dataset(tokenizer, items)


def train(out_dir: Path, seed: int = SEED) -> None:
    """Train the toy and save it to `out_dir`; `seed` draws the corpus, the initialisation and the batch order (the
    tokenizer and the held-out split are fixed; the committed toy is `SEED`)."""
    torch.set_num_threads(1)
    start = time.process_time()
    tokenizer = build_tokenizer()
    tokens, weights = encode_corpus(tokenizer, make_corpus(seed=seed))
    heldout = heldout_data(tokenizer)
    model = build_model(tokenizer, seed)

    def evaluate(m) -> dict[str, float]:
        logits = m(input_ids=heldout.clean_tokens).logits[:, -1]
        correct = heldout.answers[:, 0]
        return {"heldout_top1": float((logits.argmax(-1) == correct).float().mean())}

    result = train_loop(model, (tokens, weights), lm_loss, TrainConfig(seed=seed, **TRAIN), eval_fn=evaluate)
    model.eval()
    metadata = {
        "recipe": "helpers.models.recipes.syllogism", "seed": seed, "n_rows": N_ROWS, "answer_weight": ANSWER_WEIGHT,
        "not_first_share": NOT_FIRST_SHARE, "held_out_categories": list(HELD_OUT_CATEGORIES),
        "held_out_nouns": list(HELD_OUT_NOUNS), "vocab_size": len(tokenizer), "arch": ARCH,
        "train": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN.items()},
        "final_train_loss": round(sum(result.train_losses[-50:]) / 50, 4),
        "heldout_prompts": len(heldout), "heldout_top1": round(result.eval_metrics[-1]["heldout_top1"], 4),
        "cpu_seconds": round(time.process_time() - start, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    save_hf_checkpoint(model, tokenizer, out_dir, metadata)
    print(metadata)
