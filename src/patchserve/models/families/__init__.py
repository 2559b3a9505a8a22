"""Model families: each module turns a Hugging Face ``config.json`` into a
:class:`~patchserve.models.config.ModelConfig` and maps checkpoint tensor
names onto the runtime's parameters (one small, explicit mapping per family).
"""
