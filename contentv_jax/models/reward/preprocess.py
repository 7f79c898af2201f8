"""CLIP image preprocessing in JAX, differentiable with respect to the pixels.

What ``transformers.CLIPImageProcessor`` (PickScore, MPS) and open_clip's validation transform (HPSv2)
do to an image, written on float frames so that a reward's gradient reaches the generator:

1. resize so that the short side is ``size`` (224), the long side ``int(size * long / short)``
   (HF ``get_resize_output_image_size`` and torchvision ``Resize(int)`` truncate the same way), bicubic
   with antialiasing (``jax.image.resize(method="bicubic", antialias=True)``: Keys cubic ``a = -0.5``
   with the kernel widened by the downscale factor and renormalised at the borders, the filter of
   PIL's ``BICUBIC`` and of ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``);
2. center crop ``size x size``, offset ``(excess) // 2`` (HF ``center_crop``; torchvision rounds the half
   offset instead, which differs by one pixel only when the excess is odd);
3. ``(x - mean) / std`` with the OpenAI CLIP mean/std (``OPENAI_CLIP_MEAN``/``OPENAI_CLIP_STD``).

Differences from the reference pipelines, by design: no uint8 quantisation (HF converts to uint8 before
PIL resizes, then rescales by 1/255), and no clipping of bicubic overshoot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shape(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """Output ``(h, w)`` of the short-side resize: the short side becomes ``size``, the long side
    ``int(size * long / short)`` (truncated, as HF and torchvision do)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_short_side(frames: jax.Array, size: int = 224) -> jax.Array:
    """Bicubic antialiased resize of ``frames (B, H, W, C)`` so the short side is ``size``.

    Returns ``(B, h, w, C)`` float32 with ``(h, w) = resize_shape(H, W, size)``.
    """
    b, h, w, c = frames.shape
    oh, ow = resize_shape(h, w, size)
    return jax.image.resize(frames.astype(jnp.float32), (b, oh, ow, c), method="bicubic", antialias=True)


def center_crop(frames: jax.Array, size: int = 224) -> jax.Array:
    """The central ``size x size`` window of ``frames (B, H, W, C)``, top/left offset ``(H - size) // 2``.

    Raises:
      ValueError: a side is shorter than ``size``.
    """
    _, h, w, _ = frames.shape
    if h < size or w < size:
        raise ValueError(f"frames: expected both sides >= {size} for the center crop, got {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return frames[:, top:top + size, left:left + size, :]


def clip_preprocess(frames: jax.Array, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> jax.Array:
    """Frames ``(B, H, W, 3)`` float in ``[0, 1]``, channels-last -> CLIP input ``(B, size, size, 3)`` float32.

    Resize of the short side to ``size`` (bicubic, antialias), center crop, normalisation by ``mean``/``std``.
    Differentiable in ``frames``.

    Raises:
      ValueError: ``frames`` is not 4-D with 3 channels.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (B, H, W, 3) channels-last, got shape {tuple(frames.shape)}")
    x = center_crop(resize_short_side(frames, size), size)
    m = jnp.asarray(mean, jnp.float32)
    s = jnp.asarray(std, jnp.float32)
    return (x - m) / s
