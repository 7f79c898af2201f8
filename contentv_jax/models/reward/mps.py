"""MPS (Multi-dimensional Preference Score, Kwai-Kolors/MPS) in Flax NNX.

Mirrors github Kwai-Kolors/MPS ``trainer/models/clip_model.py`` (``CLIPModel.forward``) and
``trainer/models/cross_modeling.py`` (``Cross_model``, ``CrossAttention``, ``ParallelTransformerBlock``):

- a CLIP-H backbone (:class:`~contentv_jax.models.reward.clip.CLIPModel`) whose *token* features go
  through the projections: image ``visual_projection(vision last_hidden_state)`` ``(B, 257, D)`` (before
  ``post_layernorm``, as HF's ``last_hidden_state``), text ``text_projection(text last_hidden_state)``
  ``(B, 77, D)`` (after ``final_layer_norm``), and the pooled text feature ``text_projection(pooled)``;
- a condition mask over the 77 prompt tokens from a fixed condition string (the "overall" condition
  by default): ``s_t = max_j <text_t, cond_j>``, ``s / max(s)``, tokens with ``s <= 0.01`` masked out;
- ``Cross_model(dim=1024, layer_num=4, heads=16)``: per layer a residual cross-attention from the image
  tokens to the text tokens (multi-query: ``heads`` query heads, one shared 64-wide key/value head,
  plus a parallel SwiGLU feed-forward) then a residual parallel self-attention + SwiGLU block with
  rotary position embeddings on queries and keys; LayerNorms without bias;
- score ``logit_scale.exp() * cos(text_pooled, cross_model(...)[:, 0])``, the class-token output.

Difference from the official code, on purpose: the official forward normalises ``s`` by its maximum
over the whole batch (``sim_text_condition / sim_text_condition.max()``), which couples the samples of
a batch (a sample's mask depends on the other prompts) and can mask every token of a sample whose
similarities are all below 1 % of the batch maximum, making its softmax rows ``-inf`` only (NaN). Here
the maximum is taken per sample, so the mask of a sample depends only on its own prompt and always
keeps its best-matching token. For a batch of one prompt (the official inference example) the two are
identical. Also: the official code runs the images and the mask in float16; here everything is float32.

Layouts: ``frames (B, H, W, 3)`` float in ``[0, 1]`` channels-last, ``input_ids (B|1, 77)`` int.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contentv_jax.models.reward.base import RewardModel, broadcast_ids, check_frames
from contentv_jax.models.reward.clip import CLIPConfig, CLIPModel, Dense, LayerNorm, _normalize

# The "overall" preference condition of the MPS README's inference example.
CONDITION_OVERALL = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
MASK_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class MPSConfig:
    """MPS: the CLIP backbone config and ``Cross_model``'s ``layer_num``, ``heads``, ``dim_head``, ``ff_mult``
    (its ``dim`` is the CLIP ``projection_dim``: 1024 for CLIP-H).

    ``condition_ids``: the condition string's token ids (length ``text_config.max_position_embeddings``),
    from :func:`condition_ids`; an empty tuple means "not set" and the model refuses to run.
    """

    clip: CLIPConfig = CLIPConfig()
    layer_num: int = 4
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 4
    condition_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MPSConfig":
        kw = {k: d[k] for k in ("layer_num", "heads", "dim_head", "ff_mult") if k in d}
        return cls(clip=CLIPConfig.from_dict(d.get("clip", {})), condition_ids=tuple(int(i) for i in d.get("condition_ids", ())), **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def condition_ids(tokenizer, condition: str = CONDITION_OVERALL, length: int = 77) -> tuple[int, ...]:
    """Token ids of the condition string, padded to ``length`` as the MPS example tokenizes it."""
    from contentv_jax.models.reward.base import tokenize_with

    return tuple(int(i) for i in tokenize_with(tokenizer, [condition], length)[0])


def _swiglu(x: jax.Array) -> jax.Array:
    x, gate = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * x


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotary(n: int, dim: int) -> jax.Array:
    """Rotary angles ``(n, dim)``: ``cat(f, f)`` with ``f[i, j] = i / 10000**(2j / dim)`` (MPS ``RotaryEmbedding``)."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    f = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq[None]
    return jnp.concatenate([f, f], axis=-1)


_HI = jax.lax.Precision.HIGHEST


class CrossAttention(nnx.Module):
    """MPS ``CrossAttention(dim, heads, dim_head, parallel_ff=True)``; the residual is added by the caller.

    ``x (B, N, dim)`` queries, ``context (B, M, dim)`` (not normalised: ``norm_context=False``),
    ``mask`` additive ``(B, M)``. Kernels: ``to_q (dim, heads*dim_head)``, ``to_kv (dim, 2*dim_head)``,
    ``to_out (heads*dim_head, dim)``, ``ff_in (dim, 2*ff_mult*dim)``, ``ff_out (ff_mult*dim, dim)``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, *, rngs: nnx.Rngs):
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = LayerNorm(dim, 1e-5, use_bias=False)
        self.to_q = Dense(dim, inner, ("embed", "heads"), use_bias=False, rngs=rngs)
        self.to_kv = Dense(dim, 2 * dim_head, ("embed", None), use_bias=False, rngs=rngs)
        self.to_out = Dense(inner, dim, ("heads", "embed"), use_bias=False, rngs=rngs)
        self.ff_in = Dense(dim, 2 * ff_mult * dim, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.ff_out = Dense(ff_mult * dim, dim, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        xn = self.norm(x)
        q = self.to_q(xn).reshape(b, n, self.heads, self.dim_head) * self.dim_head ** -0.5
        k, v = jnp.split(self.to_kv(context), 2, axis=-1)
        sim = jnp.einsum("bihd,bjd->bhij", q, k, precision=_HI) + mask[:, None, None, :]
        attn = jax.nn.softmax(sim, axis=-1)
        out = jnp.einsum("bhij,bjd->bihd", attn, v, precision=_HI).reshape(b, n, -1)
        return self.to_out(out) + self.ff_out(_swiglu(self.ff_in(xn)))


class ParallelBlock(nnx.Module):
    """MPS ``ParallelTransformerBlock(dim, dim_head, heads, ff_mult)``; the residual is added by the caller.

    One fused projection ``(dim, heads*dim_head + 2*dim_head + 2*ff_mult*dim)`` -> queries, one
    key head, one value head (multi-query) and the SwiGLU input; rotary embeddings on q and k;
    ``attn_out (heads*dim_head, dim)`` + ``ff_out (ff_mult*dim, dim)``. No attention mask.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, *, rngs: nnx.Rngs):
        self.heads, self.dim_head = heads, dim_head
        self.split_sizes = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = LayerNorm(dim, 1e-5, use_bias=False)
        self.fused_attn_ff_proj = Dense(dim, sum(self.split_sizes), ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.attn_out = Dense(heads * dim_head, dim, ("heads", "embed"), use_bias=False, rngs=rngs)
        self.ff_out = Dense(ff_mult * dim, dim, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        xn = self.norm(x)
        cuts = [sum(self.split_sizes[:i + 1]) for i in range(3)]
        q, k, v, ff = jnp.split(self.fused_attn_ff_proj(xn), cuts, axis=-1)
        q = q.reshape(b, n, self.heads, self.dim_head)
        pos = rotary(n, self.dim_head)
        cos, sin = jnp.cos(pos), jnp.sin(pos)
        q = q * cos[None, :, None] + _rotate_half(q) * sin[None, :, None]
        k = k * cos[None] + _rotate_half(k) * sin[None]
        q = q * self.dim_head ** -0.5
        attn = jax.nn.softmax(jnp.einsum("bihd,bjd->bhij", q, k, precision=_HI), axis=-1)
        out = jnp.einsum("bhij,bjd->bihd", attn, v, precision=_HI).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(_swiglu(ff))


class CrossLayer(nnx.Module):
    """One ``Cross_model`` layer: ``x += cross_attn(x, ctx, mask); x += block(x)``."""

    def __init__(self, dim, heads, dim_head, ff_mult, *, rngs: nnx.Rngs):
        self.cross_attn = CrossAttention(dim, heads, dim_head, ff_mult, rngs=rngs)
        self.block = ParallelBlock(dim, heads, dim_head, ff_mult, rngs=rngs)

    def __call__(self, x, context, mask):
        x = x + self.cross_attn(x, context, mask)
        return x + self.block(x)


class CrossModel(nnx.Module):
    """MPS ``Cross_model``: ``layers`` is a list of :class:`CrossLayer`."""

    def __init__(self, dim, layer_num, heads, dim_head, ff_mult, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CrossLayer(dim, heads, dim_head, ff_mult, rngs=rngs) for _ in range(layer_num)])

    def __call__(self, query_tokens: jax.Array, context_tokens: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            query_tokens = layer(query_tokens, context_tokens, mask)
        return query_tokens


def condition_mask(text_tokens: jax.Array, condition_tokens: jax.Array) -> jax.Array:
    """Additive per-sample mask ``(B, L)``: 0 where ``s / max(s) > 0.01``, ``-inf`` elsewhere.

    ``s[b, t] = max_j <text_tokens[b, t], condition_tokens[b|0, j]>`` (projected token features,
    ``(B, L, D)`` and ``(B|1, L_c, D)``); the maximum that normalises ``s`` is per sample (the official
    code's is over the batch, see the module docstring). No gradient flows through the mask.
    """
    sim = jnp.einsum("bid,bjd->bij", text_tokens, jnp.broadcast_to(condition_tokens, (text_tokens.shape[0],) + condition_tokens.shape[1:]),
                     precision=_HI)
    s = jax.lax.stop_gradient(sim.max(axis=-1))
    s = s / s.max(axis=-1, keepdims=True)
    return jnp.where(s > MASK_THRESHOLD, 0.0, -jnp.inf).astype(jnp.float32)


class MPSModel(RewardModel):
    """The MPS reward: ``frames (B, H, W, 3)`` in ``[0, 1]``, ``input_ids (B|1, 77)`` -> ``(B,)`` float32.

    Attributes: ``clip`` (:class:`CLIPModel`, MPS checkpoint prefix ``model.``), ``cross_model``
    (:class:`CrossModel`, prefix ``cross_model.``), ``condition_ids`` (a static tuple).

    Raises (on call):
      ValueError: ``config.condition_ids`` is empty, or bad ``frames``/``input_ids`` shapes.
    """

    def __init__(self, cfg: MPSConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.clip = CLIPModel(cfg.clip, rngs=rngs)
        self.cross_model = CrossModel(cfg.clip.projection_dim, cfg.layer_num, cfg.heads, cfg.dim_head, cfg.ff_mult, rngs=rngs)
        self.context_length = cfg.clip.text_config.max_position_embeddings
        self.condition_ids = tuple(cfg.condition_ids)

    def text_tokens(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(B, L)`` ids -> (projected token features ``(B, L, D)``, projected pooled feature ``(B, D)``)."""
        hidden, pooled = self.clip.text_model(input_ids)
        return self.clip.text_projection(hidden), self.clip.text_projection(pooled)

    def score(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Normalised ``pixels (B, S, S, 3)``, ``input_ids (B, L)`` -> ``(B,)`` float32 MPS score."""
        if len(self.condition_ids) != self.context_length:
            raise ValueError(
                f"MPS condition_ids: expected {self.context_length} token ids of the condition string, got {len(self.condition_ids)}")
        text_f, text_eos = self.text_tokens(input_ids)
        image_f = self.clip.visual_projection(self.clip.vision_model(pixels)[0])
        cond_f, _ = self.text_tokens(jnp.asarray(self.condition_ids, jnp.int32)[None])
        mask = condition_mask(text_f, cond_f)
        img = self.cross_model(image_f, text_f, mask)[:, 0]
        return jnp.exp(self.clip.logit_scale[...].astype(jnp.float32)) * jnp.sum(_normalize(text_eos) * _normalize(img), axis=-1)

    def __call__(self, frames: jax.Array, input_ids: jax.Array | None = None) -> jax.Array:
        check_frames(frames)
        ids = broadcast_ids(input_ids, frames.shape[0], self.context_length)
        return self.score(self.clip.pixels(frames), ids)
