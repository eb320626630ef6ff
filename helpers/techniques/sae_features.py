"""What SAE features do and what drives them: logit effects, direct feature attribution, token detectors, cosines.

Every function here works on an SAE trained on an MLP's `blocks.{L}.mlp.hook_post` (`helpers.techniques.sae`), a SAELens
`StandardSAE` or any SAE with `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec` and an affine input
(`x - b_dec`, no run-time normalisation):

- **direct logit effects** of a feature: its decoder row written through `W_out[L]`, the final norm (linearised
  with a frozen scale: LayerNorm centres, RMSNorm does not) and the unembedding. `feature_logit_weights` gives the
  whole vocabulary per unit of activation, `feature_answer_dla` the effect on each prompt's answer, activation
  included. Summed over features, plus the SAE's `b_dec` and error, they give the MLP's own direct logit
  attribution (`helpers.techniques.dla.token_attribution_at`);
- **direct feature attribution** (`feature_input_attribution`): which heads, MLPs and embeddings write the residual
  stream that the SAE's MLP reads, pushed through the MLP input norm (scale frozen), `W_in`, the activation function
  (linearised exactly at the prompt: each neuron's gain `post / pre`) and the encoder. The parts plus the biases sum
  to each feature's pre-activation; the original notebook's version dropped `b_in`, the GELU's shape, `b_dec` and
  `b_enc`;
- **token detectors** (`token_detector_statistics`): for every feature at once, the token it fires on most and that
  token's share of its activations, counted sparsely (the original notebook built a `[d_sae, d_vocab]` count matrix,
  3.3 GB);
- **virtual-weight cosines** between one layer's features and the next (`virtual_cosine_blocks`,
  `top_virtual_pairs`, `virtual_cosines_into`), in row blocks: the full `[d_sae_a, d_sae_b]` matrix is 1 GiB at
  the original notebook's 16384 features and is never held whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.components import Component, device_of, hook_name, labels, Model

_CENTRING_NORMS = ("LN", "LNPre")
_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


def _norm_weight(norm) -> Tensor | None:
    """A norm module's weight `w`, None where it has none (folded into the next matrix, or LNPre / RMSPre)."""
    try:
        return getattr(norm, "w")
    except (AttributeError, TypeError):
        return None


def _linear_norm(model, norm, stack: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | float | None
                 ) -> Float[Tensor, "... d_model"]:
    """The linear part of a norm with its scale frozen: `w * centre(stack) / scale`; only LayerNorm centres (an
    RMSNorm residual stream keeps its mean). `scale` broadcasts against `stack`; None leaves it out."""
    if model.cfg.normalization_type in _CENTRING_NORMS:
        stack = stack - stack.mean(dim=-1, keepdim=True)
    if scale is not None and model.cfg.normalization_type in _NORMS:
        stack = stack / torch.as_tensor(scale, dtype=stack.dtype, device=stack.device)
    weight = _norm_weight(norm) if model.cfg.normalization_type in _NORMS else None
    return stack if weight is None else stack * weight.to(stack)


# ----------------------------------------------------------------------------------------------------------------
# Direct logit effects of features
# ----------------------------------------------------------------------------------------------------------------
def feature_writes(model: Model, sae, layer: int) -> Float[Tensor, "d_sae d_model"]:
    """What one unit of each feature's activation writes to the residual stream: `W_dec @ W_out[layer]`."""
    W_out = model.W_out[layer]
    return sae.W_dec.to(W_out) @ W_out


def feature_logit_weights(model: Model, sae, layer: int, ln_scale: Float[Tensor, ""] | float | None = None
                          ) -> Float[Tensor, "d_sae d_vocab"]:
    """Weight-based direct logit effect of every feature per unit of activation: `W_dec @ W_out[layer]` through the
    final norm and `W_U`. Divided by the final norm's scale when `ln_scale` is given (a typical
    `ln_final.hook_scale`, so magnitudes are in logits; the original notebook left it out). The writes are centred only
    on a LayerNorm model: RMSNorm does not centre, so centring there would change the answer."""
    writes = _linear_norm(model, model.ln_final, feature_writes(model, sae, layer), ln_scale)
    return writes @ model.W_U.to(writes)


def feature_answer_dla(model: Model, sae, layer: int, acts: Float[Tensor, "batch d_sae"], answers: Int[Tensor, "batch"],
                       ln_scale: Float[Tensor, "batch"] | None) -> Float[Tensor, "batch d_sae"]:
    """Each feature's direct effect on each prompt's answer logit: `acts[b, f]` times feature f's write through the
    final norm (scale `ln_scale[b]`, the cached `ln_final.hook_scale` at the prompt's position) onto
    `W_U[:, answers[b]]`. Summed over features it is the direct logit attribution of the SAE reconstruction less
    `b_dec`."""
    writes = _linear_norm(model, model.ln_final, feature_writes(model, sae, layer), None)  # [d_sae, d_model]
    per_answer = (writes @ model.W_U[:, answers.to(model.W_U.device)].to(writes)).T  # [batch, d_sae]
    if ln_scale is not None and model.cfg.normalization_type in _NORMS:
        per_answer = per_answer / ln_scale.to(per_answer)[:, None]
    return acts.to(per_answer) * per_answer


def mlp_vector_dla(model: Model, layer: int, vectors: Float[Tensor, "batch d_mlp"], answers: Int[Tensor, "batch"],
                   ln_scale: Float[Tensor, "batch"] | None) -> Float[Tensor, "batch"]:
    """Direct logit effect on each prompt's answer of a vector in MLP `layer`'s neuron space (its `hook_post`, an
    SAE reconstruction, its error): `vectors @ W_out[layer]` (no `b_out`) through the final norm (scale
    `ln_scale[b]`) onto `W_U[:, answers[b]]`. For the MLP's own activation it is the MLP's direct logit
    attribution less what `b_out` writes."""
    W_out = model.W_out[layer]
    writes = vectors.to(W_out) @ W_out  # [batch, d_model]
    scale = None if ln_scale is None else ln_scale.to(writes)[:, None]
    directions = model.W_U[:, answers.to(model.W_U.device)].T.to(writes)  # [batch, d_model]
    return (_linear_norm(model, model.ln_final, writes, scale) * directions).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Direct feature attribution: which components drive a feature
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FeatureAttribution:
    """Contributions to SAE feature pre-activations at one position per prompt.

    `per_prompt[c, f, b]` is what `components[c]` adds to the pre-activation of `features[f]` on prompt `b`;
    `constant[f, b]` collects the biases (the MLP's `b_in` through each neuron's gain, the SAE's `b_dec` and
    `b_enc`). `per_prompt.sum(0) + constant` is the pre-activation, and the activation where it is positive.
    """

    per_prompt: Float[Tensor, "component feature batch"]
    constant: Float[Tensor, "feature batch"]
    components: list[Component]
    features: list[int]

    @property
    def labels(self) -> list[str]:
        return labels(self.components)

    def mean(self, where: Bool[Tensor, "feature batch"] | None = None) -> Float[Tensor, "component feature"]:
        """Mean contribution of each component to each feature over prompts (only where `where[f, b]`, e.g. the
        prompts on which the feature is active)."""
        if where is None:
            return self.per_prompt.mean(-1)
        weights = where.to(self.per_prompt).expand_as(self.per_prompt[0])
        return (self.per_prompt * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def mlp_input_pieces(model: Model, cache, layer: int, rows: Int[Tensor, "batch"], positions: Int[Tensor, "batch"]
                     ) -> tuple[Float[Tensor, "component batch d_model"], list[Component]]:
    """The writers of the residual stream that MLP `layer` reads, at `positions[b]` of row `rows[b]` of the cache:
    `EMBED`, (`POS_EMBED`), every head `L{l}H{h}` (`z @ W_O`) and `ATTN_BIAS{l}` of the layers before it, and of its
    own layer unless attention and MLP run in parallel (GPT-NeoX), and every earlier `MLP{l}`. They sum to
    `blocks.{layer}.ln2.hook_in`."""
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    pieces = [cache[hook_name("embed")][rows, positions]]
    components = [Component.embed()]
    if hook_name("pos_embed") in cache.keys():
        pos_embed = cache[hook_name("pos_embed")]
        pieces.append(pos_embed[rows, positions] if pos_embed.ndim == 3 else pos_embed[positions])
        components.append(Component.pos_embed())
    W_O = model.W_O  # stacked once (the bridge stacks it anew on each access)
    for source in range(layer + (0 if parallel else 1)):
        z = cache[hook_name("head", source)][rows, positions]  # [batch, head, d_head]
        heads = torch.einsum("bhd,hdm->hbm", z, W_O[source].to(z.dtype))  # [head, batch, d_model]
        pieces += [*heads, cache[hook_name("attn", source)][rows, positions] - heads.sum(0)]
        components += [Component.head(source, head) for head in range(model.cfg.n_heads)]
        components.append(Component.attn_bias(source))
        if source < layer:
            pieces.append(cache[hook_name("mlp", source)][rows, positions])
            components.append(Component.mlp(source))
    return torch.stack(pieces), components


def _ln2_scale_name(layer: int) -> str:
    return f"blocks.{layer}.ln2.hook_scale"


def _mlp_linear_name(model, layer: int) -> str:
    """The hook of the MLP's linear input `x @ W_in + b_in`: `hook_pre`, or `hook_pre_linear` for a gated MLP (whose
    `hook_pre` is the gate)."""
    return hook_name("neuron", layer, "pre_linear" if model.cfg.gated_mlp else "pre")


def mlp_input_names(model: Model, layer: int) -> Callable[[str], bool]:
    """`names_filter` for `model.run_with_cache` that keeps what `feature_input_attribution` reads for an SAE on MLP
    `layer`: the embeddings, every layer's `hook_z` / `hook_attn_out` / `hook_mlp_out`, and the MLP's norm scale,
    linear input and `hook_post`."""
    own = {_ln2_scale_name(layer), _mlp_linear_name(model, layer), hook_name("neuron", layer)}
    return lambda name: (name in own or name in (hook_name("embed"), hook_name("pos_embed"))
                         or name.endswith(("attn.hook_z", "hook_attn_out", "hook_mlp_out")))


def _bias(module, name: str) -> Tensor | None:
    try:
        return getattr(module, name)
    except (AttributeError, TypeError):  # the bridge's stacked accessors fail on a layer without that bias
        return None


@torch.no_grad()
def feature_input_attribution(model: Model, cache, sae, layer: int, features: Sequence[int],
                              positions: Int[Tensor, "batch"]) -> FeatureAttribution:
    """Direct feature attribution: how much each component's write drives each of `features` of an SAE on
    `blocks.{layer}.mlp.hook_post`, at `positions[b]` of each row of `cache` (from `model.run_with_cache`).

    Each writer `c` of the MLP's input is normalised with the cached `ln2` scale, mapped through `W_in[layer]` and
    multiplied by each neuron's gain `g = post / pre` at that prompt (GELU's exact secant; for a gated MLP,
    `pre` is the linear branch and `g` the gate's activation), then read by the encoder: `(g * (norm(c) @ W_in)) @
    W_enc[:, f]`. The linearisation is exact, so the parts sum to the pre-activation; a component's part is also
    what removing its write would change if the norm's scale and the neurons' gains were held fixed.
    """
    if getattr(sae.cfg, "normalize_activations", "none") not in ("none", None):
        raise ValueError("feature_input_attribution needs an SAE without run-time input normalisation")
    device = cache[hook_name("embed")].device
    rows = torch.arange(len(positions), device=device)
    positions = positions.to(device).long()
    pieces, components = mlp_input_pieces(model, cache, layer, rows, positions)
    norm = model.blocks[layer].ln2
    scale = cache[_ln2_scale_name(layer)][rows, positions] if model.cfg.normalization_type in _NORMS else None
    W_in = model.W_in[layer].to(pieces)
    linear_in = cache[_mlp_linear_name(model, layer)][rows, positions]
    gain = torch.where(linear_in != 0, cache[hook_name("neuron", layer)][rows, positions] / linear_in, 0.0)
    neuron_parts = gain * (_linear_norm(model, norm, pieces, scale) @ W_in)  # [component, batch, d_mlp]
    neuron_bias = torch.zeros_like(gain)
    b_in = _bias(model.blocks[layer].mlp, "b_in")
    if b_in is not None:
        neuron_bias = neuron_bias + b_in.to(gain)
    norm_bias = _bias(norm, "b") if model.cfg.normalization_type in _CENTRING_NORMS else None
    if norm_bias is not None:
        neuron_bias = neuron_bias + norm_bias.to(W_in) @ W_in
    index = torch.as_tensor(list(features), dtype=torch.long, device=sae.W_enc.device)
    W_enc, b_enc = sae.W_enc[:, index].to(gain), sae.b_enc[index].to(gain)
    b_dec = sae.b_dec.to(gain) * float(getattr(sae.cfg, "apply_b_dec_to_input", True))
    per_prompt = (neuron_parts @ W_enc).permute(0, 2, 1)  # [component, feature, batch]
    constant = ((gain * neuron_bias - b_dec) @ W_enc + b_enc).T  # [feature, batch]
    return FeatureAttribution(per_prompt.cpu(), constant.cpu(), components, [int(f) for f in features])


# ----------------------------------------------------------------------------------------------------------------
# Where features fire: examples and token statistics
# ----------------------------------------------------------------------------------------------------------------
def top_examples(acts: Float[Tensor, "batch seq d_sae"], feature: int, k: int = 10) -> list[tuple[int, int, float]]:
    """The `k` largest activations of `feature`: `[(row, position, value)]`, positive values only."""
    values = acts[..., feature]
    flat = values.flatten()
    top = torch.topk(flat, min(k, flat.numel()))
    out = []
    for value, index in zip(top.values.tolist(), top.indices.tolist()):
        if value <= 0:
            break
        out.append((index // values.shape[1], index % values.shape[1], value))
    return out


def token_statistics(tokens: Int[Tensor, "batch seq"], acts: Float[Tensor, "batch seq d_sae"],
                     features: Sequence[int], *, threshold: float = 0.0) -> dict[int, dict]:
    """Which tokens a few features fire on: for each, the number of active positions (activation > `threshold`),
    the most frequent token there and its share."""
    out = {}
    for feature in features:
        active = acts[..., feature] > threshold
        hits = tokens[active.to(tokens.device)]
        if len(hits) == 0:
            out[feature] = {"active": 0, "top_token": None, "top_share": float("nan")}
            continue
        counts = torch.bincount(hits)
        top = int(counts.argmax())
        out[feature] = {"active": int(len(hits)), "top_token": top, "top_share": float(counts[top] / len(hits))}
    return out


@dataclass
class TokenDetectorStats:
    """Per feature: `n_active` positions above its threshold, the `top_token` there (-1 if it never fired) and
    that token's share `top_share` (NaN if it never fired). A share near 1 is a single-token detector."""

    n_active: Int[Tensor, "d_sae"]
    top_token: Int[Tensor, "d_sae"]
    top_share: Float[Tensor, "d_sae"]
    threshold_fraction: float

    @property
    def live(self) -> Bool[Tensor, "d_sae"]:
        return self.n_active > 0


@torch.no_grad()
def token_detector_statistics(model: Model, sae, tokens: Int[Tensor, "batch seq"], *, hook_name: str | None = None,
                              threshold_fraction: float = 0.5, skip_first: int = 1,
                              batch_size: int = 64) -> TokenDetectorStats:
    """For every feature of `sae`: on which token it fires, over all positions of `tokens` after the first
    `skip_first` (BOS). A position counts when the activation exceeds `threshold_fraction` x the feature's
    maximum over `tokens` (the original notebook's 0.5). Only the non-zero activations are kept, and (feature, token)
    pairs are counted with `unique`, so memory grows with the active entries, not with `d_sae x d_vocab`."""
    hook_name = hook_name or sae.cfg.metadata.hook_name
    found_features, found_tokens, found_values = [], [], []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start: start + batch_size]
        _, cache = model.run_with_cache(chunk.to(device_of(model)), names_filter=[hook_name])
        acts = sae.encode(cache[hook_name][:, skip_first:].to(sae.W_dec.dtype)).cpu()  # [batch, seq', d_sae]
        row, pos, feature = acts.nonzero(as_tuple=True)
        found_features.append(feature)
        found_tokens.append(chunk[:, skip_first:][row, pos])
        found_values.append(acts[row, pos, feature])
    feature, token, value = torch.cat(found_features), torch.cat(found_tokens), torch.cat(found_values)
    d_sae, d_vocab = sae.cfg.d_sae, int(model.cfg.d_vocab)
    peak = torch.zeros(d_sae).scatter_reduce(0, feature, value, reduce="amax")
    keep = value > threshold_fraction * peak[feature]
    pairs, counts = torch.unique(feature[keep] * d_vocab + token[keep], return_counts=True)  # sorted pairs
    pair_feature, pair_token = pairs // d_vocab, pairs % d_vocab
    n_active = torch.zeros(d_sae, dtype=torch.long).index_add_(0, pair_feature, counts)
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[torch.argsort(pair_feature[order], stable=True)]  # by feature, then by count (ties: lower token)
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = pair_feature[order][1:] != pair_feature[order][:-1]
    winners = order[first]
    top_token = torch.full((d_sae,), -1, dtype=torch.long)
    top_token[pair_feature[winners]] = pair_token[winners]
    top_share = torch.full((d_sae,), float("nan"))
    top_share[pair_feature[winners]] = counts[winners].float() / n_active[pair_feature[winners]].float()
    return TokenDetectorStats(n_active, top_token, top_share, threshold_fraction)


def coactivation(acts: Float[Tensor, "n k"]) -> Float[Tensor, "k k"]:
    """Pearson correlations between the columns of `acts` (NaN for a constant column)."""
    return torch.corrcoef(acts.T.float())


# ----------------------------------------------------------------------------------------------------------------
# Virtual-weight cosines across layers, in blocks
# ----------------------------------------------------------------------------------------------------------------
def _feature_reads(model, sae, layer: int) -> Float[Tensor, "d_model d_sae"]:
    """What each feature of an `mlp.hook_post` SAE reads from the residual stream through the MLP, unit norm:
    `W_in[layer] @ W_enc`, columns normalised."""
    return F.normalize(model.W_in[layer].float() @ sae.W_enc.float().to(model.W_in.device), dim=0)


@torch.no_grad()
def virtual_cosine_blocks(model: Model, sae_a, layer_a: int, sae_b, layer_b: int, *, block_rows: int = 1024
                          ) -> Iterator[tuple[int, Float[Tensor, "rows d_sae_b"]]]:
    """The cross-layer cosine matrix `[d_sae_a, d_sae_b]` in blocks of `block_rows` rows: yields `(first_row,
    block)`. Entry `[i, j]` is the cosine between what feature i of the SAE at `layer_a` writes to the residual
    stream (`W_dec_a @ W_out[layer_a]`) and what feature j of the SAE at `layer_b` reads from it through the MLP
    (`W_in[layer_b] @ W_enc_b`). The whole cross matrix is meaningful (the original notebook's `tril` dropped pairs);
    LayerNorm scale and the GELU are ignored."""
    reads = _feature_reads(model, sae_b, layer_b)
    for start in range(0, sae_a.cfg.d_sae, block_rows):
        rows = sae_a.W_dec[start: start + block_rows].float()
        writes = F.normalize(rows.to(model.W_out.device) @ model.W_out[layer_a].float(), dim=-1)
        yield start, writes @ reads


@torch.no_grad()
def virtual_cosines_into(model: Model, sae_a, layer_a: int, sae_b, layer_b: int, features: Sequence[int]
                         ) -> Float[Tensor, "d_sae_a n_features"]:
    """The columns of the cross-layer cosine matrix for a few later-layer `features`: every earlier feature's
    cosine with each of them."""
    reads = _feature_reads(model, sae_b, layer_b)[:, list(features)]
    writes = F.normalize(feature_writes(model, sae_a, layer_a).float(), dim=-1)
    return writes @ reads


def top_pairs(matrix: Float[Tensor, "rows cols"], k: int, *, row_offset: int = 0) -> list[tuple[int, int, float]]:
    """The `k` largest entries of a 2-D matrix as `(row + row_offset, column, value)`, largest first (the column
    count comes from the matrix itself; the original notebook used the other SAE's size)."""
    top = torch.topk(matrix.flatten(), min(k, matrix.numel()))
    n_cols = matrix.shape[1]
    return [(row_offset + i // n_cols, i % n_cols, v) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def top_virtual_pairs(model: Model, sae_a, layer_a: int, sae_b, layer_b: int, k: int, *, block_rows: int = 1024
                      ) -> list[tuple[int, int, float]]:
    """The `k` largest cross-layer cosines `(earlier feature, later feature, cosine)`, largest first, found block
    by block (at most `block_rows x d_sae_b` values held at once)."""
    best: list[tuple[int, int, float]] = []
    for start, block in virtual_cosine_blocks(model, sae_a, layer_a, sae_b, layer_b, block_rows=block_rows):
        best = sorted(best + top_pairs(block, k, row_offset=start), key=lambda pair: -pair[2])[:k]
    return best
