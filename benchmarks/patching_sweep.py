"""Benchmark: the project's patching engine (`helpers.techniques.patching`) against TransformerLens's loop
(`transformer_lens.patching`) on the same model, prompts and metric, in one run.

Three sweeps, each timed for TransformerLens and for ours twice, interleaved (TL, ours declared, ours plain, TL, ...)
so that a machine shared with other jobs slows them alike, best of `--repeats`:
- resid by layer x position: `act_patch_resid_pre` vs `get_act_patch_resid_pre`;
- heads by position:         `act_patch_heads(..., "z", by_position=True)` vs `get_act_patch_attn_head_out_by_pos`;
- heads all positions:       `act_patch_heads(..., "z")` vs `get_act_patch_attn_head_out_all_pos`.
The metric is the logit difference of the two answer tokens at the last position, given two ways: *declared*, a
`PositionalMetric` that says it reads one position and two tokens; *plain*, `metric(logits) -> scalar` as a
TransformerLens user writes it (the engine learns what it reads, `patching.learn_reads`). TransformerLens gets the
plain one. For each: the times (CPU seconds on the CPU, wall seconds on a GPU), the ratios, the largest difference
from TransformerLens's result (in logits), and the floor of a loop: N plain forward passes of the batch (N = the
sweep's number of patches).

Two batch shapes: the syllogisms of notebook 03 (`--n-prompts` prompts of their own length) and random tokens
(`--random-shapes`, PROMPTSxTOKENS: a clean batch, the corrupted one with a third of its positions redrawn).
Then attribution patching of every head by position (`attribution_patch_heads`) with the declared metric against the
plain one.

    python benchmarks/patching_sweep.py                                   # toy-syllogism and Pythia-70m-sized
    python benchmarks/patching_sweep.py --models pythia-70m --n-prompts 4 --random-shapes 8x12
    python benchmarks/patching_sweep.py --models pythia-410m --device cuda --n-prompts 104

`pythia-70m` and `pythia-410m` are the real-size checkpoints of `helpers.sources.realsize` (real configs and tokenizer,
random weights; built once with `python -m helpers.sources.realsize build NAME`); any other name goes to `load_model`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: TransformerLens's sweeps draw a bar each

import torch  # noqa: E402

SWEEPS = ("resid by layer x pos", "heads by pos", "heads all pos")


def _load(name: str, device: str):
    from helpers.sources import realsize
    from helpers.models.load import load_model

    if name in realsize.REAL_CONFIGS:
        return load_model(str(realsize.build_checkpoint(name)), device=device)
    return load_model(name, device=device)


def _sweeps(model, tokens, cache, metrics):
    """`{sweep: (ours(metric), theirs, number of patches)}`: the calls of each sweep."""
    import transformer_lens.patching as tl_patching

    from helpers.techniques import patching

    cfg, n_pos, plain = model.cfg, tokens.shape[1], metrics["plain"]
    return {
        SWEEPS[0]: (lambda m: patching.act_patch_resid_pre(model, tokens, cache, m),
                    lambda: tl_patching.get_act_patch_resid_pre(model, tokens, cache, plain), cfg.n_layers * n_pos),
        SWEEPS[1]: (lambda m: patching.act_patch_heads(model, tokens, cache, m, "z", by_position=True),
                    lambda: tl_patching.get_act_patch_attn_head_out_by_pos(model, tokens, cache, plain),
                    cfg.n_layers * n_pos * cfg.n_heads),
        SWEEPS[2]: (lambda m: patching.act_patch_heads(model, tokens, cache, m, "z"),
                    lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, tokens, cache, plain),
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


def _syllogism_batch(model, n_prompts: int, seed: int):
    """Clean and corrupted tokens `[n, pos]` and answers `[n, 2]` of notebook 03's syllogisms."""
    from helpers.tasks import syllogisms

    items = syllogisms.make_syllogisms(n=max(400, 4 * n_prompts), seed=seed)
    data = syllogisms.sample_pairs(syllogisms.build_dataset(model.tokenizer, items), n_prompts, seed)
    return data.clean_tokens, data.corrupted_tokens, data.answers


def _random_batch(model, shape: str, seed: int):
    """Random clean tokens of `shape` ("PROMPTSxTOKENS"), the corrupted batch with a third of the positions (after
    the first) redrawn, and two random answer tokens per prompt."""
    n_prompts, n_tokens = (int(n) for n in shape.split("x"))
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (n_prompts, n_tokens), generator=generator)
    corrupted = clean.clone()
    redrawn = torch.randperm(n_tokens - 1, generator=generator)[: max(1, n_tokens // 3)] + 1
    corrupted[:, redrawn] = torch.randint(0, model.cfg.d_vocab, (n_prompts, len(redrawn)), generator=generator)
    return clean, corrupted, torch.randint(0, model.cfg.d_vocab, (n_prompts, 2), generator=generator)


def _metrics(answers):
    """The logit difference at the last position, declared (a `PositionalMetric`) and plain."""
    from helpers.techniques import patching
    from helpers.techniques.dla import logit_diff

    def plain(logits):
        return logit_diff(logits, answers)

    return {"declared": patching.normalised_logit_diff(answers, 1.0, 0.0), "plain": plain}


def benchmark(name: str, device: str, n_prompts: int, random_shapes: list[str], repeats: int, seed: int,
              sweeps: list[str]) -> list[dict]:
    """Rows of the table for one model: per batch shape, per sweep."""
    model = _load(name, device)
    print(f"{name} on {device}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}"
          f", vocab {model.cfg.d_vocab}", flush=True)
    batches = {"syllogisms": _syllogism_batch(model, n_prompts, seed)} if n_prompts else {}
    batches.update({f"random {shape}": _random_batch(model, shape, seed) for shape in random_shapes})
    rows = []
    for label, (clean_tokens, corrupted_tokens, answers) in batches.items():
        clean_tokens, corrupted_tokens, answers = (t.to(device) for t in (clean_tokens, corrupted_tokens, answers))
        _, clean_cache = model.run_with_cache(clean_tokens)
        metrics = _metrics(answers)
        forward = min(_timed(lambda: model(corrupted_tokens), device)[1] for _ in range(3))
        print(f" {label}: {corrupted_tokens.shape[0]} prompts x {corrupted_tokens.shape[1]} tokens", flush=True)
        for sweep, (ours, theirs, n_patches) in _sweeps(model, corrupted_tokens, clean_cache, metrics).items():
            if sweep not in sweeps:
                continue
            calls = {"TL": theirs, **{which: (lambda m=m: ours(m)) for which, m in metrics.items()}}
            best, results = {which: float("inf") for which in calls}, {}
            for _ in range(repeats):
                for which, call in calls.items():
                    results[which], seconds = _timed(call, device)
                    best[which] = min(best[which], seconds)
            diffs = {which: (results[which].float().cpu() - results["TL"].float().cpu()).abs().max().item()
                     for which in metrics}
            rows.append(dict(model=name, batch=label, sweep=sweep, patches=n_patches, times=best, diffs=diffs,
                             floor=n_patches * forward))
            _print_row(rows[-1])
        _attribution_row(model, clean_tokens, corrupted_tokens, metrics, device, repeats)
    return rows


def _attribution_row(model, clean_tokens, corrupted_tokens, metrics, device: str, repeats: int) -> None:
    """Attribution patching with the metric's declared reads against the plain metric (every logit)."""
    from helpers.techniques import patching

    calls = {which: (lambda m=m: patching.attribution_patch_heads(model, clean_tokens, corrupted_tokens, m,
                                                                  by_position=True))
             for which, m in metrics.items()}
    best = {which: float("inf") for which in calls}
    results = {}
    for _ in range(repeats):
        for which, call in calls.items():
            results[which], seconds = _timed(call, device)
            best[which] = min(best[which], seconds)
    diff = (results["declared"] - results["plain"]).abs().max().item()
    print(f"   attribution heads by pos  declared {best['declared']:8.2f} s   plain {best['plain']:8.2f} s"
          f"   {best['plain'] / best['declared']:5.1f}x   max |diff| {diff:.1e}", flush=True)


def _print_row(row: dict) -> None:
    t, d = row["times"], row["diffs"]
    print(f"   {row['sweep']:22s} {row['patches']:6d} patches   TL {t['TL']:8.2f} s   declared {t['declared']:7.2f} s"
          f" ({t['TL'] / t['declared']:4.1f}x)   plain {t['plain']:7.2f} s ({t['TL'] / t['plain']:4.1f}x)   "
          f"{row['patches']} forwards {row['floor']:7.2f} s   max |diff| {d['declared']:.1e} / {d['plain']:.1e}",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-syllogism", "pythia-70m"])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-prompts", type=int, default=16, help="syllogism prompts (0: none)")
    parser.add_argument("--random-shapes", nargs="*", default=["8x12"], help="random-token batches, PROMPTSxTOKENS")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"{args.threads} CPU thread(s); best of {args.repeats}, TransformerLens and ours interleaved")
    for name in args.models:
        benchmark(name, args.device, args.n_prompts, args.random_shapes, args.repeats, args.seed, args.sweeps)


if __name__ == "__main__":
    main()
