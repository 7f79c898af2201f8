"""TEMPORARY stand-in for the Wan VAE (``models/vae.py``, another issue), with its API, so the trainer
runs before it lands: average pooling (Wan shapes: frame 0 alone, then 4 frames per latent frame, 8x
spatial) and a linear map to 16 channels. Delete this file once ``models/vae.py`` is on main.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------- VAE


@dataclasses.dataclass
class VAEConfig:
    z_dim: int = 16


class _Dist:
    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape)


class WanVAE(nnx.Module):
    """Stand-in causal VAE: frame 0 alone then groups of 4 frames averaged, 8x8 average pool, a linear map."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.proj = nnx.Linear(3, 2 * config.z_dim, rngs=rngs)
        self.latents_mean = nnx.Variable(jnp.zeros((config.z_dim,)))
        self.latents_std = nnx.Variable(jnp.ones((config.z_dim,)) * 0.5)

    def encode(self, x):
        b, t, h, w, c = x.shape
        first = x[:, :1]
        rest = x[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, c).mean(2)
        x = jnp.concatenate([first, rest], 1)
        x = x.reshape(b, x.shape[1], h // 8, 8, w // 8, 8, c).mean((3, 5))
        m, lv = jnp.split(self.proj(x), 2, -1)
        return _Dist(m, jnp.clip(lv, -30, 20))

    def normalize(self, z):
        return (z - self.latents_mean[...]) / self.latents_std[...]

    def denormalize(self, z):
        return z * self.latents_std[...] + self.latents_mean[...]


def get_vae_config(name):
    return VAEConfig()


def save_vae(vae: WanVAE, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(vae))}
    np.savez(path / "standin_vae.npz", **flat)
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(vae.config)))


def load_vae(path):
    path = Path(path)
    vae = WanVAE(VAEConfig(**json.loads((path / "config.json").read_text())), rngs=nnx.Rngs(0))
    data = np.load(path / "standin_vae.npz")
    state = nnx.state(vae)
    for k, v in nnx.to_flat_state(state):
        v.value = jnp.asarray(data["/".join(map(str, k))])
    nnx.update(vae, state)
    return vae


