"""Ulysses sequence parallelism for joint (video + text) attention.

DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509), as the ContentV report uses it (reference
doc section 6): video tokens arrive sharded over the mesh axis ``sequence`` (size ``sp``); an
all-to-all turns each device's ``(tokens/sp, heads)`` block into ``(tokens, heads/sp)``, attention runs
over all tokens for the device's heads, and a second all-to-all turns the result back. Text tokens are
replicated over ``sequence``; they enter split by heads (each device takes its heads locally, no
communication), and the text output leaves split by heads (gathered where the next layer needs it).

Automatic padding: a head count that ``sp`` does not divide (ContentV has 38 heads) is padded with
zero heads whose outputs are dropped; a video-token count that ``sp`` does not divide is padded at the
end and the pad keys are masked out of attention (pad queries are sliced off).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from contentv_jax.sharding.logical import DEFAULT_RULES, LogicalRules, active, spec_for

AXIS = "sequence"


def pad_axis(x: jax.Array, axis: int, to: int) -> jax.Array:
    """Zero-pad ``x`` along ``axis`` up to length ``to`` (no-op when already that long)."""
    if x.shape[axis] == to:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, pad)


_pad = pad_axis


def batch_axes(mesh: Mesh, rules: LogicalRules, batch: int) -> tuple[str, ...]:
    """The mesh axes the rules put ``batch`` on (as :func:`logical.spec_for` places a batch of that size)."""
    entry = spec_for((batch,), ("batch",), mesh, rules)[0]
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    if AXIS in axes:
        raise ValueError(f"ulysses: the rules put the batch on {AXIS!r}, which Ulysses needs for tokens")
    return axes


def sequence_size() -> int:
    """The ``sequence`` axis size of the active mesh (``logical.activation_sharding``), 1 without one."""
    ctx = active()
    return 1 if ctx is None else ctx[0].shape.get(AXIS, 1)


def pad_tokens(x: jax.Array, multiple: int) -> jax.Array:
    """Pad ``x`` (B, S, ...) with zero tokens at the end of axis 1 to a multiple of ``multiple``."""
    return _pad(x, 1, -(-x.shape[1] // multiple) * multiple)


def ulysses_joint_attention(
    attend: Callable[..., tuple[jax.Array, jax.Array]],
    q_img: jax.Array,
    k_img: jax.Array,
    v_img: jax.Array,
    q_txt: jax.Array,
    k_txt: jax.Array,
    v_txt: jax.Array,
    *,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    img_valid: int | None = None,
    check_vma: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Joint attention with video tokens split over ``mesh``'s ``sequence`` axis.

    Args:
      attend: the single-device joint attention,
        ``attend(q_img, k_img, v_img, q_txt, k_txt, v_txt, img_valid=...) -> (out_img, out_txt)``.
      q_img, k_img, v_img: (B, S_img, N, D) global video-token arrays (sharded over ``sequence`` or not).
      q_txt, k_txt, v_txt: (B, S_txt, N, D) global text-token arrays.
      mesh: a mesh with a ``sequence`` axis; ``rules`` place the batch (see :func:`batch_axes`).
      img_valid: real video tokens when ``S_img`` carries trailing padding (``None``: all are real).
      check_vma: ``jax.shard_map``'s type check; off for kernels that cannot declare it (Pallas
        splash). Every input enters split over ``sequence``, so no gradient needs a cross-device sum.
    Returns:
      (out_img (B, S_img, N, D) split over ``sequence`` by tokens, out_txt (B, S_txt, N, D) split by heads).
    Raises:
      ValueError: if ``mesh`` has no ``sequence`` axis.
    """
    if AXIS not in mesh.shape:
        raise ValueError(f"ulysses: mesh axes {tuple(mesh.shape)} have no {AXIS!r} axis")
    sp = mesh.shape[AXIS]
    b, s_img, n, _ = q_img.shape
    valid = s_img if img_valid is None else img_valid
    s_pad, n_pad = -(-s_img // sp) * sp, -(-n // sp) * sp

    imgs = [_pad(_pad(t, 1, s_pad), 2, n_pad) for t in (q_img, k_img, v_img)]
    txts = [_pad(t, 2, n_pad) for t in (q_txt, k_txt, v_txt)]

    bat = batch_axes(mesh, rules, b) or None
    img_spec = PartitionSpec(bat, AXIS, None, None)  # tokens split over `sequence`
    txt_spec = PartitionSpec(bat, None, AXIS, None)  # text heads split over `sequence`

    def local(qi, ki, vi, qt, kt, vt):
        # (b, s_pad/sp, n_pad, D) -> (b, s_pad, n_pad/sp, D)
        to_heads = lambda x: jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
        oi, ot = attend(to_heads(qi), to_heads(ki), to_heads(vi), qt, kt, vt,
                        img_valid=None if valid == s_pad else valid)
        return jax.lax.all_to_all(oi, AXIS, split_axis=1, concat_axis=2, tiled=True), ot

    out_img, out_txt = jax.shard_map(
        local, mesh=mesh, in_specs=(img_spec,) * 3 + (txt_spec,) * 3, out_specs=(img_spec, txt_spec),
        check_vma=check_vma,
    )(*imgs, *txts)
    return out_img[:, :s_img, :n], out_txt[:, :, :n]
