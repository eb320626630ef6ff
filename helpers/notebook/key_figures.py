"""The README's static key figures: one per study, redrawn with seaborn from the figures a notebook run saved.

    python -m helpers.notebook.key_figures            # figs/<notebook>/... (from `make run`) -> docs/figures/<study>.png
    make key-figures

Each PNG is the study's headline plot (the one to hold beside the paper's), so a reader of the README sees what the
default run found before running anything. The source is the interactive figure the notebook saved under figs/; a
notebook that has not been run is skipped with a message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from helpers.core.paths import FIGS_DIR, REPO_ROOT
from helpers.notebook.plotting import read_saved_figure, static_figure

DOCS_FIGURES = REPO_ROOT / "docs" / "figures"

KEY_FIGURES = {  # PNG name -> the figure a default run saves (relative to figs/)
    "01_grokking_progress_measures": "01_grokking/progress_measures.html",
    "02_arithmetic_faithfulness_vs_heads": "02_arithmetic_heuristics/faithfulness_vs_heads.html",
    "03_syllogism_head_dla": "03_syllogism_circuit/head_dla.html",
    "04_german_context_neuron_histogram": "04_german_context_neuron/context_neuron_histogram.html",
    "05_sae_quote_loss_by_condition": "05_sae_quote_features/loss_by_condition.html",
}


def write_key_figures(figs: Path = FIGS_DIR, out: Path = DOCS_FIGURES) -> list[Path]:
    """Redraw every key figure found under `figs` into `out`; returns the PNGs written."""
    written = []
    for name, source in KEY_FIGURES.items():
        if not (figs / source).is_file():
            print(f"skipped {name}: {figs / source} is missing (run the notebook first)")
            continue
        written.append(static_figure(read_saved_figure(figs / source), out / name))
        print(f"{source} -> {written[-1]}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.notebook.key_figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figs", type=Path, default=FIGS_DIR, help="where the notebooks saved their figures")
    parser.add_argument("--out", type=Path, default=DOCS_FIGURES, help="folder for the PNGs")
    args = parser.parse_args(argv)
    write_key_figures(args.figs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
