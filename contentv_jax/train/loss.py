"""Flow-matching loss in diffusers' convention, and caption dropout for classifier-free guidance.

``x_sigma = (1 - sigma) * x0 + sigma * noise``; the model predicts the velocity ``noise - x0`` from
``x_sigma`` and ``timestep = sigma * 1000`` (ContentV report (arXiv 2506.05343), section 5.1; diffusers
``examples/dreambooth/train_dreambooth_sd3.py`` with ``FlowMatchEulerDiscreteScheduler``, weighting ``none``
after logit-normal sigma sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contentv_jax.scheduler import NUM_TRAIN_TIMESTEPS


def _per_sample(sigma: jax.Array, ndim: int) -> jax.Array:
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def noisy_latents(latents: jax.Array, noise: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x_sigma, target)`` for clean ``latents`` x0 and ``noise``, both (B, T, H, W, C).

    ``sigma``: float (B,) in [0, 1]. Computed in float32; returns float32 ``x_sigma`` and velocity target
    ``noise - x0``. Raises ValueError when shapes differ.
    """
    if latents.shape != noise.shape:
        raise ValueError(f"latents {latents.shape} and noise {noise.shape} must have the same shape")
    if sigma.shape != latents.shape[:1]:
        raise ValueError(f"sigma must have shape (B,)={latents.shape[:1]}, got {sigma.shape}")
    x0 = latents.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    s = _per_sample(sigma.astype(jnp.float32), x0.ndim)
    return (1.0 - s) * x0 + s * noise, noise - x0


def timesteps(sigma: jax.Array) -> jax.Array:
    """The transformer's timestep ``sigma * 1000``, float32 (B,)."""
    return sigma.astype(jnp.float32) * NUM_TRAIN_TIMESTEPS


def velocity_mse(velocity: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element, in float32 (a scalar).

    Padded video tokens are not seen here: the model slices them off before returning the velocity.
    """
    if velocity.shape != target.shape:
        raise ValueError(f"velocity {velocity.shape} and target {target.shape} must have the same shape")
    d = velocity.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d))


def caption_dropout(
    key: jax.Array,
    context: jax.Array,
    pooled: jax.Array,
    empty_context: jax.Array,
    empty_pooled: jax.Array,
    rate: float,
) -> tuple[jax.Array, jax.Array]:
    """Replace each sample's text by the empty prompt's embeddings with probability ``rate``.

    Args:
      context: (B, L, Dctx) prompt embeddings; ``empty_context``: (L, Dctx) or (1, L, Dctx), the empty prompt's.
      pooled: (B, Dpool); ``empty_pooled``: (Dpool,) or (1, Dpool).
    Returns the (context, pooled) pair with the dropped samples replaced (dtypes of the inputs).
    """
    b = context.shape[0]
    empty_context = jnp.broadcast_to(empty_context.reshape(context.shape[1:]), context.shape).astype(context.dtype)
    empty_pooled = jnp.broadcast_to(empty_pooled.reshape(pooled.shape[1:]), pooled.shape).astype(pooled.dtype)
    drop = jax.random.uniform(key, (b,)) < rate
    context = jnp.where(drop[:, None, None], empty_context, context)
    pooled = jnp.where(drop[:, None], empty_pooled, pooled)
    return context, pooled
