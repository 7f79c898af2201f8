"""TEMPORARY stand-ins for pieces other issues build (MM-DiT, VAE, text encoders, synthetic data,
encode stage, grain data iterator), with the same APIs, so the trainer runs before they land.

The trainer imports the real modules first and falls back to these only on ImportError.
Delete this file once ``models/transformer.py``, ``models/vae.py``, ``text.py``, ``encode.py``,
``train/synthetic.py`` and ``train/data.py`` are all on main.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------- transformer


@dataclasses.dataclass
class TransformerConfig:
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 64
    num_layers: int = 2
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 32
    remat_policy: str = "none"


def get_config(name: str) -> TransformerConfig:
    if name != "tiny":
        raise ValueError(f"stand-in transformer only knows 'tiny', got {name!r}")
    return TransformerConfig()


def _dense(din, dout, names, rngs):
    return nnx.Linear(din, dout, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names), rngs=rngs)


class MMDiT(nnx.Module):
    """Stand-in: patchify, token MLP blocks conditioned on timestep, pooled and mean context."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        with nnx.use_eager_sharding(False):
            self.patch = _dense(p * p * c, d, ("patch_in", "embed"), rngs)
            self.time = _dense(256, d, ("time_in", "embed"), rngs)
            self.pool = _dense(config.pooled_projection_dim, d, ("pooled_in", "embed"), rngs)
            self.ctx = _dense(config.joint_attention_dim, d, ("context_in", "embed"), rngs)
            self.ups = nnx.List([_dense(d, 2 * d, ("embed", "mlp"), rngs) for _ in range(config.num_layers)])
            self.downs = nnx.List([_dense(2 * d, d, ("mlp", "embed"), rngs) for _ in range(config.num_layers)])
            self.out = _dense(d, p * p * config.out_channels, ("embed", "patch_out"), rngs)

    def __call__(self, latents, timestep, context, pooled):
        b, t, h, w, c = latents.shape
        p = self.config.patch_size
        x = latents.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, -1, p * p * c)
        half = 128
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        args = timestep.astype(jnp.float32)[:, None] * freqs[None]
        temb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1).astype(latents.dtype)
        cond = nnx.silu(self.time(temb)) + self.pool(pooled) + self.ctx(context).mean(1)
        hdn = self.patch(x) + cond[:, None]
        for up, down in zip(self.ups, self.downs):
            hdn = hdn + down(nnx.gelu(up(hdn)))
        y = self.out(hdn)
        return y.reshape(b, t, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h, w, c)


def load_transformer(path):
    raise NotImplementedError("the stand-in MM-DiT cannot load checkpoints; models/transformer.py has not landed")


# ----------------------------------------------------------------------------- VAE


@dataclasses.dataclass
class VAEConfig:
    z_dim: int = 4


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


# ----------------------------------------------------------------------------- text


class TextEncoders:
    """Stand-in: byte-hashed token embeddings (T5-like context) and mean-pooled (CLIP-like pooled)."""

    def __init__(self, table_ctx, table_pool, max_length=32):
        self.table_ctx, self.table_pool, self.max_length = table_ctx, table_pool, max_length

    @classmethod
    def from_pretrained(cls, path):
        d = np.load(Path(path) / "standin_text.npz")
        return cls(d["ctx"], d["pool"])

    def encode(self, prompts):
        ids = np.zeros((len(prompts), self.max_length), np.int64)
        for i, p in enumerate(prompts):
            words = p.lower().split()[: self.max_length]
            for j, wd in enumerate(words):
                ids[i, j] = 1 + (sum(wd.encode()) * 2654435761) % (self.table_ctx.shape[0] - 1)
        ctx = self.table_ctx[ids]
        pooled = self.table_pool[ids].mean(1)
        return ctx.astype(np.float32), pooled.astype(np.float32)


def build_tiny_text_encoders(dst_dir, clip_dims=(16, 16), t5_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    np.savez(Path(dst_dir) / "standin_text.npz", ctx=rng.normal(size=(512, t5_dim)).astype(np.float32) * 0.5,
             pool=rng.normal(size=(512, sum(clip_dims))).astype(np.float32))
    return Path(dst_dir)


# ----------------------------------------------------------------------------- synthetic data

_COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 220, 40)}
_DIRS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def make_synthetic_dataset(out_dir, num_videos=16, *, frames=24, height=64, width=64, fps=8, seed=0):
    """Moving coloured squares on a grey background, written as mp4 with ``captions.jsonl``."""
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_videos):
        color = list(_COLORS)[i % 4]
        direction = list(_DIRS)[(i // 4) % 4]
        name = f"shape_{i:03d}.mp4"
        size = int(rng.integers(12, 20))
        x0, y0 = rng.integers(0, width - size), rng.integers(0, height - size)
        with av.open(str(out / name), "w") as f:
            s = f.add_stream("mpeg4", rate=fps)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            for t in range(frames):
                img = np.full((height, width, 3), 110, np.uint8)
                dx, dy = _DIRS[direction]
                x = int(x0 + dx * 2 * t) % (width - size)
                y = int(y0 + dy * 2 * t) % (height - size)
                img[y : y + size, x : x + size] = _COLORS[color]
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    f.mux(pkt)
            for pkt in s.encode():
                f.mux(pkt)
        lines.append({"file": name, "caption": f"a {color} square moving {direction} on a grey background"})
    with open(out / "captions.jsonl", "w") as f:
        for ln in lines:
            f.write(json.dumps(ln) + "\n")
    return out


# ----------------------------------------------------------------------------- encode


def _read_frames(path, fps):
    import av

    with av.open(str(path)) as f:
        stream = f.streams.video[0]
        src_fps = float(stream.average_rate or fps)
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(stream)]
    if not frames:
        raise ValueError("no frames")
    step = src_fps / fps
    idx = np.arange(0, len(frames), step).astype(int)
    return np.stack([frames[i] for i in idx])


def _resize_crop(frames, height, width):
    from PIL import Image

    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    out = []
    for fr in frames:
        im = np.asarray(Image.fromarray(fr).resize((nw, nh), Image.BILINEAR))
        top, left = (nh - height) // 2, (nw - width) // 2
        out.append(im[top : top + height, left : left + width])
    return np.stack(out)


def encode_dataset(data_dir, out_dir, vae, text_encoders, *, frames, height, width, fps, max_clips_per_video=8):
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    with open(data_dir / "captions.jsonl") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                captions[row["file"]] = row["caption"]
    skipped, n = [], 0
    files = sorted(p.name for p in data_dir.iterdir() if p.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv", ".avi"))
    encode = jax.jit(lambda x: vae.normalize(vae.encode(x).mode()))
    for name in files + sorted(set(captions) - set(files)):
        if name not in captions:
            warnings.warn(f"encode: skipping {name}: no caption in captions.jsonl")
            skipped.append({"file": name, "reason": "no caption"})
            continue
        try:
            vid = _read_frames(data_dir / name, fps)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"encode: skipping {name}: unreadable video ({type(e).__name__}: {e})")
            skipped.append({"file": name, "reason": f"unreadable: {type(e).__name__}"})
            continue
        if len(vid) < frames:
            warnings.warn(f"encode: skipping {name}: {len(vid)} frames at {fps} fps, shorter than one clip of {frames}")
            skipped.append({"file": name, "reason": "shorter than one clip"})
            continue
        ctx, pooled = text_encoders.encode([captions[name]])
        for c in range(min(len(vid) // frames, max_clips_per_video)):
            clip = _resize_crop(vid[c * frames : (c + 1) * frames], height, width)
            x = jnp.asarray(clip, jnp.float32)[None] / 127.5 - 1.0
            lat = np.asarray(encode(x))[0]
            np.savez(out_dir / f"rec_{n:05d}.npz", latents=lat, prompt_embeds=ctx[0], pooled=pooled[0])
            n += 1
    return {"records": n, "skipped": skipped}


# ----------------------------------------------------------------------------- data iterator


class RecordIterator:
    """Deterministic batches: step ``s`` draws indices from ``(seed, s)``; state is the next step."""

    def __init__(self, encoded_dir, batch_size, seed, process_index=0, process_count=1):
        self.files = sorted(Path(encoded_dir).glob("rec_*.npz"))
        if not self.files:
            raise ValueError(f"no encoded records in {encoded_dir}")
        self.records = [dict(np.load(f)) for f in self.files]
        self.batch_size, self.seed = batch_size, seed
        self.pi, self.pc = process_index, process_count
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.step])
        idx = rng.integers(0, len(self.records), self.batch_size)
        per = self.batch_size // self.pc
        idx = idx[self.pi * per : (self.pi + 1) * per]
        self.step += 1
        return {k: np.stack([self.records[i][k] for i in idx]) for k in ("latents", "prompt_embeds", "pooled")} | {"bucket": "standin"}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])
