"""Interpretability techniques, independent of any one study: the run engine, patching, ablation, DLA, edge
attribution, neurons, SAEs."""
