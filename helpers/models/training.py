"""One training loop for every model the project trains: the zoo's toys and the grokking transformer.

Seeded and deterministic on CPU, AdamW with the original notebooks' knobs, full-batch or minibatch, an eval callback,
atomic checkpoints every N steps that make a run resumable, and tqdm progress.

A checkpoint holds plain data only (tensors, numbers, strings, lists, tuples and dicts: the config and history go in
as `asdict(...)`), so it is loaded with `torch.load(weights_only=True)` and no class of the project is allow-listed.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn
from tqdm.auto import tqdm

from helpers.core import cache
from helpers.core.components import Model

Batch = tuple[Shaped[Tensor, "n *rest"], ...]
LossFn = Callable[[nn.Module, Batch], Float[Tensor, ""]]
EvalFn = Callable[[nn.Module], dict[str, float]]

_CHECKPOINT = re.compile(r"step_(\d+)\.pt$")


@dataclass
class TrainConfig:
    """Knobs of `train`. Defaults are the original grokking notebook's (AdamW lr 1e-3, weight decay 1, betas 0.9/0.98).

    Attributes:
        steps: optimiser steps (an "epoch" of the original grokking notebook is one full-batch step).
        batch_size: examples per step; None trains full-batch.
        lr_schedule: "constant", or "cosine" (decay to 10% of lr after warmup).
        frozen: substrings of parameter names that are not trained (e.g. "bias").
        eval_every: call `eval_fn` every this many steps (and after the last step).
        checkpoint_every: write `step_{N}.pt` into the checkpoint folder every this many steps.
        snapshot_steps: steps after which `train`'s `snapshot_fn` is called (0: before the first step), e.g. to save
            the model's training checkpoints; they do not change the training.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    batch_size: int | None = None
    seed: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = None
    frozen: tuple[str, ...] = ()
    eval_every: int = 100
    checkpoint_every: int | None = None
    snapshot_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.lr_schedule not in {"constant", "cosine"}:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.eval_every < 1 or (self.checkpoint_every is not None and self.checkpoint_every < 1):
            raise ValueError("eval_every and checkpoint_every must be >= 1")
        if any(not 0 <= step <= self.steps for step in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must lie in [0, steps={self.steps}], got {self.snapshot_steps}")


@dataclass
class TrainResult:
    """What `train` returns: one training loss per step, and the eval metrics with their steps."""

    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_metrics: list[dict[str, float]] = field(default_factory=list)
    checkpoint_steps: list[int] = field(default_factory=list)

    def metric(self, name: str) -> list[float]:
        """The history of one eval metric, aligned with `eval_steps`."""
        return [metrics[name] for metrics in self.eval_metrics]


def log_spaced_steps(total: int, n: int, first: int = 10) -> tuple[int, ...]:
    """Step 0 and about `n - 1` steps spaced evenly in log from `first` to `total`, each rounded to two significant
    figures, as Pythia's checkpoints are log-spaced early in training (`step0`, `step1`, ..., `step512`, `step1000`)."""
    if not 1 <= first <= total or n < 2:
        raise ValueError(f"need 1 <= first <= total and n >= 2, got first={first}, total={total}, n={n}")
    spaced = torch.logspace(math.log10(first), math.log10(total), n - 1, dtype=torch.float64).tolist()
    rounded = {min(total, int(float(f"{step:.2g}"))) for step in spaced} | {total}
    return (0, *sorted(rounded))


def trainable_parameters(model: Model | nn.Module, frozen: Sequence[str] = ()) -> list[nn.Parameter]:
    """Parameters to optimise; those whose name contains any of `frozen` get `requires_grad=False`."""
    params = []
    for name, param in model.named_parameters():
        if any(pattern in name for pattern in frozen):
            param.requires_grad_(False)
        elif param.requires_grad:
            params.append(param)
    return params


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at `step` (linear warmup, then constant or cosine to 10%)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_N.pt` in `folder`, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _CHECKPOINT.search(path.name))]
    return sorted(found)


def load_checkpoint(model: Model | nn.Module, path: str | Path) -> dict:
    """Load a checkpoint written by `train` into `model`; returns the whole checkpoint dict.

    Loaded as plain data (`weights_only=True`): a file that would build any other object, such as a crafted
    pickle that runs code, raises `pickle.UnpicklingError` instead.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    return checkpoint


def _save_atomically(payload: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def batch_indices(step: int, n_examples: int, batch_size: int | None, seed: int) -> Int[Tensor, " batch"]:
    """Rows used at `step`: everything (full batch), or slice `step` of a per-epoch shuffle seeded by (seed, epoch).

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    if batch_size is None or batch_size >= n_examples:
        return torch.arange(n_examples)
    per_epoch = n_examples // batch_size
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[slot * batch_size : (slot + 1) * batch_size]


def train(
    model: Model | nn.Module,
    data: Shaped[Tensor, "n *rest"] | Batch,
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    snapshot_fn: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `data` and return the loss history.

    Args:
        model: any module; it is put in train mode for the steps and eval mode for `eval_fn`.
        data: a tensor `[n_examples, ...]` or a tuple of such tensors sharing dim 0; each step passes
            `loss_fn` a tuple of the rows selected for the batch.
        loss_fn: `(model, batch) -> scalar loss`.
        eval_fn: `(model) -> {"name": value}`, called under no_grad every `config.eval_every` steps.
        checkpoint_dir: where `step_N.pt` files go (model, optimiser state and history). With `resume`, training
            continues from the newest one found there. Stale temp files of killed checkpoint writes are removed
            (`cache.remove_stale_temp_files`).
        snapshot_fn: `(step, model) -> None`, called with the model (in eval mode) at each of `config.snapshot_steps`
            the run passes through.
    """
    tensors: Batch = (data,) if isinstance(data, Tensor) else tuple(data)
    n_examples = len(tensors[0])
    if any(len(t) != n_examples for t in tensors):
        raise ValueError("all data tensors must share their first dimension")
    params = trainable_parameters(model, config.frozen)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    result = TrainResult()
    start_step = 0
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        cache.remove_stale_temp_files(folder)
        existing = list_checkpoints(folder)
        if resume and existing:
            checkpoint = load_checkpoint(model, existing[-1][1])
            optimizer.load_state_dict(checkpoint["optimizer"])
            result = TrainResult(**checkpoint["history"])
            start_step = checkpoint["step"]

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            metrics = {name: float(value) for name, value in eval_fn(model).items()}
        result.eval_steps.append(step)
        result.eval_metrics.append(metrics)

    def snapshot(step: int) -> None:
        if snapshot_fn is not None and step in config.snapshot_steps:
            model.eval()
            snapshot_fn(step, model)

    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not progress,
               desc="training", mininterval=1.0)
    if start_step == 0:
        snapshot(0)
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        index = batch_indices(step, n_examples, config.batch_size, config.seed)
        batch = tuple(t[index] for t in tensors)
        loss = loss_fn(model, batch)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_losses.append(loss.item())
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            evaluate(done)
            if result.eval_metrics:
                bar.set_postfix({"train": f"{result.train_losses[-1]:.3g}",
                                 **{k: f"{v:.3g}" for k, v in result.eval_metrics[-1].items()}}, refresh=False)
        snapshot(done)
        if folder is not None and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            result.checkpoint_steps.append(done)
            payload = {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "history": asdict(result), "config": asdict(config)}
            _save_atomically(payload, folder / f"step_{done:07d}.pt")
    model.eval()
    return result
