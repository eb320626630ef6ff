"""Helpers for the mechanistic-interpretability notebook collection, organised by technique and concern."""
