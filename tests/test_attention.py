"""Attention kernels against the XLA reference (jax.nn.dot_product_attention) on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contentv_jax.models.attention import chunked_attention, dot_product_attention, joint_attention, joint_attention_local


def _qkv(b=2, sq=37, sk=45, n=3, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, sq, n, d)), jax.random.normal(ks[1], (b, sk, n, d)),
            jax.random.normal(ks[2], (b, sk, n, d)))


def _softmax_reference(q, k, v, kv_length=None):
    """Closed form in numpy float64: softmax(q k^T / sqrt(D)) v over the first kv_length keys."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    if kv_length is not None:
        k, v = k[:, :kv_length], v[:, :kv_length]
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


@pytest.mark.parametrize("kernel", ["xla", "chunked", "splash"])
@pytest.mark.parametrize("kv_length", [None, 29])
def test_kernel_matches_closed_form(kernel, kv_length):
    q, k, v = _qkv()
    out = dot_product_attention(q, k, v, kernel=kernel, kv_length=kv_length)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), _softmax_reference(q, k, v, kv_length), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kv_length", [77, 80, 90])
def test_chunked_multi_chunk_forward_and_grad_match_xla(kv_length):
    """90 keys in chunks of 16 (96 padded): 77 valid keys leave a part-padded chunk and one of padding only
    (skipped); 80 end on a chunk boundary; 90 mask only the padding of the last chunk."""
    q, k, v = _qkv(sq=70, sk=90)
    chunked = lambda q, k, v: chunked_attention(q, k, v, kv_length=kv_length, q_chunk=32, kv_chunk=16)  # noqa: E731
    xla = lambda q, k, v: dot_product_attention(q, k, v, kv_length=kv_length)  # noqa: E731
    w = jax.random.normal(jax.random.key(9), q.shape)
    loss = lambda f: lambda *a: (f(*a) * w).sum()  # noqa: E731
    np.testing.assert_allclose(np.asarray(chunked(q, k, v)), np.asarray(xla(q, k, v)), rtol=1e-5, atol=2e-6)
    g_c = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    g_x = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_c, g_x):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # padded keys get no gradient
    if kv_length < 90:
        assert float(jnp.abs(g_c[1][:, kv_length:]).max()) == 0.0
        assert float(jnp.abs(g_c[2][:, kv_length:]).max()) == 0.0


def test_splash_grad_matches_xla():
    q, k, v = _qkv(b=1, sq=20, sk=24, n=2, d=8)
    w = jax.random.normal(jax.random.key(3), q.shape)
    g_s = jax.grad(lambda q, k, v: (dot_product_attention(q, k, v, kernel="splash") * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_x = jax.grad(lambda q, k, v: (dot_product_attention(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_s, g_x):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_joint_attention_padding_is_masked_and_matches_diffusers_order():
    """Trailing video-token padding (img_valid) changes nothing for the real tokens."""
    qi, ki, vi = _qkv(sq=13, sk=13, seed=1)
    qt, kt, vt = _qkv(sq=5, sk=5, seed=2)
    out_i, out_t = joint_attention(qi, ki, vi, qt, kt, vt)
    # diffusers JointAttnProcessor2_0: one attention over the concatenation [image ; text]
    ref = _softmax_reference(*(np.concatenate([a, b], 1) for a, b in ((qi, qt), (ki, kt), (vi, vt))))
    np.testing.assert_allclose(np.asarray(out_i), ref[:, :13], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out_t), ref[:, 13:], rtol=1e-5, atol=2e-6)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 3), (0, 0), (0, 0)), constant_values=7.0)  # noqa: E731
    for kernel in ("xla", "chunked"):
        pi, pt = jax.jit(joint_attention_local, static_argnames=("kernel", "img_valid"))(pad(qi), pad(ki), pad(vi), qt, kt, vt, kernel=kernel, img_valid=13)
        np.testing.assert_allclose(np.asarray(pi[:, :13]), ref[:, :13], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(pt), ref[:, 13:], rtol=1e-5, atol=2e-6)


def test_bad_inputs_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, kernel="flash3")
    with pytest.raises(ValueError, match="kv_length"):
        dot_product_attention(q, k, v, kv_length=0)
    with pytest.raises(ValueError, match="k, v"):
        dot_product_attention(q, k[:, :, :2], v)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="GPU"):
            dot_product_attention(q, k, v, kernel="cudnn")
    with pytest.raises(ValueError, match="img_valid"):
        joint_attention(q, q, q, k, k, v, img_valid=40)
    with pytest.raises(ValueError, match="k_txt"):
        joint_attention(q, q, q, k, k[:, :3], v)
