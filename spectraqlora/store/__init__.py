"""Files on disk: safetensors headers and tensors, checkpoints (local, hub, GGUF, random-init) and
the run dir contract. Imports only the top level (config, errors)."""
