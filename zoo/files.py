"""File names of a saved ensemble (torch-free, so `ltzoo list` and the registry stay light)."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME"]
