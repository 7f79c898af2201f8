"""Models: the 3D MM-DiT and the Wan2.1 VAE (channels-last, Flax NNX).

Public names are imported lazily so that ``import contentv_jax.models`` stays cheap:
``MMDiT``, ``TransformerConfig`` (``transformer.py``) and ``WanVAE``, ``VAEConfig`` (``vae.py``).
Loading weights is ``contentv_jax.checkpoints`` (``load_transformer``, ``load_vae``; also exported
from ``contentv_jax``): this package imports neither it nor ``converters``.
"""

import importlib

_LAZY = {
    "MMDiT": "transformer",
    "TransformerConfig": "transformer",
    "WanVAE": "vae",
    "VAEConfig": "vae",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
