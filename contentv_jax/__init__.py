"""contentv-jax: ContentV (3D MM-DiT on the Wan2.1 causal video VAE) in JAX / Flax NNX.

``from contentv_jax import ContentVPipeline, export_to_video`` (loaded on first use, so that importing the
package stays cheap):

    pipe = ContentVPipeline.from_pretrained("ContentV-8B", dtype="bfloat16")
    video = pipe(prompt="A red panda eating bamboo", num_inference_steps=50, seed=42).frames[0]
    export_to_video(video, "panda.mp4", fps=24)
"""

__version__ = "0.1.0"

_LAZY = {
    "ContentVPipeline": "contentv_jax.pipeline",
    "ContentVPipelineOutput": "contentv_jax.pipeline",
    "export_to_video": "contentv_jax.pipeline",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'contentv_jax' has no attribute {name!r}")
