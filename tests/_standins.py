"""Test stand-ins with the public API of project parts that tests of other parts need.

``PoolingVAE`` has the API of ``contentv_jax.models.load_vae(path)``'s VAE for the encode stage:
``encode(x (B, T, H, W, 3) in [-1, 1]) -> dist`` with ``.mean``, ``.mode()``, ``.sample(key)``, and
``normalize(z)``, the Wan shapes (first frame alone then 4 frames per latent frame, 8x spatial,
16 channels) and a closed form: average pooling then a fixed 3 -> C linear map.
"""

import jax
import jax.numpy as jnp
import numpy as np


class _Dist:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class PoolingVAE:
    def __init__(self, channels=16, seed=0):
        rng = np.random.default_rng(seed)
        self.proj = jnp.asarray(rng.normal(size=(3, channels)), jnp.float32)
        self.latents_mean = jnp.asarray(rng.normal(size=(channels,)) * 0.1, jnp.float32)
        self.latents_std = jnp.asarray(rng.uniform(0.5, 2.0, size=(channels,)), jnp.float32)

    @staticmethod
    def pool(x):
        b, t, h, w, c = x.shape
        assert (t - 1) % 4 == 0 and h % 8 == 0 and w % 8 == 0, x.shape
        first = x[:, :1]
        rest = x[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, c).mean(2)
        x = jnp.concatenate([first, rest], 1)
        return x.reshape(b, x.shape[1], h // 8, 8, w // 8, 8, c).mean((3, 5))

    def encode(self, x):
        return _Dist(self.pool(jnp.asarray(x, jnp.float32)) @ self.proj, 0.01)

    def normalize(self, z):
        return (z - self.latents_mean) / self.latents_std
