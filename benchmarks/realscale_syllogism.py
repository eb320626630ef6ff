"""Notebook 03's heaviest steps on a trained model, each beside its floor: plain passes over the same prompts.

    python benchmarks/realscale_syllogism.py [--model smollm2-135m-instruct] [--pool-size 2000] [--n-prompts 32]
                                             [--ld-threshold 0.5] [--exact-top 200] [--path-senders 24]

The prompts are the notebook's: `pool_size` generated syllogisms, those of the commonest layout, the logit-difference
filter at `ld_threshold`, `n_prompts` in flip pairs. The floor of a step is the forward passes (and forward plus
backward passes, where the step needs gradients) it cannot do without, over the same prompts (listed in `FLOORS`),
each timed first in the same run. A screened sweep's floor is one forward and backward pass (attribution patching)
and one plain pass per exactly patched site; a full sweep's would be one per site (printed beside it). Peak memory
is the largest resident set sampled every 10 ms during the step, the model included. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realscale_context_neuron import timed  # noqa: E402  (the same timer and memory sampler)

from helpers.techniques import dla, circuit_levels, eap, patching  # noqa: E402
from helpers.core.components import Component  # noqa: E402
from helpers.models.load import load_model  # noqa: E402
from helpers.tasks import syllogisms  # noqa: E402

FLOORS = {  # step: what its floor counts
    "filter (clean and flipped pool)": "one pass over the layout-kept pool, clean and flipped",
    "resid / attn / MLP by layer and position, screened": "one forward and backward pass (attribution patching), "
                                                          "then one pass per exactly patched site",
    "heads by position, screened": "the same",
    "path patching into the movers' keys, screened senders": "one forward and backward pass (attribution patching), "
                                                             "then passes C and D per sender",
    "EAP-IG edge scores": "one forward and backward pass per integration step, and the corrupted senders' pass",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pool-size", type=int, default=2000)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--ld-threshold", type=float, default=0.5)
    parser.add_argument("--exact-top", type=int, default=200)
    parser.add_argument("--path-senders", type=int, default=24)
    parser.add_argument("--ig-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    pool = syllogisms.build_dataset(model.tokenizer, syllogisms.make_syllogisms(n=args.pool_size, seed=0),
                                    prepend_bos=model.cfg.default_prepend_bos)

    def pool_pass():
        for tokens in (pool.clean_tokens, pool.corrupted_tokens):
            for start in range(0, len(tokens), 64):
                model(tokens[start:start + 64])

    state = {}

    def filter_pool():
        state["filtered"], _ = syllogisms.filter_by_logit_diff(model, pool, args.ld_threshold)

    pool_pass()  # warm-up
    pool_floor, pool_memory, _ = timed(pool_pass)
    rows = [("one plain pass over the layout-kept pool, clean and flipped", pool_floor, pool_floor, pool_memory)]
    elapsed, peak, _ = timed(filter_pool)
    rows.append(("filter (clean and flipped pool)", elapsed, pool_floor, peak))

    data = syllogisms.sample_pairs(state["filtered"], args.n_prompts, seed=0)
    clean, corrupted, answers = data.clean_tokens, data.corrupted_tokens, data.answers
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_ld = dla.logit_diff(clean_logits, answers).item()
    metric = patching.normalised_logit_diff(answers, clean_ld, dla.logit_diff(model(corrupted), answers).item())

    def forward_backward():
        with torch.enable_grad():
            metric(model(corrupted)).backward()
        model.zero_grad(set_to_none=True)

    model(corrupted)  # warm-up
    unit, _, _ = timed(lambda: model(corrupted))
    unit_grad, grad_memory, _ = timed(forward_backward)
    rows += [("one plain pass over the analysed prompts", unit, unit, None),
             ("one forward and backward pass over them", unit_grad, unit_grad, grad_memory)]
    positions = range(clean.shape[1])
    for name, sweep in (("resid / attn / MLP by layer and position, screened",
                         patching.layer_pos_sweep(model, patching.BLOCK_HOOKS, positions)),
                        ("heads by position, screened", patching.head_sweep(model, "z", True, positions))):
        elapsed, peak, result = timed(lambda: patching.run_sweep(model, corrupted, clean_cache, metric, sweep,
                                                                 exact_top=args.exact_top))
        rows.append((name, elapsed, unit_grad + args.exact_top * unit, peak))
        print(f"{name}: {result.describe()}; a full exact sweep's floor: {len(sweep.sites)} passes, "
              f"{len(sweep.sites) * unit:.0f} s")

    head_dla = dla.head_attribution(model, clean_cache, answers)
    movers = [Component.head(l, h, -1) for (l, h), _ in dla.top_components(head_dla, 3)]
    receivers = [Component.head(m.layer, m.index, p) for m in movers for p in range(clean.shape[1])]
    last = max(m.layer for m in movers)

    def path():
        senders = circuit_levels.screened_senders(model, clean, corrupted, metric, last, args.path_senders)
        return circuit_levels.upstream_path_patch(model, clean, corrupted, metric, receivers, "k", senders)

    elapsed, peak, _ = timed(path)
    rows.append(("path patching into the movers' keys, screened senders", elapsed,
                 unit_grad + 2 * args.path_senders * unit, peak))
    graph = eap.build_graph(model)
    elapsed, peak, _ = timed(lambda: eap.edge_scores(model, clean, corrupted, metric, graph=graph,
                                                     ig_steps=args.ig_steps))
    rows.append(("EAP-IG edge scores", elapsed, args.ig_steps * unit_grad + unit, peak))

    print(f"{args.model}: {len(pool)} layout-kept syllogisms of {args.pool_size}, {len(state['filtered'])} pass "
          f"+-{args.ld_threshold}; {len(data)} analysed prompts of {clean.shape[1]} tokens; "
          f"{torch.get_num_threads()} threads; movers by DLA {[m.label for m in movers]}; graph {graph.n_edges} edges")
    print("| step | ours (s) | floor (s) | ratio | peak memory (GB) |\n|---|---:|---:|---:|---:|")
    for name, ours, floor_s, peak in rows:
        memory = "-" if peak is None else f"{peak / 2 ** 30:.2f}"
        print(f"| {name} | {ours:.1f} | {floor_s:.1f} | {ours / floor_s:.1f} | {memory} |")
    for name, what in FLOORS.items():
        print(f"floor of {name}: {what}")


if __name__ == "__main__":
    main()
