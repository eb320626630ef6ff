"""The notebooks' one ending: PASS / FAIL lines asserted on the toys only, and the paper's figures beside the run's."""
import pytest

from helpers.notebook import ending


def test_the_verdict_prints_every_bar_and_asserts_only_when_asked():
    checks = {"accuracy above chance": True, "circuit faithful": False}
    assert ending.verdict(checks, assert_bars=False).splitlines() == [
        "PASS accuracy above chance", "FAIL circuit faithful", ending.NOT_ASSERTED]
    with pytest.raises(AssertionError, match=r"\['circuit faithful'\]"):
        ending.verdict(checks, assert_bars=True)
    assert ending.verdict({"accuracy above chance": True}, assert_bars=True) == "PASS accuracy above chance"


def test_the_table_aligns_the_columns_and_marks_what_the_paper_did_not_report():
    found = {"context neuron": "L1N22", "its rank": 24}
    table = ending.beside_paper(found, {"context neuron": "L3N669", "not shown": 1}, "paper (Pythia-70m)")
    assert table.splitlines() == ["               | paper (Pythia-70m) | this run",
                                  "context neuron | L3N669             | L1N22",
                                  "its rank       | —                  | 24"]


def test_the_table_can_show_some_rows_and_rounds_floats():
    found = {"loss": 0.95234567, "prompts": 600, "recovered": 0.8}
    table = ending.beside_paper(found, {"loss": 0.952}, "original notebook", keys=["prompts", "loss"])
    assert table.splitlines()[1:] == ["prompts | —                 | 600", "loss    | 0.952             | 0.9523"]
