"""Benchmark: the head-by-position activation-patching sweep (every head's output at every position) with the
project's batched engine (`helpers.patching.act_patch_heads(..., by_position=True)`) and with TransformerLens's
loop (`transformer_lens.patching.get_act_patch_attn_head_out_by_pos`), on the same model and prompts in one run.

    python benchmarks/patching_sweep.py                       # toy-syllogism on CPU, 32 prompts
    python benchmarks/patching_sweep.py --model EleutherAI/pythia-410m --device cuda --n-prompts 104

Prints both wall times, their ratio (goal >= 5x) and the largest difference between the two results.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-syllogism")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rows", type=int, default=None, help="rows per forward pass of the batched engine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model.startswith("toy-"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import transformer_lens.patching as tl_patching

    from helpers import patching
    from helpers.attribution import logit_diff
    from helpers.models import load_model
    from helpers.tasks import syllogisms

    model = load_model(args.model, device=args.device)
    items = syllogisms.make_syllogisms(n=4 * args.n_prompts, seed=args.seed)
    data = syllogisms.sample_pairs(syllogisms.build_dataset(model.tokenizer, items), args.n_prompts, args.seed)
    data = data.to(model.cfg.device)
    clean_logits, clean_cache = model.run_with_cache(data.clean_tokens)
    clean = logit_diff(clean_logits, data.answers).item()
    corrupted = logit_diff(model(data.corrupted_tokens), data.answers).item()
    metric = patching.normalised_logit_diff(data.answers, clean, corrupted)
    n_patches = model.cfg.n_layers * data.clean_tokens.shape[1] * model.cfg.n_heads
    print(f"model {args.model} on {args.device}: {len(data)} prompts x {data.clean_tokens.shape[1]} tokens, "
          f"{n_patches} patches (layers x positions x heads), {args.threads} CPU thread(s)")

    def timed(fn):
        if str(model.cfg.device).startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if str(model.cfg.device).startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    ours, t_ours = timed(lambda: patching.act_patch_heads(model, data.corrupted_tokens, clean_cache, metric, "z",
                                                          by_position=True, max_rows=args.max_rows))
    theirs, t_theirs = timed(lambda: tl_patching.get_act_patch_attn_head_out_by_pos(
        model, data.corrupted_tokens, clean_cache, metric))
    diff = (ours - theirs.float().cpu()).abs().max().item()
    print(f"helpers.patching (batched):        {t_ours:8.2f} s")
    print(f"transformer_lens.patching (loop):  {t_theirs:8.2f} s")
    print(f"speed-up: {t_theirs / t_ours:.1f}x   max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
