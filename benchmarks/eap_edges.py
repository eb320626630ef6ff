"""Edge attribution patching against exact edge patching, on toy-syllogism and a Pythia-70m-sized model.

    python benchmarks/eap_edges.py [--repeats 3] [--ig-steps 5] [--exact-sample 512] [--models toy,pythia]

For each model: the graph's size; the wall time of EAP (1 forward + 1 backward for every edge at once) and EAP-IG
(`--ig-steps` of them), as edges scored per second; exact edge patching of the same edges (one patched forward pass
per edge, batched 16 edges a pass) timed on `--exact-sample` edges and extrapolated to the whole graph; the ratio;
and how well each estimate matches the exact effects (Spearman rank correlation, mean absolute error) on the edges
patched exactly. Times are best of `--repeats` (exact patching: one run), on whatever threads torch is given.

The Pythia-70m-sized checkpoint has the real config at real size with random weights
(`python -m helpers.sources.realsize build pythia-70m`); its prompts are random tokens, the corrupted ones with four
positions resampled, and its metric the logit difference of two fixed tokens -- a timing, not a finding.
"""
from __future__ import annotations

import argparse
import time

import torch

from helpers.techniques import eap
from helpers.models.load import load_model

N_PROMPTS, SEQ_LEN = 16, 20


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def toy_task():
    from helpers.techniques import patching
    from helpers.tasks import syllogisms

    model = load_model("toy-syllogism", device="cpu")
    pool = syllogisms.build_dataset(model.tokenizer, syllogisms.make_syllogisms(n=2000, seed=0))
    filtered, _ = syllogisms.filter_by_logit_diff(model, pool, 2.0)
    data = syllogisms.sample_pairs(filtered, N_PROMPTS, seed=0)
    with torch.no_grad():
        clean_ld = float(logit_difference(model(data.clean_tokens), data.answers))
        corrupted_ld = float(logit_difference(model(data.corrupted_tokens), data.answers))
    metric = patching.normalised_logit_diff(data.answers, clean_ld, corrupted_ld)
    return model, data.clean_tokens, data.corrupted_tokens, metric


def logit_difference(logits, answers):
    last = logits[:, -1]
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


def pythia_task():
    from helpers.sources.realsize import build_checkpoint

    model = load_model(build_checkpoint("pythia-70m"), device="cpu")
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(1000, 20000, (N_PROMPTS, SEQ_LEN), generator=generator)
    corrupted = clean.clone()
    positions = torch.randint(1, SEQ_LEN, (4,), generator=generator)
    corrupted[:, positions] = torch.randint(1000, 20000, (N_PROMPTS, 4), generator=generator)
    answers = torch.tensor([[1234, 5678]]).repeat(N_PROMPTS, 1)
    return model, clean, corrupted, lambda logits: logit_difference(logits, answers)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: x.argsort().argsort().double()  # noqa: E731
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run(name: str, task, repeats: int, ig_steps: int, exact_sample: int) -> None:
    model, clean, corrupted, metric = task()
    graph = eap.build_graph(model)
    eap_time, eap_scores = best_time(lambda: eap.edge_scores(model, clean, corrupted, metric, graph=graph), repeats)
    ig_time, ig_scores = best_time(lambda: eap.edge_scores(model, clean, corrupted, metric, graph=graph,
                                                           ig_steps=ig_steps), repeats)
    edges = graph.edges.nonzero()
    sample = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:exact_sample]]
    start = time.perf_counter()
    exact = eap.exact_edge_effects(model, clean, corrupted, metric, graph, sample.tolist())
    exact_time = (time.perf_counter() - start) * graph.n_edges / len(sample)
    s, r = sample[:, 0], sample[:, 1]
    print(f"\n{name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
          f"{len(clean)} prompts x {clean.shape[1]} tokens; graph {len(graph.senders)} senders, "
          f"{len(graph.receivers)} receivers, {graph.n_edges} edges")
    print(f"{'method':<22}{'whole graph (s)':>16}{'edges / s':>12}{'vs exact':>10}{'Spearman':>10}{'MAE':>10}")
    for label, seconds, scores in (("EAP", eap_time, eap_scores), (f"EAP-IG ({ig_steps} steps)", ig_time, ig_scores)):
        print(f"{label:<22}{seconds:>16.2f}{graph.n_edges / seconds:>12.0f}{exact_time / seconds:>9.0f}x"
              f"{spearman(scores[s, r], exact[s, r]):>10.3f}{(scores[s, r] - exact[s, r]).abs().mean():>10.2e}")
    print(f"{'exact edge patching':<22}{exact_time:>16.2f}{graph.n_edges / exact_time:>12.0f}{'1x':>10}"
          f"   (timed on {len(sample)} edges, extrapolated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--exact-sample", type=int, default=512)
    parser.add_argument("--models", default="toy,pythia")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    tasks = {"toy": ("toy-syllogism", toy_task), "pythia": ("Pythia-70m-sized (random weights)", pythia_task)}
    for key in args.models.split(","):
        name, task = tasks[key]
        run(name, task, args.repeats, args.ig_steps, args.exact_sample)


if __name__ == "__main__":
    main()
