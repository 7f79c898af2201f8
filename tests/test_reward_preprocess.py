"""The differentiable CLIP preprocessing against PIL and torch bicubic antialias, and the analytic reward
against its closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from contentv_jax.models.reward import AnalyticConfig, AnalyticReward, clip_preprocess
from contentv_jax.models.reward.preprocess import resize_shape, resize_short_side


def _realish(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like test image in [0, 1]: smooth illumination, hard-edged shapes, fine texture, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 1), 0.4 + 0.3 * np.cos(4 * y), 0.3 + 0.2 * x * y], -1)
    for _ in range(12):
        cy, cx, r = rng.random() * h, rng.random() * w, 5 + rng.random() * h / 6
        disk = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
        img[disk] = rng.random(3)
    img[h // 2:h // 2 + 40, :] += 0.15 * np.sign(np.sin(np.arange(w) * 1.3))[:, None]  # stripes near Nyquist
    img += 0.03 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _pil_resize(img: np.ndarray, hw) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(img[..., c], mode="F").resize(hw[::-1], Image.BICUBIC)) for c in range(3)], -1)


def test_resize_matches_pil_and_torch():
    for h, w in [(432, 768), (300, 250), (150, 180)]:  # downscale landscape (ContentV frames), portrait, upscale
        img = _realish(h, w)
        hw = resize_shape(h, w)
        assert min(hw) == 224
        ours = np.asarray(resize_short_side(jnp.asarray(img[None])))[0]
        pil = _pil_resize(img, hw)
        tch = F.interpolate(torch.tensor(img).permute(2, 0, 1)[None], size=hw, mode="bicubic", antialias=True,
                            align_corners=False)[0].permute(1, 2, 0).numpy()
        d_pil, d_t = np.abs(ours - pil), np.abs(ours - tch)
        print(f"{h}x{w} -> {hw}: max |ours - PIL| {d_pil.max():.1e} (mean {d_pil.mean():.1e}), "
              f"max |ours - torch| {d_t.max():.1e} (mean {d_t.mean():.1e})")
        # Same filter (Keys a=-0.5, support widened by the scale, renormalised at the borders); measured
        # differences are float32 rounding (about 1e-5 to PIL, 5e-6 to torch on values in [0, 1]).
        assert d_pil.max() < 5e-5 and d_t.max() < 5e-5


def test_preprocess_shape_values_and_gradient():
    img = _realish(432, 768)[None]
    out = clip_preprocess(jnp.asarray(img))
    assert out.shape == (1, 224, 224, 3) and out.dtype == jnp.float32
    # center crop of the resized frame, then the OpenAI mean/std
    full = np.asarray(resize_short_side(jnp.asarray(img)))[0]
    left = (full.shape[1] - 224) // 2
    mean = np.array([0.48145466, 0.4578275, 0.40821073]); std = np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(np.asarray(out)[0], (full[:, left:left + 224] - mean) / std, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(clip_preprocess(x))))(jnp.asarray(img))
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    # columns left of the crop (original x < 87 * 768 / 398 - kernel support) get no gradient; the centre does
    assert np.abs(g[0, :, :150]).max() == 0 and np.abs(g[0, :, 384]).sum() > 0


def test_analytic_reward_closed_form():
    rng = np.random.default_rng(0)
    frames = rng.random((4, 8, 6, 3), dtype=np.float32)
    cfg = AnalyticConfig(target=(1.0, 0.5, 0.0), scale=2.0)
    r = AnalyticReward(cfg)
    t = np.array(cfg.target, np.float32)
    want = -2.0 * ((frames - t) ** 2).mean(axis=(1, 2, 3))
    got = np.asarray(r(jnp.asarray(frames)))
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g = np.asarray(jax.grad(lambda f: r(f).sum())(jnp.asarray(frames)))
    np.testing.assert_allclose(g, -2.0 * 2 * (frames - t) / (8 * 6 * 3), rtol=1e-5, atol=1e-8)
    assert float(r(jnp.broadcast_to(jnp.asarray(t), (1, 8, 6, 3)))[0]) == 0.0
    b = AnalyticReward(AnalyticConfig(brightness=0.25))
    luma = frames @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(np.asarray(b(jnp.asarray(frames))), -(luma.mean(axis=(1, 2)) - 0.25) ** 2, rtol=1e-5)
    for bad in (dict(target=(2.0, 0, 0)), dict(brightness=1.5), dict(scale=0.0), dict(target=(1.0, 0.0))):
        try:
            AnalyticConfig(**bad)
        except ValueError as e:
            assert "analytic reward" in str(e)
        else:
            raise AssertionError(f"{bad} accepted")
