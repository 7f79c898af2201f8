"""Attention kernels and the joint (image + text) attention entry point of the MM-DiT.

Layout everywhere: ``(B, S, N, D)`` = (batch, tokens, heads, head_dim). Softmax scale 1/sqrt(D).
Mirrors diffusers ``JointAttnProcessor2_0`` (``diffusers/models/attention_processor.py``):
attention runs over the concatenation ``[image tokens ; text tokens]``.

The sharding issue extends this module with the kernel choice (``xla``, ``cudnn``, ``splash``,
``chunked``) and Ulysses sequence parallelism; the model only ever calls :func:`joint_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNELS = ("xla",)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: str = "xla") -> jax.Array:
    """Softmax attention. q: (B, Sq, N, D); k, v: (B, Sk, N, D) -> (B, Sq, N, D), dtype of q.

    Raises:
      ValueError: for an unknown ``kernel``.
    """
    if kernel == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")


def joint_attention(
    q_img: jax.Array,
    k_img: jax.Array,
    v_img: jax.Array,
    q_txt: jax.Array,
    k_txt: jax.Array,
    v_txt: jax.Array,
    *,
    kernel: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """Joint attention over ``[image ; text]`` tokens.

    Args:
      q_img, k_img, v_img: (B, S_img, N, D) video-token projections (after QK norm).
      q_txt, k_txt, v_txt: (B, S_txt, N, D) text-token projections (after QK norm).
      kernel: attention kernel name (see :data:`KERNELS`).
    Returns:
      (out_img (B, S_img, N, D), out_txt (B, S_txt, N, D)).
    """
    s_img = q_img.shape[1]
    q = jnp.concatenate([q_img, q_txt], axis=1)
    k = jnp.concatenate([k_img, k_txt], axis=1)
    v = jnp.concatenate([v_img, v_txt], axis=1)
    out = dot_product_attention(q, k, v, kernel=kernel)
    return out[:, :s_img], out[:, s_img:]
