"""A forward pass and its per-token losses: next-token cross-entropy at every position, under hooks or not.

`token_losses` runs one hooked (or clean) pass; `token_losses_each` runs a clean pass and several hooked variants,
each from the first block its hooks sit in (`replay.replayed_logits`). Logits are turned into losses a few rows at a
time (`losses_from_logits`), so neither a second `[batch, pos, vocab]` tensor nor more than about
`LOGIT_ROWS_BUDGET` floats of logits is held at once: with a 50k vocabulary those are a notebook's largest
allocations. Ablation, direct logit attribution, SAE splices and the context-neuron and n-gram studies measure
with these.
"""
from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import Hook, Model, run_with_hooks
from helpers.techniques.replay import kept_run_available, replayed_logits

LOGIT_ROWS_BUDGET = 2 ** 26  # floats of logits of one replayed run (256 MB in float32)
LOSS_CHUNK = 2 ** 24  # floats of logits turned into losses at a time (64 MB in float32)


@torch.no_grad()
def token_losses(model: Model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[Hook] = ()
                 ) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position: tokens `[batch, pos]` -> `[batch, pos - 1]` (entry `i` is the loss
    of predicting `tokens[:, i + 1]`), under `fwd_hooks`. Runs from a clean run `replay.keep_clean_block_inputs`
    kept, where it can (rows taken as `token_losses_each` takes them)."""
    chunks = tokens.split(_logit_rows(model, tokens))
    if fwd_hooks and all(kept_run_available(model, chunk, fwd_hooks) for chunk in chunks):
        return torch.cat([losses_from_logits(next(replayed_logits(model, chunk, [fwd_hooks], clean=False)), chunk)
                          for chunk in chunks])
    logits = run_with_hooks(model, tokens, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(tokens)
    return losses_from_logits(logits, tokens)


def _logit_rows(model, tokens: Tensor) -> int:
    """Rows of `tokens` whose logits fit `LOGIT_ROWS_BUDGET`."""
    return max(1, LOGIT_ROWS_BUDGET // max(1, tokens.shape[1] * model.cfg.d_vocab))


@torch.no_grad()
def token_losses_each(model: Model, tokens: Int[Tensor, "batch pos"], variants: Sequence[Sequence[Hook]]
                      ) -> Float[Tensor, "variant batch pos_minus_1"]:
    """`token_losses` without hooks (row 0) and under each of `variants` (rows 1..), sharing one clean pass: each
    hooked run starts at the first block its hooks sit in (`replay.replayed_logits`). Rows of `tokens` are taken
    a few at a time, so no more than about `LOGIT_ROWS_BUDGET` floats of logits are held at once."""
    parts = [torch.stack([losses_from_logits(logits, chunk) for logits in replayed_logits(model, chunk, variants)])
             for chunk in tokens.split(_logit_rows(model, tokens))]
    return torch.cat(parts, dim=1)


def loss_chunk_rows(n_positions: int, d_vocab: int) -> int:
    """Rows of `[rows, n_positions, d_vocab]` logits that stay near `LOSS_CHUNK` floats (at least one)."""
    return max(1, LOSS_CHUNK // max(1, n_positions * d_vocab))


def losses_from_logits(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
                       ) -> Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of `tokens[:, i + 1]` under `logits[:, i]`: logits `[batch, pos, vocab]` -> `[batch, pos - 1]`.

    Computed as `logsumexp - logit[target]` a few rows at a time, so no second `[batch, pos, vocab]` tensor (the
    log-softmax) is ever held: with a 50k vocabulary that copy is the largest allocation of a notebook.
    """
    targets = tokens[:, 1:, None].to(logits.device)
    rows = loss_chunk_rows(logits.shape[1], logits.shape[2])
    losses = []
    for start in range(0, len(logits), rows):
        chunk = logits[start:start + rows, :-1].float()
        losses.append(torch.logsumexp(chunk, dim=-1) - chunk.gather(-1, targets[start:start + rows])[..., 0])
    return torch.cat(losses) if losses else logits.new_zeros((0, max(0, logits.shape[1] - 1)))
