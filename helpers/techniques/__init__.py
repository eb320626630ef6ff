"""Interpretability techniques, independent of any one study: patching and its replay engine, ablation, DLA, edge attribution, neurons, SAEs."""
