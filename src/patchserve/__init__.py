"""patchserve: an activation-patching server for transformer language models."""

__version__ = "0.1.0"
