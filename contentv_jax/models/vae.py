"""The Wan2.1 causal video VAE in Flax NNX (channels-last), chunked in time with a feature cache.

Mirrors diffusers ``models/autoencoders/autoencoder_kl_wan.py`` (``AutoencoderKLWan``, diffusers
0.42.1) for the Wan2.1 variant (``is_residual=False``, no ``patch_size``):

- ``WanCausalConv3d``: 3D convolutions padded ``2 * p`` frames on the past side only; spatially
  padded ``p`` on both sides.
- ``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels.
- ``WanResidualBlock``, ``WanAttentionBlock`` (single head, per frame), ``WanMidBlock``.
- ``WanResample``: ``downsample2d`` / ``downsample3d`` (right/bottom zero pad + stride-2 3x3 conv;
  3d adds a stride-2 causal time conv that skips the first chunk), ``upsample2d`` / ``upsample3d``
  (nearest x2 + 3x3 conv; 3d adds a time conv to 2C channels interleaved into 2x frames, skipped
  for the first chunk, whose frame is not doubled).

Chunking (as diffusers ``_encode`` / ``_decode``): the encoder sees the first frame alone, then 4
frames per chunk, each chunk giving one latent frame; the decoder sees one latent frame per chunk,
the first giving 1 frame and each later one 4 frames. Every causal conv keeps the last frames of
its input in a cache (2 frames for a time kernel of 3, 1 frame for the stride-2 time conv of
``downsample3d``). The first chunk runs once; the remaining chunks run under one ``jax.lax.scan``
with the cache as carry, so each (shape, dtype) compiles once and activation memory does not grow
with the number of frames. Results equal diffusers' chunked computation (which equals a causal
computation over the whole clip).

Public layout is channels-last: pixels ``(B, T, H, W, 3)`` in ``[-1, 1]`` with ``T = 4k + 1``,
latents ``(B, k + 1, H / 8, W / 8, z_dim)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contentv_jax.config import ConfigError

__all__ = [
    "VAEConfig",
    "WanVAE",
    "DiagonalGaussian",
    "get_config",
]

# Pixel values with |x| above this (on a [-1, 1] scale) trigger one warning per call.
PIXEL_WARN_ABS = 1.5

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Configuration of the Wan2.1 VAE; field names and defaults follow diffusers ``AutoencoderKLWan``.

    ``temperal_downsample`` keeps diffusers' spelling so that the config dict round-trips.
    Only the Wan2.1 layout is supported: ``is_residual=False`` and ``patch_size=None``.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip
    in_channels: int = 3
    out_channels: int = 3
    is_residual: bool = False
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.is_residual or self.patch_size is not None:
            raise ConfigError(
                "VAEConfig: only the Wan2.1 VAE is supported (is_residual=False, patch_size=None); "
                f"got is_residual={self.is_residual}, patch_size={self.patch_size} (the Wan2.2 layout)"
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"VAEConfig: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temperal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"VAEConfig: latents_mean and latents_std need z_dim = {self.z_dim} entries, "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if self.in_channels != 3 or self.out_channels != 3:
            raise ConfigError(
                f"VAEConfig: in_channels and out_channels must be 3 (RGB), got {self.in_channels}, {self.out_channels}"
            )

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent along H and W (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_scale(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Build from a diffusers ``AutoencoderKLWan`` config dict (keys starting with ``_`` are ignored).

        Unknown keys are ignored with a warning (as diffusers does).

        Raises:
          ValueError: a non-Wan2.1 layout (``is_residual`` / ``patch_size``) or another ``_class_name``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            # diffusers itself ignores unexpected config keys (with a warning); so do we, loudly.
            warnings.warn(f"VAEConfig.from_diffusers: ignoring unknown config keys {unknown}; known: {sorted(names)}")
            kwargs = {k: v for k, v in kwargs.items() if k in names}
        cls_name = config.get("_class_name", "AutoencoderKLWan")
        if cls_name != "AutoencoderKLWan":
            raise ConfigError(f"VAEConfig.from_diffusers: expected _class_name 'AutoencoderKLWan', got {cls_name!r}")
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict (``_class_name`` first, lists instead of tuples)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKLWan"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


_CONFIGS: dict[str, Callable[[], VAEConfig]] = {
    "wan2.1": VAEConfig,
    # Same structure as Wan2.1 (3 spatial downsamples, 2 temporal, mid attention, z_dim 16),
    # with narrow channels and one residual block per level, for fast tests.
    "tiny": lambda: VAEConfig(base_dim=8, num_res_blocks=1),
}


def get_config(name: str) -> VAEConfig:
    """A named config: ``'wan2.1'`` (the real Wan2.1 VAE) or ``'tiny'`` (tests).

    Raises:
      ConfigError (a ValueError): for an unknown name.
    """
    if name not in _CONFIGS:
        raise ConfigError(f"unknown VAE config {name!r}; expected one of {sorted(_CONFIGS)}")
    return _CONFIGS[name]()


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

_CONV_NAMES_3D = ("conv_kernel", "conv_kernel", "conv_kernel", "conv_in", "conv_out")
_CONV_NAMES_2D = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    """A parameter carrying logical axis names; never sharded eagerly, so models build without a mesh."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class _Cache:
    """Trace-time bookkeeping of the causal feature cache (diffusers' ``feat_cache`` / ``feat_idx``).

    ``old`` is the list of cache arrays from the previous chunk (``None`` for the first chunk, where
    every cache reads as zeros); layers call :meth:`take` then :meth:`put` in a fixed order.
    """

    def __init__(self, old: list[jax.Array] | None):
        self.old = old
        self.new: list[jax.Array] = []

    @property
    def first(self) -> bool:
        return self.old is None

    def take(self) -> jax.Array | None:
        return None if self.old is None else self.old[len(self.new)]

    def put(self, value: jax.Array) -> None:
        self.new.append(value)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, bound: float) -> jax.Array:
    """U(-bound, bound) of ``shape`` from the ``params`` stream of ``rngs``.

    The VAE is frozen (only ever loaded from a checkpoint or built at random for tests), so its random init
    needs no JAX random program: a concrete key seeds NumPy (milliseconds) where ``jax.random.uniform`` would
    compile one threefry program per parameter shape (about a minute for the tiny VAE on 2 CPU cores). Under
    ``nnx.eval_shape`` / ``jit`` (a traced key) it stays ``jax.random.uniform``, which costs nothing there.
    """
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32), dtype)


def _init_conv(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    # torch's default Conv init: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return _uniform(rngs, shape, dtype, 1.0 / math.sqrt(math.prod(shape[:-1])))


class CausalConv3d(nnx.Module):
    """``WanCausalConv3d``: a Conv3d padded ``2 * padding[0]`` frames on the past side only.

    Kernel ``(kt, kh, kw, C_in, C_out)`` (torch ``(C_out, C_in, kt, kh, kw)``), bias ``(C_out,)``.
    ``__call__(x, cache)``: x ``(B, T, H, W, C_in)``; ``cache`` ``(B, 2 * padding[0], H, W, C_in)``
    past input frames (zeros when ``None``). Returns ``(y, new_cache)`` where ``new_cache`` is the
    last ``2 * padding[0]`` frames of ``[cache; x]`` (``None`` when the conv has no time padding).
    """

    def __init__(self, cin, cout, kernel, stride=(1, 1, 1), padding=(0, 0, 0), *, rngs: nnx.Rngs, param_dtype):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.stride = stride
        self.time_pad = 2 * padding[0]
        self.spatial_pad = ((padding[1], padding[1]), (padding[2], padding[2]))
        self.kernel = _param(_init_conv(rngs, (*kernel, cin, cout), param_dtype), _CONV_NAMES_3D)
        bound = 1.0 / math.sqrt(math.prod(kernel) * cin)
        self.bias = _param(
            _uniform(rngs, (cout,), param_dtype, bound), ("conv_out",)
        )

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        new_cache = None
        if self.time_pad:
            if cache is None:
                cache = jnp.zeros((x.shape[0], self.time_pad, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
            new_cache = x[:, -self.time_pad :]
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=self.stride,
            padding=((0, 0), *self.spatial_pad),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(x.dtype), new_cache


class Conv2d(nnx.Module):
    """A per-frame 2D conv (torch ``nn.Conv2d``); kernel ``(kh, kw, C_in, C_out)``, bias ``(C_out,)``.

    ``__call__``: x ``(N, H, W, C_in)`` -> ``(N, H', W', C_out)``.
    """

    def __init__(self, cin, cout, kernel, stride=1, padding=0, *, rngs: nnx.Rngs, param_dtype):
        self.stride = (stride, stride)
        self.padding = ((padding, padding), (padding, padding))
        self.kernel = _param(
            _init_conv(rngs, (kernel, kernel, cin, cout), param_dtype), _CONV_NAMES_2D
        )
        bound = 1.0 / math.sqrt(kernel * kernel * cin)
        self.bias = _param(
            _uniform(rngs, (cout,), param_dtype, bound), ("conv_out",)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(x.dtype)


class RMSNorm(nnx.Module):
    """``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the channel axis (last).

    ``gamma`` is ``(C,)`` (torch ``(C, 1, 1, 1)``, or ``(C, 1, 1)`` in attention blocks). Half
    precision inputs are normalised in float32, as diffusers does.
    """

    def __init__(self, dim: int, *, param_dtype):
        self.scale = dim**0.5
        self.gamma = _param(jnp.ones((dim,), param_dtype), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normed = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return normed * self.scale * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``WanResidualBlock``: RMS norm, SiLU, causal conv 3x3x3, twice, plus a (1x1x1 conv) shortcut.

    x ``(B, T, H, W, in_dim)`` -> ``(B, T, H, W, out_dim)``; uses two cache entries.
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: _Cache) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x = jax.nn.silu(self.norm1(x))
        x, c = self.conv1(x, cache.take())
        cache.put(c)
        x = jax.nn.silu(self.norm2(x))
        x, c = self.conv2(x, cache.take())
        cache.put(c)
        return x + h


class AttentionBlock(nnx.Module):
    """``WanAttentionBlock``: single-head self-attention over the H*W tokens of each frame.

    x ``(B, T, H, W, C)`` -> same shape; ``to_qkv`` / ``proj`` are 1x1 convs (kernels ``(1, 1, C, 3C)``
    and ``(1, 1, C, C)``); q, k, v are the first, second and third C channels of ``to_qkv``.
    """

    def __init__(self, dim: int, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = Conv2d(dim, dim * 3, 1, **kw)
        self.proj = Conv2d(dim, dim, 1, **kw)

    def __call__(self, x: jax.Array, cache: _Cache | None = None) -> jax.Array:
        b, t, h, w, c = x.shape
        y = self.norm(einops.rearrange(x, "b t h w c -> (b t) h w c"))
        qkv = einops.rearrange(self.to_qkv(y), "n h w c -> n (h w) 1 c")
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        y = self.proj(einops.rearrange(y, "n (h w) 1 c -> n h w c", h=h))
        return einops.rearrange(y, "(b t) h w c -> b t h w c", b=b) + x


class Resample(nnx.Module):
    """``WanResample`` in mode ``downsample2d``, ``downsample3d``, ``upsample2d`` or ``upsample3d``.

    Down: x ``(B, T, H, W, C)`` -> ``(B, T', H/2, W/2, C)`` with ``T' = T`` (2d), or for 3d
    ``T' = T`` on the first chunk and ``T/2`` after (stride-2 time conv over ``[last cached frame; x]``).
    Up: x ``(B, T, H, W, C)`` -> ``(B, T', 2H, 2W, out_dim)`` with ``T' = T`` (2d, and 3d on the first
    chunk), else ``2T`` (time conv to 2C channels, interleaved as frames ``2i`` = first C, ``2i+1`` = last C).
    """

    def __init__(self, dim: int, mode: str, *, rngs, param_dtype, upsample_out_dim: int | None = None):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1, **kw)
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = Conv2d(dim, dim, 3, stride=2, **kw)
        else:
            raise ValueError(f"Resample: unknown mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: _Cache) -> jax.Array:
        if self.mode == "upsample3d":
            old = cache.take()
            if cache.first:
                # diffusers marks the cache "Rep": no time conv, no doubling; later chunks see zeros.
                cache.put(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))
            else:
                y, c = self.time_conv(x, old)
                cache.put(c)
                x = einops.rearrange(y, "b t h w (two c) -> b (t two) h w c", two=2)
        b = x.shape[0]
        y = einops.rearrange(x, "b t h w c -> (b t) h w c")
        if self.mode.startswith("upsample"):
            y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)  # nearest-exact x2
        else:
            y = jnp.pad(y, ((0, 0), (0, 1), (0, 1), (0, 0)))  # nn.ZeroPad2d((0, 1, 0, 1))
        y = self.resample(y)
        x = einops.rearrange(y, "(b t) h w c -> b t h w c", b=b)
        if self.mode == "downsample3d":
            old = cache.take()
            last = x[:, -1:]
            if not cache.first:
                # stride-2 time conv over [last frame of the previous chunk; this chunk]
                x = self.time_conv(jnp.concatenate([old.astype(x.dtype), x], axis=1))[0]
            cache.put(last)
        return x


class MidBlock(nnx.Module):
    """``WanMidBlock``: residual block, attention, residual block (at the lowest resolution)."""

    def __init__(self, dim: int, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])

    def __call__(self, x: jax.Array, cache: _Cache) -> jax.Array:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


class Encoder3d(nnx.Module):
    """``WanEncoder3d``: conv_in, down_blocks (residual / attention / resample), mid block, head.

    x ``(B, T, H, W, 3)`` -> ``(B, T', H/8, W/8, 2 * z_dim)`` for one chunk (T' = 1 per chunk).
    """

    def __init__(self, cfg: VAEConfig, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, **kw)
        blocks: list[nnx.Module] = []
        scale = 1.0
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, **kw))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(out_dim, **kw)
        self.norm_out = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: _Cache) -> jax.Array:
        x, c = self.conv_in(x, cache.take())
        cache.put(c)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        x = jax.nn.silu(self.norm_out(x))
        x, c = self.conv_out(x, cache.take())
        cache.put(c)
        return x


class UpBlock(nnx.Module):
    """``WanUpBlock``: ``num_res_blocks + 1`` residual blocks, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        resnets = []
        for _ in range(num_res_blocks + 1):
            resnets.append(ResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(out_dim, upsample_mode, **kw)] if upsample_mode else [])

    def __call__(self, x: jax.Array, cache: _Cache) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for up in self.upsamplers:
            x = up(x, cache)
        return x


class Decoder3d(nnx.Module):
    """``WanDecoder3d``: conv_in, mid block, up_blocks, head.

    z ``(B, 1, h, w, z_dim)`` (one latent frame per chunk) -> ``(B, T, 8h, 8w, 3)`` with T = 1 for the
    first chunk and 4 after.
    """

    def __init__(self, cfg: VAEConfig, *, rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # Wan2.1: the previous upsampler halved the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(out_dim, cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: _Cache, head_frames: int | None = 1) -> jax.Array:
        """``head_frames``: the full-resolution section (the last spatial upsampler, the top up-block,
        norm_out and conv_out, where the largest activations are: 96 channels at the output size) runs
        ``head_frames`` frames at a time, in a scan that carries its causal cache from one frame group
        to the next. The result is the same as the whole chunk at once (every op there is per frame or
        causal in time); the working set of that section shrinks by ``frames / head_frames``. ``None``
        runs the chunk at once (diffusers' order)."""
        x, c = self.conv_in(x, cache.take())
        cache.put(c)
        x = self.mid_block(x, cache)
        *body, top = self.up_blocks
        # a spatial-only upsampler (no time conv, no cache) just below the top block joins the section
        pre = list(body[-1].upsamplers) if body and [u.mode for u in body[-1].upsamplers] == ["upsample2d"] else []
        for i, block in enumerate(body):
            for resnet in block.resnets:
                x = resnet(x, cache)
            if not (pre and i == len(body) - 1):
                for up in block.upsamplers:
                    x = up(x, cache)

        def section(x, cache):
            for up in pre:
                x = up(x, cache)
            x = top(x, cache)
            x = jax.nn.silu(self.norm_out(x))
            x, c = self.conv_out(x, cache.take())
            cache.put(c)
            return x

        return _in_time_groups(section, x, cache, head_frames)


def _in_time_groups(fn, x: jax.Array, cache: _Cache, frames: int | None) -> jax.Array:
    """``fn(x, cache)`` (causal in time, cache entries taken and put in a fixed order) applied to ``x``
    ``(B, T, H, W, C)`` ``frames`` frames at a time: the first group under ``cache``'s entries, each later
    group (a ``lax.scan``, so one group's buffers are live at a time) under the entries the previous group
    put; the last group's entries are put into ``cache``. Equal to ``fn(x, cache)``; unchanged when
    ``frames`` is None or does not divide ``T`` into two or more groups."""
    t = x.shape[1]
    if not frames or t <= frames or t % frames:
        return fn(x, cache)
    offset = len(cache.new)
    sub = _Cache(None if cache.first else cache.old[offset:])
    y0 = fn(x[:, :frames], sub)

    def step(entries, xg):
        cc = _Cache(entries)
        y = fn(xg, cc)
        return cc.new, y

    entries, ys = jax.lax.scan(step, sub.new, einops.rearrange(x[:, frames:], "b (n g) h w c -> n b g h w c", g=frames))
    for e in entries:
        cache.put(e)
    return jnp.concatenate([y0, einops.rearrange(ys, "n b g h w c -> b (n g) h w c")], axis=1)


# ---------------------------------------------------------------------------------------------
# Latent distribution
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's latent distribution (diffusers ``DiagonalGaussianDistribution``).

    ``mean`` and ``logvar``: ``(B, T', H/8, W/8, z_dim)``; ``logvar`` is clipped to ``[-30, 20]``.
    """

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``key``; shape and dtype of ``mean``."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The mean (the distribution's mode)."""
        return self.mean


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _encode_impl(model: WanVAE, x: jax.Array) -> jax.Array:
    """Chunked encoder + quant_conv: x (B, 1 + 4k, H, W, 3) -> moments (B, 1 + k, H/8, W/8, 2 z_dim)."""
    ts = model.config.temporal_scale
    b, t, h, w, c = x.shape
    cache = _Cache(None)
    first = model.encoder(x[:, :1], cache)
    outs = [first]
    n = (t - 1) // ts
    if n:
        chunks = x[:, 1:].reshape(b, n, ts, h, w, c).swapaxes(0, 1)

        def step(carry, chunk):
            cc = _Cache(carry)
            y = model.encoder(chunk, cc)
            return cc.new, y

        _, ys = jax.lax.scan(step, cache.new, chunks)  # (n, B, 1, h', w', C)
        outs.append(ys.swapaxes(0, 1).reshape(b, n, *ys.shape[3:]))
    moments = jnp.concatenate(outs, axis=1)
    return model.quant_conv(moments)[0]


def _decode_impl(model: WanVAE, z: jax.Array, clamp: bool, head_frames: int | None = 1) -> jax.Array:
    """post_quant_conv + chunked decoder: z (B, 1 + k, h, w, z_dim) -> (B, 1 + 4k, 8h, 8w, 3).

    Each chunk's frames are written into the output buffer carried through the scan (in place), so
    the only buffers that scale with the number of frames are the latents and the output itself.
    Inside a chunk the full-resolution layers run ``head_frames`` frames at a time (``Decoder3d``).
    """
    b, t = z.shape[:2]
    ts = model.config.temporal_scale
    x = model.post_quant_conv(z)[0]
    cache = _Cache(None)
    first = model.decoder(x[:, :1], cache, head_frames)
    if clamp:
        first = jnp.clip(first, -1.0, 1.0)
    if t == 1:
        return first
    out = jnp.zeros((b, 1 + ts * (t - 1), *first.shape[2:]), first.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, first, 0, axis=1)

    def step(carry, i):
        cache_in, out = carry
        cc = _Cache(cache_in)
        y = model.decoder(jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1), cc, head_frames)
        if clamp:
            y = jnp.clip(y, -1.0, 1.0)
        out = jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), 1 + ts * (i - 1), axis=1)
        return (cc.new, out), None

    (_, out), _ = jax.lax.scan(step, (cache.new, out), jnp.arange(1, t))
    return out


@jax.jit
def _encode_jit(graphdef, state, x):
    return _encode_impl(nnx.merge(graphdef, state), x)


@functools.partial(jax.jit, static_argnames=("clamp", "head_frames"))
def _decode_jit(graphdef, state, z, clamp=True, head_frames=1):
    return _decode_impl(nnx.merge(graphdef, state), z, clamp, head_frames)


def _blend_tiles(rows, blend: tuple[int, int], stride: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """diffusers ``blend_v`` / ``blend_h`` + crop: linear cross-fade of each tile into its upper/left
    neighbour over ``blend`` rows/columns, keep ``stride`` of each tile, crop to ``size``. Tiles are
    ``(B, T, H, W, C)``."""

    def ramp(n, axis, ndim):
        r = jnp.arange(n, dtype=jnp.float32) / n
        shape = [1] * ndim
        shape[axis] = n
        return r.reshape(shape)

    out_rows = []
    for i, row in enumerate(rows):
        result = []
        for j, tile in enumerate(row):
            if i > 0:
                above = rows[i - 1][j]
                n = min(above.shape[2], tile.shape[2], blend[0])
                if n > 0:
                    r = ramp(n, 2, tile.ndim).astype(tile.dtype)
                    mixed = above[:, :, -n:] * (1 - r) + tile[:, :, :n] * r
                    tile = tile.at[:, :, :n].set(mixed)
            if j > 0:
                left = row[j - 1]
                n = min(left.shape[3], tile.shape[3], blend[1])
                if n > 0:
                    r = ramp(n, 3, tile.ndim).astype(tile.dtype)
                    mixed = left[:, :, :, -n:] * (1 - r) + tile[:, :, :, :n] * r
                    tile = tile.at[:, :, :, :n].set(mixed)
            # diffusers blends in place: the blended tile is what later neighbours see.
            row[j] = tile
            result.append(tile[:, :, : stride[0], : stride[1]])
        out_rows.append(jnp.concatenate(result, axis=3))
    return jnp.concatenate(out_rows, axis=2)[:, :, : size[0], : size[1]]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


class WanVAE(nnx.Module):
    """The Wan2.1 causal video VAE (diffusers ``AutoencoderKLWan``), channels-last.

    Attributes mirror the checkpoint: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.

    Args:
      config: a :class:`VAEConfig` (``get_config('wan2.1')`` for the real model).
      rngs: parameter initialisation (random init; real weights come from ``contentv_jax.checkpoints.load_vae``).
      param_dtype: parameter dtype (float32 default). Compute runs in the input's dtype.
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder3d(config, **kw)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1, **kw)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
        self.decoder = Decoder3d(config, **kw)

    # -- validation -------------------------------------------------------------------------

    def _check_pixels(self, x: jax.Array) -> None:
        cfg = self.config
        s, ts = cfg.spatial_scale, cfg.temporal_scale
        expected = f"(B, T, H, W, 3) with T = {ts}k+1 and H, W divisible by {s}"
        if x.ndim != 5:
            raise ValueError(f"WanVAE.encode: x must be {expected}; got shape {tuple(x.shape)}")
        b, t, h, w, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"WanVAE.encode: x must be {expected}; got {c} channels (shape {tuple(x.shape)})")
        if t % ts != 1:
            raise ValueError(
                f"WanVAE.encode: x must be {expected}; got T = {t} frames (T = {ts}k+1: 1, 5, 9, 13, 17, ...)"
            )
        if h % s or w % s:
            raise ValueError(f"WanVAE.encode: x must be {expected}; got H, W = {h}, {w}")
        if not isinstance(x, jax.core.Tracer):
            peak = float(jnp.max(jnp.abs(x)))
            if not np.isfinite(peak) or peak > PIXEL_WARN_ABS:
                warnings.warn(
                    f"WanVAE.encode: pixel values reach |x| = {peak:.3g}, far outside the expected [-1, 1] "
                    "(scale uint8 frames as x / 127.5 - 1)",
                    stacklevel=3,
                )

    def _check_latents(self, z: jax.Array, what: str = "decode") -> None:
        zd = self.config.z_dim
        if z.ndim != 5 or z.shape[-1] != zd:
            raise ValueError(f"WanVAE.{what}: z must be (B, T', h, w, {zd}); got shape {tuple(z.shape)}")

    # -- API --------------------------------------------------------------------------------

    def encode(
        self,
        x: jax.Array,
        *,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_sample_stride: int | Sequence[int] | None = None,
    ) -> DiagonalGaussian:
        """Encode pixels to the latent distribution (diffusers ``AutoencoderKLWan.encode``).

        Args:
          x: ``(B, T, H, W, 3)`` float pixels in ``[-1, 1]``, ``T = 4k + 1``, H and W divisible by 8.
          tile_sample_size: optional spatial tile ``(h, w)`` in pixels (diffusers
            ``tile_sample_min_height/width``); frames larger than it are encoded tile by tile.
          tile_sample_stride: tile stride in pixels (default 3/4 of the tile, rounded to 8).
        Returns:
          :class:`DiagonalGaussian` with ``mean`` / ``logvar`` ``(B, k + 1, H/8, W/8, z_dim)`` in x's dtype.
        Raises:
          ValueError: x not ``(B, 4k+1, H, W, 3)`` with H, W divisible by 8. Warns once if ``|x| > 1.5``.
        """
        x = jnp.asarray(x)
        self._check_pixels(x)
        h, w = x.shape[2:4]
        if tile_sample_size is not None and (h > _pair(tile_sample_size)[0] or w > _pair(tile_sample_size)[1]):
            moments = self._tiled_encode(x, tile_sample_size, tile_sample_stride)
        else:
            graphdef, state = nnx.split(self)
            moments = _encode_jit(graphdef, state, x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(
        self,
        z: jax.Array,
        *,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_sample_stride: int | Sequence[int] | None = None,
    ) -> jax.Array:
        """Decode latents to pixels (diffusers ``AutoencoderKLWan.decode``), clamped to ``[-1, 1]``.

        Args:
          z: ``(B, T', h, w, z_dim)`` latents (unnormalised; see :meth:`denormalize`).
          tile_sample_size / tile_sample_stride: optional spatial tiling in pixels, as diffusers
            ``enable_tiling`` (tiles overlap by ``size - stride`` pixels, blended linearly).
        Returns:
          ``(B, 4 (T' - 1) + 1, 8h, 8w, 3)`` in z's dtype.
        Raises:
          ValueError: z not ``(B, T', h, w, z_dim)``.
        """
        z = jnp.asarray(z)
        self._check_latents(z)
        s = self.config.spatial_scale
        h, w = z.shape[2] * s, z.shape[3] * s
        if tile_sample_size is not None and (h > _pair(tile_sample_size)[0] or w > _pair(tile_sample_size)[1]):
            out = self._tiled_decode(z, tile_sample_size, tile_sample_stride)
        else:
            graphdef, state = nnx.split(self)
            out = _decode_jit(graphdef, state, z)
        return out

    def normalize(self, z: jax.Array) -> jax.Array:
        """``(z - latents_mean) / latents_std`` per channel; z ``(..., z_dim)``."""
        mean = jnp.asarray(self.config.latents_mean, z.dtype)
        std = jnp.asarray(self.config.latents_std, z.dtype)
        return (z - mean) / std

    def denormalize(self, z: jax.Array) -> jax.Array:
        """Inverse of :meth:`normalize`: ``z * latents_std + latents_mean``; z ``(..., z_dim)``."""
        mean = jnp.asarray(self.config.latents_mean, z.dtype)
        std = jnp.asarray(self.config.latents_std, z.dtype)
        return z * std + mean

    # -- tiling (diffusers tiled_encode / tiled_decode) ----------------------------------------

    def _tile_geometry(self, size, stride):
        s = self.config.spatial_scale
        size = _pair(size)
        stride = _pair(stride) if stride is not None else tuple(max(s, (v * 3 // 4) // s * s) for v in size)
        for v, name in ((size, "tile_sample_size"), (stride, "tile_sample_stride")):
            if any(a <= 0 or a % s for a in v):
                raise ValueError(f"WanVAE tiling: {name} must be positive multiples of {s}; got {v}")
        if any(st > sz for st, sz in zip(stride, size)):
            raise ValueError(f"WanVAE tiling: tile_sample_stride {stride} exceeds tile_sample_size {size}")
        return size, stride

    def _tiled_encode(self, x, size, stride):
        s = self.config.spatial_scale
        size, stride = self._tile_geometry(size, stride)
        h, w = x.shape[2:4]
        graphdef, state = nnx.split(self)
        rows = []
        for i in range(0, h, stride[0]):
            rows.append(
                [
                    _encode_jit(graphdef, state, x[:, :, i : i + size[0], j : j + size[1]])
                    for j in range(0, w, stride[1])
                ]
            )
        lat_size = (size[0] // s, size[1] // s)
        lat_stride = (stride[0] // s, stride[1] // s)
        blend = (lat_size[0] - lat_stride[0], lat_size[1] - lat_stride[1])
        return _blend_tiles(rows, blend, lat_stride, (h // s, w // s))

    def _tiled_decode(self, z, size, stride):
        s = self.config.spatial_scale
        size, stride = self._tile_geometry(size, stride)
        h, w = z.shape[2:4]
        lat_size = (size[0] // s, size[1] // s)
        lat_stride = (stride[0] // s, stride[1] // s)
        graphdef, state = nnx.split(self)
        rows = []
        for i in range(0, h, lat_stride[0]):
            rows.append(
                [
                    _decode_jit(graphdef, state, z[:, :, i : i + lat_size[0], j : j + lat_size[1]], clamp=False)
                    for j in range(0, w, lat_stride[1])
                ]
            )
        blend = (size[0] - stride[0], size[1] - stride[1])
        return jnp.clip(_blend_tiles(rows, blend, stride, (h * s, w * s)), -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def init_vae(config: VAEConfig, seed: int = 0, param_dtype=jnp.float32) -> WanVAE:
    """A randomly initialised :class:`WanVAE` (torch's default Conv3d / Conv2d init, uniform in
    +-1/sqrt(fan_in)); ``WanVAE(config, rngs=nnx.Rngs(seed))``, named for the tiny-asset and benchmark code."""
    return WanVAE(config, rngs=nnx.Rngs(seed), param_dtype=param_dtype)


def abstract_vae(config: VAEConfig, param_dtype=jnp.float32) -> WanVAE:
    """A :class:`WanVAE` whose parameters are ``jax.ShapeDtypeStruct`` s (no memory, no compute)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
