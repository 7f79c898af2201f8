"""Supervised fine-tuning (ContentV report, arXiv 2506.05343, section 6.1 and Table 2): the velocity
regulariser against the frozen pre-trained model. (The caption draw among several captions per clip and
the curated-subset filter are data: :mod:`contentv_jax.data.curation`.)

The regulariser. The report adds "KL-divergence penalties against the original pre-trained model's
outputs" without a formula. For flow matching, the per-step Euler transitions of the fine-tuned and the
reference model are Gaussians with the same variance whose means differ by ``dsigma * (v - v_ref)``, so
their KL is proportional to ``||v - v_ref||^2`` (the Flow-GRPO / DiffusionNFT regulariser). The SFT loss
on one noised input ``x_sigma`` is::

    L = mean((v - u)^2) + lambda * mean((v - sg(v_ref))^2),   u = noise - x0 (the flow-matching target)

which equals ``(1 + lambda) * mean((v - (u + lambda v_ref) / (1 + lambda))^2)`` plus a term free of the
trained parameters (:func:`blended_target`): the regularised loss is plain flow matching towards a
target pulled towards the reference's velocity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["blended_target", "regularised_loss"]


def regularised_loss(
    velocity: jax.Array, target: jax.Array, v_ref: jax.Array | None, kl_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SFT loss ``mean((v - u)^2) + kl_weight * mean((v - sg(v_ref))^2)`` in float32.

    Args:
      velocity: the trained model's prediction ``v`` (B, T, H, W, C), any float dtype.
      target: the flow-matching target ``u = noise - x0``, same shape.
      v_ref: the frozen reference model's prediction on the same input, same shape; gradient-stopped
        here. Ignored (may be None) when ``kl_weight == 0``: the loss is then exactly the plain
        flow-matching loss, computed by the same operations.
      kl_weight: lambda >= 0, a Python float (static).
    Returns ``(loss, {"loss_fm": ..., "loss_kl": ...})`` float32 scalars (``loss_kl`` is 0 when disabled).
    Raises ValueError on mismatched shapes or a negative weight.
    """
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if velocity.shape != target.shape:
        raise ValueError(f"velocity {velocity.shape} and target {target.shape} must have the same shape")
    v = velocity.astype(jnp.float32)
    loss_fm = jnp.mean(jnp.square(v - target.astype(jnp.float32)))
    if kl_weight == 0:
        return loss_fm, {"loss_fm": loss_fm, "loss_kl": jnp.zeros((), jnp.float32)}
    if v_ref is None or v_ref.shape != velocity.shape:
        raise ValueError(f"v_ref must have the velocity's shape {velocity.shape}, got {getattr(v_ref, 'shape', None)}")
    loss_kl = jnp.mean(jnp.square(v - jax.lax.stop_gradient(v_ref.astype(jnp.float32))))
    return loss_fm + kl_weight * loss_kl, {"loss_fm": loss_fm, "loss_kl": loss_kl}


def blended_target(target: jax.Array, v_ref: jax.Array, kl_weight: float) -> jax.Array:
    """``(u + lambda v_ref) / (1 + lambda)``: the target whose plain MSE, times ``1 + lambda``, equals
    :func:`regularised_loss` up to a parameter-free constant (same gradients). float32, shape of ``target``."""
    u = target.astype(jnp.float32)
    return (u + kl_weight * v_ref.astype(jnp.float32)) / (1.0 + kl_weight)
