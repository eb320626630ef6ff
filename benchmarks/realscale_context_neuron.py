"""Notebook 04's heaviest steps on a trained model, each beside its floor: plain forward passes over the same tokens.

    python benchmarks/realscale_context_neuron.py [--model smollm2-135m-instruct] [--n-docs 60] [--max-tokens 96]
                                                  [--batch-size 20]

Real German and English paragraphs (`helpers.sources.realdata`, fetched by `make fixtures`) are tokenised as the notebook
tokenises them. The floor of a step is the number of forward passes over both languages' documents it cannot do
without (listed in `FLOORS`), times the wall time of one plain `model(tokens)` pass over them, timed first in the
same run. Ratio = ours / floor. Peak memory is the largest resident set size sampled (every 10 ms) during the step:
the whole process's, the model and the documents included. Every figure comes from the machine it runs on; run it
alone (the 2-core CPU is the reference).
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from helpers.studies import context_neuron, ngrams
from helpers.techniques import neurons
from helpers.core.components import Component
from helpers.models.load import load_model
from helpers.tasks import bilingual

FLOORS = {  # step: (forward passes over both languages' documents it needs, what they are)
    "neuron scan": (1.0, "one pass"),
    "context neuron F1 interval": (0.0, "none: the scan's pass could keep the one neuron's values (the notebook plots "
                                        "the same values, so this pass serves both)"),
    "pinning and backups": (7.5, "English means (1/2), clean, and six pinned runs: the context neuron, each of 3 "
                                 "other neurons, the 3 together, all 4 (both languages)"),
    "later components (direct patching)": (1.0, "clean and pinned German, + one unembedding of the German tokens per "
                                                "component, timed"),
    "DLA difference": (1.0, "clean and pinned German"),
    "shift statistics (every later neuron, context neuron on - off)": (2.5, "German means (1/2), then pinned on and "
                                                                          "pinned off, both languages"),
}


class PeakMemory:
    """The largest resident set size (bytes) seen while the block runs, sampled from /proc every 10 ms."""

    def __enter__(self):
        self.peak, self._running = _rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(function):
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak, result


def print_table(rows, floors: dict[str, str], digits: int = 1) -> None:
    """The benchmark's table (step, ours, floor, ratio, peak memory) from `(name, ours s, floor s, peak bytes)` rows,
    then what each step's floor counts."""
    print("| step | ours (s) | floor (s) | ratio | peak memory (GB) |\n|---|---:|---:|---:|---:|")
    for name, ours, floor_s, peak in rows:
        print(f"| {name} | {ours:.{digits}f} | {floor_s:.{digits}f} | {ours / floor_s:.{digits}f} | "
              f"{peak / 2 ** 30:.2f} |")
    for name, what in floors.items():
        print(f"floor of {name}: {what}")


def documents(model, n_docs: int, max_tokens: int, batch_size: int):
    bos = model.cfg.default_prepend_bos
    return [context_neuron.Documents.from_tokens(
        *bilingual.tokenize_documents(model.tokenizer, bilingual.load_text_documents(name, n_documents=n_docs,
                                                                                      language=language),
                                      max_tokens, prepend_bos=bos), 10, batch_size)
        for name, language in (("debian-reference-de", "de"), ("debian-reference-en", "en"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-docs", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    german, english = documents(model, args.n_docs, args.max_tokens, args.batch_size)

    def plain_pass():
        for docs in (german, english):
            for tokens, _ in docs.batches():
                model(tokens)

    def unembed_german():
        for tokens, _ in german.batches():
            model.unembed(model.ln_final(torch.zeros(*tokens.shape, model.cfg.d_model)))

    plain_pass()  # warm-up
    floor, floor_memory, _ = timed(plain_pass)
    unembedding, _, _ = timed(unembed_german)
    rows = [("one plain pass (the unit)", floor, floor, floor_memory)]
    state = {}

    def scan():
        state["scan"] = neurons.scan_neurons(model, context_neuron.labelled_batches(german, english), bins=1024)
        layer, neuron, _ = state["scan"].ranking(4)[0]
        state["context"] = (layer, neuron)
        state["others"] = [(l, n) for l, n, _ in state["scan"].ranking(4)[1:]]

    def f1_interval():
        scan, (layer, neuron) = state["scan"], state["context"]
        row = scan.layers.index(layer)
        activations = tuple(ngrams.neuron_activation(model, docs.tokens, layer, neuron, args.batch_size)
                            for docs in (german, english))
        context_neuron.f1_interval(german, english, activations, float(scan.threshold[row, neuron]),
                                   int(scan.direction[row, neuron]))

    def pinning_and_backups():
        means = context_neuron.pin_means(model, english, [state["context"], *state["others"]])
        state["hooks"] = context_neuron.pin_hooks(means, [state["context"]])
        pins = context_neuron.backup_pins(state["context"], state["others"])
        losses = context_neuron.variant_losses(model, german, english, context_neuron.pin_variants(means, pins))
        losses.intervals((state["context"],))
        context_neuron.backup_test(losses, state["others"], state["context"])

    def later_components():
        layer = state["context"][0]
        later = [Component.mlp(layer)] + [Component(kind, l) for l in range(layer + 1, model.cfg.n_layers)
                                          for kind in ("attn", "mlp")]
        state["n_later"] = len(later)
        context_neuron.direct_patching(model, german, state["hooks"], later)

    def dla():
        context_neuron.dla_difference(model, german, state["hooks"])

    def shift_statistics():
        layer = state["context"][0]
        on_hooks = context_neuron.pin_hooks(context_neuron.pin_means(model, german, [state["context"]]),
                                            [state["context"]])
        neurons.activation_difference_stats(model, context_neuron.both_languages(german, english),
                                            list(range(layer + 1, model.cfg.n_layers)), on_hooks, state["hooks"],
                                            hook="pre")

    steps = {"neuron scan": scan, "context neuron F1 interval": f1_interval,
             "pinning and backups": pinning_and_backups, "later components (direct patching)": later_components,
             "DLA difference": dla, "shift statistics (every later neuron, context neuron on - off)": shift_statistics}
    for name, step in steps.items():
        elapsed, peak, _ = timed(step)
        extra = unembedding * state["n_later"] if name == "later components (direct patching)" else 0.0
        rows.append((name, elapsed, FLOORS[name][0] * floor + extra, peak))
    tokens = int(german.present.sum() + english.present.sum())
    print(f"{args.model}: {len(german)} German + {len(english)} English documents, {args.max_tokens} tokens, "
          f"{tokens} real tokens; batch {args.batch_size}; {torch.get_num_threads()} threads; "
          f"context neuron {Component.neuron(*state['context']).label}")
    print(f"unembedding the German tokens once: {unembedding:.1f} s")
    print(f"| step | ours (s) | floor (s) | ratio | peak memory (GB) |\n|---|---:|---:|---:|---:|")
    for name, ours, floor_s, peak in rows:
        ratio = f"{ours / floor_s:.1f}" if floor_s else "-"
        print(f"| {name} | {ours:.1f} | {floor_s:.1f} | {ratio} | {peak / 2 ** 30:.2f} |")
    for name, (passes, what) in FLOORS.items():
        print(f"floor of {name}: {passes:g} passes ({what})")


if __name__ == "__main__":
    main()
