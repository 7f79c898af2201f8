"""Attention kernels and the joint (image + text) attention entry point of the MM-DiT.

Layout everywhere: ``(B, S, N, D)`` = (batch, tokens, heads, head_dim). Softmax scale 1/sqrt(D).
Mirrors diffusers ``JointAttnProcessor2_0`` (``diffusers/models/attention_processor.py``):
attention runs over the concatenation ``[image tokens ; text tokens]``.

Kernels (:data:`KERNELS`):

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, the reference; any backend.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention``; GPU only, float16/bfloat16.
- ``splash``: Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``); compiled
  on TPU, run in Pallas interpret mode elsewhere (slow: for tests only).
- ``chunked``: an online-softmax (flash-style) kernel in plain JAX that never holds more than a
  ``(q_chunk, kv_chunk)`` block of logits per head; rematerialised in the backward pass.

:func:`joint_attention` runs Ulysses sequence parallelism (``contentv_jax.sharding.ulysses``) when a
mesh with ``sequence`` > 1 is active (``contentv_jax.sharding.logical.activation_sharding``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from contentv_jax.sharding import logical, ulysses
from contentv_jax.sharding.ulysses import pad_axis

KERNELS = ("xla", "cudnn", "splash", "chunked")

_NEG = -0.7 * float(np.finfo(np.float32).max)


def _check(q, k, v, kv_length):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: expected q (B, Sq, N, D) and k, v (B, Sk, N, D), got {q.shape}, {k.shape}, {v.shape}")
    if kv_length is not None and not 0 < kv_length <= k.shape[1]:
        raise ValueError(f"attention: kv_length must be in [1, {k.shape[1]}], got {kv_length}")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel: str = "xla",
    kv_length: int | None = None,
) -> jax.Array:
    """Softmax attention. q: (B, Sq, N, D); k, v: (B, Sk, N, D) -> (B, Sq, N, D), dtype of q.

    Args:
      kernel: one of :data:`KERNELS`.
      kv_length: if given, only keys ``[0, kv_length)`` are attended to (the rest are padding).
    Raises:
      ValueError: for an unknown ``kernel``, mismatched shapes, a bad ``kv_length``, or ``cudnn``
        off GPU / with a dtype other than float16/bfloat16.
    """
    _check(q, k, v, kv_length)
    if kv_length == k.shape[1]:
        kv_length = None
    if kernel in ("xla", "cudnn"):
        if kernel == "cudnn":
            if jax.default_backend() != "gpu":
                raise ValueError(f"attention kernel 'cudnn' needs a GPU backend, not {jax.default_backend()!r}")
            if q.dtype not in (jnp.float16, jnp.bfloat16):
                raise ValueError(f"attention kernel 'cudnn' needs float16/bfloat16 inputs, got {q.dtype}")
        lengths = None if kv_length is None else jnp.full((q.shape[0],), kv_length, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=kernel)
    if kernel == "chunked":
        return chunked_attention(q, k, v, kv_length=kv_length)
    if kernel == "splash":
        return splash_attention(q, k, v, kv_length=kv_length)
    raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")


def _scores(qb, kb, ok):
    """(B, cq, N, D) x (B, ck, N, D) -> (B, N, cq, ck) logits, padded keys at a large negative value."""
    return jnp.where(ok, jnp.einsum("bqnd,bknd->bnqk", qb, kb), _NEG)


def _flash_forward(qc, kc, vc, key_ok):
    """Online softmax. qc: (nq, B, cq, N, D) pre-scaled; kc, vc: (nk, B, ck, N, D); key_ok: (nk, ck).
    Returns out (nq, B, cq, N, D) and the log-sum-exp (nq, B, N, cq)."""

    def one_chunk(qb):
        # the first key chunk (it holds key 0, always valid) starts the running max, sum and output;
        # starting from the data rather than from constants keeps the carry's type right under shard_map
        s = _scores(qb, kc[0], key_ok[0])
        m = s.max(-1)
        p = jnp.where(key_ok[0], jnp.exp(s - m[..., None]), 0.0)
        init = (m, p.sum(-1), jnp.einsum("bnqk,bknd->bqnd", p, vc[0]))

        def step(carry, xs):
            m, l, acc = carry  # (B, N, cq), (B, N, cq), (B, cq, N, D)
            kb, vb, ok = xs
            s = _scores(qb, kb, ok)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr.transpose(0, 2, 1)[..., None] + jnp.einsum("bnqk,bknd->bqnd", p, vb)
            return (m_new, l * corr + p.sum(-1), acc), None

        (m, l, acc), _ = jax.lax.scan(step, init, (kc[1:], vc[1:], key_ok[1:]))
        return acc / l.transpose(0, 2, 1)[..., None], m + jnp.log(l)

    return jax.lax.map(one_chunk, qc)


@jax.custom_vjp
def _flash(qc, kc, vc, key_ok):
    return _flash_forward(qc, kc, vc, key_ok)[0]


def _flash_fwd(qc, kc, vc, key_ok):
    out, lse = _flash_forward(qc, kc, vc, key_ok)
    return out, (qc, kc, vc, key_ok, out, lse)


def _flash_bwd(res, d_out):
    """FlashAttention-2 backward: recompute each (q, k) block's probabilities from the saved
    log-sum-exp; memory is the inputs plus one block of logits."""
    qc, kc, vc, key_ok, out, lse = res
    delta = jnp.einsum("cbqnd,cbqnd->cbnq", d_out, out)  # rowsum(dO * O), (nq, B, N, cq)
    nk = kc.shape[0]

    def q_step(carry, xs):
        dk, dv = carry  # (nk, B, ck, N, D)
        qb, dob, lse_b, delta_b = xs

        def k_step(inner, j):
            dq, dk, dv = inner
            kb, vb, ok = kc[j], vc[j], key_ok[j]
            p = jnp.where(ok, jnp.exp(_scores(qb, kb, ok) - lse_b[..., None]), 0.0)  # (B, N, cq, ck)
            dv = dv.at[j].add(jnp.einsum("bnqk,bqnd->bknd", p, dob))
            ds = p * (jnp.einsum("bqnd,bknd->bnqk", dob, vb) - delta_b[..., None])
            dq = dq + jnp.einsum("bnqk,bknd->bqnd", ds, kb)
            dk = dk.at[j].add(jnp.einsum("bnqk,bqnd->bknd", ds, qb))
            return (dq, dk, dv), None

        (dq, dk, dv), _ = jax.lax.scan(k_step, (qb * 0, dk, dv), jnp.arange(nk))
        return (dk, dv), dq

    (dk, dv), dq = jax.lax.scan(q_step, (kc * 0, vc * 0), (qc, d_out, lse, delta))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_length: int | None = None,
    q_chunk: int = 512,
    kv_chunk: int = 512,
) -> jax.Array:
    """Memory-lean attention: online softmax over key/value chunks (Rabe & Staats 2021; FlashAttention-2).

    Shapes as :func:`dot_product_attention`. Accumulates in float32. Forward and backward hold one
    ``(B, N, q_chunk, kv_chunk)`` block of logits at a time; the backward pass (a custom VJP) saves
    only the inputs, the output and the per-query log-sum-exp, and recomputes the probabilities.
    """
    b, sq, n, d = q.shape
    sk = k.shape[1]
    valid = sk if kv_length is None else kv_length
    cq, ck = min(q_chunk, sq), min(kv_chunk, sk)
    sq_p, sk_p = -(-sq // cq) * cq, -(-sk // ck) * ck
    qf = pad_axis(q, 1, sq_p).astype(jnp.float32) * (1.0 / math.sqrt(d))
    kf, vf = (pad_axis(t, 1, sk_p).astype(jnp.float32) for t in (k, v))
    qc = qf.reshape(b, sq_p // cq, cq, n, d).swapaxes(0, 1)
    kc = kf.reshape(b, sk_p // ck, ck, n, d).swapaxes(0, 1)
    vc = vf.reshape(b, sk_p // ck, ck, n, d).swapaxes(0, 1)
    key_ok = (jnp.arange(sk_p) < valid).reshape(sk_p // ck, ck)
    out = _flash(qc, kc, vc, key_ok).swapaxes(0, 1).reshape(b, sq_p, n, d)
    return out[:, :sq].astype(q.dtype)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_length: int | None = None, block: int = 512
) -> jax.Array:
    """Pallas splash attention (TPU; interpret mode elsewhere). Shapes as :func:`dot_product_attention`.

    Sequences are padded to a multiple of the block size (a multiple of 128); padded keys are masked
    with segment ids, padded queries sliced off.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, sq, n, d = q.shape
    sk = k.shape[1]
    valid = sk if kv_length is None else kv_length
    bq = min(block, -(-sq // 128) * 128)
    bk = min(block, -(-sk // 128) * 128)
    sq_p, sk_p = -(-sq // bq) * bq, -(-sk // bk) * bk
    sizes = sk_lib.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        block_q_dq=bq, block_kv_dq=bk,
    )
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((sq_p, sk_p))] * n)
    kern = sk_lib.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=jax.default_backend() != "tpu")
    seg = sk_lib.SegmentIds(q=jnp.ones((sq_p,), jnp.int32), kv=(jnp.arange(sk_p) < valid).astype(jnp.int32))
    # splash takes (N, S, D) per example and does not scale the logits
    qt = (pad_axis(q, 1, sq_p) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)
    kt, vt = (pad_axis(t, 1, sk_p).transpose(0, 2, 1, 3) for t in (k, v))
    out = jax.vmap(functools.partial(kern, segment_ids=seg))(qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :sq].astype(q.dtype)


def joint_attention_local(
    q_img, k_img, v_img, q_txt, k_txt, v_txt, *, kernel: str = "xla", img_valid: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`joint_attention` on one device (no sequence parallelism). Same arguments."""
    s_img = q_img.shape[1]
    q = jnp.concatenate([q_img, q_txt], axis=1)
    if img_valid is None or img_valid == s_img:
        k = jnp.concatenate([k_img, k_txt], axis=1)
        v = jnp.concatenate([v_img, v_txt], axis=1)
        out = dot_product_attention(q, k, v, kernel=kernel)
    else:
        # keys in the order [text ; image] put the image padding last, so a key length masks it
        k = jnp.concatenate([k_txt, k_img], axis=1)
        v = jnp.concatenate([v_txt, v_img], axis=1)
        out = dot_product_attention(q, k, v, kernel=kernel, kv_length=k_txt.shape[1] + img_valid)
    return out[:, :s_img], out[:, s_img:]


def joint_attention(
    q_img: jax.Array,
    k_img: jax.Array,
    v_img: jax.Array,
    q_txt: jax.Array,
    k_txt: jax.Array,
    v_txt: jax.Array,
    *,
    kernel: str = "xla",
    img_valid: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Joint attention over ``[image ; text]`` tokens.

    With an active mesh whose ``sequence`` axis is > 1 (``logical.activation_sharding``), runs
    Ulysses sequence parallelism (:func:`contentv_jax.sharding.ulysses.ulysses_joint_attention`);
    otherwise attends on each device over all tokens.

    Args:
      q_img, k_img, v_img: (B, S_img, N, D) video-token projections (after QK norm).
      q_txt, k_txt, v_txt: (B, S_txt, N, D) text-token projections (after QK norm).
      kernel: attention kernel name (see :data:`KERNELS`).
      img_valid: number of real video tokens when ``S_img`` includes trailing padding (pad keys are
        masked out; pad queries produce values the caller must drop). ``None``: all are real.
    Returns:
      (out_img (B, S_img, N, D), out_txt (B, S_txt, N, D)), dtype of the inputs.
    Raises:
      ValueError: for an unknown kernel or inconsistent shapes.
    """
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
    for name, t in (("k_img", k_img), ("v_img", v_img)):
        if t.shape != q_img.shape:
            raise ValueError(f"joint_attention: {name} has shape {t.shape}, expected q_img's {q_img.shape}")
    for name, t in (("k_txt", k_txt), ("v_txt", v_txt)):
        if t.shape != q_txt.shape:
            raise ValueError(f"joint_attention: {name} has shape {t.shape}, expected q_txt's {q_txt.shape}")
    if q_img.shape[0] != q_txt.shape[0] or q_img.shape[2:] != q_txt.shape[2:]:
        raise ValueError(f"joint_attention: image {q_img.shape} and text {q_txt.shape} differ in batch/heads/head_dim")
    if img_valid is not None and not 0 < img_valid <= q_img.shape[1]:
        raise ValueError(f"joint_attention: img_valid must be in [1, {q_img.shape[1]}], got {img_valid}")

    ctx = logical.active()
    if ctx is not None and ctx[0].shape.get("sequence", 1) > 1:
        mesh, rules = ctx
        attend = functools.partial(joint_attention_local, kernel=kernel)
        return ulysses.ulysses_joint_attention(
            attend, q_img, k_img, v_img, q_txt, k_txt, v_txt, mesh=mesh, rules=rules, img_valid=img_valid,
            check_vma=kernel != "splash",
        )
    return joint_attention_local(q_img, k_img, v_img, q_txt, k_txt, v_txt, kernel=kernel, img_valid=img_valid)
