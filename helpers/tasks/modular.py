"""Two-operand arithmetic over 0..p-1 for the grokking notebook: `a b =` -> (a + b) mod p, or plain a + b.

Tokens are `[a, b, =]` with `=` encoded as id `p` (no BOS); the answer is read at the last position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import Model

TASKS = ("modular", "addition")


@dataclass
class ArithmeticData:
    """Every pair (a, b) in row order `a * p + b`, with labels and a seeded train/test split.

    Attributes:
        tokens: `[p*p, 3]` rows `[a, b, p]`.
        labels: `[p*p]` (a + b) mod p for "modular", a + b for "addition".
        train_indices, test_indices: rows of `tokens` in each split.
        n_classes: output vocabulary, p ("modular") or 2p - 1 ("addition").
    """

    task: str
    p: int
    tokens: Int[Tensor, "pairs 3"]
    labels: Int[Tensor, " pairs"]
    train_indices: Int[Tensor, " n_train"]
    test_indices: Int[Tensor, " n_test"]
    n_classes: int

    @property
    def a(self) -> Int[Tensor, " pairs"]:
        return self.tokens[:, 0]

    @property
    def b(self) -> Int[Tensor, " pairs"]:
        return self.tokens[:, 1]

    def to(self, device: torch.device | str) -> "ArithmeticData":
        """The same data with every tensor on `device`."""
        return ArithmeticData(self.task, self.p, self.tokens.to(device), self.labels.to(device),
                              self.train_indices.to(device), self.test_indices.to(device), self.n_classes)

    def split(self, name: str) -> Int[Tensor, " rows"]:
        """Row indices of "train", "test" or "all"."""
        return {"train": self.train_indices, "test": self.test_indices,
                "all": torch.arange(len(self.labels), device=self.labels.device)}[name]


def make_data(p: int, task: str = "modular", frac_train: float = 0.3, seed: int = 598) -> ArithmeticData:
    """All p*p pairs of the task, split with `torch.randperm` seeded by `seed` (the original notebook's DATA_SEED is
    598)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    if not 0 < frac_train < 1:
        raise ValueError(f"frac_train must lie strictly between 0 and 1, got {frac_train}")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p if task == "modular" else a + b
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(p * p, generator=generator)
    cutoff = int(p * p * frac_train)
    if cutoff == 0 or cutoff == p * p:
        raise ValueError(f"frac_train={frac_train} leaves an empty split for p={p}")
    return ArithmeticData(task, p, tokens, labels, order[:cutoff], order[cutoff:],
                          p if task == "modular" else 2 * p - 1)


def last_position_loss(logits: Float[Tensor, "batch *seq vocab"], labels: Int[Tensor, " batch"]) -> Float[Tensor, ""]:
    """Cross-entropy at the final position in float64 (the original notebook's loss_fn); `logits` with or without a
    position axis."""
    if logits.ndim == 3:
        logits = logits[:, -1]
    log_probs = logits.to(torch.float64).log_softmax(-1)
    return -log_probs.gather(-1, labels[:, None]).mean()


def accuracy(logits: Float[Tensor, "batch *seq vocab"], labels: Int[Tensor, " batch"]) -> float:
    """Fraction of rows whose argmax at the final position equals the label."""
    if logits.ndim == 3:
        logits = logits[:, -1]
    return (logits.argmax(-1) == labels).float().mean().item()


def batch_loss(model: Model, batch: tuple[Int[Tensor, "batch 3"], Int[Tensor, " batch"]]) -> Float[Tensor, ""]:
    """The training loss for a batch `(tokens [batch, 3], labels [batch])`: `last_position_loss` of the model."""
    tokens, labels = batch
    return last_position_loss(model(tokens), labels)


def train_test_metrics(data: ArithmeticData) -> Callable[[Model], dict[str, Float[Tensor, ""] | float]]:
    """An eval function for `training.train`: test loss, train accuracy and test accuracy on all pairs of `data`
    (one forward pass; the tensors of `data` must be on the model's device)."""
    def evaluate(model: Model) -> dict[str, Float[Tensor, ""] | float]:
        logits = model(data.tokens)[:, -1]
        train, test = data.train_indices, data.test_indices
        return {"test_loss": last_position_loss(logits[test], data.labels[test]),
                "train_acc": accuracy(logits[train], data.labels[train]),
                "test_acc": accuracy(logits[test], data.labels[test])}

    return evaluate


def grokking_phases(epochs: Int[Tensor, " evals"], test_loss: Float[Tensor, " evals"],
                    train_acc: Float[Tensor, " evals"], test_acc: Float[Tensor, " evals"]) -> dict[str, int | None]:
    """The epochs that mark memorisation and grokking on a training curve, read off it (None: never reached).

    "train accuracy 100%" is memorisation; "test loss peak" is where memorising hurts the test pairs most;
    "test loss < 1", "test accuracy 99%" and "test loss < 0.01" mark grokking. A run whose test accuracy never
    reaches 99% memorised without generalising.
    """
    first = lambda condition: int(epochs[condition.nonzero()[0, 0]]) if condition.any() else None  # noqa: E731
    return {"train accuracy 100%": first(train_acc >= 1.0), "test loss peak": int(epochs[test_loss.argmax()]),
            "test loss < 1": first(test_loss < 1), "test accuracy 99%": first(test_acc >= 0.99),
            "test loss < 0.01": first(test_loss < 0.01)}
