"""Recipe of `toy-arithmetic`: a small Llama (RMSNorm, rotary, gated SiLU MLP, grouped-query attention, untied
embeddings: the architecture of Meta-Llama-3-8B) trained on single-token arithmetic prompts `{x}{op}{y}=`.

Tokenizer. Built deliberately, not learned: a WordLevel vocabulary holding the special tokens, every number
"0".."999" as ONE token (as in Llama-3, whose BPE has all 1- to 3-digit numbers), the operators `+ - * /` and `=`.
The pre-tokenizer splits digits into runs of at most three (Llama-3's `\\p{N}{1,3}` rule) and every other character
into its own piece; whitespace is dropped. The decoder fuses pieces without separators, so `decode(encode("12+34="))`
round-trips. Like Llama-3's, the tokenizer prepends BOS (`<|begin_of_text|>`).

Data. All valid prompts of the four operators with operands in [0, MAX_OP) ([1, MAX_OP) for division) and a
single-token result, from `helpers.tasks.arithmetic`; a seeded HELD_OUT fraction of each operator is never trained
on, so the model's accuracy over all prompts is high but not perfect and both correct and incorrect prompts exist.
Subtraction and multiplication (fewer prompts) are oversampled. The loss is the cross-entropy of the answer token
at `=` only.

Head sparsity. In Llama-3-8B a handful of its 1,024 heads take part in arithmetic; the rest serve other tasks, their
output on arithmetic prompts is nearly constant, and mean-ablating them costs little. A toy trained on arithmetic
alone has no other task and spreads the routing of operands and operator over every head it has (without the
penalty below, the 4-layer, 8-head toy needed 16 of its 32 heads for a circuit faithfulness of 0.88, and a 4-head
variant 11 of 16). So the loss adds a group-lasso penalty, HEAD_PENALTY times the sum over heads of the Frobenius
norms of each head's output-projection block and each key/value group's value-projection block
(`head_group_norms`): training may switch off heads that do not pay for themselves, as heads that arithmetic does
not need are idle in an LLM. Which heads survive, and the circuit, are left for the notebook to discover.
The strength is set for training seeds, not for one: at 0.01 two of five seeds routed subtraction through more than
the 9 heads notebook 02 allows (12 on seed 3); at 0.03 every seed of 0-4 reaches faithfulness 0.9 for + and for
- within 9 heads (`docs/robustness.md`).

Retrain with `python -m helpers.models.zoo train toy-arithmetic` (single-threaded; the CPU time is stored in zoo.json).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.tasks import arithmetic as task
from helpers.models.training import TrainConfig, train as train_loop
from helpers.models.zoo import save_hf_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEED = 0
MAX_OP = 150
MAX_NUMBER = 999
HELD_OUT = 0.2
OVERSAMPLE = {"+": 1, "-": 2, "*": 3, "/": 1}
BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
SYMBOLS = ("+", "-", "*", "/", "=")
ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
HEAD_PENALTY = 0.03
TRAIN = dict(steps=4500, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.98), batch_size=256, warmup_steps=100,
             lr_schedule="cosine", grad_clip=1.0, eval_every=500)


def build_tokenizer(max_number: int = MAX_NUMBER):
    """Word-level tokenizer: specials, "0".."max_number" as single tokens, `+ - * / =`; BOS prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (BOS, EOS, UNK, *[str(n) for n in range(max_number + 1)], *SYMBOLS):
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\d{1,3}|\D"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=EOS, add_bos_token=True, model_max_length=ARCH["max_position_embeddings"])


def build_model(tokenizer, seed: int = SEED, **overrides):
    """A freshly initialised LlamaForCausalLM with the toy's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         hidden_act="silu", attention_bias=False, mlp_bias=False, **{**ARCH, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_splits(tokenizer, max_op: int = MAX_OP, seed: int = SEED, held_out: float = HELD_OUT):
    """Per operator: (train PromptSet, held-out PromptSet)."""
    splits = {}
    for i, op in enumerate(task.OPERATORS):
        prompts = task.all_prompts(op, max_op=max_op, max_single_token=MAX_NUMBER)
        splits[op] = task.split_train_test(prompts, held_out, seed + 17 * i)
    return splits


def answer_loss(model: PreTrainedModel, batch: tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]
                ) -> Float[Tensor, ""]:
    tokens, answers = batch
    logits = model(input_ids=tokens).logits[:, -1]
    return torch.nn.functional.cross_entropy(logits, answers)


def head_group_norms(model: PreTrainedModel) -> Float[Tensor, ""]:
    """Sum over layers of the group-lasso norms of the attention heads: the Frobenius norm of each head's block of
    the output projection (`o_proj`, columns of that head) plus that of each key/value group's block of `v_proj`."""
    cfg = model.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    total = 0.0
    for layer in model.model.layers:
        w_o = layer.self_attn.o_proj.weight.view(cfg.hidden_size, cfg.num_attention_heads, d_head)
        w_v = layer.self_attn.v_proj.weight.view(cfg.num_key_value_heads, d_head, cfg.hidden_size)
        total = total + w_o.pow(2).sum(dim=(0, 2)).sqrt().sum() + w_v.pow(2).sum(dim=(1, 2)).sqrt().sum()
    return total


def make_loss(head_penalty: float):
    """The answer cross-entropy plus `head_penalty` times `head_group_norms` (0: plain cross-entropy)."""
    if not head_penalty:
        return answer_loss
    return lambda model, batch: answer_loss(model, batch) + head_penalty * head_group_norms(model)


def train(out_dir: Path, arch: dict | None = None, train_config: dict | None = None, seed: int = SEED,
          head_penalty: float = HEAD_PENALTY) -> None:
    """Train the toy and save it to `out_dir`; `arch` / `train_config` override entries of ARCH / TRAIN (for
    experiments; the zoo calls it with the defaults)."""
    torch.set_num_threads(1)
    start = time.process_time()
    arch = {**ARCH, **(arch or {})}
    train_config = {**TRAIN, **(train_config or {})}
    tokenizer = build_tokenizer()
    numbers = task.number_token_ids(tokenizer, MAX_NUMBER)
    splits = make_splits(tokenizer, seed=seed)
    tokens, answers = [], []
    for op, (train_set, _) in splits.items():
        t = task.prompt_tokens(tokenizer, train_set)
        a = numbers[train_set.results]
        tokens += [t] * OVERSAMPLE[op]
        answers += [a] * OVERSAMPLE[op]
    tokens, answers = torch.cat(tokens), torch.cat(answers)
    eval_sets = {op: (task.prompt_tokens(tokenizer, test), numbers[test.results]) for op, (_, test) in splits.items()}
    model = build_model(tokenizer, seed, **arch)

    def evaluate(m) -> dict[str, float]:
        out = {}
        for op, (t, a) in eval_sets.items():
            out[f"heldout_{task.OPERATOR_NAMES[op][:3]}"] = float((m(input_ids=t).logits[:, -1].argmax(-1) == a)
                                                                   .float().mean())
        return out

    result = train_loop(model, (tokens, answers), make_loss(head_penalty), TrainConfig(seed=seed, **train_config),
                        eval_fn=evaluate)
    model.eval()
    with torch.no_grad():
        accuracy = {}
        for op, (train_set, test_set) in splits.items():
            both = task.PromptSet.concat([train_set, test_set])
            t, a = task.prompt_tokens(tokenizer, both), numbers[both.results]
            accuracy[op] = round(float((model(input_ids=t).logits[:, -1].argmax(-1) == a).float().mean()), 4)
    metadata = {
        "recipe": "helpers.models.recipes.arithmetic", "seed": seed, "max_op": MAX_OP, "max_number": MAX_NUMBER,
        "held_out": HELD_OUT, "oversample": OVERSAMPLE, "vocab_size": len(tokenizer), "arch": arch,
        "train": {k: list(v) if isinstance(v, tuple) else v for k, v in train_config.items()},
        "head_penalty": head_penalty, "n_train_rows": int(len(tokens)),
        "final_train_loss": round(sum(result.train_losses[-50:]) / 50, 4),
        "final_heldout_accuracy": {k: round(v, 4) for k, v in result.eval_metrics[-1].items()},
        "accuracy_all_prompts": accuracy,
        "cpu_seconds": round(time.process_time() - start, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    save_hf_checkpoint(model, tokenizer, out_dir, metadata)
    print(metadata)
