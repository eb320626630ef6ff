"""The real-model path, end to end: each notebook on a checkpoint of its real model's config at real size.

The checkpoints (`helpers.sources.realsize`) have random weights and the real tokenizers, and load by folder path
through `load_model`, as a downloaded model would. Sample sizes are cut so the tier fits CI; the code path is the notebooks'
own. On random weights a run must complete, say that the toy's bars were not asserted, and find nothing: every
acceptance line reads FAIL. Each run appends its wall time and peak memory to `runs/realscale/report.jsonl`.

Run alone with `make realscale` (it fetches the tokenizers and builds the checkpoints the first time).
"""
from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from helpers.sources import realsize
from helpers.core.paths import REPO_ROOT

REPORT = REPO_ROOT / "runs" / "realscale" / "report.jsonl"
NOT_ASSERTED = "acceptance bars not asserted"

# notebook -> (real config, reduced parameters); every other parameter keeps its default
CASES = {
    "02_arithmetic_heuristics": ("llama-3-shrunk", dict(
        operators=["+", "-"], max_op=40, n_discovery=6, n_eval=6, require_correct=False, n_mean_reference=40,
        probe_prompts=60, n_attribution_check=3, n_knockout_prompts=12, max_knockout_heuristics=4,
        prompt_knockout_limits=[0, 1, 2], qk_max_op=12, batch_size=64)),
    "03_syllogism_circuit": ("pythia-70m", dict(
        pool_size=200, n_prompts=4, ld_threshold=None, max_movers=3)),
    "04_german_context_neuron": ("pythia-70m", dict(
        n_docs=12, max_tokens=48, batch_size=12, n_candidates=3, n_unigrams=20, max_rows=6)),
    "05_sae_quote_features": ("tinystories-2layers-33m", dict(
        n_stories=60, n_prompts=16, n_eval_sequences=8, sae_layers=[1], sae_steps=20, sae_batch_size=64,
        expansion_factor=1, n_candidates=3)),  # one SAE, not on layer 0: the path a 30-layer model takes
}


def checkpoint(name: str) -> str:
    try:
        return str(realsize.build_checkpoint(name))
    except realsize.FixtureError as error:
        pytest.fail(f"{error}\nFetch the real tokenizers with: python -m helpers.sources.realsize fetch")


def run_notebook(stem: str, parameters: dict, out_dir) -> subprocess.CompletedProcess:
    """Execute one notebook with papermill in a fresh process (so the report's peak memory is this notebook's)."""
    command = [sys.executable, "-m", "helpers.notebook.run_notebooks", "--only", stem, "--out", str(out_dir),
               "--report", str(REPORT), "--cell-timeout", "900"]
    for name, value in parameters.items():
        command += ["--set", f"{name}={value!r}"]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)


def summary_text(executed) -> str:
    """The printed output of the notebook's checked summary cells (`# NBVAL_CHECK_OUTPUT`), in order."""
    notebook = nbformat.read(executed, as_version=4)
    cells = [c for c in notebook.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    return "".join(o.get("text", "") for c in cells for o in c.outputs if o.get("output_type") == "stream")


@pytest.mark.parametrize("stem", list(CASES))
def test_notebook_runs_on_its_real_size_checkpoint_and_finds_nothing_in_noise(stem, tmp_path):
    config, reduced = CASES[stem]
    parameters = {"model_name": checkpoint(config), "output_dir": str(tmp_path / "figs"), **reduced}
    result = run_notebook(stem, parameters, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = summary_text(tmp_path / f"{stem}.ipynb")
    print(summary)
    assert NOT_ASSERTED in summary
    passes = [line for line in summary.splitlines() if line.startswith("PASS")]
    assert not passes, f"random weights cannot show the phenomenon, yet the summary says {passes}"


def test_syllogism_filter_that_keeps_too_few_prompts_names_the_parameter(tmp_path):
    parameters = {"model_name": checkpoint("pythia-70m"), "output_dir": str(tmp_path / "figs"), "pool_size": 200}
    result = run_notebook("03_syllogism_circuit", parameters, tmp_path)
    assert result.returncode != 0
    assert "lower ld_threshold (now 2.0)" in result.stderr + result.stdout


def test_reference_figures_follow_the_model_not_its_name():
    from helpers.models.load import load_model, reference_model

    model = load_model(checkpoint("pythia-70m"), device="cpu")
    assert reference_model(model) == "EleutherAI/pythia-70m"



def test_pythia_410m_runs_the_syllogism_pipeline_at_real_size():
    """Notebook 03's real model at real size, through its helpers: the full notebook's exhaustive sweeps over 24 x 16
    heads do not fit a 2-core CPU (its run on the Pythia-70m config above covers the same code path)."""
    import pandas as pd
    import torch
    import transformer_lens.patching as tl_patching

    from helpers.techniques import dla, patching
    from helpers.models.load import load_model, reference_model
    from helpers.tasks import syllogisms

    model = load_model(checkpoint("pythia-410m"), device="cpu")
    assert reference_model(model) == "EleutherAI/pythia-410m"
    data = syllogisms.build_dataset(model.tokenizer, syllogisms.make_syllogisms(n=400, seed=0)).subset(range(2))
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(data.clean_tokens)
        clean_ld = dla.logit_diff(clean_logits, data.answers).item()
        corrupted_ld = dla.logit_diff(model(data.corrupted_tokens), data.answers).item()
    layers = dla.layer_attribution(model, clean_cache, data.answers)
    assert abs(layers.values.sum().item() - clean_ld) < 1e-4 * max(1.0, abs(clean_ld))
    metric = patching.normalised_logit_diff(data.answers, clean_ld, corrupted_ld)
    final = [data.positions["final"]]
    ours = patching.act_patch_layer_pos(model, data.corrupted_tokens, clean_cache, metric, positions=final)
    index = pd.DataFrame({"layer": range(model.cfg.n_layers), "pos": final * model.cfg.n_layers})
    theirs = tl_patching.generic_activation_patch(model, data.corrupted_tokens, clean_cache, metric,
                                                  tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index)
    # equal to 1e-5 logits: the normalised metric divides by clean - corrupted, which random weights make small
    span = abs(clean_ld - corrupted_ld)
    torch.testing.assert_close(ours[:, 0] * span, theirs.cpu() * span, atol=1e-5, rtol=0)
