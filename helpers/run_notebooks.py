"""Execute the notebooks headless with papermill on their defaults and print each one's wall time.

    python -m helpers.run_notebooks                          # every notebook -> runs/<name>.ipynb, figures -> figs/
    python -m helpers.run_notebooks --only 01_grokking --set task=addition --out runs/addition
    python -m helpers.run_notebooks --inplace                # refresh the committed outputs
    python -m helpers.run_notebooks --only 04_german_context_neuron --report runs/report.jsonl   # + time and memory

Each cell has an execution timeout (`--cell-timeout`, default 20 minutes), so a stalled cell fails naming itself.
"""
from __future__ import annotations

import argparse
import ast
import json
import resource
import sys
import time
from pathlib import Path

from helpers.paths import NOTEBOOKS_DIR, REPO_ROOT


def parse_assignment(text: str) -> tuple[str, object]:
    """`name=value` -> (name, value), the value read as a Python literal when it is one, else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw


def notebooks(only: list[str] | None) -> list[Path]:
    """The notebooks to run, in order; `only` holds stems like `01_grokking`."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        stems = {path.stem: path for path in found}
        missing = [name for name in only if name not in stems]
        if missing:
            raise SystemExit(f"unknown notebook(s) {missing}; have {sorted(stems)}")
        found = [stems[name] for name in only]
    return found


def drop_machine_paths(notebook: Path) -> None:
    """Rewrite papermill's absolute input/output paths as repository-relative ones, so a committed notebook holds
    no path of the machine that ran it."""
    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    record = executed.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in record and Path(record[key]).is_relative_to(REPO_ROOT):
            record[key] = str(Path(record[key]).relative_to(REPO_ROOT))
    nbformat.write(executed, notebook)


def write_report(report: Path, stem: str, parameters: dict, elapsed: float) -> None:
    """Append `{notebook, parameters, wall_s, peak_rss_gb}` to `report`. The peak is the largest resident memory of
    any kernel this process has run so far (exact for one notebook per process)."""
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    report.parent.mkdir(parents=True, exist_ok=True)
    with open(report, "a") as handle:
        handle.write(json.dumps({"notebook": stem, "parameters": parameters, "wall_s": round(elapsed, 1),
                                 "peak_rss_gb": round(peak_kb / 2 ** 20, 2)}, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.run_notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="notebook stems to run (default: all)")
    parser.add_argument("--set", dest="parameters", type=parse_assignment, action="append", default=[],
                        help="papermill parameter name=value (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs", help="folder for executed copies")
    parser.add_argument("--inplace", action="store_true", help="overwrite the notebooks with their executed version")
    parser.add_argument("--cell-timeout", type=int, default=1200, help="seconds one cell may run (default 1200)")
    parser.add_argument("--report", type=Path, default=None,
                        help="append one JSON line per notebook: parameters, wall time, peak kernel memory")
    args = parser.parse_args(argv)

    import papermill

    parameters = dict(args.parameters)
    if args.inplace and parameters:
        raise SystemExit("--inplace runs the committed defaults; drop --set")
    timings = []
    for notebook in notebooks(args.only):
        output = notebook if args.inplace else args.out / notebook.name
        output.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(NOTEBOOKS_DIR),
                                   kernel_name="python3", progress_bar=False, execution_timeout=args.cell_timeout)
        elapsed = time.perf_counter() - start
        timings.append((notebook.stem, elapsed))
        if args.inplace:
            drop_machine_paths(output)
        if args.report is not None:
            write_report(args.report, notebook.stem, parameters, elapsed)
        print(f"{notebook.stem}: {elapsed:.0f} s -> {output.relative_to(REPO_ROOT) if output.is_relative_to(REPO_ROOT) else output}",
              flush=True)
    print(f"total: {sum(t for _, t in timings):.0f} s for {len(timings)} notebook(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
