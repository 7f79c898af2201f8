"""CLIP in Flax NNX: a ViT vision tower and a causal text tower, as in HF ``CLIPModel``.

Mirrors ``transformers/models/clip/modeling_clip.py`` (``CLIPModel``: ``CLIPTextTransformer``,
``CLIPVisionTransformer``, ``visual_projection``, ``text_projection``, ``logit_scale``) and, with the
same computation, open_clip's ``CLIP`` (``open_clip/model.py``, ``open_clip/transformer.py``: pre-LN
``VisionTransformer`` with class token, ``ln_pre``/``ln_post`` and ``proj``; causal ``TextTransformer``
with ``ln_final``, argmax pooling and ``text_projection``). PickScore_v1 is this model at ViT-H/14;
MPS and HPSv2 are built on it (``mps.py``, ``hps.py``).

Parameter names follow HF's module tree (``text_model.encoder.layers.{i}.self_attn.q_proj.kernel``,
...; kernels are ``(in, out)``, the torch Linear weight transposed; the patch conv kernel is
``(p, p, 3, width)``); the name tables to HF and open_clip checkpoints live in ``converters/reward.py``.
Config field names are HF ``CLIPConfig``'s (``text_config``, ``vision_config``, ``projection_dim``).

Layouts: images are channels-last ``(B, H, W, 3)`` float, already normalised (``preprocess.py``);
token ids are ``(B, L)`` int with ``L <= max_position_embeddings``. All computation is float32
unless ``dtype`` says otherwise; LayerNorm statistics and softmax are always float32.

Text attention is causal only (no padding mask): pooled text features and every token before the
first end-of-text token are identical to HF's with or without an ``attention_mask`` (positions attend
only backwards); MPS uses all 77 token features without a mask, as the official MPS code does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contentv_jax.models.reward.base import RewardModel, broadcast_ids, check_frames
from contentv_jax.models.reward.preprocess import clip_preprocess

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """HF ``CLIPTextConfig`` fields we use (same names, same defaults as the laion ViT-H-14 text tower).

    ``pool``: ``"argmax"`` (the position of the largest token id, HF's legacy path when
    ``eos_token_id == 2``, and open_clip's) or ``"eos"`` (the first ``eos_token_id``, HF otherwise).
    """

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    pool: str = "argmax"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """HF ``CLIPVisionConfig`` fields we use (defaults: the ViT-H/14 vision tower)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """Class token plus ``(image_size // patch_size) ** 2`` patches (257 at ViT-H/14, 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """HF ``CLIPConfig``: ``text_config``, ``vision_config``, ``projection_dim``, ``logit_scale_init_value``.

    ``dtype``: parameter and matmul dtype (``"float32"`` default; scores are returned in float32).
    """

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 1024
    logit_scale_init_value: float = 2.6592
    dtype: str = "float32"

    def __post_init__(self):
        for name, c in (("text_config", self.text_config), ("vision_config", self.vision_config)):
            if c.hidden_act not in ACTIVATIONS:
                raise ValueError(f"{name}.hidden_act: expected one of {ACTIVATIONS}, got {c.hidden_act!r}")
            if c.hidden_size % c.num_attention_heads:
                raise ValueError(
                    f"{name}: hidden_size {c.hidden_size} is not a multiple of num_attention_heads {c.num_attention_heads}"
                )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.text_config.pool not in ("argmax", "eos"):
            raise ValueError(f"text_config.pool: expected 'argmax' or 'eos', got {self.text_config.pool!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """Build from an HF ``CLIPConfig`` dict (``config.json`` of ``CLIPModel.save_pretrained``) or ``to_dict()``.

        Unknown keys are ignored (HF configs carry many); ``pool`` is derived from ``eos_token_id``
        exactly as HF's ``CLIPTextTransformer`` does when not given.
        """
        t = dict(d.get("text_config") or {})
        v = dict(d.get("vision_config") or {})
        tf = {f.name for f in dataclasses.fields(CLIPTextConfig)}
        vf = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
        t = {k: t[k] for k in tf if k in t}
        if "pool" not in t:
            t["pool"] = "argmax" if t.get("eos_token_id", 2) == 2 else "eos"
        kw = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d}
        if d.get("dtype") in ("float32", "bfloat16", "float16"):  # ours; HF's "dtype" (often None) is the torch dtype
            kw["dtype"] = d["dtype"]
        return cls(text_config=CLIPTextConfig(**t), vision_config=CLIPVisionConfig(**{k: v[k] for k in vf if k in v}), **kw)

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> "CLIPConfig":
        """Build from an open_clip model config (``open_clip/model_configs/ViT-H-14.json``: ``embed_dim``,
        ``vision_cfg``, ``text_cfg``, optional ``quick_gelu``).

        Raises:
          ValueError: the config uses a feature this model does not implement (a timm or HF tower,
            attentional pooling, non-default pooling, biasless or post-pool LayerNorms).
        """
        v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        unsupported = [f"vision_cfg.{k}" for k in ("timm_model_name", "attentional_pool", "final_ln_after_pool", "no_ln_pre")
                       if v.get(k)] + [f"text_cfg.{k}" for k in ("hf_model_name", "no_causal_mask", "embed_cls", "proj_bias")
                                       if t.get(k)]
        if v.get("pool_type", "tok") != "tok":
            unsupported.append(f"vision_cfg.pool_type={v['pool_type']!r}")
        if t.get("pool_type", "argmax") != "argmax":
            unsupported.append(f"text_cfg.pool_type={t['pool_type']!r}")
        if unsupported:
            raise ValueError(f"open_clip config: unsupported features {unsupported}")
        act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
        vw = int(v["width"])
        head_width = int(v.get("head_width", 64))
        vision = CLIPVisionConfig(
            hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4.0)), num_hidden_layers=int(v["layers"]),
            num_attention_heads=vw // head_width, image_size=int(v.get("image_size", 224)), patch_size=int(v["patch_size"]),
            hidden_act=act,
        )
        tw = int(t.get("width", 512))
        text = CLIPTextConfig(
            vocab_size=int(t.get("vocab_size", 49408)), hidden_size=tw, intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
            num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
            max_position_embeddings=int(t.get("context_length", 77)), hidden_act=act, pool="argmax",
        )
        return cls(text_config=text, vision_config=vision, projection_dim=int(cfg["embed_dim"]),
                   logit_scale_init_value=math.log(1 / 0.07))

    def to_dict(self) -> dict:
        """A JSON-able dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Layers


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)  # gelu_new, gelu_pytorch_tanh


def _param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names))


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)``; kernel ``(in, out)`` (torch Linear weight transposed), logical ``names``."""

    def __init__(self, din: int, dout: int, names, *, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = _param(rngs, nnx.initializers.normal(din ** -0.5), (din, dout), dtype, names)
        self.bias = _param(rngs, nnx.initializers.zeros, (dout,), dtype, names[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return y + self.bias[...] if self.bias is not None else y


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm(dim, eps)`` over the last axis; statistics in float32, returns ``x``'s dtype.

    ``use_bias=False`` gives the bias-free LayerNorm of the MPS head.
    """

    def __init__(self, dim: int, eps: float, *, use_bias: bool = True, dtype=jnp.float32, name: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=(name,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), out_sharding=(name,)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention ``(B, S, N, D) x (B, T, N, D) -> (B, S, N, D)``, scale ``D**-0.5``.

    ``mask``: additive, broadcastable to ``(B, N, S, T)`` (0 keeps, ``-inf`` drops). Softmax in float32.
    """
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bsnd,btnd->bnst", q, k, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32) * scale
    if mask is not None:
        s = s + mask
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnst,btnd->bsnd", p, v, precision=jax.lax.Precision.HIGHEST)


class _Group(nnx.Module):
    """A named group of parameters (mirrors an HF submodule without its own computation)."""


class SelfAttention(nnx.Module):
    """HF ``CLIPAttention``: ``q_proj``/``k_proj``/``v_proj``/``out_proj`` with biases, ``heads`` heads."""

    def __init__(self, width: int, heads: int, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = Dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = Dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v_proj = Dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out_proj = Dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, s, w = x.shape
        split = lambda t: t.reshape(b, s, self.heads, w // self.heads)
        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
        return self.out_proj(o.reshape(b, s, w))


class EncoderLayer(nnx.Module):
    """HF ``CLIPEncoderLayer`` (pre-LN): ``x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))``."""

    def __init__(self, width: int, mlp: int, heads: int, act: str, eps: float, dtype, rngs: nnx.Rngs):
        self.act = act
        self.layer_norm1 = LayerNorm(width, eps, dtype=dtype)
        self.self_attn = SelfAttention(width, heads, dtype, rngs)
        self.layer_norm2 = LayerNorm(width, eps, dtype=dtype)
        self.mlp = _Group()
        self.mlp.fc1 = Dense(width, mlp, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.mlp.fc2 = Dense(mlp, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(_act(self.act, self.mlp.fc1(self.layer_norm2(x))))


class Encoder(nnx.Module):
    """HF ``CLIPEncoder``: ``layers`` is a list of :class:`EncoderLayer`."""

    def __init__(self, width, mlp, heads, n, act, eps, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(width, mlp, heads, act, eps, dtype, rngs) for _ in range(n)])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TextTransformer(nnx.Module):
    """HF ``CLIPTextTransformer``: token + position embeddings, causal encoder, ``final_layer_norm``."""

    def __init__(self, cfg: CLIPTextConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.hidden_size
        self.embeddings = _Group()
        self.embeddings.token_embedding = _param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, w), dtype, ("vocab", "embed"))
        self.embeddings.position_embedding = _param(
            rngs, nnx.initializers.normal(0.01), (cfg.max_position_embeddings, w), dtype, (None, "embed"))
        self.encoder = Encoder(w, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                               cfg.hidden_act, cfg.layer_norm_eps, dtype, rngs)
        self.final_layer_norm = LayerNorm(w, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``input_ids (B, L)`` int -> (``last_hidden_state (B, L, W)``, ``pooled (B, W)``), after ``final_layer_norm``.

        Pooling: the token at the largest id (``pool="argmax"``) or at the first ``eos_token_id``.
        """
        ids = jnp.asarray(input_ids).astype(jnp.int32)
        b, n = ids.shape
        x = jnp.take(self.embeddings.token_embedding[...], ids, axis=0) + self.embeddings.position_embedding[...][:n]
        causal = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)
        x = self.final_layer_norm(self.encoder(x, causal[None, None]))
        if self.cfg.pool == "argmax":
            pos = jnp.argmax(ids, axis=-1)
        else:
            pos = jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
        return x, x[jnp.arange(b), pos]


class VisionTransformer(nnx.Module):
    """HF ``CLIPVisionTransformer``: patch conv (no bias) + class token + positions, ``pre_layernorm``,
    encoder, ``post_layernorm`` on the class token."""

    def __init__(self, cfg: CLIPVisionConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        w, p = cfg.hidden_size, cfg.patch_size
        self.embeddings = _Group()
        self.embeddings.class_embedding = _param(rngs, nnx.initializers.normal(w ** -0.5), (w,), dtype, ("embed",))
        self.embeddings.patch_embedding = _Group()
        self.embeddings.patch_embedding.kernel = _param(
            rngs, nnx.initializers.normal((p * p * cfg.num_channels) ** -0.5), (p, p, cfg.num_channels, w), dtype,
            (None, None, None, "embed"))
        self.embeddings.position_embedding = _param(rngs, nnx.initializers.normal(0.02), (cfg.num_positions, w), dtype, (None, "embed"))
        self.pre_layernorm = LayerNorm(w, cfg.layer_norm_eps, dtype=dtype)
        self.encoder = Encoder(w, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                               cfg.hidden_act, cfg.layer_norm_eps, dtype, rngs)
        self.post_layernorm = LayerNorm(w, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``pixels (B, S, S, 3)`` normalised, ``S = image_size`` -> (``last_hidden_state (B, 1 + P, W)``
        before ``post_layernorm`` as in HF, ``pooled (B, W)`` = ``post_layernorm`` of the class token).

        Raises:
          ValueError: the image is not ``image_size`` square with ``num_channels`` channels.
        """
        c = self.cfg
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"pixels: expected (B, {c.image_size}, {c.image_size}, {c.num_channels}), got {pixels.shape}")
        kern = self.embeddings.patch_embedding.kernel[...]
        x = jax.lax.conv_general_dilated(
            pixels.astype(kern.dtype), kern, (c.patch_size, c.patch_size), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.embeddings.class_embedding[...], (b, 1, c.hidden_size)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.embeddings.position_embedding[...]
        x = self.encoder(self.pre_layernorm(x))
        return x, self.post_layernorm(x[:, 0])


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(RewardModel):
    """HF ``CLIPModel`` in Flax NNX, and the CLIP / PickScore reward.

    As a reward (``__call__``): ``frames (B, H, W, 3)`` float in ``[0, 1]`` and ``input_ids (B|1, L)``
    -> ``(B,)`` float32 ``logit_scale.exp() * cos(image, text)`` after :func:`clip_preprocess`
    (PickScore_v1's score: ``logits_per_image`` of ``yuvalkirstain/PickScore_v1``).

    Attributes: ``text_model``, ``vision_model``, ``visual_projection`` (``(W_v, D)`` kernel, no bias),
    ``text_projection`` (``(W_t, D)``, no bias), ``logit_scale`` (scalar, log of the temperature).
    """

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.text_model = TextTransformer(cfg.text_config, dtype, rngs)
        self.vision_model = VisionTransformer(cfg.vision_config, dtype, rngs)
        self.visual_projection = Dense(cfg.vision_config.hidden_size, cfg.projection_dim, ("embed", "projection"),
                                       use_bias=False, dtype=dtype, rngs=rngs)
        self.text_projection = Dense(cfg.text_config.hidden_size, cfg.projection_dim, ("embed", "projection"),
                                     use_bias=False, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, jnp.float32), out_sharding=())
        self.context_length = cfg.text_config.max_position_embeddings

    def pixels(self, frames: jax.Array) -> jax.Array:
        """``frames (B, H, W, 3)`` in ``[0, 1]`` -> normalised ``(B, S, S, 3)`` CLIP input, ``S = image_size``."""
        check_frames(frames)
        return clip_preprocess(frames, self.config.vision_config.image_size)

    def __call__(self, frames: jax.Array, input_ids: jax.Array | None = None) -> jax.Array:
        ids = broadcast_ids(input_ids, frames.shape[0], self.context_length)
        return self.score(self.pixels(frames), ids)

    def get_image_features(self, pixels: jax.Array) -> jax.Array:
        """``pixels (B, S, S, 3)`` normalised -> ``(B, D)`` float32 (not L2-normalised), HF ``get_image_features``."""
        return self.visual_projection(self.vision_model(pixels)[1]).astype(jnp.float32)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """``input_ids (B, L)`` -> ``(B, D)`` float32 (not L2-normalised), HF ``get_text_features``."""
        return self.text_projection(self.text_model(input_ids)[1]).astype(jnp.float32)

    def score(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
        """``logit_scale.exp() * cos(image_i, text_i)``, ``(B,)`` float32 (PickScore; HF ``logits_per_image`` diagonal).

        ``input_ids`` may have batch 1 (one prompt for every image).
        """
        img = _normalize(self.get_image_features(pixels))
        txt = _normalize(self.get_text_features(input_ids))
        return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * jnp.sum(img * txt, axis=-1)
