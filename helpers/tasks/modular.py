"""Two-operand arithmetic over 0..p-1 for the grokking notebook: `a b =` -> (a + b) mod p, or plain a + b.

Tokens are `[a, b, =]` with `=` encoded as id `p` (no BOS); the answer is read at the last position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
    tokens: Tensor
    labels: Tensor
    train_indices: Tensor
    test_indices: Tensor
    n_classes: int

    @property
    def a(self) -> Tensor:
        return self.tokens[:, 0]

    @property
    def b(self) -> Tensor:
        return self.tokens[:, 1]

    def split(self, name: str) -> Tensor:
        """Row indices of "train", "test" or "all"."""
        return {"train": self.train_indices, "test": self.test_indices,
                "all": torch.arange(len(self.labels))}[name]


def make_data(p: int, task: str = "modular", frac_train: float = 0.3, seed: int = 598) -> ArithmeticData:
    """All p*p pairs of the task, split with `torch.randperm` seeded by `seed` (the seed's DATA_SEED is 598)."""
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


def last_position_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy at the final position in float64 (the seed's loss_fn).

    Args:
        logits: `[batch, seq, vocab]` or `[batch, vocab]`.
        labels: `[batch]`.
    """
    if logits.ndim == 3:
        logits = logits[:, -1]
    log_probs = logits.to(torch.float64).log_softmax(-1)
    return -log_probs.gather(-1, labels[:, None]).mean()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose argmax at the final position equals the label."""
    if logits.ndim == 3:
        logits = logits[:, -1]
    return (logits.argmax(-1) == labels).float().mean().item()
