"""How every notebook ends: its acceptance bars as PASS / FAIL lines, and the paper's figures beside the run's.

    print(ending.verdict(S.acceptance_checks(...), assert_bars))   # "PASS name" per bar; asserted on the toys
    print(ending.beside_paper(found, S.REFERENCE[...], "paper (Pythia-70m)"))   # what | paper | this run

The paper's figures come from the study module's `REFERENCE` (keyed by the model they were measured on); a study
module's `acceptance_checks` says what its notebook's bars are. Both return text, so the notebook prints it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

NOT_ASSERTED = "(acceptance bars not asserted: they are the toy's; strict=True asserts them)"
MISSING = "—"
"""How a table shows a figure the paper did not report."""


def verdict(checks: Mapping[str, bool], assert_bars: bool) -> str:
    """One line per acceptance bar, `PASS name` or `FAIL name`. With `assert_bars` (the toys) a failed bar raises an
    AssertionError naming every failed one; otherwise a last line says the bars are the toy's and were not asserted."""
    failed = [name for name, ok in checks.items() if not ok]
    if assert_bars and failed:
        raise AssertionError(f"acceptance bars not met: {failed}")
    lines = [f"{'PASS' if ok else 'FAIL'} {name}" for name, ok in checks.items()]
    return "\n".join(lines if assert_bars else [*lines, NOT_ASSERTED])


def beside_paper(found: Mapping[str, object], reference: Mapping[str, object], paper: str,
                 keys: Sequence[str] | None = None) -> str:
    """What this run `found` (`{what: figure}`; only `keys` where given, in their order) beside the paper's figure for
    the same `what` in `reference`, as aligned text columns under a header naming the paper's column
    (`"paper (Pythia-70m)"`). A figure the reference does not hold prints as a dash, a float to 4 significant
    digits."""
    rows = [(what, reference.get(what), found[what]) for what in (found if keys is None else keys)]
    table = [("", paper, "this run"), *((what, _cell(theirs), _cell(ours)) for what, theirs, ours in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


def _cell(value: object) -> str:
    if value is None:
        return MISSING
    return f"{value:.4g}" if isinstance(value, float) else str(value)
