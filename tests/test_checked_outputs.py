"""The tolerance nbval applies to the notebooks' checked outputs: float noise passes, a changed finding fails."""
import nbformat
import pytest

from helpers.notebook.checked_outputs import align_outputs, align_to_reference, number_agrees, texts_agree


@pytest.mark.parametrize("reference, test", [
    # the clean-clone failure of notebook 05 on another CPU
    ("top-3 ablation, logprob / logit / rank difference: 0.254 / -0.545 / -0.46",
     "top-3 ablation, logprob / logit / rank difference: 0.255 / -0.546 / -0.46"),
    ("mean ablation: German +378%, English -0.0%", "mean ablation: German +381%, English +0.1%"),
    ("F1 0.997 (runner-up L1N14 0.988)", "F1 0.999 (runner-up L1N14 0.987)"),
    ("final train loss ~1e-7", "final train loss ~1e-8"),
    ("active on 98% of closing prompts", "active on 99% of closing prompts"),
    ("interval over prompts 60-70%", "interval over prompts 60-71%"),
])
def test_float_noise_agrees(reference, test):
    assert texts_agree(reference, test)


@pytest.mark.parametrize("reference, test", [
    ("PASS: German loss +5% or more", "FAIL: German loss +5% or more"),
    ("circuit 8 of 32 heads", "circuit 9 of 32 heads"),        # a count
    ("feature 415 boosts closing quotes", "feature 416 boosts closing quotes"),   # an index
    ("mover heads: L3H2, L2H2", "mover heads: L3H2, L2H3"),    # a name
    ("F1 0.997", "F1 0.986"),                                   # over 1% of its value
    ("loss recovered 0.42", "loss recovered 0.45"),             # 3 units of the last digit
    ("mean ablation: German +378%", "mean ablation: German +383%"),
    ("final train loss ~1e-7", "final train loss ~1e-9"),
    ("probe R^2 0.98", "probe R^2 0.98 (refit)"),               # the text around the numbers
    ("L0 35", "L0 35.0"),
])
def test_changed_findings_disagree(reference, test):
    assert not texts_agree(reference, test)


def test_a_name_is_not_a_number():
    assert not number_agrees("7", "8")
    assert align_to_reference("L0H7 0.51", "L0H7 0.50") == "L0H7 0.50"
    assert align_to_reference("L0H6 0.51", "L0H7 0.50") == "L0H6 0.51"


def test_only_the_numbers_out_of_tolerance_still_differ():
    aligned = align_to_reference("loss 0.255 / -0.600 / -0.46", "loss 0.254 / -0.545 / -0.46")
    assert aligned == "loss 0.254 / -0.600 / -0.46"


def test_align_outputs_touches_streams_of_the_same_name_only():
    reference = [nbformat.v4.new_output("stream", name="stdout", text="loss 0.254\n"),
                 nbformat.v4.new_output("stream", name="stderr", text="warning 0.1\n")]
    test = [nbformat.v4.new_output("stream", name="stdout", text="loss 0.255\n"),
            nbformat.v4.new_output("stream", name="stdout", text="warning 0.11\n")]
    aligned = align_outputs(test, reference)
    assert [output["text"] for output in aligned] == ["loss 0.254\n", "warning 0.11\n"]
    assert test[0]["text"] == "loss 0.255\n"  # the test outputs themselves are left as they were


def test_a_number_ending_a_sentence_is_still_a_number():
    assert texts_agree("the loss is 0.77.", "the loss is 0.78.")
    assert not texts_agree("the loss is 0.77.", "the loss is 0.87.")


@pytest.mark.parametrize("stored, passes", [("loss 0.254\n", True), ("loss 0.300\n", False)])
def test_nbval_with_the_notebooks_conftest_passes_float_noise_and_fails_a_changed_figure(tmp_path, stored, passes):
    import shutil
    import subprocess
    import sys

    from helpers.core.paths import NOTEBOOKS_DIR

    shutil.copy(NOTEBOOKS_DIR / "conftest.py", tmp_path / "conftest.py")
    cell = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('loss 0.255')", execution_count=1,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=stored)])
    notebook = nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(notebook, tmp_path / "checked.ipynb")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             "checked.ipynb"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) is passes, result.stdout[-2000:]
    assert ("1 passed" in result.stdout) is passes
