"""Compare a notebook's checked outputs with their committed copy within a stated tolerance.

nbval compares the text printed by the cells marked `# NBVAL_CHECK_OUTPUT` with the text stored in the notebook. A
figure computed from a model trained inside the notebook (the grokking transformer, the SAEs) or averaged over many
tokens moves in its last printed digit on another CPU, or at another thread count: the vector kernels add the same
floats in another order. So the comparison reads the numbers in the text and allows each its own tolerance:

- the text around the numbers must match exactly: names (`L1N22`, `L3H2`, `F1`), words, `PASS`/`FAIL` lines;
- an integer is a count or an index (`8 of 32 heads`, `feature 415`, `step 700`) and must match exactly,
  except a rounded percentage (`+378%`, `98%`), which may differ by 1% of its value or 1 point, whichever is larger;
- a decimal (`0.254`, `-0.0`) may differ by 2 units of its last printed digit or 1% of its value, whichever is
  larger;
- an order of magnitude (`1e-7`) may differ by one in its exponent.

The acceptance bars are printed as `PASS`/`FAIL` lines, so they are compared exactly. `notebooks/conftest.py` puts
`align_to_reference` in front of nbval's own comparison; `make nbtest-threads` runs nbval at other thread counts to
check that the committed outputs hold under another reduction order.
"""
from __future__ import annotations

import copy
import math
import re

NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)")
"""A number standing alone (`0.97`, `+217`, `1e-7`, the `70` of `60-70%`), not the digits of a name (`L0H7`, `F1`,
`L1N22`, `top-1`)."""

RELATIVE = 0.01
LAST_DIGIT_UNITS = 2


def _decimals(text: str) -> int:
    return len(text.partition(".")[2]) if "." in text else 0


def number_agrees(reference: str, test: str, *, percentage: bool = False) -> bool:
    """True when the printed number `test` is within the module's tolerance of the printed `reference`."""
    if "e" in reference or "e" in test:
        if ("e" in reference) != ("e" in test):
            return False
        (ref_mantissa, ref_exponent), (test_mantissa, test_exponent) = reference.split("e"), test.split("e")
        return ref_mantissa.lstrip("+") == test_mantissa.lstrip("+") and abs(int(ref_exponent) - int(test_exponent)) <= 1
    ref_value, test_value = float(reference), float(test)
    if "." in reference:
        allowed = max(LAST_DIGIT_UNITS * 10.0 ** -_decimals(reference), RELATIVE * abs(ref_value))
    elif percentage:
        allowed = max(1.0, RELATIVE * abs(ref_value))
    else:
        return "." not in test and ref_value == test_value
    return math.isclose(ref_value, test_value, rel_tol=0.0, abs_tol=allowed + 1e-12)


def _split(text: str) -> tuple[list[str], list[str]]:
    """(the text between numbers, the numbers): `len(parts) == len(numbers) + 1`."""
    return NUMBER.split(text), NUMBER.findall(text)


def texts_agree(reference: str, test: str) -> bool:
    """True when `test` reads as `reference`: the same text around the numbers, every number within tolerance."""
    return align_to_reference(test, reference) == reference


def align_to_reference(test: str, reference: str) -> str:
    """`test` with each number that agrees with the reference's number at its place written as the reference's.

    Where the text around the numbers differs, `test` is returned unchanged, so a failing comparison still shows
    every difference; where only some numbers disagree, only those still differ from the reference."""
    test_parts, test_numbers = _split(test)
    ref_parts, ref_numbers = _split(reference)
    if test_parts != ref_parts:
        return test
    merged = [test_parts[0]]
    for index, (ref_number, test_number) in enumerate(zip(ref_numbers, test_numbers)):
        percentage = ref_parts[index + 1].startswith("%")
        merged += [ref_number if number_agrees(ref_number, test_number, percentage=percentage) else test_number,
                   test_parts[index + 1]]
    return "".join(merged)


def align_outputs(test: list[dict], reference: list[dict]) -> list[dict]:
    """A copy of a cell's test outputs (nbformat output dicts) with each stdout/stderr stream aligned to the
    reference's stream of the same name at the same place; other outputs are copied as they are."""
    aligned = copy.deepcopy(test)
    for index, output in enumerate(aligned):
        stored = reference[index] if index < len(reference) else None
        if (stored is not None and output.get("output_type") == "stream" == stored.get("output_type")
                and output.get("name") == stored.get("name")):
            output["text"] = align_to_reference(output["text"], stored["text"])
    return aligned
