"""Direct logit attribution (DLA): how much each component writes along a logit-difference direction.

Everything reads a cache from `model.run_with_cache(tokens)` (TransformerBridge in compatibility mode, or any
HookedTransformer-like model) and the answer tokens `[batch, 2]` (column 0 correct, column 1 wrong). The final norm
is linearised with the scale stored in the cache (`ln_final.hook_scale`, `[batch, pos, 1]`), the way
`ActivationCache.apply_ln_to_stack` does, so the contributions add up exactly:

    sum(layer_attribution(...).values) == mean logit difference      (to float rounding)

Every result names its terms with `helpers.core.components.Component` (labels `EMBED`, `POS_EMBED`, `L3H2`, `ATTN3`,
`ATTN_BIAS3`, `MLP3`, `UNEMBED_BIAS`, `RESID_PRE3`, ...), the vocabulary patching and ablation use too, so a DLA
term can be patched or ablated by the component it names: `component.hook_name()`.

How each final norm (`model.cfg.normalization_type`) is linearised, for one piece `x` of the residual stream:

    "LN", "LNPre"    w * (x - mean(x)) / scale    scale = sqrt(mean((resid - mean(resid))^2) + eps)
    "RMS", "RMSPre"  w * x / scale                scale = sqrt(mean(resid^2) + eps); RMSNorm does not centre
    None             x                            no final norm, no scale in the cache

The norm's weight `w` is 1 when it has been folded into `W_U` (fold_ln: the bridge keeps "LN" / "RMS" with unit
weights and a zero bias, HookedTransformer switches to the weightless "LNPre" / "RMSPre"); an unprocessed model keeps
its own `w`, and LayerNorm's bias `b` writes the constant `b @ W_U`. Centring is what tells the two apart: on a
processed LayerNorm model `center_writing_weights` has already centred every writer, so it changes nothing there,
while an RMSNorm residual stream keeps its mean and centring it would be wrong.

The decomposition of the final residual stream is `embed (+ pos_embed) + sum_l (attn_out_l + mlp_out_l)`; heads
split `attn_out_l` into `z_h @ W_O[l, h]` plus the bias `b_O[l]` (zero where attention has no bias, as in Llama). The
constant logit offset, `b @ W_U + b_U` (the final norm's bias and the unembedding bias, each where the model has
one), is reported as the component `UNEMBED_BIAS` so that nothing is left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.techniques import replay
from helpers.techniques.losses import loss_chunk_rows, losses_from_logits
from helpers.core.components import as_components, Component, final_resid_hook_name, hook_name, Model

Position = int | slice


@dataclass
class Attribution:
    """Contributions named by components: `values[i]` (mean over prompts) and `per_prompt[i]` (`[batch]`) belong to
    `components[i]`.

        result.components        [Component.embed(), Component.attn(0), ...]
        result.labels            ['EMBED', 'ATTN0', ...]
        result["MLP1"]           the value of one component, by label or by `Component.mlp(1)`
        result.as_dict()         {'EMBED': 0.12, 'ATTN0': -0.4, ...}
    """

    values: Float[Tensor, "component"]
    components: list[Component]
    per_prompt: Float[Tensor, "component batch"] | None = None

    @property
    def labels(self) -> list[str]:
        return [component.label for component in self.components]

    def __getitem__(self, component: Component | str) -> float:
        if isinstance(component, str):
            component = Component.from_label(component)
        return float(self.values[self.components.index(component)])

    def as_dict(self) -> dict[str, float]:
        return {label: float(value) for label, value in zip(self.labels, self.values)}


_NORMS = ("LN", "LNPre", "RMS", "RMSPre")
_CENTRING_NORMS = ("LN", "LNPre")


def _param(owner, name: str) -> Tensor | None:
    """`owner.<name>`, or None where the model lacks that parameter: absent, None (a bridge block whose layer has no
    bias), or a stacking accessor that fails on those Nones (the bridge's `model.b_O` on Llama raises TypeError)."""
    try:
        return getattr(owner, name)
    except (AttributeError, TypeError):
        return None


def _final_norm_weight(model) -> Float[Tensor, "d_model"] | None:
    """The final norm's weight `w` `[d_model]`, None where it has none (LNPre, RMSPre, no final norm)."""
    return _param(model.ln_final, "w") if model.cfg.normalization_type in _NORMS else None


def _final_scale(model, cache, index) -> Float[Tensor, "batch 1"] | None:
    """The cached final-norm scale `ln_final.hook_scale[index]` (`[batch, 1]` for `index = (slice(None), pos)`),
    None for a model without a final norm."""
    if model.cfg.normalization_type not in _NORMS:
        return None
    return cache["ln_final.hook_scale"][index]


def _linear_final_norm(model, stack: Float[Tensor, "... batch d_model"], scale: Float[Tensor, "batch 1"] | None
                       ) -> Float[Tensor, "... batch d_model"]:
    """The linear part of the final norm with a frozen scale: stack `[..., batch, d_model]` and scale `[batch, 1]`
    (or None) -> `w * centre(stack) / scale`, `[..., batch, d_model]`; only LayerNorm centres."""
    if model.cfg.normalization_type in _CENTRING_NORMS:
        stack = stack - stack.mean(dim=-1, keepdim=True)
    if scale is not None:
        stack = stack / scale.to(stack.dtype)
    weight = _final_norm_weight(model)
    return stack if weight is None else stack * weight.to(stack)


def _logit_offset(model) -> Float[Tensor, "d_vocab"] | None:
    """What every prompt adds to the logits whatever the residual stream: `b @ W_U + b_U` `[d_vocab]` (final-norm
    bias `b`, unembedding bias `b_U`, each where the model has one); None where it has neither."""
    norm_bias = _param(model.ln_final, "b") if model.cfg.normalization_type in _CENTRING_NORMS else None
    b_U = _param(model, "b_U")
    if norm_bias is None:
        return b_U
    offset = norm_bias.to(model.W_U) @ model.W_U
    return offset if b_U is None else offset + b_U.to(offset)


def logit_diff_directions(model: Model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch d_model"]:
    """`W_U[:, correct] - W_U[:, wrong]`: `[batch, d_model]` for answer tokens `[batch, 2]`."""
    W_U = model.W_U
    answer_tokens = answer_tokens.to(W_U.device)
    return (W_U[:, answer_tokens[:, 0]] - W_U[:, answer_tokens[:, 1]]).T


def unembed_bias_diff(model: Model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch"]:
    """`offset[correct] - offset[wrong]` for the constant logit offset `b @ W_U + b_U`: `[batch]` (zeros when the
    model has neither a final-norm bias nor an unembedding bias)."""
    offset = _logit_offset(model)
    if offset is None:
        return torch.zeros(len(answer_tokens))
    answer_tokens = answer_tokens.to(offset.device)
    return offset[answer_tokens[:, 0]] - offset[answer_tokens[:, 1]]


def logit_diff(logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
               answer_tokens: Int[Tensor, "batch 2"], pos: int = -1, per_prompt: bool = False
               ) -> Float[Tensor, ""] | Float[Tensor, "batch"]:
    """Logit of the correct minus the wrong answer at `pos`: logits `[batch, pos, vocab]` or `[batch, vocab]`,
    answer tokens `[batch, 2]` -> scalar mean (or `[batch]` with `per_prompt`)."""
    if logits.ndim == 3:
        logits = logits[:, pos]
    answer_tokens = answer_tokens.to(logits.device)
    diff = logits.gather(1, answer_tokens[:, :1]) - logits.gather(1, answer_tokens[:, 1:2])
    diff = diff[:, 0]
    return diff if per_prompt else diff.mean()


def apply_ln_final(stack: Float[Tensor, "... batch d_model"], cache, pos: Position = -1
                   ) -> Float[Tensor, "... batch d_model"]:
    """Linearised final norm of `cache.model` (the model that made the cache): centre each vector (LayerNorm only),
    divide by the cached scale at `pos` and multiply by the norm's weight (see the module docstring).

    stack `[..., batch, d_model]` -> `[..., batch, d_model]`, so that
    `apply_ln_final(final_resid) @ W_U + b @ W_U + b_U` are the logits.
    """
    model = cache.model
    return _linear_final_norm(model, stack, _final_scale(model, cache, (slice(None), pos)))


def stack_to_logit_diff(stack: Float[Tensor, "... batch d_model"], cache, directions: Float[Tensor, "batch d_model"],
                        pos: int = -1, per_prompt: bool = False) -> Float[Tensor, "..."] | Float[Tensor, "... batch"]:
    """Project residual-stream pieces on the logit-difference directions.

    stack `[..., batch, d_model]` (values at position `pos`), directions `[batch, d_model]` -> `[...]` (mean over
    the batch) or `[..., batch]` with `per_prompt`.
    """
    scaled = apply_ln_final(stack, cache, pos)
    values = (scaled * directions.to(scaled.dtype)).sum(-1)
    return values if per_prompt else values.mean(-1)


def _embeddings(cache) -> list[Component]:
    """`[EMBED]`, or `[EMBED, POS_EMBED]` for a model with learned positions."""
    has_pos_embed = hook_name("pos_embed") in cache.keys()
    return [Component.embed()] + ([Component.pos_embed()] if has_pos_embed else [])


def decompose_resid(model: Model, cache, pos: Position = -1) -> tuple[Float[Tensor, "component batch d_model"],
                                                               list[Component]]:
    """The final residual stream at `pos` split into its writers.

    Returns `(stack, components)` with components `EMBED`, (`POS_EMBED`), `ATTN0`, `MLP0`, `ATTN1`, ... Their sum is
    `blocks.{L-1}.hook_resid_post[:, pos]`. (With a slice `pos` the stack is `[component, batch, pos, d_model]`.)
    """
    embeddings = _embeddings(cache)
    pieces = [cache[hook_name("embed")][:, pos]]
    if len(embeddings) == 2:
        pos_embed = cache[hook_name("pos_embed")]
        pieces.append(pos_embed[:, pos] if pos_embed.ndim == 3 else pos_embed[pos].expand_as(pieces[0]))
    writers = [component for layer in range(model.cfg.n_layers)
               for component in (Component.attn(layer), Component.mlp(layer))]
    pieces += [cache[component.hook_name()][:, pos] for component in writers]
    return torch.stack(pieces), embeddings + writers


def accumulated_resid(model: Model, cache, pos: int = -1) -> tuple[Float[Tensor, "layer_plus_1 batch d_model"],
                                                            list[Component]]:
    """The residual stream at `pos` before each layer and after the last: `(stack, components)` with components
    `RESID_PRE0`, ..., `RESID_PRE{L-1}`, `RESID_POST{L-1}`."""
    n_layers = model.cfg.n_layers
    components = [Component.resid(layer) for layer in range(n_layers)]
    components.append(Component.resid(n_layers - 1, where="post"))
    return torch.stack([cache[component.hook_name()][:, pos] for component in components]), components


def head_results(model: Model, cache, layer: int, pos: int = -1) -> Float[Tensor, "batch head d_model"]:
    """Each head's write to the residual stream at `pos`: `z[:, pos] @ W_O[layer]` -> `[batch, n_heads, d_model]`
    (without the shared bias `b_O[layer]`)."""
    z = cache[hook_name("head", layer)][:, pos]  # [batch, head, d_head]
    return torch.einsum("bhd,hdm->bhm", z, model.W_O[layer].to(z.dtype))


def _attn_bias(model, layer: int, like: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The attention output bias `b_O[layer]` broadcast to `like` `[..., d_model]`; zeros where the layer's attention
    has no output bias (Llama)."""
    bias = _param(model.blocks[layer].attn, "b_O")
    return torch.zeros_like(like) if bias is None else bias.to(like).expand_as(like)


def layer_attribution(model: Model, cache, answer_tokens: Int[Tensor, "batch 2"], pos: int = -1) -> Attribution:
    """DLA of `EMBED`, (`POS_EMBED`), every `ATTN{l}` / `MLP{l}`, and `UNEMBED_BIAS`: values `[n_components]`.

    The values sum to the mean logit difference at `pos`.
    """
    stack, components = decompose_resid(model, cache, pos)
    directions = logit_diff_directions(model, answer_tokens)
    per_prompt = stack_to_logit_diff(stack, cache, directions, pos, per_prompt=True)
    bias = unembed_bias_diff(model, answer_tokens).to(per_prompt)
    per_prompt = torch.cat([per_prompt, bias[None]])
    return Attribution(per_prompt.mean(-1), components + [Component.unembed_bias()], per_prompt)


def logit_lens(model: Model, cache, answer_tokens: Int[Tensor, "batch 2"], pos: int = -1) -> Attribution:
    """Logit difference read from the accumulated residual stream before each layer (`RESID_PRE{l}`) and after the
    last (`RESID_POST{L-1}`), final norm linearised with the cached scale of the final residual stream, plus the
    constant offset `UNEMBED_BIAS`: values `[n_layers + 1]`; the last equals the model's logit difference."""
    stack, components = accumulated_resid(model, cache, pos)
    directions = logit_diff_directions(model, answer_tokens)
    per_prompt = stack_to_logit_diff(stack, cache, directions, pos, per_prompt=True)
    per_prompt = per_prompt + unembed_bias_diff(model, answer_tokens).to(per_prompt)
    return Attribution(per_prompt.mean(-1), components, per_prompt)


def head_attribution(model: Model, cache, answer_tokens: Int[Tensor, "batch 2"], pos: int = -1, per_prompt: bool = False
                     ) -> Float[Tensor, "layer head"] | Float[Tensor, "layer head batch"]:
    """DLA of every head at `pos`: `[n_layers, n_heads]` (or `[n_layers, n_heads, batch]` with `per_prompt`)."""
    directions = logit_diff_directions(model, answer_tokens)
    rows = []
    for layer in range(model.cfg.n_layers):
        results = head_results(model, cache, layer, pos).transpose(0, 1)  # [head, batch, d_model]
        rows.append(stack_to_logit_diff(results, cache, directions, pos, per_prompt=per_prompt))
    return torch.stack(rows)


def full_attribution(model: Model, cache, answer_tokens: Int[Tensor, "batch 2"], pos: int = -1) -> Attribution:
    """Finest exact split: `EMBED`, (`POS_EMBED`), every head `L{l}H{h}`, each layer's `ATTN_BIAS{l}` (zero
    without an attention bias), every `MLP{l}`, and `UNEMBED_BIAS`: values `[n_components]`, per_prompt
    `[n_components, batch]`. Values sum to the mean logit difference."""
    directions = logit_diff_directions(model, answer_tokens)
    pieces: list[Tensor] = []
    components: list[Component] = []
    stack, writers = decompose_resid(model, cache, pos)
    for piece, writer in zip(stack, writers):
        if writer.kind in ("embed", "pos_embed"):
            pieces.append(stack_to_logit_diff(piece, cache, directions, pos, per_prompt=True))
            components.append(writer)
    heads = head_attribution(model, cache, answer_tokens, pos, per_prompt=True)  # [L, H, batch]
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            pieces.append(heads[layer, head])
            components.append(Component.head(layer, head))
        pieces.append(stack_to_logit_diff(_attn_bias(model, layer, stack[0]), cache, directions, pos,
                                          per_prompt=True))
        components.append(Component.attn_bias(layer))
        pieces.append(stack_to_logit_diff(cache[hook_name("mlp", layer)][:, pos], cache, directions, pos,
                                          per_prompt=True))
        components.append(Component.mlp(layer))
    pieces.append(unembed_bias_diff(model, answer_tokens).to(pieces[0]))
    components.append(Component.unembed_bias())
    per_prompt = torch.stack(pieces)
    return Attribution(per_prompt.mean(-1), components, per_prompt)


def top_components(values: Float[Tensor, "..."], k: int, largest: bool = True
                   ) -> list[tuple[tuple[int, ...], float]]:
    """The `k` largest (or smallest) entries of a map such as `[n_layers, n_heads]`: `[((layer, head), value), ...]`."""
    flat = values.flatten()
    k = min(k, flat.numel())
    order = torch.topk(flat if largest else -flat, k).indices
    return [(tuple(int(i) for i in torch.unravel_index(idx, values.shape)), float(flat[idx])) for idx in order]


def attention_vs_contribution(model: Model, cache, answer_tokens: Int[Tensor, "batch 2"], layer: int, head: int,
                              query_pos: int, key_positions: Int[Tensor, "batch"], answer_column: int = 0
                              ) -> tuple[Float[Tensor, "batch"], Float[Tensor, "batch"]]:
    """For one head: attention from `query_pos` to `key_positions[i]` and the head's DLA along the direction of
    answer column `answer_column` (0 correct, 1 wrong) at `query_pos`, per prompt.

    key_positions `[batch]` (int) -> `(attention [batch], contribution [batch])`.
    """
    pattern = cache[hook_name("head", layer, "pattern")][:, head, query_pos]  # [batch, key]
    attention = pattern.gather(1, key_positions.to(pattern.device)[:, None].long())[:, 0]
    directions = model.W_U[:, answer_tokens[:, answer_column].to(model.W_U.device)].T  # [batch, d_model]
    result = head_results(model, cache, layer, query_pos)[:, head]  # [batch, d_model]
    contribution = (apply_ln_final(result, cache, query_pos) * directions).sum(-1)
    return attention, contribution


# ---- every position, next-token views (German context neuron notebook) -------------------------------------------
def next_token_dla(model: Model, cache, tokens: Int[Tensor, "batch pos"]
                   ) -> tuple[Float[Tensor, "component batch pos_minus_1"], list[Component]]:
    """DLA on the correct next token at every position.

    tokens `[batch, pos]` and the cache of `model.run_with_cache(tokens)` (which needs only `dla_hook_names(model)`)
    -> `(values [n_components, batch, pos - 1], components)` with components `EMBED`, (`POS_EMBED`), `ATTN0`,
    `MLP0`, ..., `UNEMBED_BIAS`; summed over components they give the logit of `tokens[:, i + 1]` at position `i`
    (final norm linearised with the cached scale). One component's `[batch, pos, d_model]` at a time, never the
    whole stack of writers.
    """
    components = _embeddings(cache) + [component for layer in range(model.cfg.n_layers)
                                       for component in (Component.attn(layer), Component.mlp(layer))]
    targets = tokens[:, 1:].to(model.W_U.device)
    directions = model.W_U.T[targets]                                      # [batch, pos-1, d_model]
    values = []
    for component in components:
        output = cache[component.hook_name()]
        output = output[:, :-1] if output.ndim == 3 else output[:-1].expand(len(tokens), -1, -1)
        scaled = apply_ln_final(output, cache, pos=slice(None, -1))       # [batch, pos-1, d_model]
        values.append((scaled * directions.to(scaled.dtype)).sum(-1))
    offset = _logit_offset(model)
    bias = offset[targets] if offset is not None else torch.zeros_like(values[0])
    return torch.stack(values + [bias.to(values[0])]), components + [Component.unembed_bias()]


def dla_hook_names(model: Model) -> list[str]:
    """The hooks `next_token_dla` and `decompose_resid` read: the embeddings, every attention and MLP output and the
    final norm's scale (a `names_filter` for `run_with_cache`; a name the model lacks is simply not cached)."""
    writers = [component.hook_name() for layer in range(model.cfg.n_layers)
               for component in (Component.attn(layer), Component.mlp(layer))]
    return [hook_name("embed"), hook_name("pos_embed"), *writers, "ln_final.hook_scale"]


@torch.no_grad()
def direct_patch_losses(model: Model, tokens: Int[Tensor, "batch pos"], fwd_hooks,
                        components: Iterable[Component | str] | None = None
                        ) -> tuple[Float[Tensor, "component batch pos_minus_1"], list[Component],
                                   Float[Tensor, "batch pos_minus_1"], Float[Tensor, "batch pos_minus_1"]]:
    """Direct effect of an intervention through each writer of the final residual stream, on the next-token loss.

    Runs `tokens [batch, pos]` clean and under `fwd_hooks`. For each component (`EMBED`, (`POS_EMBED`), `ATTN{l}`,
    `MLP{l}`; all, or those given in `components`, as Components or labels) the clean final residual stream gets
    that component's output from the hooked run instead of its clean one; the final LayerNorm and unembedding are
    recomputed (the original notebook's `get_direct_loss_increase_for_component`). The effects of different components
    are not additive. Both runs read only the final residual stream and the components' outputs (`replay.activations`:
    from a kept clean run where the hooks and components are all in its block or after).

    Returns `(patched [n_components, batch, pos - 1], components, clean [batch, pos - 1], hooked [batch, pos - 1])`,
    all per-token losses.
    """
    requested = _writers(model) if components is None else as_components(components)
    final = final_resid_hook_name(model)
    names = [final, *dict.fromkeys(component.hook_name() for component in requested)]
    clean = replay.activations(model, tokens, names)
    hooked = replay.activations(model, tokens, names, fwd_hooks)
    chosen = [component for component in requested if component.hook_name() in clean]   # POS_EMBED: learned only
    patched = [_losses_of_resid(model, clean[final] - clean[c.hook_name()] + hooked[c.hook_name()], tokens)
               for c in chosen]
    return (torch.stack(patched), chosen, _losses_of_resid(model, clean[final], tokens),
            _losses_of_resid(model, hooked[final], tokens))


def _writers(model) -> list[Component]:
    """Every writer of the final residual stream, in `decompose_resid`'s order: `EMBED`, `POS_EMBED`, `ATTN0`,
    `MLP0`, ... (`POS_EMBED` is dropped by the reads of a model without learned positions)."""
    return [Component.embed(), Component.pos_embed()] + [component for layer in range(model.cfg.n_layers)
                                                         for component in (Component.attn(layer), Component.mlp(layer))]


def _losses_of_resid(model, resid: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]
                     ) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token losses of the final residual stream `resid` (final norm and unembedding), a few rows at a time."""
    rows = loss_chunk_rows(tokens.shape[1], model.cfg.d_vocab)
    return torch.cat([losses_from_logits(model.unembed(model.ln_final(resid[start:start + rows])),
                                         tokens[start:start + rows]) for start in range(0, len(resid), rows)])


# ---- one answer token at one position per prompt (SAE quotation notebook) ----------------------------------------
def token_attribution_at(model: Model, cache, answers: Int[Tensor, "batch"], positions: Int[Tensor, "batch"]
                         ) -> Attribution:
    """DLA of one answer token per prompt at one position per prompt (prompts of different lengths, right-padded).

    answers `[batch]` (token ids), positions `[batch]` (index of each prompt's predicting position) and the cache of
    `model.run_with_cache(tokens)` -> values `[n_components]` (mean over prompts) and per_prompt
    `[n_components, batch]`, with components `EMBED`, (`POS_EMBED`), every head `L{l}H{h}`, `ATTN_BIAS{l}`,
    `MLP{l}` and `UNEMBED_BIAS`. The components sum to the answer's logit at that position (final norm linearised
    with the cached scale; with center_unembed that logit is relative to the mean over the vocabulary).
    """
    device = cache[hook_name("embed")].device
    rows = torch.arange(len(positions), device=device)
    positions = positions.to(device).long()
    scale = _final_scale(model, cache, (rows, positions))  # [batch, 1] or None
    directions = model.W_U[:, answers.to(model.W_U.device)].T.to(device)  # [batch, d_model]

    def project(vectors: Tensor) -> Tensor:  # [..., batch, d_model] -> [..., batch]
        return (_linear_final_norm(model, vectors, scale) * directions.to(vectors.dtype)).sum(-1)

    components = _embeddings(cache)
    pieces = [project(cache[hook_name("embed")][rows, positions])]
    if len(components) == 2:
        pos_embed = cache[hook_name("pos_embed")]
        pieces.append(project(pos_embed[rows, positions] if pos_embed.ndim == 3 else pos_embed[positions]))
    W_O = model.W_O  # [layer, head, d_head, d_model], stacked once (the bridge stacks it anew on each access)
    for layer in range(model.cfg.n_layers):
        z = cache[hook_name("head", layer)][rows, positions]  # [batch, head, d_head]
        results = torch.einsum("bhd,hdm->hbm", z, W_O[layer].to(z.dtype))
        pieces.extend(project(results).unbind(0))
        components += [Component.head(layer, head) for head in range(model.cfg.n_heads)]
        pieces.append(project(_attn_bias(model, layer, results[0])))
        components.append(Component.attn_bias(layer))
        pieces.append(project(cache[hook_name("mlp", layer)][rows, positions]))
        components.append(Component.mlp(layer))
    offset = _logit_offset(model)
    pieces.append(torch.zeros_like(pieces[0]) if offset is None else offset[answers.to(offset.device)].to(pieces[0]))
    components.append(Component.unembed_bias())
    per_prompt = torch.stack(pieces)
    return Attribution(per_prompt.mean(-1), components, per_prompt)


# ---- who writes a direction (German context neuron notebook) -----------------------------------------------------
def direction_write_hook_names(model: Model) -> list[str]:
    """The hooks `direction_writes` reads (a `names_filter` for `run_with_cache`): the embeddings, every attention
    and MLP output and every head's `z` (no final norm: a pass can stop after the last block)."""
    return [name for name in dla_hook_names(model) if not name.startswith("ln_final")] + \
        [hook_name("head", layer) for layer in range(model.cfg.n_layers)]


def direction_writes(model: Model, cache, direction: Float[Tensor, "d_model"]
                     ) -> tuple[Float[Tensor, "component batch pos"], list[Component]]:
    """Every writer of the final residual stream projected on one residual direction, at every position.

    `direction [d_model]` and the cache of `model.run_with_cache(tokens)` -> `(values [n_components, batch, pos],
    components)` with components `EMBED`, (`POS_EMBED`), `L{l}H{h}` for each head (its `z @ W_O`), `ATTN_BIAS{l}`,
    `MLP{l}`. Summed over components they give `final_resid @ direction`. Used to ask which component carries a
    feature such as the document's language.
    """
    W_O = model.W_O  # stacked once (the bridge stacks it anew on each access)
    direction = direction.to(W_O.device, W_O.dtype)
    components = _embeddings(cache)
    values = [cache[hook_name("embed")] @ direction]
    if len(components) == 2:
        values.append((cache[hook_name("pos_embed")] @ direction).expand_as(values[0]))
    for layer in range(model.cfg.n_layers):
        z = cache[hook_name("head", layer)]                                        # [batch, pos, head, d_head]
        per_head = torch.einsum("bphd,hd->hbp", z, W_O[layer] @ direction)
        attn_bias = cache[hook_name("attn", layer)] @ direction - per_head.sum(0)
        values += [*per_head, attn_bias, cache[hook_name("mlp", layer)] @ direction]
        components += [Component.head(layer, head) for head in range(model.cfg.n_heads)]
        components += [Component.attn_bias(layer), Component.mlp(layer)]
    return torch.stack(values), components
