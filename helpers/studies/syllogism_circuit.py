"""Notebook 03's study: the syllogism circuit of Pythia-410m, found level by level (`techniques.circuit_levels`).

What the original notebook reported, and the notebook's acceptance bars.
"""
from __future__ import annotations

REFERENCE_LABEL = "original notebook (Pythia-410m)"
REFERENCE: dict[str, dict[str, object]] = {
    # the original notebook's coherent Pythia-410m cells only (its later cells ran on another model and template);
    # keyed like the closing table's rows
    "EleutherAI/pythia-410m": {
        "prompts analysed": 104,
        "layout": "22 tokens: A at 4, B at 9, final at 21",
        "clean / corrupted logit diff": "2.68 / -2.68",
        "DLA sum - logit diff": 4.8e-7,
        "top-12 heads' share of the logit diff": 1.17,
        "mover heads": "L18H0, L19H4, L20H2",
    },
}
"""The original notebook's figures, by the model they were measured on: shown beside a run's, never used in its
place (its mover heads were candidates it named, not a knockout's result)."""

HELDOUT_ACCURACY_BAR = 0.95
KNOCKOUT_DROP_BAR = 0.5


def acceptance_checks(heldout_top1: float, n_movers: int, knockout_left: float, n_level2: int) -> dict[str, bool]:
    """The notebook's bars (asserted on the toy): held-out top-1 accuracy; knocking out the mover heads removes at
    least half of the clean logit difference (`knockout_left` is the fraction left); path patching names earlier
    heads that feed the movers' keys."""
    return {
        "held-out accuracy >= 95%": heldout_top1 >= HELDOUT_ACCURACY_BAR,
        "mover knockout lowers the (clean-normalised) logit diff by >= 50%":
            n_movers > 0 and 1 - knockout_left >= KNOCKOUT_DROP_BAR,
        "path patching names earlier heads feeding the movers": n_level2 > 0,
    }
