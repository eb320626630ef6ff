"""Notebook 02's heaviest steps on a trained model, each beside its floor: plain passes over the same prompts.

    python benchmarks/realscale_arithmetic.py [--model smollm2-135m-instruct] [--max-op 10] [--max-single-token 9]
                                              [--operator +] [--n-discovery 40] [--n-check 2]
                                              [--few-shot-prefix '3+4=7\n...'] [--n-circuits 16]

The prompts are the notebook's (`tasks.arithmetic`): every operand pair below `max_op` whose result is a single
token, for the filter all four operators, for the rest `n_discovery` of `operator`'s prompts drawn at random (answered or not:
the benchmark times the steps, whatever the model answers) and their counterfactuals; the circuit steps put the trained
run's worked examples before those prompts, as the notebook does on SmolLM2. SmolLM2 keeps numbers whole
only up to 9, so its prompts have one-digit operands. The floor of a step is the plain work it cannot do without
(listed in `FLOORS`): forward passes (and one forward and backward pass, for attribution) over the same prompts,
timed first in the same run. Peak memory is the largest resident set sampled every 10 ms during the step, the model
included. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realscale_context_neuron import print_table, timed  # noqa: E402  (the same timer, sampler, table)

from helpers.studies import arithmetic_circuit as AC  # noqa: E402
from helpers.studies import heuristic_scheme as HS  # noqa: E402
from helpers.studies import heuristics as H  # noqa: E402
from helpers.techniques import replay  # noqa: E402
from helpers.techniques.ablation import CircuitEvaluator, circuit_universe, normalized_logits, reference_activations  # noqa: E402
from helpers.models.load import load_model  # noqa: E402
from helpers.tasks import arithmetic as task  # noqa: E402

FLOORS = {  # step: what its floor counts
    "filter (greedy answer of every prompt, four operators)": "one pass over them",
    "IE maps (every head and MLP at op1, operator, op2, =)": "one pass over the discovery prompts per site",
    "neuron attribution (every neuron at every position)": "one forward and backward pass over them",
    "activation patching of the checked neurons at =": "one pass per neuron",
    "heuristic analysis of the top neurons (K and KV maps, classification)": "one pass over every prompt of the "
                                                                             "operator",
    "circuit faithfulness after the worked examples, whole runs": "one pass over the prompts, worked examples "
                                                                  "included, per circuit and for the full and "
                                                                  "empty runs",
    "circuit faithfulness after the worked examples, run once (share_prefix)": "the same",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-op", type=int, default=10)
    parser.add_argument("--max-single-token", type=int, default=9)
    parser.add_argument("--operator", default="+")
    parser.add_argument("--n-discovery", type=int, default=40)
    parser.add_argument("--n-check", type=int, default=2, help="top and random neurons per layer patched exactly")
    parser.add_argument("--top-neurons", type=int, default=20, help="top neurons per layer analysed")
    parser.add_argument("--few-shot-prefix", default="3+4=7\n9-5=4\n2*3=6\n8/2=4\n",
                        help="worked examples before each prompt of the circuit steps (the trained run's)")
    parser.add_argument("--n-circuits", type=int, default=16, help="circuits evaluated (top-n heads, all MLPs)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    tokenizer = model.tokenizer
    task.check_single_token_numbers(tokenizer, args.max_single_token)
    numbers = task.number_token_ids(tokenizer, args.max_single_token)
    prompts = {op: task.all_prompts(op, None, args.max_op, args.max_single_token) for op in task.OPERATORS}
    every = torch.cat([task.prompt_tokens(tokenizer, prompts[op]) for op in task.OPERATORS])
    chosen = prompts[args.operator]
    discovery = chosen.sample(min(args.n_discovery, len(chosen)), seed=0)
    c_ops, c_pairs, c_results = task.corrupt_partners(discovery, list(prompts.values()), seed=0)
    clean = task.prompt_tokens(tokenizer, discovery)
    inputs = (clean, task.mixed_tokens(tokenizer, c_ops, c_pairs), numbers[discovery.results], numbers[c_results])
    operator_tokens = task.prompt_tokens(tokenizer, chosen)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_sites = 4 * n_layers * (n_heads + 1)
    prefix_format = task.PromptFormat(args.few_shot_prefix.encode().decode("unicode_escape"),
                                      prepend_bos=model.cfg.default_prepend_bos)
    prefixed = task.prompt_tokens(tokenizer, discovery, prefix_format)
    universe = circuit_universe(model)
    means = reference_activations(model, prefixed, universe, "mean")
    ranked = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    circuits = [AC.head_circuit(ranked[:n], n_layers)
                for n in range(0, len(ranked) + 1, max(1, len(ranked) // (args.n_circuits - 1)))][:args.n_circuits]

    def faithfulness(prefix: list[int] | None):
        replay.share_prefix(model, None if prefix is None else torch.tensor(prefix))
        evaluate = CircuitEvaluator(model, prefixed, normalized_logits(numbers[discovery.results]),
                                    reference=means, universe=universe)
        [evaluate(circuit) for circuit in circuits]
        replay.share_prefix(model, None)

    def forward_backward():
        with torch.enable_grad():
            model(clean)[:, -1].logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    model(every)  # warm-up
    every_pass, every_memory, _ = timed(lambda: model(every))
    unit, _, _ = timed(lambda: model(clean))
    unit_grad, _, _ = timed(forward_backward)
    operator_pass, _, _ = timed(lambda: model(operator_tokens))
    prefixed_pass, _, _ = timed(lambda: model(prefixed))
    rows = [("one plain pass over the discovery prompts (the unit)", unit, unit, every_memory)]
    state = {}

    def attribution():
        state["attribution"] = AC.neuron_attribution(model, *inputs)

    def check():
        state["sample"] = AC.check_sample(state["attribution"][:, -1].abs(), args.n_check, seed=0)
        AC.patch_neurons_at_last(model, *inputs, state["sample"])

    def analysis():
        top = HS.top_neurons_per_layer(state["attribution"][:, -1].abs(), args.top_neurons, range(n_layers))
        H.analyse_neurons(model, operator_tokens, numbers[chosen.results], chosen.pairs, chosen.results,
                          args.operator, top)

    steps = [("filter (greedy answer of every prompt, four operators)",
              lambda: [task.split_by_correctness(model, tokenizer, prompts[op]) for op in task.OPERATORS],
              every_pass),
             ("IE maps (every head and MLP at op1, operator, op2, =)", lambda: AC.ie_maps(model, *inputs),
              n_sites * unit),
             ("neuron attribution (every neuron at every position)", attribution, unit_grad),
             ("activation patching of the checked neurons at =", check, None),
             ("heuristic analysis of the top neurons (K and KV maps, classification)", analysis, operator_pass),
             ("circuit faithfulness after the worked examples, whole runs", lambda: faithfulness(None),
              (len(circuits) + 2) * prefixed_pass),
             ("circuit faithfulness after the worked examples, run once (share_prefix)",
              lambda: faithfulness(prefix_format.lead_tokens(tokenizer)), (len(circuits) + 2) * prefixed_pass)]
    for name, step, floor in steps:
        elapsed, peak, _ = timed(step)
        rows.append((name, elapsed, len(state.get("sample", ())) * unit if floor is None else floor, peak))
    print(f"{args.model}: {len(every)} prompts of {every.shape[1]} tokens over four operators (operands below "
          f"{args.max_op}, results up to {args.max_single_token}); {len(discovery)} discovery prompts of "
          f"{args.operator!r}; {n_sites} IE sites; {len(state['sample'])} checked neurons; {args.top_neurons} top "
          f"neurons per layer analysed over {len(chosen)} prompts; {len(circuits)} circuits on the discovery "
          f"prompts after {len(prefix_format.lead_tokens(tokenizer))} tokens of worked examples "
          f"({prefixed.shape[1]} tokens); {torch.get_num_threads()} threads")
    print_table(rows, FLOORS, digits=2)


if __name__ == "__main__":
    main()
