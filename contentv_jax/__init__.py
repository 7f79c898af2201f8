"""contentv-jax: ContentV (3D MM-DiT on the Wan2.1 causal video VAE) in JAX / Flax NNX.

``from contentv_jax import ContentVPipeline, export_to_video`` (imported on first use, as are
``contentv_jax.load_transformer`` / ``contentv_jax.load_vae`` from ``contentv_jax.checkpoints``, so that
``import contentv_jax`` stays cheap)::

    pipe = ContentVPipeline.from_pretrained("ContentV-8B", dtype="bfloat16")
    video = pipe(prompt="A red panda eating bamboo", num_inference_steps=50, seed=42).frames[0]
    export_to_video(video, "panda.mp4", fps=24)
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ContentVPipeline": "pipeline",
    "ContentVPipelineOutput": "pipeline",
    "export_to_video": "pipeline",
    "load_transformer": "checkpoints",
    "load_vae": "checkpoints",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
