"""Models: a name resolved once, the loader (zoo, local folder, GGUF, hub), the toy zoo and its training recipes, the
training loop, walks over training checkpoints."""
