"""Notebook 03's acceptance bars: a clear circuit passes, and each bar fails alone."""
from helpers.studies import syllogism_circuit
from tests.conftest import failed_bars


def test_the_acceptance_checks_pass_a_clear_circuit_and_fail_each_bar_alone():
    passing = dict(heldout_top1=0.97, n_movers=4, knockout_left=0.36, n_level2=2)
    assert all(syllogism_circuit.acceptance_checks(**passing).values())
    knockout = "mover knockout lowers the (clean-normalised) logit diff by >= 50%"
    for change, failed in [({"heldout_top1": 0.94}, "held-out accuracy >= 95%"),
                           ({"n_movers": 0}, knockout), ({"knockout_left": 0.51}, knockout),
                           ({"n_level2": 0}, "path patching names earlier heads feeding the movers")]:
        assert failed_bars(syllogism_circuit.acceptance_checks, passing, change) == [failed]
