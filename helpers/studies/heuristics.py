"""Arithmetic heuristics (Nikankin et al., "Arithmetic Without Algorithms", ICLR 2025), the model's side: neuron
activation maps over operand pairs, the whole heuristic analysis of a set of neurons, and the knockout experiments.

The heuristic scheme itself (which heuristics exist, which prompts each concerns, how maps are scored and neurons
classified) is pure and lives in `helpers.studies.heuristic_scheme`; the localisation steps before it (IE maps,
circuit, probes, top-k neurons) are in `helpers.studies.arithmetic_circuit`, the generic head views in
`helpers.techniques.attention`, neuron ablation hooks in `helpers.techniques.ablation`. Everything here takes tensors
(operand pairs, results, tokens, answer token ids) and the model; nothing imports a task module. Shapes:
`pairs [N, 2]` long (op1, op2), `results [N]` long, `tokens [N, seq]` (answer read at the last position), maps
`[n_neurons, N]`.

Maps (paper Fig. 6, Algorithm 1). For an MLP neuron (layer l, index n) and the prompts of all operand pairs:
    K map:  its activation `blocks.l.mlp.hook_post[:, -1, n]` (the "key" of the neuron read as a key/value memory)
    KV map: K * logit_lens(v)[correct answer], with v = W_out[l, n] the neuron's value vector and
            logit_lens(v) = v @ W_U (the final norm's weight is folded into W_U by the loader)
A *direct* heuristic (one that promotes result tokens: `result_*`) is classified on the KV map, an *indirect* one
(operand ranges, moduli, patterns, values, identical operands) on the K map; this is the original notebook's "HYBRID"
mode.

Knockouts (paper §4.2) ablate neurons at every position from `from_position` on (default every one; after worked
examples, the prompt's) with zero ablation (labelled as such; the original notebook's docstrings said "mean") or mean
ablation; "unrelated" prompts exclude every related prompt, baselines are measured, neurons of a prompt are ranked by
their classification score (paper) and the random control draws per layer from the top neurons NOT associated with the
prompt (paper), never more than exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.components import device_of, hook_name, Model, unembed_only_at
from helpers.studies.heuristic_scheme import (associated_neurons, build_scheme, classify, HeuristicScores, Neuron,
                                              relevant_mask)
from helpers.techniques.ablation import neuron_mask_hooks
from helpers.techniques.replay import activations, hooked_logits


# ---- maps from a model ----------------------------------------------------------------------------------------------
@torch.no_grad()
def neuron_activations(model: Model, tokens: Int[Tensor, "N seq"], neurons: Sequence[Neuron], position: int = -1,
                       batch_size: int = 1024) -> Float[Tensor, "n_neurons N"]:
    """K maps: `blocks.l.mlp.hook_post[:, position, n]` for each (l, n) over the prompts: `[n_neurons, N]` (CPU),
    from clean runs after a shared prefix where one is registered (`replay.activations`)."""
    neurons = [tuple(map(int, nn)) for nn in neurons]
    layers = sorted({l for l, _ in neurons})
    names = {hook_name("neuron", l) for l in layers}
    index = {l: torch.tensor([n for ll, n in neurons if ll == l]) for l in layers}
    rows = {l: [i for i, (ll, _) in enumerate(neurons) if ll == l] for l in layers}
    out = torch.zeros(len(neurons), len(tokens))
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device_of(model))
        cache = activations(model, batch, sorted(names))
        for l in layers:
            act = cache[hook_name("neuron", l)][:, position].float().cpu()
            out[rows[l], start : start + len(batch)] = act[:, index[l]].T
    return out


@torch.no_grad()
def neuron_answer_logits(model: Model, neurons: Sequence[Neuron], answer_ids: Int[Tensor, "N"]
                         ) -> Float[Tensor, "n_neurons N"]:
    """The logit lens of each neuron's value vector at each prompt's answer token: `(W_out[l, n] @ W_U)[answer]`,
    `[n_neurons, N]`, from the unembedding's columns of the answers alone."""
    answers, column = torch.as_tensor(answer_ids).long().unique(return_inverse=True)
    return value_logits(model, neurons, answers)[:, column]


def kv_maps(model: Model, k_maps: Float[Tensor, "n_neurons N"], neurons: Sequence[Neuron], answer_ids: Int[Tensor, "N"]
            ) -> Float[Tensor, "n_neurons N"]:
    """KV maps `[n_neurons, N]`: activation times the value vector's logit of the correct answer (paper Alg. 1)."""
    return k_maps * neuron_answer_logits(model, neurons, answer_ids)


@torch.no_grad()
def value_logits(model: Model, neurons: Sequence[Neuron], token_ids: Int[Tensor, "T"] | None = None
                 ) -> Float[Tensor, "n_neurons T"]:
    """The logit lens of each neuron's value vector: `W_out[layer, neuron] @ W_U`, what the neuron promotes when it
    fires (positive activation), over `token_ids` (default the whole vocabulary): `[n_neurons, T]` (CPU)."""
    W_U = model.W_U.float() if token_ids is None else model.W_U.float()[:, torch.as_tensor(token_ids).long()]
    W_out = model.W_out   # stacked once (the bridge stacks every layer's W_out anew on each access)
    rows = torch.stack([W_out[layer, neuron].float() for layer, neuron in neurons]) if neurons else None
    return (rows @ W_U).cpu() if rows is not None else torch.zeros(0, W_U.shape[1])


def analyse_neurons(model: Model, tokens: Int[Tensor, "N seq"], answer_ids: Int[Tensor, "N"], pairs: Int[Tensor, "N 2"],
                    results: Int[Tensor, "N"], operator: str, neurons: Sequence[Neuron], batch_size: int = 1024,
                    chance_correct: bool = True) -> tuple[Float[Tensor, "n N"], Float[Tensor, "n N"], HeuristicScores]:
    """The whole heuristic analysis of `neurons` over one operator's prompts (every valid operand pair): their K maps,
    KV maps and classification (`classify` on `build_scheme(pairs, results, operator)`)."""
    k_maps = neuron_activations(model, tokens, neurons, batch_size=batch_size)
    kv = kv_maps(model, k_maps, neurons, answer_ids)
    scheme = build_scheme(pairs, results, operator)
    return k_maps, kv, classify(k_maps, kv, scheme, neurons, chance_correct=chance_correct)


# ---- knockouts ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def correct_under(model: Model, tokens: Int[Tensor, "N seq"], answers: Int[Tensor, "N"],
                  masks: dict[int, Bool[Tensor, "N d_mlp"]] | None = None, method: str = "zero",
                  means: dict[int, Float[Tensor, "*pos d_mlp"]] | None = None, batch_size: int = 512,
                  from_position: int = 0) -> Bool[Tensor, "N"]:
    """Is the greedy answer still right with the neuron masks `{layer: [N, d_mlp] or [d_mlp]}` (True = ablate; per
    prompt or the same for all) zero- or mean-ablated (`means[layer]`, `[pos, d_mlp]` or `[d_mlp]`) at every
    position from `from_position` on (e.g. the prompt after a few-shot prefix, which then runs once:
    `replay.share_prefix`)?"""
    if method not in ("zero", "mean"):
        raise ValueError(f"method must be 'zero' or 'mean', got {method!r}")
    out = []
    for start in range(0, len(tokens), batch_size):
        sl = slice(start, start + batch_size)
        batch = tokens[sl].to(device_of(model))
        fill = None if method == "zero" else means
        hooks = neuron_mask_hooks({l: m if m.dim() == 1 else m[sl] for l, m in masks.items()}, fill,
                                  from_position) if masks else []
        last = torch.full((len(batch),), batch.shape[1] - 1)
        logits = hooked_logits(model, batch, [*hooks, *unembed_only_at(model, last)])
        out.append(logits[:, -1].argmax(-1).cpu() == answers[sl].cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@dataclass
class KnockoutResult:
    """One heuristic knocked out (all its neurons at score >= threshold ablated together)."""

    heuristic: str
    neurons: list[Neuron]
    score_sum: float
    n_related: int
    n_unrelated: int
    baseline_related: float
    ablated_related: float
    baseline_unrelated: float
    ablated_unrelated: float

    @property
    def drop_related(self) -> float:
        return self.baseline_related - self.ablated_related

    @property
    def drop_unrelated(self) -> float:
        return self.baseline_unrelated - self.ablated_unrelated


def _masks_for(neurons: Sequence[Neuron], d_mlp: int) -> dict[int, Bool[Tensor, "d_mlp"]]:
    """`{layer: [d_mlp]}`, True at `neurons`: the same knockout for every prompt."""
    masks: dict[int, Tensor] = {}
    for layer, neuron in neurons:
        masks.setdefault(layer, torch.zeros(d_mlp, dtype=torch.bool))[neuron] = True
    return masks


def heuristic_knockout(model: Model, scores: HeuristicScores, threshold: float, tokens: Int[Tensor, "N seq"],
                       answers: Int[Tensor, "N"], pairs: Int[Tensor, "N 2"], results: Int[Tensor, "N"], *,
                       min_neurons: int = 3, n_prompts: int = 100, seed: int = 0,
                       method: str = "zero", means: dict[int, Float[Tensor, "*pos d_mlp"]] | None = None,
                       max_heuristics: int | None = None, from_position: int = 0) -> list[KnockoutResult]:
    """Knock out one heuristic at a time and measure accuracy on related vs unrelated prompts (paper §4.2).

    Args:
        tokens, answers, pairs, results: the evaluation prompts `[N, seq]`, answer ids `[N]`, operands `[N, 2]`,
            integer results `[N]` (usually the model's correct prompts of one operator).
        min_neurons: heuristics with fewer neurons at >= threshold are skipped; heuristics are taken in decreasing
            neuron count (ties by name), at most `max_heuristics`.
        n_prompts: related and unrelated prompts are each sampled (seeded) down to this many; unrelated prompts are
            those the heuristic does not concern at all.
        from_position: the first position ablated (e.g. the prompt's, after a few-shot prefix); default every one.

    Every sampled prompt runs once clean; each heuristic then costs one ablated run of its related and unrelated
    prompts together.
    """
    classes = scores.classes(threshold)
    order = sorted(classes, key=lambda name: (-len(classes[name]), name))
    order = [name for name in order if len(classes[name]) >= min_neurons][: max_heuristics]
    generator = torch.Generator().manual_seed(seed)
    samples = {}                                   # heuristic -> (related rows, unrelated rows) of the prompts
    for name in order:
        related = relevant_mask(name, pairs, results)
        rel_idx, unrel_idx = related.nonzero().flatten(), (~related).nonzero().flatten()
        if len(rel_idx) and len(unrel_idx):
            samples[name] = (rel_idx[torch.randperm(len(rel_idx), generator=generator)[:n_prompts]],
                             unrel_idx[torch.randperm(len(unrel_idx), generator=generator)[:n_prompts]])
    used = sorted({int(i) for rows in samples.values() for idx in rows for i in idx})
    baseline = torch.zeros(len(tokens), dtype=torch.bool)         # one clean run of every sampled prompt
    baseline[used] = correct_under(model, tokens[used], answers[used])
    out = []
    for name, (rel_idx, unrel_idx) in samples.items():
        neurons = [(l, n) for l, n, _ in classes[name]]
        rows = torch.cat([rel_idx, unrel_idx])
        ablated = correct_under(model, tokens[rows], answers[rows], _masks_for(neurons, model.cfg.d_mlp), method,
                                means, from_position=from_position).float()
        out.append(KnockoutResult(name, neurons, float(sum(s for _, _, s in classes[name])), len(rel_idx),
                                  len(unrel_idx), float(baseline[rel_idx].float().mean()),
                                  float(ablated[:len(rel_idx)].mean()), float(baseline[unrel_idx].float().mean()),
                                  float(ablated[len(rel_idx):].mean())))
    return out


def knockout_accuracy(results: Sequence[KnockoutResult]) -> tuple[float, float]:
    """Mean accuracy over knocked-out heuristics on (related, unrelated) prompts (NaN when none was knocked out)."""
    if not results:
        return float("nan"), float("nan")
    return (sum(r.ablated_related for r in results) / len(results),
            sum(r.ablated_unrelated for r in results) / len(results))


@dataclass
class PromptKnockoutResult:
    """Prompt-guided knockout at several per-layer neuron limits (paper Fig. 8).

    Attributes:
        limits: `[n_limits]` neurons per layer (at most) ablated per prompt.
        baseline: accuracy without ablation.
        ablated, control: `[n_limits]` accuracy with the prompt's heuristic neurons / as many random top neurons
            not associated with the prompt ablated.
        mean_ablated, mean_control: `[n_limits]` average number of neurons ablated per prompt in each arm.
    """

    limits: list[int]
    baseline: float
    ablated: Tensor
    control: Tensor
    mean_ablated: Tensor
    mean_control: Tensor


def prompt_guided_knockout(model: Model, scores: HeuristicScores, threshold: float, tokens: Int[Tensor, "N seq"],
                           answers: Int[Tensor, "N"], pairs: Int[Tensor, "N 2"], results: Int[Tensor, "N"],
                           top_neurons: Sequence[Neuron], limits: Sequence[int], *,
                           seed: int = 0, method: str = "zero",
                           means: dict[int, Float[Tensor, "*pos d_mlp"]] | None = None, from_position: int = 0
                           ) -> PromptKnockoutResult:
    """For each prompt ablate (per layer) up to `limit` of its associated heuristic neurons, ranked by their
    classification score, and compare with ablating exactly as many random neurons of that layer not associated
    with the prompt: drawn from the layer's `top_neurons` (the paper's control) and, where too few of those are left,
    topped up from the layer's other neurons, so both arms always ablate the same number. Positions from
    `from_position` on are ablated. Seeded; batched over prompts."""
    best, _ = associated_neurons(scores, threshold, pairs, results)
    d_mlp = model.cfg.d_mlp
    layers = sorted({l for l, _ in top_neurons})
    col = {neuron: i for i, neuron in enumerate(scores.neurons)}
    by_layer = {l: [n for ll, n in top_neurons if ll == l] for l in layers}
    top_set = {l: set(by_layer[l]) for l in layers}
    baseline = float(correct_under(model, tokens, answers).float().mean())
    ablated, control, n_abl, n_ctl = [], [], [], []
    n = len(tokens)
    for limit in limits:
        generator = torch.Generator().manual_seed(seed)
        mask_a = {l: torch.zeros(n, d_mlp, dtype=torch.bool) for l in layers}
        mask_c = {l: torch.zeros(n, d_mlp, dtype=torch.bool) for l in layers}
        for p in range(n):
            for l in layers:
                cands = [(float(best[p, col[(l, nn)]]), nn) for nn in by_layer[l] if (l, nn) in col
                         and best[p, col[(l, nn)]] > 0]
                cands.sort(key=lambda t: (-t[0], t[1]))
                chosen = [nn for _, nn in cands[:limit]]
                associated = {nn for _, nn in cands}
                pool = [nn for nn in by_layer[l] if nn not in associated]
                drawn = [pool[i] for i in torch.randperm(len(pool), generator=generator)[: len(chosen)].tolist()]
                if len(drawn) < len(chosen):  # too few unassociated top neurons: the rest of the layer
                    rest = [nn for nn in range(d_mlp) if nn not in top_set[l]]
                    extra = torch.randperm(len(rest), generator=generator)[: len(chosen) - len(drawn)]
                    drawn += [rest[i] for i in extra.tolist()]
                if chosen:
                    mask_a[l][p, chosen] = True
                if drawn:
                    mask_c[l][p, drawn] = True
        ablated.append(float(correct_under(model, tokens, answers, mask_a, method, means,
                                           from_position=from_position).float().mean()))
        control.append(float(correct_under(model, tokens, answers, mask_c, method, means,
                                           from_position=from_position).float().mean()))
        n_abl.append(float(sum(m.sum() for m in mask_a.values())) / max(n, 1))
        n_ctl.append(float(sum(m.sum() for m in mask_c.values())) / max(n, 1))
    return PromptKnockoutResult(list(limits), baseline, torch.tensor(ablated), torch.tensor(control),
                                torch.tensor(n_abl), torch.tensor(n_ctl))


@dataclass
class PromptProfile:
    """Per prompt: how many classified neurons are associated with it, and their summed direct logit contribution
    to the correct answer (activation on that prompt times the value vector's answer logit)."""

    n_associated: Tensor
    n_strong: Tensor
    logit_contribution: Tensor
    mean_score: Tensor


@torch.no_grad()
def prompt_profile(model: Model, scores: HeuristicScores, threshold: float, tokens: Int[Tensor, "N seq"],
                   answer_ids: Int[Tensor, "N"], pairs: Int[Tensor, "N 2"], results: Int[Tensor, "N"],
                   strong: float = 0.05) -> PromptProfile:
    """The failure-mode analysis (paper §4.3) on any prompts: activations are computed on these prompts (not looked
    up in a grid of another operand range), contributions at the answer the prompt *should* get (`answer_ids`).
    `strong`: a contribution counted as "high" when above this fraction of the prompt's largest contribution."""
    best, _ = associated_neurons(scores, threshold, pairs, results)
    acts = neuron_activations(model, tokens, scores.neurons)                    # [n_neurons, N]
    contrib = (acts * neuron_answer_logits(model, scores.neurons, answer_ids)).T  # [N, n_neurons]
    assoc = best > 0
    masked = torch.where(assoc, contrib, torch.zeros_like(contrib))
    scale = contrib.abs().amax(dim=1, keepdim=True).clamp(min=1e-9)
    n_strong = ((masked / scale) > strong).sum(1)
    mean_score = torch.where(assoc, best, torch.zeros_like(best)).sum(1) / assoc.sum(1).clamp(min=1)
    return PromptProfile(assoc.sum(1), n_strong, masked.sum(1), mean_score)
