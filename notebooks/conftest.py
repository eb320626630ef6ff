"""nbval compares the checked cells' numbers within a tolerance (`helpers.notebook.checked_outputs` states it).

Each stdout stream a checked cell printed is aligned with the committed stream before nbval's own comparison: a
number within tolerance of the committed one is written as the committed one, so nbval passes it; any other
difference (a name, a PASS that became FAIL, a number out of tolerance) still fails and is shown.
"""
from __future__ import annotations

from nbval.plugin import IPyNbCell

from helpers.notebook.checked_outputs import align_outputs


def _compare_within_tolerance(item: IPyNbCell):
    def compare(test, reference, skip_compare=None):
        return IPyNbCell.compare_outputs(item, align_outputs(test, reference), reference, skip_compare)
    return compare


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, IPyNbCell):
            item.compare_outputs = _compare_within_tolerance(item)
