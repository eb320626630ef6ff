"""Files from the package registries, pinned and checksummed: real tokenizers, real-config checkpoints, a trained
model, real prose."""
