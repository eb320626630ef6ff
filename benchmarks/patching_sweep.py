"""Benchmark: the project's patching engine (`helpers.patching`) against TransformerLens's loop
(`transformer_lens.patching`) on the same model, prompts and metric, in one run.

Three sweeps, each timed for both, interleaved (ours, theirs, ours, theirs, ...) so that a machine shared with other
jobs slows both alike, best of `--repeats`:
- resid by layer x position: `act_patch_resid_pre` vs `get_act_patch_resid_pre`;
- heads by position:         `act_patch_heads(..., "z", by_position=True)` vs `get_act_patch_attn_head_out_by_pos`;
- heads all positions:       `act_patch_heads(..., "z")` vs `get_act_patch_attn_head_out_all_pos`.
For each: both times (CPU seconds on the CPU, wall seconds on a GPU), the ratio, the largest difference between the
two results, and the floor of a loop: N plain forward passes of the batch (N = the sweep's number of patches).
Then attribution patching of every head by position (`attribution_patch_heads`), whose metric declares the one
position and the two tokens it reads, against the same call given that metric as a plain function (every logit).

    python benchmarks/patching_sweep.py                                   # toy-syllogism and Pythia-70m-sized
    python benchmarks/patching_sweep.py --models pythia-410m --device cuda --n-prompts 104

`pythia-70m` and `pythia-410m` are the real-size checkpoints of `helpers.realsize` (real configs and tokenizer,
random weights; built once with `python -m helpers.realsize build NAME`); any other name goes to `load_model`.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

SWEEPS = ("resid by layer x pos", "heads by pos", "heads all pos")


def _load(name: str, device: str):
    from helpers import realsize
    from helpers.models import load_model

    if name in realsize.REAL_CONFIGS:
        return load_model(str(realsize.build_checkpoint(name)), device=device)
    return load_model(name, device=device)


def _sweeps(model, tokens, cache, metric):
    """`{sweep: (ours, theirs, number of patches)}`: the two calls of each sweep."""
    import transformer_lens.patching as tl_patching

    from helpers import patching

    cfg, n_pos = model.cfg, tokens.shape[1]
    return {
        SWEEPS[0]: (lambda: patching.act_patch_resid_pre(model, tokens, cache, metric),
                    lambda: tl_patching.get_act_patch_resid_pre(model, tokens, cache, metric), cfg.n_layers * n_pos),
        SWEEPS[1]: (lambda: patching.act_patch_heads(model, tokens, cache, metric, "z", by_position=True),
                    lambda: tl_patching.get_act_patch_attn_head_out_by_pos(model, tokens, cache, metric),
                    cfg.n_layers * n_pos * cfg.n_heads),
        SWEEPS[2]: (lambda: patching.act_patch_heads(model, tokens, cache, metric, "z"),
                    lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, tokens, cache, metric),
                    cfg.n_layers * cfg.n_heads),
    }


def _timed(fn, device: str):
    """`(fn(), seconds)`: CPU seconds of this process on the CPU (what the work costs, whatever else runs on a
    shared machine), wall seconds on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - start
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def benchmark(name: str, device: str, n_prompts: int, repeats: int, seed: int, sweeps: list[str]) -> list[dict]:
    """Rows of the table for one model."""
    from helpers import patching
    from helpers.attribution import logit_diff
    from helpers.tasks import syllogisms

    model = _load(name, device)
    items = syllogisms.make_syllogisms(n=max(400, 4 * n_prompts), seed=seed)
    data = syllogisms.sample_pairs(syllogisms.build_dataset(model.tokenizer, items), n_prompts, seed).to(device)
    clean_logits, clean_cache = model.run_with_cache(data.clean_tokens)
    clean = logit_diff(clean_logits, data.answers).item()
    corrupted = logit_diff(model(data.corrupted_tokens), data.answers).item()
    metric = patching.normalised_logit_diff(data.answers, clean, corrupted)
    print(f"{name} on {device}: {len(data)} prompts x {data.clean_tokens.shape[1]} tokens, "
          f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}; fast path: {patching.fast_path(model)}", flush=True)
    forward = min(_timed(lambda: model(data.corrupted_tokens), device)[1] for _ in range(3))
    rows = []
    for sweep, (ours, theirs, n_patches) in _sweeps(model, data.corrupted_tokens, clean_cache, metric).items():
        if sweep not in sweeps:
            continue
        best = {"ours": float("inf"), "theirs": float("inf")}
        for _ in range(repeats):
            got, seconds = _timed(ours, device)
            best["ours"] = min(best["ours"], seconds)
            expected, seconds = _timed(theirs, device)
            best["theirs"] = min(best["theirs"], seconds)
        diff = (got.float().cpu() - expected.float().cpu()).abs().max().item()
        rows.append(dict(model=name, sweep=sweep, patches=n_patches, ours=best["ours"], theirs=best["theirs"],
                         floor=n_patches * forward, diff=diff))
        _print_row(rows[-1])
    _attribution_row(model, data, metric, device, repeats)
    return rows


def _attribution_row(model, data, metric, device: str, repeats: int) -> None:
    """Attribution patching with the metric's declared reads against the same metric as a plain function."""
    from helpers import patching

    def plain(logits):
        return metric(logits)

    calls = {which: (lambda m=m: patching.attribution_patch_heads(model, data.clean_tokens, data.corrupted_tokens, m,
                                                                  by_position=True))
             for which, m in (("declared", metric), ("plain", plain))}
    best = {which: float("inf") for which in calls}
    results = {}
    for _ in range(repeats):
        for which, call in calls.items():
            results[which], seconds = _timed(call, device)
            best[which] = min(best[which], seconds)
    diff = (results["declared"] - results["plain"]).abs().max().item()
    print(f"  attribution heads by pos   declared reads {best['declared']:8.2f} s   every logit {best['plain']:8.2f} s"
          f"   {best['plain'] / best['declared']:5.1f}x   max |diff| {diff:.1e}", flush=True)


def _print_row(row: dict) -> None:
    print(f"  {row['sweep']:22s} {row['patches']:6d} patches   ours {row['ours']:8.2f} s   TL {row['theirs']:8.2f} s"
          f"   {row['theirs'] / row['ours']:5.1f}x   {row['patches']} forwards {row['floor']:8.2f} s"
          f"   max |diff| {row['diff']:.1e}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-syllogism", "pythia-70m"])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"{args.threads} CPU thread(s); best of {args.repeats}, ours and TransformerLens interleaved")
    for name in args.models:
        benchmark(name, args.device, args.n_prompts, args.repeats, args.seed, args.sweeps)


if __name__ == "__main__":
    main()
