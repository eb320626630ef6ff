"""Execute the notebooks headless with papermill on their defaults and print each one's wall time.

    python -m helpers.notebook.run_notebooks                          # every notebook -> runs/<name>.ipynb, figures -> figs/
    python -m helpers.notebook.run_notebooks --only 01_grokking 01b_plain_addition --set data_seed=1 --out runs/seed1
    python -m helpers.notebook.run_notebooks --inplace                # refresh the committed outputs
    python -m helpers.notebook.run_notebooks --only 04_german_context_neuron --report runs/report.jsonl   # + time and memory

    python -m helpers.notebook.run_notebooks --only 03_syllogism_circuit --sweep seed=0,1,2,3,4 --out runs/sweep-03

Each cell has an execution timeout (`--cell-timeout`, default 20 minutes), so a stalled cell fails naming itself.

`--sweep name=v1,v2,...` runs a notebook once per value (several `--sweep`s: every combination) into
`<out>/<notebook>/<name>=<value>.ipynb`, and collects each run's checked figures (the lines printed by its
`# NBVAL_CHECK_OUTPUT` cells: `PASS`/`FAIL` bars and figures such as `held-out top-1 accuracy: 0.97`) into
`<out>/<notebook>/sweep.jsonl` (one JSON object per run) and `sweep.md` (a markdown table: which bars held per run,
the share of runs passing each bar, and every checked figure per run). A run that fails is recorded with the error
and the cell that raised it, and the sweep goes on.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from helpers.notebook.checked_outputs import NUMBER
from helpers.core.paths import NOTEBOOKS_DIR, REPO_ROOT


BAR_LINE = re.compile(r"^(PASS|FAIL)\b[:\s]*(.*)$")


def parse_assignment(text: str) -> tuple[str, object]:
    """`name=value` -> (name, value), the value read as a Python literal when it is one, else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw


def parse_sweep(text: str) -> tuple[str, list]:
    """`name=v1,v2,...` -> (name, [v1, v2, ...]), each value a Python literal when the list reads as one
    (`seed=0,1,2`, `sae_layers=[0],[1]`), else the comma-separated strings (`knockout_method=zero,mean`)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier() or not raw:
        raise argparse.ArgumentTypeError(f"expected name=v1,v2,..., got {text!r}")
    try:
        values = ast.literal_eval(f"[{raw}]")
    except (ValueError, SyntaxError):
        values = raw.split(",")
    return name, values


def sweep_grid(sweeps: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the swept values, the first sweep varying slowest."""
    names = [name for name, _ in sweeps]
    return [dict(zip(names, combination)) for combination in itertools.product(*(values for _, values in sweeps))]


def run_name(parameters: dict) -> str:
    """A file name for one run of a sweep: `seed=3`, `data_seed=1_model_seed=2` (unsafe characters become `-`)."""
    text = "_".join(f"{name}={value}" for name, value in parameters.items()) or "defaults"
    return re.sub(r"[^A-Za-z0-9=._+-]+", "-", text).strip("-")


def notebooks(only: list[str] | None) -> list[Path]:
    """The notebooks to run, in order; `only` holds stems like `01_grokking` or `01b_plain_addition`, or paths of
    other `.ipynb` files."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]*_*.ipynb"))
    if only:
        stems = {path.stem: path for path in found}
        paths = {name: Path(name) for name in only if name.endswith(".ipynb") and Path(name).is_file()}
        missing = [name for name in only if name not in stems and name not in paths]
        if missing:
            raise SystemExit(f"unknown notebook(s) {missing}; have {sorted(stems)}")
        found = [paths.get(name) or stems[name] for name in only]
    return found


def display_path(path: Path) -> str:
    """`path` relative to the repository when it is inside it, for messages and records."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def drop_machine_paths(notebook: Path) -> None:
    """Rewrite papermill's absolute input/output paths as repository-relative ones (a path outside the repository
    keeps only its file name), so an executed notebook holds no path of the machine that ran it."""
    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    record = executed.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in record and Path(record[key]).is_absolute():
            path = Path(record[key]).resolve()
            record[key] = str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name)
    nbformat.write(executed, notebook)


@dataclass
class RunResult:
    """One execution of a notebook: all its parameters, wall time, the error (naming the failing cell) if it
    failed, and its checked figures and bars."""

    notebook: str
    parameters: dict
    output: str
    wall_s: float
    error: str | None = None
    figures: dict = field(default_factory=dict)
    bars: dict = field(default_factory=dict)


def describe_failure(error: BaseException, executed: Path) -> str:
    """`ename: message (In [n]: first line of the cell)` for a failed run. The cell is found by its error output in
    the executed copy, so a timeout (nbclient interrupts the cell; papermill records no index) names it too."""
    import nbformat

    cells = nbformat.read(executed, as_version=4).cells if executed.is_file() else []
    failing = next((cell for cell in cells if cell.cell_type == "code"
                    and any(output.get("output_type") == "error" for output in cell.get("outputs", []))), None)
    name = getattr(error, "ename", None) or type(error).__name__
    message = (getattr(error, "evalue", None) or str(error)).strip().splitlines()
    where = ""
    if failing is not None:
        first_line = next((line for line in failing.source.splitlines() if line.strip()), "")
        where = f" (In [{failing.execution_count}]: {first_line.strip()[:80]})"
    return f"{name}: {message[0] if message else ''}{where}"


# seconds a cell's last outputs may take to arrive after it finished: papermill stops the notebook past it, and
# nbclient's default (4 s) killed a 30-minute run on a busy 2-core machine ("CellTimeoutError ... after 4 seconds")
IOPUB_TIMEOUT_S = 120


def execute(notebook: Path, output: Path, parameters: dict, cell_timeout: int) -> RunResult:
    """Run `notebook` with papermill into `output`, the kernel started in the notebook's folder. A failure is
    caught and described (the executed copy keeps the outputs up to it), so a sweep can go on."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                                   kernel_name="python3", progress_bar=False, execution_timeout=cell_timeout,
                                   iopub_timeout=IOPUB_TIMEOUT_S)
    except Exception as failure:  # noqa: BLE001 - whatever the kernel raised ends this run, not the runner
        error = describe_failure(failure, output)
    elapsed = time.perf_counter() - start
    if output.is_file():
        drop_machine_paths(output)
    return RunResult(notebook.stem, parameters, display_path(output), round(elapsed, 1), error)


def checked_lines(executed: Path) -> list[str]:
    """The non-empty lines printed by the cells marked `# NBVAL_CHECK_OUTPUT` (what nbval compares)."""
    import nbformat

    lines = []
    for cell in nbformat.read(executed, as_version=4).cells:
        if cell.cell_type != "code" or "NBVAL_CHECK_OUTPUT" not in cell.source:
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                lines += [line.rstrip() for line in output["text"].splitlines() if line.strip()]
    return lines


def parse_checked(lines: list[str]) -> tuple[dict, dict]:
    """Split checked lines into figures and bars.

    `PASS ...`/`FAIL ...` lines are bars (`{bar: True/False}`). A `label: value` line whose label holds no number is
    the figure `label`. Any other line is keyed by its text with each number replaced by `#` (so the same line of
    two runs shares a key, e.g. `feature #: active on #% of closing prompts`; a repeated key gets ` (2)`, ...).
    A value that is one number (`0.97`, `70%`, `~1e-07`) is stored as a float, else as the text."""
    figures, bars = {}, {}
    for line in lines:
        bar = BAR_LINE.match(line)
        if bar:
            bars[bar.group(2).strip()] = bar.group(1) == "PASS"
            continue
        label, sep, value = line.partition(": ")
        if sep and not NUMBER.search(label):
            key, value = label.strip(), value.strip()
        else:
            key, value = NUMBER.sub("#", line), line
        numbers = NUMBER.findall(value)
        one_number = len(numbers) == 1 and NUMBER.sub("", value).strip(" ~%") == ""
        unique, copy = key, 1
        while unique in figures:
            copy += 1
            unique = f"{key} ({copy})"
        figures[unique] = float(numbers[0]) if one_number else value
    return figures, bars


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def sweep_markdown(results: list[RunResult], names: list[str]) -> str:
    """Markdown: one row per run (the swept parameters `names`, wall time, bars held, failing bars or the error),
    the share of runs passing each bar, and every checked figure per run."""
    bars = list(dict.fromkeys(bar for result in results for bar in result.bars))
    figures = list(dict.fromkeys(key for result in results for key in result.figures))
    lines = ["| " + " | ".join(names + ["wall (s)", "bars held", "failing bars or error"]) + " |",
             "|" + "---|" * (len(names) + 3)]
    for result in results:
        failing = [bar for bar, held in result.bars.items() if not held] + ([result.error] if result.error else [])
        lines.append("| " + " | ".join([_cell(result.parameters[name]) for name in names] + [
            f"{result.wall_s:.0f}", f"{sum(result.bars.values())}/{len(result.bars)}",
            _cell("; ".join(failing) or "—")]) + " |")
    if bars:
        lines += ["", "| bar | runs passing |", "|---|---|"]
        for bar in bars:
            passed = sum(result.bars.get(bar, False) for result in results)
            lines.append(f"| {_cell(bar)} | {passed}/{len(results)} ({passed / len(results):.0%}) |")
    if figures:
        runs = [run_name({name: result.parameters[name] for name in names}) for result in results]
        lines += ["", "| figure | " + " | ".join(runs) + " |", "|---|" + "---|" * len(results)]
        for key in figures:
            lines.append(f"| {_cell(key)} | " + " | ".join(_cell(r.figures.get(key, "")) for r in results) + " |")
    return "\n".join(lines) + "\n"


def sweep(notebook: Path, grid: list[dict], out: Path, fixed: dict, cell_timeout: int) -> list[RunResult]:
    """Run `notebook` once per parameter set of `grid` (on top of `fixed`) into `out/<notebook>/`, and write
    `sweep.jsonl` and `sweep.md` there, rewritten after every run so a long sweep can be read while it runs."""
    folder = out / notebook.stem
    names = list(grid[0]) if grid else []
    results = []
    for swept in grid:
        output = folder / f"{run_name(swept)}.ipynb"
        result = execute(notebook, output, {**fixed, **swept}, cell_timeout)
        if output.is_file():
            result.figures, result.bars = parse_checked(checked_lines(output))
        results.append(result)
        print(f"{notebook.stem} {run_name(swept)}: {result.wall_s:.0f} s, bars held {sum(result.bars.values())}/"
              f"{len(result.bars)}{'; ' + result.error if result.error else ''}", flush=True)
        (folder / "sweep.jsonl").write_text("".join(json.dumps(asdict(r), default=str) + "\n" for r in results))
        (folder / "sweep.md").write_text(sweep_markdown(results, names))
    return results


CELL_MEMORY_STARTUP = """\
# written by helpers.notebook.run_notebooks: each cell's peak resident memory, appended to $MECHINTERP_CELL_MEMORY
import json as _json, os as _os, time as _time
from pathlib import Path as _Path


def _cell_memory_reset(*_):
    global _cell_started
    _cell_started = _time.perf_counter()
    try:
        _Path("/proc/self/clear_refs").write_text("5")   # restart the kernel's peak (VmHWM) at this cell
    except OSError:
        pass


def _cell_memory_record(result):
    peak = next(int(line.split()[1]) for line in _Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    with open(_os.environ["MECHINTERP_CELL_MEMORY"], "a") as handle:
        handle.write(_json.dumps({"execution_count": result.execution_count, "peak_rss_gb": round(peak / 2 ** 20, 2),
                                  "wall_s": round(_time.perf_counter() - _cell_started, 1)}) + "\\n")


get_ipython().events.register("pre_run_cell", _cell_memory_reset)
get_ipython().events.register("post_run_cell", _cell_memory_record)
"""


@contextmanager
def cell_memory_log(folder: Path) -> Iterator[Path]:
    """While open, kernels started from this process append each cell's peak resident memory (Linux `VmHWM`, reset
    before every cell) and wall time to the returned file: an IPython startup file in a private `IPYTHONDIR`."""
    startup = folder / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-cell-memory.py").write_text(CELL_MEMORY_STARTUP)
    log = folder / "cells.jsonl"
    log.write_text("")
    saved = {name: os.environ.get(name) for name in ("IPYTHONDIR", "MECHINTERP_CELL_MEMORY")}
    os.environ.update(IPYTHONDIR=str(folder / "ipython"), MECHINTERP_CELL_MEMORY=str(log))
    try:
        yield log
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cell_report(log: Path, executed: Path) -> list[dict]:
    """Per code cell of `executed`, in order: `{cell, first_line, wall_s, peak_rss_gb}` from the `cell_memory_log`
    (cells matched by execution count; papermill's injected parameters cell included)."""
    import nbformat

    by_count = {entry["execution_count"]: entry for entry in map(json.loads, log.read_text().splitlines())}
    cells = []
    for index, cell in enumerate(nbformat.read(executed, as_version=4).cells):
        entry = by_count.get(cell.get("execution_count")) if cell.cell_type == "code" else None
        if entry is not None:
            first_line = next((line for line in cell.source.splitlines() if line.strip()), "")[:60]
            cells.append({"cell": index, "first_line": first_line, "wall_s": entry["wall_s"],
                          "peak_rss_gb": entry["peak_rss_gb"]})
    return cells


def write_report(report: Path, stem: str, parameters: dict, elapsed: float, cells: list[dict]) -> None:
    """Append `{notebook, parameters, wall_s, peak_rss_gb, cells}` to `report`: the kernel's peak resident memory
    (the largest of its cells') and each cell's (`cell_report`)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    with open(report, "a") as handle:
        handle.write(json.dumps({"notebook": stem, "parameters": parameters, "wall_s": round(elapsed, 1),
                                 "peak_rss_gb": max((cell["peak_rss_gb"] for cell in cells), default=None),
                                 "cells": cells}, default=str) + "\n")


def over_budget(cells: list[dict], wall_s: float, max_cell_gb: float | None, max_wall_s: float | None) -> list[str]:
    """What broke a budget: each cell whose peak resident memory passed `max_cell_gb`, and the notebook's wall time
    past `max_wall_s` (None: no budget)."""
    broken = [f"cell {cell['cell']} ({cell['first_line']!r}) peaked at {cell['peak_rss_gb']} GB > {max_cell_gb} GB"
              for cell in cells if max_cell_gb is not None and cell["peak_rss_gb"] > max_cell_gb]
    if max_wall_s is not None and wall_s > max_wall_s:
        broken.append(f"the notebook took {wall_s:.0f} s > {max_wall_s:.0f} s")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.notebook.run_notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="notebook stems (or .ipynb paths) to run (default: all)")
    parser.add_argument("--set", dest="parameters", type=parse_assignment, action="append", default=[],
                        help="papermill parameter name=value (repeatable)")
    parser.add_argument("--sweep", type=parse_sweep, action="append", default=[],
                        help="name=v1,v2,...: one run per value (repeatable: every combination); writes "
                             "<out>/<notebook>/sweep.jsonl and sweep.md")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs", help="folder for executed copies")
    parser.add_argument("--inplace", action="store_true", help="overwrite the notebooks with their executed version")
    parser.add_argument("--cell-timeout", type=int, default=1200, help="seconds one cell may run (default 1200)")
    parser.add_argument("--report", type=Path, default=None,
                        help="append one JSON line per notebook: parameters, wall time, peak kernel memory, and "
                             "each cell's wall time and peak memory")
    parser.add_argument("--max-cell-gb", type=float, default=None,
                        help="fail when a cell's peak resident memory passes this many GB (names the cell)")
    parser.add_argument("--max-wall-s", type=float, default=None,
                        help="fail when a notebook takes longer than this many seconds")
    args = parser.parse_args(argv)

    parameters = dict(args.parameters)
    if args.inplace and (parameters or args.sweep):
        raise SystemExit("--inplace runs the committed defaults; drop --set and --sweep")
    if args.sweep:
        for notebook in notebooks(args.only):
            results = sweep(notebook, sweep_grid(args.sweep), args.out, parameters, args.cell_timeout)
            failed = sum(result.error is not None for result in results)
            print(f"{notebook.stem}: {len(results)} runs, {failed} failed -> "
                  f"{display_path(args.out / notebook.stem / 'sweep.md')}", flush=True)
        return 0
    timings = []
    for notebook in notebooks(args.only):
        output = notebook if args.inplace else args.out / notebook.name
        cells = []
        if args.report is None and args.max_cell_gb is None:
            result = execute(notebook, output, parameters, args.cell_timeout)
        else:
            with tempfile.TemporaryDirectory() as folder, cell_memory_log(Path(folder)) as log:
                result = execute(notebook, output, parameters, args.cell_timeout)
                cells = cell_report(log, output) if output.is_file() else []
            if args.report is not None:
                write_report(args.report, notebook.stem, parameters, result.wall_s, cells)
        if result.error is not None:
            raise SystemExit(f"{notebook.stem} failed after {result.wall_s:.0f} s: {result.error}")
        broken = over_budget(cells, result.wall_s, args.max_cell_gb, args.max_wall_s)
        if broken:
            raise SystemExit(f"{notebook.stem} is over its budget: " + "; ".join(broken))
        timings.append((notebook.stem, result.wall_s))
        print(f"{notebook.stem}: {result.wall_s:.0f} s -> {result.output}", flush=True)
    print(f"total: {sum(t for _, t in timings):.0f} s for {len(timings)} notebook(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
