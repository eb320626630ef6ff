"""The notebook runner on planted notebooks (never a real one): sweeps run one notebook per value and table each
run's checked figures and bars, a failing run is recorded naming its cell, a stalled cell times out naming itself,
and executed copies keep no machine path."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers.notebook import colab, params, run_notebooks
from helpers.core.paths import NOTEBOOKS_DIR, REPO_ROOT
from helpers.notebook.run_notebooks import parse_checked, parse_sweep, sweep_grid

PLANTED = [  # seed 3 fails after its checked cell; the bar holds from seed 2 on
    ("parameters", "seed = 0\nthreshold = 0.5"),
    (None, "score = seed / 4"),
    (None, '# NBVAL_CHECK_OUTPUT\nprint(f"score: {score}")\nprint(f"run {seed}: {seed ** 2} squared")\n'
           'print(("PASS" if score >= threshold else "FAIL") + " score >= threshold")'),
    (None, 'assert seed != 3, "planted failure"'),
]


def planted_notebook(folder, cells=PLANTED):
    """A notebook with the Colab setup cell first (as the real ones), then `cells` ((tag, source) pairs)."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(colab.SETUP_CELL, metadata={"tags": [colab.SETUP_TAG]})] + [
        nbformat.v4.new_code_cell(source, metadata={"tags": [tag] if tag else []}) for tag, source in cells]
    path = folder / "planted.ipynb"
    nbformat.write(notebook, path)
    return path


def test_sweep_values_and_grid():
    assert parse_sweep("seed=0,1,2") == ("seed", [0, 1, 2])
    assert parse_sweep("method=zero,mean") == ("method", ["zero", "mean"])
    assert parse_sweep("layers=[0],[0, 1]") == ("layers", [[0], [0, 1]])
    assert sweep_grid([("a", [1, 2]), ("b", ["x", "y"])]) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(Exception):
        parse_sweep("seed")


def test_checked_lines_become_figures_and_bars():
    figures, bars = parse_checked([
        "held-out top-1 accuracy: 0.97", "model: toy-syllogism; prompts analysed: 32",
        "SAE L0: d_sae 1024, L0 14", "SAE L1: d_sae 1024, L0 7", "mean ablation: German +217%, English -0.3%",
        "feature 415: active on 97% of closing prompts", "final train loss ~1e-07",
        "run 3: 9 squared", "run 4: 16 squared", "PASS accuracy above chance", "FAIL: SAE splice recovers >= 80% of the loss"])
    assert figures["held-out top-1 accuracy"] == 0.97 and figures["model"] == "toy-syllogism; prompts analysed: 32"
    assert figures["SAE L0"] == "d_sae 1024, L0 14" and figures["SAE L1"] == "d_sae 1024, L0 7"
    assert figures["mean ablation"] == "German +217%, English -0.3%"
    assert figures["feature #: active on #% of closing prompts"].startswith("feature 415")
    assert figures["final train loss ~#"] == "final train loss ~1e-07"
    assert figures["run #: # squared"] == "run 3: 9 squared" and figures["run #: # squared (2)"] == "run 4: 16 squared"
    assert bars == {"accuracy above chance": True, "SAE splice recovers >= 80% of the loss": False}


def test_sweep_runs_each_value_and_tables_its_checked_figures(tmp_path, capsys):
    notebook = planted_notebook(tmp_path)
    out = tmp_path / "runs"
    assert run_notebooks.main(["--only", str(notebook), "--sweep", "seed=1,2,3", "--set", "threshold=0.5",
                               "--out", str(out), "--cell-timeout", "120"]) == 0
    records = [json.loads(line) for line in (out / "planted" / "sweep.jsonl").read_text().splitlines()]
    assert [r["parameters"] for r in records] == [{"threshold": 0.5, "seed": s} for s in (1, 2, 3)]
    assert [r["figures"]["score"] for r in records] == [0.25, 0.5, 0.75]
    assert [r["figures"]["run #: # squared"] for r in records] == ["run 1: 1 squared", "run 2: 4 squared",
                                                                    "run 3: 9 squared"]
    assert [r["bars"] for r in records] == [{"score >= threshold": held} for held in (False, True, True)]
    assert [r["error"] for r in records[:2]] == [None, None]
    assert records[2]["error"].startswith("AssertionError: planted failure (In [")
    assert "assert seed != 3" in records[2]["error"]
    for seed in (1, 2, 3):
        executed = nbformat.read(out / "planted" / f"seed={seed}.ipynb", as_version=4)
        assert executed.metadata.papermill.input_path == "planted.ipynb"  # no machine path
        setup = next(cell for cell in executed.cells if colab.SETUP_TAG in cell.metadata.get("tags", []))
        assert not setup.outputs  # the Colab cell did nothing outside Colab
    table = (out / "planted" / "sweep.md").read_text()
    assert "| 1 | " in table and "| score >= threshold | 2/3 (67%) |" in table
    assert "| score | 0.25 | 0.5 | 0.75 |" in table
    assert "planted: 3 runs, 1 failed" in capsys.readouterr().out


def test_report_gives_each_cells_peak_memory(tmp_path):
    """A cell that holds 400 MB peaks 400 MB above the cells around it: each cell's peak is its own."""
    notebook = planted_notebook(tmp_path, [("parameters", "seed = 0"), (None, "x = 1"),
                                           (None, "import numpy as np\nbig = np.ones(50_000_000)\ndel big"),
                                           (None, "y = 2")])
    report = tmp_path / "report.jsonl"
    assert run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "runs"), "--report", str(report)]) == 0
    record = json.loads(report.read_text())
    cells = {cell["first_line"]: cell for cell in record["cells"]}
    assert {"x = 1", "import numpy as np", "y = 2"} <= set(cells)
    big, after = cells["import numpy as np"]["peak_rss_gb"], cells["y = 2"]["peak_rss_gb"]
    assert big - after > 0.3 and record["peak_rss_gb"] == max(cell["peak_rss_gb"] for cell in record["cells"])
    assert all(cell["wall_s"] >= 0 for cell in record["cells"])


def test_a_cell_over_its_memory_budget_fails_the_run_naming_the_cell(tmp_path):
    notebook = planted_notebook(tmp_path, [("parameters", "seed = 0"), (None, "x = 1"),
                                           (None, "import numpy as np\nbig = np.ones(50_000_000)\ndel big")])
    baseline = tmp_path / "baseline.jsonl"
    run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "a"), "--report", str(baseline)])
    cells = {cell["first_line"]: cell["peak_rss_gb"] for cell in json.loads(baseline.read_text())["cells"]}
    budget = str(round(cells["x = 1"] + 0.2, 2))  # above the quiet cell, 0.2 GB under the 400 MB one
    with pytest.raises(SystemExit, match=r"over its budget: cell \d+ \('import numpy as np'\) peaked at"):
        run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "b"), "--max-cell-gb", budget])
    assert run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "c"), "--max-cell-gb", "64"]) == 0
    with pytest.raises(SystemExit, match=r"the notebook took \d+ s > 0 s"):
        run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "d"), "--max-wall-s", "0"])


def test_a_stalled_cell_times_out_naming_itself(tmp_path):
    notebook = planted_notebook(tmp_path, [("parameters", "seed = 0"), (None, "import time\ntime.sleep(60)")])
    result = run_notebooks.execute(notebook, tmp_path / "out.ipynb", {}, cell_timeout=3)
    assert result.error.startswith("CellTimeoutError: A cell timed out while it was being executed, after 3 seconds")
    assert "import time" in result.error and result.wall_s < 40
    with pytest.raises(SystemExit, match="planted failed after"):
        run_notebooks.main(["--only", str(notebook), "--out", str(tmp_path / "again"), "--cell-timeout", "3"])


@pytest.mark.parametrize("path", [f"{stem}.ipynb" for stem in params.NOTEBOOKS]
                         + [f"trained/{path.name}" for path in sorted((NOTEBOOKS_DIR / "trained").glob("*.ipynb"))])
def test_committed_notebooks_hold_no_machine_path(path):
    metadata = json.dumps(nbformat.read(NOTEBOOKS_DIR / path, as_version=4).metadata)
    record = json.loads(metadata).get("papermill", {})
    assert all(not Path(record[key]).is_absolute() for key in ("input_path", "output_path") if key in record)
    assert str(REPO_ROOT) not in metadata and "/home/" not in metadata and "/tmp/" not in metadata


def test_every_notebook_runs_by_default_and_by_its_stem():
    assert [path.stem for path in run_notebooks.notebooks(None)] == list(params.NOTEBOOKS)
    assert [path.stem for path in run_notebooks.notebooks(["01b_plain_addition", "01_grokking"])] == [
        "01b_plain_addition", "01_grokking"]


def test_drop_machine_paths_makes_papermill_paths_relative(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["papermill"] = {"input_path": str(NOTEBOOKS_DIR / "01_grokking.ipynb"),
                                      "output_path": str(tmp_path / "elsewhere" / "out.ipynb")}
    nbformat.write(notebook, tmp_path / "nb.ipynb")
    run_notebooks.drop_machine_paths(tmp_path / "nb.ipynb")
    record = nbformat.read(tmp_path / "nb.ipynb", as_version=4).metadata.papermill
    assert (record.input_path, record.output_path) == ("notebooks/01_grokking.ipynb", "out.ipynb")
