"""Models: loading any name (zoo, local folder, GGUF, hub), the toy zoo and its training recipes, the training loop, walks over training checkpoints."""
