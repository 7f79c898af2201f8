"""The 3D MM-DiT of ContentV in Flax NNX (channels-last).

Mirrors ContentV's PyTorch model (``torch_npu_backend/transformer.py``; github ``bytedance/ContentV``
``contentv_transformer.py``), i.e. diffusers' ``SD3Transformer2DModel``
(``diffusers/models/transformers/transformer_sd3.py``) with a 3D patch embedding:

- patch embed: the 2D ``pos_embed.proj`` conv (kernel = stride = patch) on every latent frame, tokens in
  (t, h, w) order, plus the fixed 3D sin-cos table of ``get_3d_sincos_pos_embed``
  (``diffusers/models/embeddings.py``) computed for the input's T, H, W;
- conditioning: ``temb = TimestepEmbedding(sinusoid(timestep, 256)) + PixArt projection(pooled)``
  (``CombinedTimestepTextProjEmbeddings``); context: ``Linear(joint_attention_dim -> width)``;
- ``num_layers`` ``JointTransformerBlock``s (``diffusers/models/attention.py``): AdaLayerNormZero on both
  streams, joint attention over ``[video tokens ; text tokens]`` with QK RMSNorm
  (``JointAttnProcessor2_0``), GELU-tanh FFN (4x); the last block is ``context_pre_only``;
- output: ``AdaLayerNormContinuous`` (scale, then shift), ``Linear(width -> p*p*C)``, unpatchify.

The first ``num_layers - 1`` blocks are identical: they are created stacked with ``nnx.vmap`` (leading
logical axis ``layers``) and run with ``jax.lax.scan`` over their split state, each step under
``jax.checkpoint`` with a named remat policy (:data:`REMAT_POLICIES`). The last block is a separate module (``final_block``).

Parameters live in ``param_dtype``; matmuls run in ``dtype``; layer-norm / RMS-norm statistics and the
sinusoids are computed in float32 (softmax statistics: see ``attention.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contentv_jax.models.attention import joint_attention
from contentv_jax.sharding import ulysses
from contentv_jax.sharding.logical import constrain

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Configuration of :class:`MMDiT` (diffusers ``SD3Transformer2DModel`` field names).

    Attributes:
      num_layers: joint blocks (the last one is ``context_pre_only``).
      num_attention_heads, attention_head_dim: width = heads x head_dim.
      in_channels, out_channels: latent channels.
      patch_size: spatial patch (the temporal patch is 1).
      joint_attention_dim: width of the text context (T5 width, 4096).
      caption_projection_dim: width the context is projected to; must equal the model width.
      pooled_projection_dim: width of the pooled text embedding (2048).
      qk_norm: ``"rms_norm"`` or ``None``.
      sample_size, pos_embed_max_size: kept for diffusers-config compatibility; unused (3D table).
      param_dtype: parameter dtype name ("float32", "bfloat16", "float16").
      dtype: compute dtype name for matmuls and the residual stream.
      remat_policy: one of :data:`REMAT_POLICIES` for the scanned blocks.
      attention_kernel: passed to :func:`contentv_jax.models.attention.joint_attention`.
      norm_eps: epsilon of every layer norm and RMS norm (1e-6 in diffusers).
    """

    num_layers: int = 38
    num_attention_heads: int = 38
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 2432
    pooled_projection_dim: int = 2048
    qk_norm: str | None = "rms_norm"
    sample_size: int = 128
    pos_embed_max_size: int | None = 192
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention_kernel: str = "xla"
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.caption_projection_dim != self.width:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads x "
                f"attention_head_dim ({self.width}) for joint attention"
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be 'rms_norm' or None, got {self.qk_norm!r}")
        if self.width % 16:
            raise ValueError(f"the width {self.width} must be a multiple of 16 for the 3D sin-cos table")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"{f} must be one of {sorted(DTYPES)}, got {getattr(self, f)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")

    @property
    def width(self) -> int:
        """Model width (heads x head_dim)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        """FFN hidden width (4 x width, diffusers ``FeedForward`` default)."""
        return 4 * self.width

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **kw) -> TransformerConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        """Inverse of :meth:`to_dict`. Raises ValueError naming unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys {unknown}")
        return cls(**d)

    _DIFFUSERS_KEYS = (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "patch_size",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "qk_norm", "sample_size",
        "pos_embed_max_size",
    )

    @classmethod
    def from_diffusers_config(cls, config: dict, **overrides) -> TransformerConfig:
        """Build from a diffusers ``config.json`` dict (``SD3Transformer2DModel`` / ContentV's ``SD3Transformer3DModel``).

        Keys starting with ``_`` are ignored. ``overrides`` set our own fields (dtypes, remat, kernel).
        Raises:
          ValueError: non-empty ``dual_attention_layers`` (SD3.5 Medium's MMDiT-X, not supported) or unknown keys.
        """
        known = set(cls._DIFFUSERS_KEYS) | {"dual_attention_layers"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unsupported transformer config keys {unknown}")
        if config.get("dual_attention_layers"):
            raise ValueError(
                f"dual_attention_layers={config['dual_attention_layers']} (MMDiT-X) is not supported; ContentV has none"
            )
        kw = {k: config[k] for k in cls._DIFFUSERS_KEYS if k in config}
        if kw.get("caption_projection_dim") is None:  # diffusers' SD3 default is not the width; ours must be
            kw["caption_projection_dim"] = kw.get("num_attention_heads", 38) * kw.get("attention_head_dim", 64)
        if "out_channels" in kw and kw["out_channels"] is None:
            kw["out_channels"] = kw.get("in_channels", 16)
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        """The diffusers ``config.json`` dict ContentV's ``SD3Transformer3DModel`` loads."""
        d = {k: getattr(self, k) for k in self._DIFFUSERS_KEYS}
        d["dual_attention_layers"] = []
        return {"_class_name": "SD3Transformer3DModel", **d}


CONFIGS: dict[str, TransformerConfig] = {
    # ContentV-8B (report Table 1): SD3.5 Large's MM-DiT with the 3D patch embed.
    "contentv-8b": TransformerConfig(param_dtype="float32", dtype="bfloat16", remat_policy="full"),
    # SD3.5 Large: same tensors (plus the unused 2D pos table in its checkpoint).
    "sd35-large": TransformerConfig(param_dtype="float32", dtype="bfloat16", remat_policy="full"),
    # For tests: 3 layers (2 scanned + the context_pre_only block), 4 heads x 16.
    "tiny": TransformerConfig(
        num_layers=3, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24, sample_size=16,
        pos_embed_max_size=None,
    ),
}


def get_config(name: str, **overrides) -> TransformerConfig:
    """A named config (``contentv-8b``, ``sd35-large``, ``tiny``) or a YAML file of
    :class:`TransformerConfig` fields (``configs/model/*.yaml``), with optional field overrides.

    Raises:
      KeyError: unknown name. ValueError: unknown fields in the YAML file.
    """
    if name.endswith((".yaml", ".yml")):
        import yaml

        return TransformerConfig.from_dict(yaml.safe_load(Path(name).read_text())).replace(**overrides)
    if name not in CONFIGS:
        raise KeyError(f"unknown transformer config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Fixed embeddings (numpy / float32; mirror diffusers/models/embeddings.py)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``get_1d_sincos_pos_embed_from_grid``: (M,) -> (M, dim) = [sin(pos w), cos(pos w)], float64."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(
    embed_dim: int, frames: int, height: int, width: int, *, spatial_scale: float = 0.5, temporal_scale: float = 1.0
) -> np.ndarray:
    """The 3D sin-cos table of ``get_3d_sincos_pos_embed(embed_dim, spatial_size=(width, height), frames,
    spatial_interpolation_scale, temporal_interpolation_scale)``, flattened in (t, h, w) token order.

    Layout per token: ``[temporal (D/4) ; sincos(w / s) (3D/8) ; sincos(h / s) (3D/8)]`` (diffusers'
    ``meshgrid(w, h, indexing="xy")`` puts the width coordinate first).

    Args:
      embed_dim: D, a multiple of 16. frames, height, width: token grid (latent size / patch).
    Returns:
      (frames * height * width, D) float32 numpy array.
    """
    d_sp, d_t = 3 * embed_dim // 4, embed_dim // 4
    hh, ww = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    spatial = np.concatenate(
        [_sincos_1d(d_sp // 2, ww.reshape(-1) / spatial_scale), _sincos_1d(d_sp // 2, hh.reshape(-1) / spatial_scale)],
        axis=1,
    )  # (h*w, 3D/4)
    temporal = _sincos_1d(d_t, np.arange(frames, dtype=np.float32) / temporal_scale)  # (t, D/4)
    table = np.concatenate(
        [np.repeat(temporal[:, None], height * width, axis=1), np.repeat(spatial[None], frames, axis=0)], axis=-1
    )
    return table.reshape(frames * height * width, embed_dim).astype(np.float32)


def timestep_sinusoid(timestep: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: (B,) -> (B, dim) float32 [cos ; sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timestep.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Layers


class _Group(nnx.Module):
    """A named group of parameters (mirrors a diffusers submodule without its own computation)."""


def _param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names))


class Dense(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``(in, out)`` (torch Linear weight transposed).

    Params in ``cfg.param_dtype`` with logical names ``names = (in_name, out_name)``; matmul in ``cfg.dtype``.
    """

    def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.jnp_dtype
        self.kernel = _param(rngs, nnx.initializers.lecun_normal(), (din, dout), cfg.jnp_param_dtype, names)
        self.bias = _param(rngs, nnx.initializers.normal(0.02), (dout,), cfg.jnp_param_dtype, names[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32; returns ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """diffusers ``RMSNorm(head_dim, eps, elementwise_affine=True)`` over the last axis (QK norm)."""

    def __init__(self, dim: int, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype), out_sharding=("head_dim",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class AdaLayerNormZero(nnx.Module):
    """diffusers ``AdaLayerNormZero``: ``linear(silu(temb))`` -> 6 chunks (shift/scale/gate msa, shift/scale/gate mlp)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.linear = Dense(cfg.width, 6 * cfg.width, ("embed", "modulation"), cfg, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array):
        emb = self.linear(jax.nn.silu(temb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(emb, 6, axis=-1)
        x = layer_norm(x, self.eps) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nnx.Module):
    """diffusers ``AdaLayerNormContinuous`` (layer norm, no affine): ``linear(silu(temb))`` -> (scale, shift)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.linear = Dense(cfg.width, 2 * cfg.width, ("embed", "modulation"), cfg, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)
        return layer_norm(x, self.eps) * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, activation_fn="gelu-approximate")``: ``proj_in`` (net.0.proj), GELU-tanh, ``proj_out`` (net.2)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, tokens: str):
        self.tokens = tokens
        self.proj_in = Dense(cfg.width, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs=rngs)
        self.proj_out = Dense(cfg.ffn_dim, cfg.width, ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.proj_in(x), approximate=True)
        h = constrain(h, ("batch", self.tokens, "mlp"))
        return self.proj_out(h)


class JointAttention(nnx.Module):
    """diffusers ``Attention`` with ``JointAttnProcessor2_0``: separate QKV for video and text tokens, QK RMSNorm,
    one softmax attention over ``[video ; text]``, output projections ``to_out`` (``to_out.0``) and ``to_add_out``
    (absent when ``context_pre_only``)."""

    def __init__(self, cfg: TransformerConfig, *, context_pre_only: bool, rngs: nnx.Rngs):
        d, n, hd = cfg.width, cfg.num_attention_heads, cfg.attention_head_dim
        self.heads, self.head_dim, self.kernel = n, hd, cfg.attention_kernel
        proj = partial(Dense, d, d, ("embed", "heads"), cfg, rngs=rngs)
        self.to_q, self.to_k, self.to_v = proj(), proj(), proj()
        self.add_q_proj, self.add_k_proj, self.add_v_proj = proj(), proj(), proj()
        self.to_out = Dense(d, d, ("heads", "embed"), cfg, rngs=rngs)
        self.to_add_out = None if context_pre_only else Dense(d, d, ("heads", "embed"), cfg, rngs=rngs)
        if cfg.qk_norm == "rms_norm":
            norm = partial(RMSNorm, hd, cfg, rngs=rngs)
            self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = norm(), norm(), norm(), norm()
        else:
            self.norm_q = self.norm_k = self.norm_added_q = self.norm_added_k = None

    def _heads(self, x: jax.Array, tokens: str) -> jax.Array:
        b, s, _ = x.shape
        return constrain(x.reshape(b, s, self.heads, self.head_dim), ("batch", tokens, "heads", "head_dim"))

    def __call__(self, x: jax.Array, c: jax.Array, img_valid: int | None = None) -> tuple[jax.Array, jax.Array | None]:
        q, k, v = (self._heads(f(x), "video_tokens") for f in (self.to_q, self.to_k, self.to_v))
        cq, ck, cv = (self._heads(f(c), "text_tokens") for f in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
            cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
        out_x, out_c = joint_attention(q, k, v, cq, ck, cv, kernel=self.kernel, img_valid=img_valid)
        b = x.shape[0]
        out_x = self.to_out(out_x.reshape(b, out_x.shape[1], -1))
        out_c = None if self.to_add_out is None else self.to_add_out(out_c.reshape(b, out_c.shape[1], -1))
        return out_x, out_c


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock`` (no dual attention).

    ``__call__(x (B, S, D), c (B, L, D), temb (B, D)) -> (x, c)``; ``c`` is ``None`` for the
    ``context_pre_only`` block.
    """

    def __init__(self, cfg: TransformerConfig, *, context_pre_only: bool, rngs: nnx.Rngs):
        self.context_pre_only = context_pre_only
        self.eps = cfg.norm_eps
        self.norm1 = AdaLayerNormZero(cfg, rngs=rngs)
        self.norm1_context = AdaLayerNormContinuous(cfg, rngs=rngs) if context_pre_only else AdaLayerNormZero(cfg, rngs=rngs)
        self.attn = JointAttention(cfg, context_pre_only=context_pre_only, rngs=rngs)
        self.ff = FeedForward(cfg, rngs=rngs, tokens="video_tokens")
        self.ff_context = None if context_pre_only else FeedForward(cfg, rngs=rngs, tokens="text_tokens")

    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array, img_valid: int | None = None):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(nx, nc, img_valid)
        x = x + gate_msa[:, None] * attn_x
        nx = layer_norm(x, self.eps) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = constrain(x + gate_mlp[:, None] * self.ff(nx), ("batch", "video_tokens", "embed"))
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * attn_c
        nc = layer_norm(c, self.eps) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = constrain(c + c_gate_mlp[:, None] * self.ff_context(nc), ("batch", "text_tokens", "embed"))
        return x, c


class PatchEmbed3D(nnx.Module):
    """Per-frame patch conv + 3D sin-cos table. ``proj.kernel`` is ``(p, p, C, D)`` (torch ``(D, C, p, p)``)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.proj = _Group()
        p, cin, d = cfg.patch_size, cfg.in_channels, cfg.width
        self.proj.kernel = _param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), (p, p, cin, d),
                                  cfg.jnp_param_dtype, (None, None, "patch_in", "embed"))
        self.proj.bias = _param(rngs, nnx.initializers.normal(0.02), (d,), cfg.jnp_param_dtype, ("embed",))
        self.patch_size, self.width, self.dtype = p, d, cfg.jnp_dtype

    def __call__(self, latents: jax.Array) -> jax.Array:
        b, t, h, w, c = latents.shape
        p = self.patch_size
        x = latents.astype(self.dtype).reshape(b, t, h // p, p, w // p, p, c)
        x = jnp.einsum("bthpwqc,pqcd->bthwd", x, self.proj.kernel[...].astype(self.dtype))
        x = x.reshape(b, t * (h // p) * (w // p), self.width) + self.proj.bias[...].astype(self.dtype)
        pos = sincos_pos_embed_3d(self.width, t, h // p, w // p)
        return x + jnp.asarray(pos, self.dtype)[None]


class TimestepTextEmbedding(nnx.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings``: MLP(sinusoid(timestep)) + MLP(pooled), SiLU MLPs."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.timestep_embedder = _Group()
        self.timestep_embedder.linear_1 = Dense(256, d, ("time_in", "embed"), cfg, rngs=rngs)
        self.timestep_embedder.linear_2 = Dense(d, d, ("embed", "embed"), cfg, rngs=rngs)
        self.text_embedder = _Group()
        self.text_embedder.linear_1 = Dense(cfg.pooled_projection_dim, d, ("pooled_in", "embed"), cfg, rngs=rngs)
        self.text_embedder.linear_2 = Dense(d, d, ("embed", "embed"), cfg, rngs=rngs)

    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        te, tx = self.timestep_embedder, self.text_embedder
        t = te.linear_2(jax.nn.silu(te.linear_1(timestep_sinusoid(timestep))))
        y = tx.linear_2(jax.nn.silu(tx.linear_1(pooled)))
        return t + y


class MMDiT(nnx.Module):
    """ContentV's 3D MM-DiT.

    ``model(latents, timestep, context, pooled) -> velocity``:
      latents: (B, T, H, W, in_channels), H and W multiples of ``patch_size``.
      timestep: (B,) float, ``sigma * 1000``.
      context: (B, L, joint_attention_dim) text tokens (CLIP ; T5).
      pooled: (B, pooled_projection_dim) pooled text embedding.
      returns: (B, T, H, W, out_channels) velocity (``noise - x0``), in ``cfg.dtype``.

    Build without a mesh under ``nnx.use_eager_sharding(False)``; parameters carry logical axis names.
    Raises ValueError for inputs of the wrong rank / width / spatial size.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pos_embed = PatchEmbed3D(cfg, rngs=rngs)
        self.time_text_embed = TimestepTextEmbedding(cfg, rngs=rngs)
        self.context_embedder = Dense(cfg.joint_attention_dim, cfg.width, ("context_in", "embed"), cfg, rngs=rngs)
        n = cfg.num_layers - 1
        if n > 0:

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return JointTransformerBlock(cfg, context_pre_only=False, rngs=rngs)

            self.transformer_blocks = make_blocks(rngs)
        else:
            self.transformer_blocks = None
        self.final_block = JointTransformerBlock(cfg, context_pre_only=True, rngs=rngs)
        self.norm_out = AdaLayerNormContinuous(cfg, rngs=rngs)
        self.proj_out = Dense(cfg.width, cfg.patch_size**2 * cfg.out_channels, ("embed", "patch_out"), cfg, rngs=rngs)

    def _check_inputs(self, latents, timestep, context, pooled):
        cfg = self.cfg
        b = latents.shape[0]
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, T, H, W, {cfg.in_channels}), got {latents.shape}")
        if latents.shape[2] % cfg.patch_size or latents.shape[3] % cfg.patch_size:
            raise ValueError(f"latents H, W {latents.shape[2:4]} must be multiples of patch_size {cfg.patch_size}")
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be ({b},) (sigma * 1000), got {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"context must be ({b}, L, {cfg.joint_attention_dim}), got {context.shape}")
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled must be ({b}, {cfg.pooled_projection_dim}), got {pooled.shape}")

    def _run_blocks(self, x, c, temb, img_valid=None):
        """The stacked blocks: ``jax.lax.scan`` over the ``layers`` axis of their state, each step under
        ``jax.checkpoint`` with the configured remat policy.

        A plain JAX scan over ``nnx.split`` state (rather than ``nnx.scan``) so that the model also runs
        inside other loops (the sampler's compiled ``fori_loop``), where flax's transforms reject
        graph nodes from an outer trace level."""
        if self.transformer_blocks is None:
            return x, c
        graphdef, state = nnx.split(self.transformer_blocks)

        def step(carry, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(carry[0], carry[1], temb, img_valid), None

        if self.cfg.remat_policy != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.cfg.remat_policy], prevent_cse=False)
        (x, c), _ = jax.lax.scan(step, (x, c), state)
        return x, c

    def __call__(self, latents: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
        self._check_inputs(latents, timestep, context, pooled)
        cfg = self.cfg
        b, t, h, w, _ = latents.shape
        p = cfg.patch_size
        x = self.pos_embed(latents)
        # Ulysses: pad the video tokens to a multiple of the sequence-parallel size; the pad keys are
        # masked out of attention (img_valid) and the pad tokens sliced off before unpatchify.
        n_tok = x.shape[1]
        x = ulysses.pad_tokens(x, ulysses.sequence_size())
        img_valid = None if x.shape[1] == n_tok else n_tok
        x = constrain(x, ("batch", "video_tokens", "embed"))
        temb = self.time_text_embed(timestep, pooled.astype(cfg.jnp_dtype))
        c = constrain(self.context_embedder(context), ("batch", "text_tokens", "embed"))
        x, c = self._run_blocks(x, c, temb, img_valid)
        x, _ = self.final_block(x, c, temb, img_valid)
        x = self.proj_out(self.norm_out(x, temb))[:, :n_tok]  # (B, t*h*w, p*p*C)
        x = x.reshape(b, t, h // p, w // p, p, p, cfg.out_channels).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h, w, cfg.out_channels)


def abstract_model(cfg: TransformerConfig) -> MMDiT:
    """The model with ``jax.ShapeDtypeStruct`` parameters (``nnx.eval_shape``; nothing allocated)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))


def init_model(cfg: TransformerConfig, seed: int = 0) -> MMDiT:
    """A randomly initialised model (built without a mesh, in one compiled computation)."""
    with nnx.use_eager_sharding(False):
        return nnx.jit(lambda: MMDiT(cfg, rngs=nnx.Rngs(seed)))()
