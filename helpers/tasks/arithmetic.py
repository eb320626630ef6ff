"""Single-token arithmetic prompts `{x}{op}{y}=` for `+ - * /` (Nikankin et al., "Arithmetic Without Algorithms").

A prompt is the text `f"{x}{op}{y}="` with no spaces. With a tokenizer in which every number 0..max_single_token
is one token (Llama-3, the `toy-arithmetic` zoo model), a prompt is four tokens, preceded by what its
`PromptFormat` puts first: a BOS token where the model takes one, and optionally a few-shot prefix text
("3+4=7\n1+5=6\n", tokenized on its own). The four prompt positions are therefore counted from the end:

    position -4: op1   -3: operator   -2: op2   -1: "="      (the answer is predicted at the last position)

With BOS and no prefix (the default, and the paper's layout) that is five tokens, BOS at position 0.

One integer convention is used everywhere (the original notebook mixed float `eval` and `int(eval)`):
    +  x + y            -  x - y (only y <= x, so no negative results)
    *  x * y            /  x // y (integer division; y >= 1, and for non-negative operands this is the
                                   original notebook's truncation `int(x / y)`)
A prompt is *valid* when its result lies in [0, max_single_token] (a single answer token). Operands lie in
[min_op, max_op); the original notebook's default minimum is 1 for division (both operands) and 0 otherwise.

Golden counts (tests/test_arithmetic.py) with max_single_token 999: max_op=300 gives + 90,000, - 45,150,
* 5,784, / 89,401 prompts; max_op=50 gives 2,500 / 1,275 / 1,946 / 2,401.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import Model, run_with_hooks

OPERATORS: tuple[str, ...] = ("+", "-", "*", "/")
OPERATOR_NAMES: dict[str, str] = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
PROMPT_POSITION_NAMES: tuple[str, ...] = ("op1", "operator", "op2", "=")  # the last four positions of a prompt
_PROMPT = re.compile(r"^\s*(\d+)\s*([+\-*/])\s*(\d+)\s*=\s*$")


def apply_tensor(op: str, x: Int[Tensor, " n"], y: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """The integer results of `x op y` for operand tensors `[n]` (long); -1 where undefined (division by zero)."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        return torch.where(y > 0, torch.div(x, y.clamp(min=1), rounding_mode="floor"), torch.full_like(x, -1))
    raise ValueError(f"unknown operator {op!r}; use one of {OPERATORS}")


def apply(op: str, x: int, y: int) -> int | None:
    """`apply_tensor` for one pair of ints: the integer result of `x op y`, or None where it is undefined."""
    if op == "/" and y == 0:
        return None
    return int(apply_tensor(op, torch.tensor([x]), torch.tensor([y]))[0])


def default_min_op(op: str) -> int:
    """The original notebook's smallest operand: 1 for division (both operands), 0 for the others."""
    return 1 if op == "/" else 0


def operand2_range(op: str, x: int, min_op: int, max_op: int, max_single_token: int = 999) -> range:
    """The second operands `y` that make `x op y` valid (result in [0, max_single_token], y >= 1 for `/`)."""
    if op == "+":
        return range(min_op, max(min_op, min(max_single_token - x + 1, max_op)))
    if op == "-":
        return range(min_op, max(min_op, min(x + 1, max_op)))
    if op == "*":
        if x == 0:
            return range(min_op, max_op)
        return range(min_op, max(min_op, min(max_single_token // x + 1, max_op)))
    if op == "/":
        return range(max(1, min_op), max_op)
    raise ValueError(f"unknown operator {op!r}; use one of {OPERATORS}")


def prompt_text(x: int, op: str, y: int) -> str:
    return f"{x}{op}{y}="


def parse_prompt(text: str) -> tuple[int, str, int]:
    """`"12+34="` -> `(12, "+", 34)`."""
    match = _PROMPT.match(text)
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {text!r}")
    return int(match[1]), match[2], int(match[3])


@dataclass
class PromptSet:
    """Prompts of ONE operator, as parallel tensors.

    Attributes:
        op: the operator.
        x, y: operands `[n]` (long).
        results: the true results `[n]` (long; -1 where undefined, which only mean-ablation sets contain).
        predictions: the model's predicted numbers `[n]` where known (-1: not a number), else None.
    """

    op: str
    x: Int[Tensor, " n"]
    y: Int[Tensor, " n"]
    results: Int[Tensor, " n"]
    predictions: Int[Tensor, " n"] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def texts(self) -> list[str]:
        return [prompt_text(int(a), self.op, int(b)) for a, b in zip(self.x, self.y)]

    @property
    def pairs(self) -> Int[Tensor, "n 2"]:
        """`[n, 2]` (op1, op2)."""
        return torch.stack([self.x, self.y], dim=1)

    def subset(self, index: Int[Tensor, " k"] | Sequence[int]) -> "PromptSet":
        index = torch.as_tensor(index, dtype=torch.long)
        predictions = None if self.predictions is None else self.predictions[index]
        return PromptSet(self.op, self.x[index], self.y[index], self.results[index], predictions, dict(self.meta))

    def sample(self, n: int, seed: int) -> "PromptSet":
        """`min(n, len)` prompts drawn without replacement with `torch.Generator().manual_seed(seed)`."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[: min(n, len(self))])

    @staticmethod
    def concat(sets: Sequence["PromptSet"]) -> "PromptSet":
        ops = {s.op for s in sets}
        if len(ops) != 1:
            raise ValueError("concat needs prompt sets of one operator")
        preds = None if any(s.predictions is None for s in sets) else torch.cat([s.predictions for s in sets])
        return PromptSet(sets[0].op, torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]),
                         torch.cat([s.results for s in sets]), preds)


def operand_pairs(op: str, min_op: int | None = None, max_op: int = 300, max_single_token: int = 999
                  ) -> Int[Tensor, "N 2"]:
    """Every valid (op1, op2) pair of `op`, sorted: `[N, 2]` long (op1 major, then op2)."""
    min_op = default_min_op(op) if min_op is None else min_op
    rows = [(x, y) for x in range(min_op, max_op) for y in operand2_range(op, x, min_op, max_op, max_single_token)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


def all_prompts(op: str, min_op: int | None = None, max_op: int = 300, max_single_token: int = 999) -> PromptSet:
    """Every valid prompt of `op` with operands in [min_op, max_op) (min_op default: `default_min_op(op)`)."""
    pairs = operand_pairs(op, min_op, max_op, max_single_token)
    x, y = pairs[:, 0], pairs[:, 1]
    return PromptSet(op, x, y, apply_tensor(op, x, y))


def prompt_counts(max_op: int, max_single_token: int = 999, operators: Iterable[str] = OPERATORS) -> dict[str, int]:
    """Number of valid prompts per operator (the golden table of the digest)."""
    return {op: len(operand_pairs(op, None, max_op, max_single_token)) for op in operators}


def grid_prompts(op: str, min_op: int, max_op: int) -> PromptSet:
    """Every pair (x, y) in [min_op, max_op)^2, valid or not (QK heatmaps, mean-ablation references).
    Results are -1 where undefined or outside [0, inf)."""
    r = torch.arange(min_op, max_op)
    x, y = r.repeat_interleave(len(r)), r.repeat(len(r))
    results = apply_tensor(op, x, y)
    return PromptSet(op, x, y, torch.where(results >= 0, results, torch.full_like(results, -1)))


def mean_ablation_prompts(max_op: int, n_per_operator: int | None, seed: int,
                          operators: Sequence[str] = OPERATORS) -> list[PromptSet]:
    """The reference distribution of mean ablation: prompts `x op y` over the whole grid [0, max_op)^2 of every
    operator, including undefined ones (x/0, negative differences), as the original notebook does, so the operators are
    balanced. `n_per_operator` (None: the whole grid) samples each operator's grid with `seed`."""
    sets = []
    for i, op in enumerate(operators):
        grid = grid_prompts(op, 0, max_op)
        sets.append(grid if n_per_operator is None else grid.sample(n_per_operator, seed + i))
    return sets


def split_discovery_evaluation(prompts: PromptSet, n_discovery: int, n_eval: int, split_seed: int, eval_seed: int
                               ) -> tuple[PromptSet, PromptSet]:
    """`n_discovery` prompts drawn with `split_seed` and, from the rest, `n_eval` evaluation prompts drawn with
    `eval_seed`: disjoint sets (the paper's discovery and evaluation prompts)."""
    if len(prompts) < n_discovery + n_eval:
        raise ValueError(f"{prompts.op}: {len(prompts)} prompts, fewer than n_discovery + n_eval = "
                         f"{n_discovery + n_eval}")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(split_seed))
    return prompts.subset(order[:n_discovery]), prompts.subset(order[n_discovery:]).sample(n_eval, eval_seed)


def split_train_test(prompts: PromptSet, test_fraction: float, seed: int) -> tuple[PromptSet, PromptSet]:
    """A seeded random split of one operator's prompts into (train, held-out)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(prompts)))
    return prompts.subset(order[n_test:].sort().values), prompts.subset(order[:n_test].sort().values)


# ---- tokens --------------------------------------------------------------------------------------------------------
def number_token_ids(tokenizer, max_single_token: int = 999) -> Int[Tensor, " numbers"]:
    """`ids[n]` = the token id of the string `str(n)` for n in [0, max_single_token]: `[max_single_token + 1]`.

    Raises if some number is not exactly one token (so the prompt format's assumption is checked, not assumed).
    """
    vocab = tokenizer.get_vocab()
    ids = []
    for n in range(max_single_token + 1):
        text = str(n)
        token_id = vocab.get(text)
        if token_id is None:
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ValueError(f"the number {n} is not a single token of this tokenizer ({encoded})")
            token_id = encoded[0]
        ids.append(token_id)
    return torch.tensor(ids, dtype=torch.long)


def check_single_token_numbers(tokenizer, max_single_token: int) -> None:
    """Refuse, naming the tokenizer property, a tokenizer that does not keep every number of [0, max_single_token]
    whole: the prompt (operand, operator, operand, `=`) and the answer read one token per number.

    Most small open models' tokenizers split numbers into digits (SmolLM2: `"12"` -> `"1"`, `"2"`); Llama-3's keeps
    0..999 whole. Such a tokenizer can still run the notebook on the numbers it keeps whole (its single digits)."""
    largest = max_single_token_number(tokenizer)
    if largest >= max_single_token:
        return
    example = str(largest + 1)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(example, add_special_tokens=False)["input_ids"])
    fits = (f"to run on the numbers it keeps whole set max_single_token={largest} and max_op={largest + 1}"
            if largest >= 1 else "no number range is left to run on")
    raise ValueError(
        f"max_single_token={max_single_token}: this notebook reads each operand and the answer as one token, but this "
        f"tokenizer keeps numbers whole only up to {largest} ({example!r} -> {pieces}: it splits numbers into "
        f"{'digits' if len(pieces) == len(example) else 'pieces'}). Use a model whose tokenizer keeps 0..999 whole "
        f"(Llama-3), or {fits}.")


def max_single_token_number(tokenizer, limit: int = 100_000) -> int:
    """The largest n such that every number in [0, n] is a single token (Llama-3: 999)."""
    vocab = tokenizer.get_vocab()
    n = -1
    while n + 1 < limit and str(n + 1) in vocab:
        n += 1
    return n


@dataclass(frozen=True)
class PromptFormat:
    """What comes before the four prompt tokens: BOS (`prepend_bos`, where the model was trained with one) and a
    few-shot `prefix` text, e.g. `"3+4=7\n1+5=6\n"` (default none: the paper's zero-shot prompts)."""

    prefix: str = ""
    prepend_bos: bool = True

    def lead_tokens(self, tokenizer) -> list[int]:
        """The token ids before the prompt: BOS (if any), then the prefix tokenized on its own."""
        bos = tokenizer.bos_token_id
        if self.prepend_bos and bos is None:
            raise ValueError("prepend_bos: the tokenizer has no BOS token")
        prefix = tokenizer(self.prefix, add_special_tokens=False)["input_ids"] if self.prefix else []
        return ([bos] if self.prepend_bos else []) + list(prefix)

    def knockout_start(self, tokenizer) -> int:
        """The first position a neuron knockout ablates: the prompt's where worked examples come first (what the
        model computes on them is context, not this prompt's arithmetic), else 0 (every position: the paper's)."""
        return len(self.lead_tokens(tokenizer)) if self.prefix else 0

    def position_names(self, tokenizer) -> tuple[str, ...]:
        """A name for every position of a prompt in this format: `BOS`, `prefix 0..`, then `PROMPT_POSITION_NAMES`."""
        lead = self.lead_tokens(tokenizer)
        bos = ("BOS",) if self.prepend_bos else ()
        return bos + tuple(f"prefix {i}" for i in range(len(lead) - len(bos))) + PROMPT_POSITION_NAMES


def prompt_tokens(tokenizer, prompts: PromptSet, prompt_format: PromptFormat = PromptFormat()
                  ) -> Int[Tensor, "n pos"]:
    """Token ids `[n, lead + 4]`: what `prompt_format` puts first, then op1, operator, op2, `=` (built from the
    vocabulary, checked against the tokenizer on the first prompt: the prefix and the prompt tokenized together must
    give the same tokens)."""
    vocab = tokenizer.get_vocab()
    lead = prompt_format.lead_tokens(tokenizer)
    numbers = number_token_ids(tokenizer, int(max(prompts.x.max(), prompts.y.max())) if len(prompts) else 0)
    op_id, eq_id = _single_token(tokenizer, vocab, prompts.op), _single_token(tokenizer, vocab, "=")
    n = len(prompts)
    tokens = torch.stack([numbers[prompts.x], torch.full((n,), op_id), numbers[prompts.y], torch.full((n,), eq_id)],
                         dim=1)
    tokens = torch.cat([torch.tensor(lead, dtype=torch.long).expand(n, -1), tokens], dim=1)
    if n:
        text = prompt_format.prefix + prompts.texts[0]
        reference = tokenizer(text, add_special_tokens=False)["input_ids"]
        if reference != tokens[0, int(prompt_format.prepend_bos):].tolist():
            raise ValueError(f"the tokenizer splits {text!r} as {reference}, not into the prefix's tokens and 4 "
                             f"single tokens" + (" (few_shot_prefix: end it with a newline or a space)"
                                                 if prompt_format.prefix else ""))
    return tokens


def _single_token(tokenizer, vocab: dict, text: str) -> int:
    if text in vocab:
        return vocab[text]
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise ValueError(f"{text!r} is not a single token of this tokenizer ({encoded})")
    return encoded[0]


@torch.no_grad()
def last_logits(model: Model, tokens: Int[Tensor, "n pos"], batch_size: int = 512, fwd_hooks: list | None = None
                ) -> Float[Tensor, "n d_vocab"]:
    """Logits at the last position `[n, d_vocab]` (float32, on CPU), in batches, optionally with hooks."""
    out = []
    device = getattr(model.cfg, "device", None)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        if device is not None:
            batch = batch.to(device)
        logits = run_with_hooks(model, batch, fwd_hooks=fwd_hooks or []) if fwd_hooks else model(batch)
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def predict_numbers(model: Model, tokenizer, prompts: PromptSet, batch_size: int = 512, fwd_hooks: list | None = None,
                    max_single_token: int | None = None, prompt_format: PromptFormat = PromptFormat()
                    ) -> Int[Tensor, " n"]:
    """The model's greedy answer as a number `[n]` (long; -1 where the argmax token is not a number 0..S; S:
    `max_single_token`, default every number the tokenizer keeps whole, up to 999)."""
    logits = last_logits(model, prompt_tokens(tokenizer, prompts, prompt_format), batch_size, fwd_hooks)
    top = logits.argmax(-1)
    if max_single_token is None:
        max_single_token = max_single_token_number(tokenizer, limit=1000)
    ids = number_token_ids(tokenizer, max_single_token)
    lookup = torch.full((max(int(ids.max()), int(top.max())) + 1,), -1, dtype=torch.long)
    lookup[ids] = torch.arange(len(ids))
    return lookup[top]


def accuracy(model: Model, tokenizer, prompts: PromptSet, batch_size: int = 512, fwd_hooks: list | None = None,
             prompt_format: PromptFormat = PromptFormat()) -> float:
    """Fraction of prompts whose greedy answer token is the true result."""
    if len(prompts) == 0:
        return float("nan")
    predicted = predict_numbers(model, tokenizer, prompts, batch_size, fwd_hooks, prompt_format=prompt_format)
    return float((predicted == prompts.results).float().mean())


def split_by_correctness(model: Model, tokenizer, prompts: PromptSet, batch_size: int = 512,
                         prompt_format: PromptFormat = PromptFormat()) -> tuple[PromptSet, PromptSet]:
    """(correct, incorrect) prompts by the model's own greedy prediction. Incorrect prompts are those where the
    model predicts a *number* that is wrong (the original notebook's `validate_numerals=True`); `predictions` holds the
    guesses."""
    predictions = predict_numbers(model, tokenizer, prompts, batch_size, prompt_format=prompt_format)
    prompts = PromptSet(prompts.op, prompts.x, prompts.y, prompts.results, predictions, dict(prompts.meta))
    correct = predictions == prompts.results
    wrong = (~correct) & (predictions >= 0)
    return prompts.subset(correct.nonzero().flatten()), prompts.subset(wrong.nonzero().flatten())


def corrupt_partners(clean: PromptSet, pool: Sequence[PromptSet], seed: int
                     ) -> tuple[list[str], Int[Tensor, "n 2"], Int[Tensor, " n"]]:
    """A counterfactual prompt for every clean prompt, drawn from `pool` (prompt sets of any operators, as in the
    original notebook: random discovery prompts of all operators), such that the corrupt answer differs from the clean
    answer and the corrupt prompt is not the clean prompt (the original notebook guaranteed neither).

    Returns `(ops [n], x_y [n, 2], results [n])` of the corrupt prompts.
    """
    rows = [(s.op, int(a), int(b), int(r)) for s in pool for a, b, r in zip(s.x, s.y, s.results)]
    if not rows:
        raise ValueError("the corrupt pool is empty")
    rng = random.Random(seed)
    ops, pairs, results = [], [], []
    for a, b, r in zip(clean.x.tolist(), clean.y.tolist(), clean.results.tolist()):
        for _ in range(1000):
            op, ca, cb, cr = rows[rng.randrange(len(rows))]
            if cr != r and not (op == clean.op and ca == a and cb == b):
                break
        else:
            raise ValueError("could not find a corrupt prompt with a different answer")
        ops.append(op)
        pairs.append((ca, cb))
        results.append(cr)
    return ops, torch.tensor(pairs, dtype=torch.long), torch.tensor(results, dtype=torch.long)


def mixed_tokens(tokenizer, ops: Sequence[str], pairs: Int[Tensor, "n 2"], prompt_format: PromptFormat = PromptFormat()
                 ) -> Int[Tensor, "n pos"]:
    """Tokens `[n, lead + 4]` of prompts with per-row operators (e.g. the corrupt prompts of `corrupt_partners`)."""
    rows = []
    for op, (a, b) in zip(ops, pairs.tolist()):
        one = PromptSet(op, torch.tensor([a]), torch.tensor([b]), torch.tensor([apply(op, a, b) or 0]))
        rows.append(prompt_tokens(tokenizer, one, prompt_format))
    width = len(prompt_format.lead_tokens(tokenizer)) + len(PROMPT_POSITION_NAMES)
    return torch.cat(rows) if rows else torch.zeros(0, width, dtype=torch.long)
