"""contentv-jax: ContentV (3D MM-DiT on the Wan2.1 causal video VAE) in JAX / Flax NNX.

``contentv_jax.load_transformer`` / ``contentv_jax.load_vae`` are ``contentv_jax.checkpoints``'s
(imported on first use, so ``import contentv_jax`` stays cheap).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"load_transformer": "checkpoints", "load_vae": "checkpoints"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
