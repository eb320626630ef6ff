"""Notebook plumbing: parameters, plots, the checked endings, the headless runner, nbval's tolerance, Colab."""
