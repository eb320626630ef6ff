"""Recipe of `toy-bilingual`: a small GPT-NeoX (Pythia's architecture) trained on the project's bilingual corpus.

Rotary positions (25% of each head, as Pythia), parallel attention + MLP, ReLU neurons (Pythia's are GELU; see
below), untied embeddings; a byte-level BPE tokenizer trained on the same corpus. Each training row is one document
(BOS + tokens, padded with EOS, padding masked out of the loss), so the model must read the language from the
document itself.

What makes a context *neuron* appear (rather than the language living only in attention heads, as it did in every
wider variant tried, see `docs/toy_bilingual.md`): a narrow residual stream (d_model 16) and few MLP neurons (32 per
layer), so the language has to be squeezed through the MLPs; German as a small minority (5% of documents); one
language per document (no code-switched phrases), so the document's language is a clean context to track; a small
vocabulary (512), so that English words are split into pieces too and both languages share sub-word pieces whose
continuation depends on the language (` e|le|g|ant`, ` fin|den` / ` fin|ds`), which is what contextual n-gram
neurons are for; and six layers, so that the neurons after the context neuron's layer can read it.

What makes it appear for most training seeds (`docs/robustness.md`): ReLU and weight decay 0.1. With GELU and no
weight decay all five bars held on 1 of 5 seeds: the best neuron's negative lobe still varied on English text
(pinning it raised English loss by 0.6-1.6% on three seeds), and the language was shared between two neurons of
nearly equal F1 (often a German-on and an English-on one reading the same head). A ReLU is exactly 0 on English
text, so pinning it there changes nothing on English. Weight decay then separated two layer-1 German-on neurons that
ReLU alone left nearly tied on seed 2 (F1 0.983 and 0.976; with weight decay 0.991 and 0.973): on ReLU neurons,
whose scale is free, it favours one large neuron over several small ones doing the same job. Training seeds 1
(committed), 2, 3 and 9 pass all five bars of notebook 04, seed 4 all but the margin over the runner-up.
`docs/toy_bilingual.md` is the lab log of the ~70 trainings behind this recipe.

Retrain with `python -m helpers.models.zoo train toy-bilingual`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.tasks import bilingual
from helpers.tasks.bilingual import tokenize_documents

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Recipe:
    """Every knob of the toy; the defaults are the committed checkpoint's."""

    seed: int = 1
    data_seed: int | None = None     # draws the corpus (hence the tokenizer) and the evaluation texts; None: `seed`,
                                     # which always draws the initialisation and the batch order
    n_documents: int = 320000
    german_fraction: float = 0.05
    min_chars: int = 200
    max_chars: int = 380
    code_switch: float = 0.0
    vocab_size: int = 512
    n_ctx: int = 112
    n_layers: int = 6
    d_model: int = 16
    n_heads: int = 2
    d_mlp: int = 32
    activation: str = "relu"         # Pythia's is "gelu"; ReLU makes the finding hold across seeds (see above)
    steps: int = 12000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    threads: int = 1
    training_checkpoints: int = 20

    def __post_init__(self) -> None:
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:   # checked here: the model is built only after the corpus and tokenizer
            raise ValueError(f"activation must be one of GPT-NeoX's ({', '.join(sorted(ACT2FN))}), "
                             f"got {self.activation!r}")


def build_tokenizer(recipe: Recipe, documents: list[bilingual.Document]):
    from helpers.models.zoo import train_bpe_tokenizer

    return train_bpe_tokenizer([d.text for d in documents], recipe.vocab_size)


def build_model(recipe: Recipe, vocab_size: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=recipe.d_model, num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads, intermediate_size=recipe.d_mlp, hidden_act=recipe.activation,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=recipe.n_ctx, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(recipe.seed)
    return GPTNeoXForCausalLM(config)


def lm_loss(model: PreTrainedModel, batch: tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]
            ) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the unmasked target positions of `batch = (tokens, mask)`."""
    tokens, mask = batch
    logits = model(input_ids=tokens).logits[:, :-1]
    targets_mask = mask[:, 1:]
    return F.cross_entropy(logits[targets_mask], tokens[:, 1:][targets_mask])


def train(out_dir: Path, recipe: Recipe = Recipe(), checkpoint_dir: Path | None = None, progress: bool = True) -> dict:
    """Train the toy and save it to `out_dir`, with `recipe.training_checkpoints` log-spaced checkpoints of its training
    (step 0 to the final model) under `out_dir/revisions/`; returns the metadata written to `zoo.json`."""
    from helpers.models.training import TrainConfig, log_spaced_steps
    from helpers.models.training import train as train_loop
    from helpers.models.zoo import save_hf_checkpoint

    torch.set_num_threads(recipe.threads)
    start = time.process_time()
    data_seed = recipe.seed if recipe.data_seed is None else recipe.data_seed
    documents = bilingual.generate_corpus(recipe.n_documents, german_fraction=recipe.german_fraction,
                                          seed=data_seed, min_chars=recipe.min_chars, max_chars=recipe.max_chars,
                                          code_switch=recipe.code_switch)
    tokenizer = build_tokenizer(recipe, documents)
    tokens, mask = tokenize_documents(tokenizer, [d.text for d in documents], recipe.n_ctx)
    model = build_model(recipe, len(tokenizer))

    eval_de, eval_en = bilingual.evaluation_texts(64, seed=data_seed + 999, min_chars=recipe.min_chars,
                                                  max_chars=recipe.max_chars, code_switch=recipe.code_switch)
    eval_batches = {lang: tokenize_documents(tokenizer, texts, recipe.n_ctx) for lang, texts in
                    (("de", eval_de), ("en", eval_en))}

    def eval_fn(m):
        return {f"loss_{lang}": lm_loss(m, batch).item() for lang, batch in eval_batches.items()}

    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95),
                         batch_size=recipe.batch_size, seed=recipe.seed, warmup_steps=recipe.warmup_steps,
                         lr_schedule="cosine", grad_clip=1.0, eval_every=max(1, recipe.steps // 20),
                         checkpoint_every=max(1, recipe.steps // 10) if checkpoint_dir else None,
                         snapshot_steps=log_spaced_steps(recipe.steps, recipe.training_checkpoints, first=20)[:-1])
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep_snapshot(step: int, m) -> None:
        snapshots[step] = {name: tensor.detach().clone() for name, tensor in m.state_dict().items()}

    result = train_loop(model, (tokens, mask), lm_loss, config, eval_fn=eval_fn, checkpoint_dir=checkpoint_dir,
                        progress=progress, snapshot_fn=keep_snapshot)
    metadata = {
        "recipe": asdict(recipe),
        "final_train_loss": round(sum(result.train_losses[-50:]) / len(result.train_losses[-50:]), 4),
        "final_eval": {k: round(v, 4) for k, v in result.eval_metrics[-1].items()},
        "cpu_seconds": round(time.process_time() - start, 1),
        "retrain": "python -m helpers.models.zoo train toy-bilingual",
    }
    save_hf_checkpoint(model, tokenizer, Path(out_dir), metadata, training_checkpoints=snapshots)
    return metadata
