"""Attention kernels and the joint (image + text) attention entry point of the MM-DiT.

Layout everywhere: ``(B, S, N, D)`` = (batch, tokens, heads, head_dim). Softmax scale 1/sqrt(D).
Mirrors diffusers ``JointAttnProcessor2_0`` (``diffusers/models/attention_processor.py``):
attention runs over the concatenation ``[image tokens ; text tokens]``.

Kernels (:data:`KERNELS`):

- ``xla``: plain softmax attention in XLA, heads-major (:func:`xla_attention`; the math of
  ``jax.nn.dot_product_attention(implementation="xla")``: float32 logits and softmax, probabilities cast
  to the value dtype); any backend.
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
AUTO = "auto"
KERNEL_CHOICES = (AUTO,) + KERNELS  # what a config may name; ``auto`` resolves per backend

# cuDNN flash attention (fp16/bf16): head dim a multiple of 8, at most 128 (256 on Hopper and later);
# the limit of jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention on pre-Hopper GPUs.
_CUDNN_DTYPES = ("float16", "bfloat16")
_CUDNN_MAX_HEAD_DIM = 128

_NEG = -0.7 * float(np.finfo(np.float32).max)


def _cudnn_problem(dtype, head_dim) -> str | None:
    if dtype is not None and jnp.dtype(dtype).name not in _CUDNN_DTYPES:
        return f"needs float16/bfloat16 inputs, the compute dtype is {jnp.dtype(dtype).name}"
    if head_dim is not None and (head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM):
        return f"needs a head dim that is a multiple of 8 and at most {_CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    return None


def resolve_kernel(name: str, *, backend: str | None = None, dtype=None, head_dim: int | None = None) -> str:
    """The attention kernel a model will run: ``auto`` resolved for the backend, an explicit name checked.

    ``auto``: ``cudnn`` (cuDNN flash) on GPU when the compute dtype is float16/bfloat16 and the head
    dim fits, else ``chunked``; ``splash`` on TPU; ``chunked`` elsewhere (CPU). Every choice is
    memory-lean (never the full score matrix). An explicit name is honoured when it can run here.

    Args:
      name: one of :data:`KERNEL_CHOICES`.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (default: ``jax.default_backend()``); given explicitly
        to plan a run for another backend.
      dtype: the compute dtype of q/k/v (None: not checked). head_dim: (None: not checked).
    Returns:
      one of :data:`KERNELS`.
    Raises:
      ValueError: one line naming the kernel, the backend and the constraint, for an unknown name,
        ``cudnn`` off GPU or with an unsupported dtype / head dim, ``splash`` off TPU.
    """
    backend = backend or jax.default_backend()
    if name not in KERNEL_CHOICES:
        raise ValueError(f"attention kernel {name!r} is not one of {KERNEL_CHOICES}")
    if name == AUTO:
        if backend == "gpu":
            return "chunked" if _cudnn_problem(dtype, head_dim) else "cudnn"
        return "splash" if backend == "tpu" else "chunked"
    if name == "cudnn":
        problem = "needs a GPU (CUDA) backend" if backend != "gpu" else _cudnn_problem(dtype, head_dim)
        if problem:
            raise ValueError(f"attention kernel 'cudnn' cannot run on backend {backend!r}: {problem}")
    if name == "splash" and backend != "tpu":
        raise ValueError(
            f"attention kernel 'splash' cannot run on backend {backend!r}: needs a TPU backend "
            "(Pallas Mosaic; off TPU it only runs in the slow interpret mode of the low-level "
            "dot_product_attention, for tests)"
        )
    return name


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
        return xla_attention(q, k, v, kv_length=kv_length)
    if kernel == "chunked":
        return chunked_attention(q, k, v, kv_length=kv_length)
    if kernel == "splash":
        return splash_attention(q, k, v, kv_length=kv_length)
    raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_length: int | None = None) -> jax.Array:
    """Softmax attention with the heads axis moved in front: q (B, Sq, N, D), k, v (B, Sk, N, D) -> (B, Sq, N, D).

    The same math as ``jax.nn.dot_product_attention(implementation="xla")`` (logits accumulated and
    soft-maxed in float32, probabilities cast to ``v``'s dtype for the second product), written as
    (B, N, S, D) batched matmuls: XLA:CPU then runs both products as plain batched GEMMs, with no
    transposed copy of the (Sq, Sk) probabilities between them (2.4x less CPU time than
    ``jax.nn.dot_product_attention`` at 653 tokens, 4 heads x 16). Keys ``>= kv_length`` are masked out.
    """
    qt, kt, vt = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    s = jnp.einsum("bnqd,bnkd->bnqk", qt, kt, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    if kv_length is not None:
        s = jnp.where(jnp.arange(k.shape[1]) < kv_length, s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bnkd->bnqd", p, vt).transpose(0, 2, 1, 3).astype(q.dtype)


def _logits(qb, kb, j, ck, valid):
    """(B, N, cq, D) x (B, N, ck, D) -> (B, N, cq, ck) float32 logits of key chunk ``j`` (q comes
    scaled); keys at or past ``valid`` (padding) at a large negative value, the mask built here, for
    this chunk only."""
    s = jnp.einsum("bnqd,bnkd->bnqk", qb, kb, preferred_element_type=jnp.float32)
    if valid is None:
        return s
    return jnp.where(j * ck + jnp.arange(ck) < valid, s, _NEG)


def _key_chunks(nk, ck, valid):
    """Static split of ``nk`` key chunks of ``ck`` keys when keys ``>= valid`` are padding: the
    number of chunks with no padding, and the index of the one chunk that is part padding (or None).
    Chunks past it hold only padding and are skipped: their probabilities are exactly 0."""
    if valid is None:
        return nk, None
    full = valid // ck
    return full, (full if valid % ck else None)


def _flash_forward(qc, kc, vc, ck, valid):
    """Online softmax. qc: (nq, B, N, cq, D), scaled by 1/sqrt(D); kc, vc: (nk, B, N, ck, D), all in the compute dtype.
    Returns out (nq, B, N, cq, D) in that dtype and the float32 log-sum-exp (nq, B, N, cq).
    Only the chunk that is part padding builds a mask; the full chunks run unmasked in the scan."""
    f32 = jnp.float32
    full, partial = _key_chunks(kc.shape[0], ck, valid)

    def one_chunk(qb):
        def start(j, masked):
            # the first key chunk (it holds key 0, always valid) starts the running max, sum and output;
            # starting from the data rather than from constants keeps the carry's type right under shard_map
            s = _logits(qb, kc[j], j, ck, valid if masked else None)
            m = s.max(-1)
            p = jnp.exp(s - m[..., None])  # masked logits underflow to exactly 0 (m is a real logit)
            return m, p.sum(-1), jnp.einsum("bnqk,bnkd->bnqd", p.astype(vc.dtype), vc[j], preferred_element_type=f32)

        def update(carry, kb, vb, j, masked):
            m, l, acc = carry  # float32 (B, N, cq), (B, N, cq), (B, N, cq, D)
            s = _logits(qb, kb, j, ck, valid if masked else None)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bnqk,bnkd->bnqd", p.astype(vb.dtype), vb, preferred_element_type=f32)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

        if full == 0:
            carry = start(0, masked=True)
        else:
            carry = start(0, masked=False)
            if full > 1:
                step = lambda c, xs: (update(c, *xs, masked=False), None)  # noqa: E731
                carry, _ = jax.lax.scan(step, carry, (kc[1:full], vc[1:full], jnp.arange(1, full)))
            if partial is not None:
                carry = update(carry, kc[partial], vc[partial], partial, masked=True)
        m, l, acc = carry
        return (acc / l[..., None]).astype(qc.dtype), m + jnp.log(l)

    return jax.lax.map(one_chunk, qc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(qc, kc, vc, ck, valid):
    return _flash_forward(qc, kc, vc, ck, valid)[0]


def _flash_fwd(qc, kc, vc, ck, valid):
    out, lse = _flash_forward(qc, kc, vc, ck, valid)
    return out, (qc, kc, vc, out, lse)


def _flash_bwd(ck, valid, res, d_out):
    """FlashAttention-2 backward: recompute each (q, k) block's probabilities from the saved
    log-sum-exp; memory is the inputs plus one block of logits. Matmuls take the compute dtype and
    accumulate in float32; the gradients are float32 until cast to the inputs' dtype at the end.
    Layouts as :func:`_flash_forward` (heads-major chunks)."""
    qc, kc, vc, out, lse = res
    f32 = jnp.float32
    delta = jnp.einsum("cbnqd,cbnqd->cbnq", d_out, out, preferred_element_type=f32)  # rowsum(dO * O)
    full, partial = _key_chunks(kc.shape[0], ck, valid)

    def q_step(carry, xs):
        dk, dv = carry  # float32 (nk, B, N, ck, D); chunks that hold only padding stay 0
        qb, dob, lse_b, delta_b = xs

        def k_step(inner, j, masked):
            dq, dk, dv = inner
            kb, vb = kc[j], vc[j]
            s = _logits(qb, kb, j, ck, valid if masked else None)
            p = jnp.exp(s - lse_b[..., None])  # (B, N, cq, ck) float32
            dv = dv.at[j].add(jnp.einsum("bnqk,bnqd->bnkd", p.astype(dob.dtype), dob, preferred_element_type=f32))
            dp = jnp.einsum("bnqd,bnkd->bnqk", dob, vb, preferred_element_type=f32)
            ds = (p * (dp - delta_b[..., None])).astype(qb.dtype)  # d(logits); the scale is on q
            dq = dq + jnp.einsum("bnqk,bnkd->bnqd", ds, kb, preferred_element_type=f32)
            dk = dk.at[j].add(jnp.einsum("bnqk,bnqd->bnkd", ds, qb, preferred_element_type=f32))
            return dq, dk, dv

        inner = ((qb * 0).astype(f32), dk, dv)
        if full:
            inner, _ = jax.lax.scan(lambda c, j: (k_step(c, j, masked=False), None), inner, jnp.arange(full))
        if partial is not None:
            inner = k_step(inner, partial, masked=True)
        dq, dk, dv = inner
        return (dk, dv), dq.astype(qc.dtype)

    (dk, dv), dq = jax.lax.scan(q_step, ((kc * 0).astype(f32), (vc * 0).astype(f32)), (qc, d_out, lse, delta))
    return dq, dk.astype(kc.dtype), dv.astype(vc.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _balanced_chunk(length: int, chunk: int, multiple: int = 16) -> int:
    """The chunk size that splits ``length`` into as many chunks as ``chunk`` would, of equal size
    rounded up to ``multiple`` (the float32 lanes of AVX-512), so the padding is under ``multiple`` per
    chunk, not up to a whole chunk: 653 tokens in chunks of at most 512 are 2 x 336, not 2 x 512; one
    chunk is the whole length, unpadded."""
    n = -(-length // chunk)
    if n == 1:
        return length
    return min(-(-(-(-length // n)) // multiple) * multiple, chunk)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_length: int | None = None,
    q_chunk: int = 1024,
    kv_chunk: int = 512,
) -> jax.Array:
    """Memory-lean attention: online softmax over key/value chunks (Rabe & Staats 2021; FlashAttention-2).

    Shapes as :func:`dot_product_attention`. q, k, v stay in their (compute) dtype; the matmuls
    accumulate in float32 and the softmax statistics (running max, sum, log-sum-exp) are float32.
    Forward and backward hold one ``(B, N, q_chunk, kv_chunk)`` block of logits at a time; the key
    mask (``kv_length`` and chunk padding) is built per key chunk from its index, never as one array
    over all keys. The backward pass (a custom VJP) saves only the inputs, the output and the
    per-query log-sum-exp, and recomputes the probabilities.

    The default chunks, 1024 queries x 512 keys, are the fastest of 256 to 4096 on a 2-core AVX-512 CPU at
    16k tokens (forward and backward); one block of logits is then 2 MiB per head in float32.
    The chunks are laid out heads-major, ``(chunks, B, N, chunk, D)``, once before the loops, so every
    product inside them is a plain batched GEMM over (B, N) and no block is transposed per chunk.
    """
    b, sq, n, d = q.shape
    sk = k.shape[1]
    valid = sk if kv_length is None else kv_length
    cq, ck = _balanced_chunk(sq, q_chunk), _balanced_chunk(sk, kv_chunk)
    sq_p, sk_p = -(-sq // cq) * cq, -(-sk // ck) * ck
    k, v = (t.astype(q.dtype) for t in (k, v))

    def to_chunks(t, s_p, c):  # (B, S, N, D) -> (S_p / c, B, N, c, D)
        return pad_axis(t, 1, s_p).reshape(b, s_p // c, c, n, d).transpose(1, 0, 3, 2, 4)

    # the logits' scale goes on q once, not on every (cq, ck) block of logits
    qc = to_chunks(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), sq_p, cq)
    kc, vc = to_chunks(k, sk_p, ck), to_chunks(v, sk_p, ck)
    out = _flash(qc, kc, vc, ck, None if valid == sk_p else valid)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, sq_p, n, d)[:, :sq]


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
