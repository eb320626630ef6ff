"""Localising the arithmetic circuit (Nikankin et al., "Arithmetic Without Algorithms", ICLR 2025, §3): the indirect
effect (Eq. 1) of every head and MLP by position, the circuit of the fewest top-ranked heads, linear probes of the
answer, per-neuron attribution and the top-k neuron curves, and the early MLP's token responses.

The study's heuristics are in `helpers.studies.heuristic_scheme` (scheme, classification) and
`helpers.studies.heuristics` (maps from the model, knockouts); the generic tools this module calls are
`helpers.techniques.patching` (batched activation and attribution patching), `helpers.techniques.ablation` (the
`CircuitEvaluator`), `helpers.techniques.neurons.fit_probe` and `helpers.techniques.attention`. Nothing here imports
a task module: prompts arrive as tokens `[N, seq]` ending in op1, operator, op2, `=` (BOS and a few-shot prefix may
come first) and answers as token ids `[N]`.

Two averages, the paper's and ours (both are computed, so a real-model run can be set beside the paper's figures):
- head IE: the paper ranks heads by `log1p(mean IE)` (mean over prompts, then over positions); we rank by the mean
  over prompts of `sign(IE) log(1 + |IE|)` (`signed_log`), because on a confident model one prompt's IE explodes
  (1e16 on the toy) when a patch drives `P*(r)` to ~0, and a plain mean is then that prompt;
- faithfulness: the paper's Eq. 2 is the mean over prompts of per-prompt ratios; we report the ratio of means, as
  one prompt whose full and empty runs nearly agree makes its ratio arbitrary (`ablation.Faithfulness`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.techniques.ablation import CircuitEvaluator
from helpers.techniques.dla import logit_diff
from helpers.techniques.eap import PromptSet
from helpers.core.components import Component, all_mlps, hook_name, Model
from helpers.techniques.neurons import fit_probe
from helpers.techniques.patching import (Sweep, SweepResult, attribution_patch_neurons, normalised_logit_diff,
                              run_patched_variants, run_sweep)
from helpers.techniques.replay import activations

Metric = Callable[[Tensor], Tensor]
PROMPT_POSITIONS = (-4, -3, -2, -1)  # op1, operator, op2, '=': the last four positions, whatever precedes them

REFERENCE_LABEL = "paper (Llama-3-8B)"
REFERENCE: dict[str, dict[str, object]] = {
    # Nikankin et al. 2025 on Llama-3-8B, keyed like the notebook's closing table
    "meta-llama/Meta-Llama-3-8B": {
        **{f"accuracy {op}": value for op, value in {"+": 0.97, "-": 0.96, "*": 0.84, "/": 0.92}.items()},  # Table 3
        **{f"circuit {op}: heads, faithfulness (Eq. 2)": value                                             # Table 1
           for op, value in {"+": "6, 0.97", "-": "6, 0.98", "*": "20, 0.90", "/": "6, 0.96"}.items()},
        "first layer the answer is decodable at '='": 16,                                                  # Fig. 3
        "top-k neurons reaching 90% faithfulness (fraction of d_mlp)": "~0.014",   # 200 of 14,336 (Fig. 4b)
        "MLP0 neurons needed (fraction)": 0.01,                                                            # Fig. 12b
        "top neurons classified at 0.6 (paper's statistic)": 0.91,
        **{f"knockout {op}: related vs unrelated accuracy": value                                          # Fig. 7
           for op, value in {"+": "0.56 vs 0.86", "-": "0.64 vs 0.88", "*": "0.80 vs 0.89",
                             "/": "0.78 vs 0.91"}.items()},
        "prompt-guided knockout below random control": "yes (Fig. 8)",
        "mean IoU of top neurons between operators": 0.54,                                                 # Fig. 15
    },
}
"""The paper's figures, by the model they were measured on: shown beside a run's, never used in its place."""

TOPK_SATURATION_BAR = 0.35
"""The top-k neuron curve of every faithful circuit must saturate at this fraction of d_mlp or less."""


def acceptance_checks(accuracy: dict[str, float], chance: dict[str, float], circuit_faithfulness: dict[str, float],
                      circuit_sizes: dict[str, int], max_circuit_heads: int, saturation: Sequence[float],
                      full_faithfulness: Sequence[float], faithfulness_target: float, mean_classified: float,
                      related: dict[str, float], unrelated: dict[str, float], guided_gap: float) -> dict[str, bool]:
    """The notebook's bars (asserted on the toy), per operator where it says so (`saturation` and
    `full_faithfulness` in the operators' order): accuracy above chance and below 1; a circuit of few heads (+ MLPs)
    with faithfulness >= 0.9 for + and -; the top-k neuron curve of every faithful circuit saturating early (a curve
    says something only where all neurons give a faithful circuit: on noise 90% of ~0 is reached at k=0); half the
    top neurons classified; knockouts hurting related prompts more than unrelated ones (NaN operators left out); the
    prompt-guided knockout below its random control."""
    faithful = [s for s, full in zip(saturation, full_faithfulness) if full >= faithfulness_target]
    return {
        "accuracy above chance and below 1": all(chance[op] < accuracy[op] < 1 for op in accuracy),
        f"circuit of <= {max_circuit_heads} heads + MLPs with faithfulness >= 0.9 for + and -": all(
            circuit_faithfulness[op] >= 0.9 and circuit_sizes[op] <= max_circuit_heads
            for op in ("+", "-") if op in circuit_faithfulness),
        "top-k curve of every faithful circuit saturates at <= 35% of d_mlp":
            bool(faithful) and max(faithful) <= TOPK_SATURATION_BAR,
        ">= 50% of top neurons classified at 0.6": mean_classified >= 0.5,
        "knockout: related hurt more than unrelated":
            bool(np.nanmean(list(related.values())) < np.nanmean(list(unrelated.values()))),
        "prompt-guided knockout below random control": guided_gap > 0,
    }


# ---- seeds: every random draw of the notebook from its one `seed` ---------------------------------------------------
SEED_OFFSETS = {
    "discovery split": 0,       # which correct prompts are discovery / evaluation prompts (one per operator)
    "evaluation sample": 100,   # the evaluation prompts drawn from the rest
    "counterfactuals": 200,     # each discovery prompt's counterfactual partner
    "probe prompts": 300,       # prompts of the linear probes
    "incorrect sample": 400,    # incorrect prompts of the failure-mode analysis
    "knockout": 0,              # prompts and random control of the knockouts
    "eap partners": 500,        # each evaluation prompt's counterfactual partner for the EAP-IG held-out test
}


def derived_seed(seed: int, purpose: str, index: int = 0) -> int:
    """The seed of one random draw: `seed + SEED_OFFSETS[purpose] + index` (index: e.g. the operator's number),
    so that every draw follows the notebook's one `seed` parameter and no two draws share a stream."""
    if purpose not in SEED_OFFSETS:
        raise ValueError(f"unknown purpose {purpose!r}; known: {sorted(SEED_OFFSETS)}")
    return seed + SEED_OFFSETS[purpose] + index


def counterfactual_prompt_set(model: Model, clean_tokens: Int[Tensor, "batch pos"],
                              clean_answers: Int[Tensor, " batch"], corrupt_tokens: Int[Tensor, "batch pos"],
                              corrupt_answers: Int[Tensor, " batch"]) -> PromptSet:
    """Prompts and their counterfactual partners as an edge-patching task: the metric is the logit difference of
    each prompt's answer over its partner's answer at the last position, normalised to 1 on the clean prompts and 0
    on the partners."""
    answers = torch.stack([clean_answers, corrupt_answers], dim=1)                       # [batch, (clean, partner)]
    with torch.no_grad():
        values = [logit_diff(model(tokens), answers).item() for tokens in (clean_tokens, corrupt_tokens)]
    return PromptSet(clean_tokens, corrupt_tokens, normalised_logit_diff(answers, *values))


# ---- the indirect effect (Stolfo et al.; Nikankin et al. Eq. 1) ------------------------------------------------------
def indirect_effect(pre: Float[Tensor, "batch vocab"], post: Float[Tensor, "batch vocab"],
                    clean_answers: Int[Tensor, "batch"], corrupt_answers: Int[Tensor, "batch"]
                    ) -> Float[Tensor, "batch"]:
    """The indirect effect per prompt: `0.5 * ((post[r'] - pre[r']) / pre[r'] + (pre[r] - post[r]) / post[r])`.

    `pre` and `post` are the next-token distributions of the clean run and of the run with one component patched
    from the counterfactual prompt, r the clean answer and r' the counterfactual answer. 0 when the patch changes
    nothing; large when it moves probability from r to r'; never below -1.
    """
    r, r_prime = clean_answers.to(pre.device)[:, None], corrupt_answers.to(pre.device)[:, None]
    pre_r, pre_rp = pre.gather(1, r)[:, 0], pre.gather(1, r_prime)[:, 0]
    post_r, post_rp = post.gather(1, r)[:, 0], post.gather(1, r_prime)[:, 0]
    return 0.5 * ((post_rp - pre_rp) / pre_rp + (pre_r - post_r) / post_r)


def signed_log(values: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """`sign * log(1 + |values|)`, elementwise: a log scale that keeps negative effects (log1p alone gives NaN
    below -1). Its gradient is 1 at 0, as its slope (`sign(x) * log1p(|x|)` would give autograd 0 there, and
    attribution patching at the unpatched run, where every IE is 0, would estimate nothing)."""
    return torch.where(values >= 0, torch.log1p(values.clamp(min=0)), -torch.log1p((-values).clamp(min=0)))


def indirect_effect_metric(clean_logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"],
                           clean_answers: Int[Tensor, "batch"], corrupt_answers: Int[Tensor, "batch"], pos: int = -1,
                           log_scale: bool = False) -> Metric:
    """`metric(logits)` = mean indirect effect (probabilities) of a patched run of the CLEAN prompts against their
    unpatched distribution `clean_logits` (`[batch, pos, vocab]` or `[batch, vocab]`); with `log_scale`, the mean of
    `signed_log(IE)` over prompts, so that one prompt's exploding IE cannot dominate. Use it with noising: run the
    clean tokens and write activations of the counterfactual run (e.g. `run_patched_variants(model, clean_tokens,
    corrupt_cache, ...)`); differentiable, so `attribution_patch(model, corrupt_tokens, clean_tokens, metric, ...)`
    gives its first-order estimate `(corrupt - clean) . dIE/dact` at the clean run (the same for both scales, as
    `signed_log` has slope 1 at 0)."""
    pre = torch.softmax((clean_logits[:, pos] if clean_logits.ndim == 3 else clean_logits).float(), dim=-1).detach()

    def metric(logits: Tensor) -> Tensor:
        post = torch.softmax((logits[:, pos] if logits.ndim == 3 else logits).float(), dim=-1)
        effect = indirect_effect(pre.to(post.device), post, clean_answers, corrupt_answers)
        return (signed_log(effect) if log_scale else effect).mean()

    return metric


# ---- localisation: IE maps and the circuit ---------------------------------------------------------------------------
@torch.no_grad()
def ie_sweep(model: Model, clean: Int[Tensor, "N seq"], corrupt: Int[Tensor, "N seq"], clean_answers: Int[Tensor, "N"],
             corrupt_answers: Int[Tensor, "N"], log_scale: bool = True, exact_top: int | None = None) -> SweepResult:
    """The IE of patching each head (`hook_z`, column h) and each MLP (`hook_mlp_out`, the last column) from the
    counterfactual prompts into the clean ones, at each prompt position (op1, operator, op2, `=`), averaged over
    prompts as `indirect_effect_metric` does (`log_scale`: ours; False: the plain mean, the paper's); `values` laid
    out `[4, n_layers, n_heads + 1]`. Batched. `exact_top` (`patching.run_sweep`): None patches every site; n ranks
    the sites by attribution patching and patches the n largest exactly (a 30-layer model has thousands of sites)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [Component.head(l, 0).hook_name() for l in range(n_layers)]
    mlps = [m.hook_name() for m in all_mlps(n_layers)]
    names = set(heads + mlps)
    _, corrupt_cache = model.run_with_cache(corrupt, names_filter=list(names))
    metric = indirect_effect_metric(model(clean), clean_answers, corrupt_answers, log_scale=log_scale)
    positions = [clean.shape[1] + p for p in PROMPT_POSITIONS]
    sites = [(heads[l], (p, h)) if h < n_heads else (mlps[l], (p,))
             for p in positions for l in range(n_layers) for h in range(n_heads + 1)]
    sweep = Sweep(sites, lambda flat: flat.view(len(PROMPT_POSITIONS), n_layers, n_heads + 1))
    return run_sweep(model, clean, {n: corrupt_cache[n] for n in names}, metric, sweep, exact_top=exact_top)


def ie_maps(model: Model, clean: Int[Tensor, "N seq"], corrupt: Int[Tensor, "N seq"], clean_answers: Int[Tensor, "N"],
            corrupt_answers: Int[Tensor, "N"], log_scale: bool = True
            ) -> Float[Tensor, "4 n_layers n_heads_plus_1"]:
    """`ie_sweep`'s maps, every site patched exactly."""
    return ie_sweep(model, clean, corrupt, clean_answers, corrupt_answers, log_scale).values


def head_scores(maps: Float[Tensor, "4 n_layers n_heads_plus_1"], paper: bool = False
                ) -> Float[Tensor, "n_layers n_heads"]:
    """Each head's score: its IE averaged over the four positions; `paper=True` takes `log1p` of that average (the
    paper's `process_ie_maps`, for maps of plain-mean IE), which ranks heads the same as the average itself."""
    scores = maps[:, :, :-1].mean(0)
    return torch.log1p(scores) if paper else scores


def rank_heads(scores: Float[Tensor, "n_layers n_heads"]) -> list[tuple[int, int]]:
    """All heads `(layer, head)`, highest score first."""
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in scores.flatten().argsort(descending=True)]


def head_circuit(heads: Sequence[tuple[int, int]], n_layers: int) -> list[Component]:
    """The circuit of the given heads plus every MLP layer (the paper keeps all MLPs)."""
    return [Component.head(l, h) for l, h in heads] + all_mlps(n_layers)


def smallest_faithful_circuit(evaluate: CircuitEvaluator, ranked: Sequence[tuple[int, int]], target: float,
                              max_heads: int) -> list[tuple[int, int]]:
    """The fewest top-ranked heads (1..max_heads) whose circuit (plus all MLPs) reaches `target` faithfulness (ratio
    of means) under `evaluate`; `max_heads` of them when none does."""
    n_layers = evaluate.model.cfg.n_layers
    n = next((n for n in range(1, max_heads + 1) if evaluate(head_circuit(ranked[:n], n_layers)) >= target),
             max_heads)
    return list(ranked[:n])


# ---- where is the answer: linear probes ------------------------------------------------------------------------------
@torch.no_grad()
def answer_probe_accuracy(model: Model, tokens: Int[Tensor, "N seq"], labels: Int[Tensor, "N"], seed: int = 0
                          ) -> Float[Tensor, "4 n_layers_plus_1"]:
    """Held-out accuracy of a multinomial logistic probe (`fit_probe`) predicting `labels` from the residual stream
    at each prompt position (op1, operator, op2, `=`) after each layer (`hook_resid_post`; column 0 is the embedding
    `hook_embed`). Features and labels come from the same rows."""
    names = [hook_name("embed")] + [hook_name("resid_post", l) for l in range(model.cfg.n_layers)]
    cache = activations(model, tokens, names)
    acc = torch.zeros(len(PROMPT_POSITIONS), len(names))
    for i, p in enumerate(PROMPT_POSITIONS):
        for j, name in enumerate(names):
            acc[i, j] = fit_probe(cache[name][:, p].float().cpu(), labels, kind="classification", seed=seed,
                                  tol=1e-2).score
    return acc


def first_answer_layer(probe_at_last: Float[Tensor, "n_layers_plus_1"], fraction: float = 0.5) -> int:
    """The first layer whose output (column l + 1) reaches `fraction` of the final layer's probe accuracy."""
    final = float(probe_at_last[-1])
    return next(l for l in range(len(probe_at_last) - 1) if probe_at_last[l + 1] >= fraction * final)


# ---- neurons: attribution, its check, top-k curves ------------------------------------------------------------------
def neuron_attribution(model: Model, clean: Int[Tensor, "N seq"], corrupt: Int[Tensor, "N seq"],
                       clean_answers: Int[Tensor, "N"], corrupt_answers: Int[Tensor, "N"]
                       ) -> Float[Tensor, "n_layers seq d_mlp"]:
    """Attribution-patching estimate of each neuron's IE at each position: `(corrupt - clean) . dIE/dact` at the
    clean run, one backward pass for all neurons (CPU, float32)."""
    metric = indirect_effect_metric(model(clean), clean_answers, corrupt_answers)
    return attribution_patch_neurons(model, corrupt, clean, metric, by_position=True).float().cpu()


@torch.no_grad()
def patch_neurons_at_last(model: Model, clean: Int[Tensor, "N seq"], corrupt: Int[Tensor, "N seq"],
                          clean_answers: Int[Tensor, "N"], corrupt_answers: Int[Tensor, "N"],
                          neurons: Sequence[tuple[int, int]]) -> Float[Tensor, "n_neurons"]:
    """Activation patching of single neurons at `=` from the counterfactual run, scored as the IE maps are (mean of
    `signed_log(IE)`): the ground truth `neuron_attribution` estimates."""
    names = sorted({Component.neuron(l, 0).hook_name() for l, _ in neurons})
    _, cache = model.run_with_cache(corrupt, names_filter=names)
    metric = indirect_effect_metric(model(clean), clean_answers, corrupt_answers, log_scale=True)
    variants = [[(Component.neuron(l, 0).hook_name(), (clean.shape[1] - 1, n))] for l, n in neurons]
    return run_patched_variants(model, clean, {k: cache[k] for k in names}, variants, metric)


def check_sample(importance: Float[Tensor, "n_layers d_mlp"], n_check: int, seed: int) -> list[tuple[int, int]]:
    """The neurons checked by activation patching: per layer, the `n_check` top neurons by `importance` and
    `n_check` random ones (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    n_layers, d_mlp = importance.shape
    return [(l, n) for l in range(n_layers) for n in importance[l].topk(n_check).indices.tolist()
            + torch.randperm(d_mlp, generator=generator)[:n_check].tolist()]


def correlation(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Pearson r of two 1-D tensors."""
    return float(np.corrcoef(x.numpy(), y.numpy())[0, 1])


def topk_curve(evaluate: CircuitEvaluator, circuit: Sequence[Component], importance: Float[Tensor, "n_layers d_mlp"],
               layers: Sequence[int], k_values: Sequence[int]) -> Float[Tensor, "n_k"]:
    """Faithfulness (ratio of means) of `circuit` with only the top-k neurons (by `importance`) of each MLP in
    `layers` kept, for each k; the other neurons of those layers are ablated at every position."""
    order = {l: importance[l].argsort(descending=True) for l in layers}
    return torch.tensor([evaluate(circuit, kept_neurons={l: order[l][:k].tolist() for l in layers})
                         for k in k_values])


def saturation(curve: Float[Tensor, "n_k"], k_values: Sequence[int], d_mlp: int, level: float = 0.9) -> float:
    """The smallest fraction k/d_mlp whose faithfulness reaches `level` of the last (all-neuron) value; the last k
    when the curve never gets there (e.g. a negative curve)."""
    j = next((j for j in range(len(k_values)) if curve[j] >= level * curve[-1]), len(k_values) - 1)
    return k_values[j] / d_mlp


# ---- the early MLP: token responses ---------------------------------------------------------------------------------
@torch.no_grad()
def token_responses(model: Model, token_ids: Int[Tensor, "T"], layer: int, neurons: Sequence[int],
                    prepend_bos: bool = True) -> Float[Tensor, "n_neurons T"]:
    """Activation of MLP neurons of `layer` on each single token (the prompt BOS + token where the model takes a
    BOS, else the token alone; read at the token): how the early MLP responds to a number by itself (the paper's
    "effective embedding", App. B.1)."""
    token_ids = torch.as_tensor(token_ids).long()
    bos = model.tokenizer.bos_token_id
    tokens = torch.stack([torch.full_like(token_ids, bos), token_ids], dim=1) if prepend_bos else token_ids[:, None]
    name = Component.neuron(layer, 0).hook_name()
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name][:, -1, list(neurons)].float().T.cpu()
