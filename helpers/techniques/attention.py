"""Head views: where a head's last position looks over a grid of prompts, and a head's OV circuit between tokens.

Two techniques any study of attention heads uses (the arithmetic notebook's "QK heatmap" and OV circuit):
- `attention_from_last`: the attention pattern row of the last (query) position, for every head, over many prompts
  of one length (e.g. every operand pair `x op y =`), so that it can be drawn over the operand grid;
- `ov_transition`: the OV circuit `W_V W_O` of one head read from input tokens to output logits,
  `x_in @ W_V @ W_O @ W_U[:, out]`, which shows whether the head copies (a diagonal) or maps tokens;
- `mean_patterns`: the mean attention pattern of chosen heads over a batch (what a circuitsvis view shows).
"""
from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.core.components import device_of, hook_name, Model


def _pattern_name(layer: int) -> str:
    return hook_name("head", layer, "pattern")


@torch.no_grad()
def attention_from_last(model: Model, tokens: Int[Tensor, "N seq"], batch_size: int = 1024
                        ) -> Float[Tensor, "n_layers n_heads N seq"]:
    """Attention of the last position to every source position, for every head (CPU, float32)."""
    names = [_pattern_name(l) for l in range(model.cfg.n_layers)]
    out = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device_of(model))
        _, cache = model.run_with_cache(batch, names_filter=names)
        out.append(torch.stack([cache[_pattern_name(l)][:, :, -1].float().cpu()          # [batch, head, seq]
                                for l in range(model.cfg.n_layers)]).transpose(1, 2))    # [layer, head, batch, seq]
    return torch.cat(out, dim=2)


@torch.no_grad()
def mean_patterns(model: Model, tokens: Int[Tensor, "N seq"], heads: Sequence[tuple[int, int]]
                  ) -> Float[Tensor, "n_heads_chosen seq seq"]:
    """The attention pattern `[query, key]` of each `(layer, head)` averaged over the prompts (CPU, float32)."""
    _, cache = model.run_with_cache(tokens, names_filter=[_pattern_name(l) for l, _ in heads])
    if not heads:
        return torch.zeros(0, tokens.shape[1], tokens.shape[1])
    return torch.stack([cache[_pattern_name(l)][:, h].float().mean(0).cpu() for l, h in heads])


@torch.no_grad()
def ov_transition(model: Model, layer: int, head: int, token_ids: Int[Tensor, "T"], source: str = "embed"
                  ) -> Float[Tensor, "T_in T_out"]:
    """The OV circuit of a head between tokens: `[n_tokens (input), n_tokens (output)]` logits.

    Input vectors are the tokens' embeddings (`source="embed"`, RMS-normalised as the attention input is) or their
    unembedding directions (`source="unembed"`, the original notebook's choice for heads that copy number
    representations); the output is read with `W_U`. Grouped-query attention is handled (query head h uses value head
    `h // (n_heads / n_kv_heads)`).
    """
    token_ids = torch.as_tensor(token_ids).long()
    W_V, W_O, W_U = model.W_V[layer].float(), model.W_O[layer, head].float(), model.W_U.float()
    kv_head = head // max(1, model.cfg.n_heads // W_V.shape[0])
    if source == "embed":
        x = model.W_E.float()[token_ids.to(W_U.device)]
        x = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    elif source == "unembed":
        x = W_U[:, token_ids.to(W_U.device)].T
    else:
        raise ValueError("source must be 'embed' or 'unembed'")
    return (x @ W_V[kv_head] @ W_O @ W_U[:, token_ids.to(W_U.device)]).cpu()     # [T_in, d_head] -> [T_in, T_out]
