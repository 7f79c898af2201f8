"""contentv-jax: ContentV (3D MM-DiT on the Wan2.1 causal video VAE) in JAX / Flax NNX."""

__version__ = "0.1.0"
