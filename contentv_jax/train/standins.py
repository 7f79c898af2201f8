"""TEMPORARY stand-ins for pieces other issues build (VAE, synthetic data, encode stage,
grain data iterator), with the same APIs, so the trainer runs before they land.

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


def encode_dataset(data_dir, out_dir, vae, text_encoders, *, frames, height, width, fps, max_sequence_length=32, max_clips_per_video=8):
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
        ctx, pooled = text_encoders.encode([captions[name]], max_sequence_length=max_sequence_length)
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
