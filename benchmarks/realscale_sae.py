"""Notebook 05's heaviest steps on a trained model, each beside its floor: plain passes over the same tokens.

    python benchmarks/realscale_sae.py [--model smollm2-135m-instruct] [--layer 3] [--n-stories 200]
                                       [--n-prompts 100] [--n-eval-sequences 32] [--sae-steps 200]

The data are the notebook's: generated stories packed into 128-token rows for SAE training (`n_stories`) and
evaluation (`n_eval_sequences` rows), and up to `n_prompts` quotation-closing prompts. The floor of a step is the
plain work it cannot do without (listed in `FLOORS`), timed first in the same run: forward passes of the model over
the same tokens (a pass that reads an MLP stops after its layer), and for SAE training the same number of plain
SAE steps (forward, backward, Adam) on batches of the same shape. Peak memory is the largest resident set sampled
every 10 ms during the step, the model included. Run it alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realscale_context_neuron import print_table, timed  # noqa: E402  (the same timer, sampler, table)

from helpers.studies import quote_features as Q  # noqa: E402
from helpers.techniques import sae as S  # noqa: E402
from helpers.techniques import sae_training as T  # noqa: E402
from helpers.core.components import hook_name  # noqa: E402
from helpers.models.load import load_model  # noqa: E402
from helpers.tasks.stories import closing_quote_prompts, generate_stories, pack_tokens  # noqa: E402

FLOORS = {  # step: what its floor counts
    "SAE training (activations streamed)": "the passes to the SAE's layer over the rows its steps read, and as "
                                           "many plain SAE steps on random batches of the same shape",
    "SAE metrics on the evaluation rows": "three passes over them: clean (the SAE's input rides on it), spliced, "
                                          "zero-ablated",
    "closing DLA": "one pass over the prompts",
    "splice and zero-ablation at the closing position": "two passes over the prompts",
    "feature ablations (one per candidate)": "one pass over the prompts per candidate",
    "conditions (zero, mean, top features, spliced)": "four passes over the prompts",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--n-stories", type=int, default=200)
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--n-eval-sequences", type=int, default=32)
    parser.add_argument("--sae-steps", type=int, default=200)
    parser.add_argument("--n-candidates", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    tokenizer, bos = model.tokenizer, model.cfg.default_prepend_bos
    stories = generate_stories(2 * args.n_stories, seed=100)
    sae_tokens = pack_tokens(stories[:args.n_stories], tokenizer, seq_len=128, prepend_bos=bos)
    eval_tokens = pack_tokens(stories[args.n_stories:], tokenizer, seq_len=128, prepend_bos=bos)[:args.n_eval_sequences]
    prompts = closing_quote_prompts(stories[args.n_stories:], tokenizer, closings=('."',), openers=("said",),
                                    max_prompts=args.n_prompts, prepend_bos=bos)
    hook = hook_name("neuron", args.layer)
    config = T.SAETrainConfig(expansion_factor=2, l1_coefficient=2.0, steps=args.sae_steps, batch_size=512)

    def passes(tokens, stop_at_layer=None, rows=16):
        for start in range(0, len(tokens), rows):
            model(tokens[start:start + rows], stop_at_layer=stop_at_layer)

    def sae_steps():
        sae = T.new_sae(model.cfg.d_mlp, 2 * model.cfg.d_mlp)
        optimizer = torch.optim.Adam(sae.parameters())
        x = torch.randn(config.batch_size, model.cfg.d_mlp)
        with torch.enable_grad():
            for _ in range(config.steps):
                acts = sae.encode(x)
                loss = (sae.decode(acts) - x).pow(2).sum(-1).mean() + acts.sum(-1).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    passes(prompts.tokens)  # warm-up
    rows_read = config.steps * config.batch_size / (sae_tokens.shape[1] - 1)   # sequences the steps read
    to_layer, _, _ = timed(lambda: passes(sae_tokens[:32], stop_at_layer=args.layer + 1))
    to_layer *= rows_read / 32
    sae_floor, _, _ = timed(sae_steps)
    eval_pass, _, _ = timed(lambda: passes(eval_tokens))
    prompt_pass, prompt_memory, _ = timed(lambda: passes(prompts.tokens))
    rows = [("one plain pass over the prompts (the unit)", prompt_pass, prompt_pass, prompt_memory)]
    state = {}

    def train():
        saes, _ = T.train_saes(model, sae_tokens, [hook], config, progress=False)
        state["sae"] = saes[hook]

    def closing_dla():
        Q.closing_dla(model, prompts)

    def splice():
        sae = state["sae"]
        Q.quote_losses_each(model, prompts, hook, [lambda pos: S.splice_hook(sae, positions=pos),
                                                   lambda pos: S.replace_hook(0.0, pos)])

    def ablations():
        sae = state["sae"]
        acts = S.feature_activations(model, sae, prompts.tokens, hook_name=hook, positions=prompts.last_pos)
        state["candidates"] = torch.argsort((acts > 0).float().mean(0), descending=True,
                                            stable=True)[:args.n_candidates].tolist()
        Q.ablation_losses(model, sae, hook, prompts, state["candidates"])

    def conditions():
        clean = S.answer_measures(S.logits_at(model, prompts.tokens, prompts.last_pos), prompts.answers)
        mean_post = S.collect_activations(model, eval_tokens, [hook])[hook].mean(0)
        Q.condition_measures(model, state["sae"], hook, prompts, clean, state["candidates"][:3], mean_post,
                             f"MLP{args.layer}")

    steps = [("SAE training (activations streamed)", train, to_layer + sae_floor),
             ("SAE metrics on the evaluation rows", lambda: S.sae_metrics(model, state["sae"], eval_tokens,
                                                                           hook_name=hook), 3 * eval_pass),
             ("closing DLA", closing_dla, prompt_pass),
             ("splice and zero-ablation at the closing position", splice, 2 * prompt_pass),
             ("feature ablations (one per candidate)", ablations, args.n_candidates * prompt_pass),
             ("conditions (zero, mean, top features, spliced)", conditions, 4 * prompt_pass)]
    for name, step, floor in steps:
        elapsed, peak, _ = timed(step)
        rows.append((name, elapsed, floor, peak))
    print(f"{args.model}: SAE on {hook}, {len(sae_tokens)} training rows of {sae_tokens.shape[1]} tokens "
          f"({rows_read:.0f} rows read by {config.steps} steps of {config.batch_size}), {len(eval_tokens)} evaluation "
          f"rows, {len(prompts)} prompts of {prompts.tokens.shape[1]} tokens; {torch.get_num_threads()} threads")
    print(f"floor parts: passes to layer {args.layer} over the rows read {to_layer:.1f} s, {config.steps} plain SAE "
          f"steps {sae_floor:.1f} s, one pass over the evaluation rows {eval_pass:.1f} s")
    print_table(rows, FLOORS, digits=1)


if __name__ == "__main__":
    main()
