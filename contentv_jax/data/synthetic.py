"""A small procedurally rendered video dataset: moving coloured shapes with matching captions.

``make_synthetic_dataset(out_dir, num_videos=16, seed=0)`` writes ``video_000.mp4`` ... (H.264) and a
``captions.jsonl`` of ``{"file": ..., "caption": ...}`` lines, the format of
``../shared/data/videos/captions.jsonl``. Each video shows one shape (circle, square, triangle) of one
colour crossing a plain background in one direction, captioned e.g.
``"a red circle moving left on a blue background"``. The content depends only on ``seed``; a default
dataset takes a few seconds on one CPU core. It is what ``python -m contentv_jax.train`` trains on when
no ``--data`` is given (no network, nothing outside the repository).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from contentv_jax.atomic import atomic_dir
from contentv_jax.data.video import write_video

__all__ = ["COLORS", "SHAPES", "DIRECTIONS", "caption", "render_video", "make_synthetic_dataset"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def caption(shape: str, color: str, background: str, direction: str) -> str:
    """E.g. ``"a red circle moving left on an orange background"``."""
    art = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
    return f"{art(color)} {color} {shape} moving {direction} on {art(background)} {background} background"


def render_video(
    shape: str, color: str, background: str, direction: str, *, num_frames: int, height: int, width: int,
    radius: float | None = None,
) -> np.ndarray:
    """Frames uint8 ``(num_frames, height, width, 3)``: ``shape`` in ``color`` moving in ``direction``
    across ``background`` (from one side, about a radius outside the frame centre line, to the other)."""
    if color not in COLORS or background not in COLORS:
        raise ValueError(f"unknown colour {color!r} or {background!r}; known: {sorted(COLORS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {sorted(DIRECTIONS)}")
    r = radius if radius is not None else 0.18 * min(height, width)
    dy, dx = DIRECTIONS[direction]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = COLORS[background]
    for t in range(num_frames):
        a = t / max(num_frames - 1, 1)  # 0 -> 1 over the video
        cy = height / 2 + dy * (a - 0.5) * (height - 2 * r)
        cx = width / 2 + dx * (a - 0.5) * (width - 2 * r)
        frames[t][_mask(shape, yy, xx, cy, cx, r)] = COLORS[color]
    return frames


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    num_videos: int = 16,
    seed: int = 0,
    num_frames: int = 24,
    fps: float = 8.0,
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (48, 80)),
) -> Path:
    """Render ``num_videos`` captioned videos into ``out_dir`` (created; replaced atomically if present).

    Video ``i`` has size ``sizes[i % len(sizes)]`` (height, width; even), ``num_frames`` frames at
    ``fps``; shape, colour, background (never the shape's colour) and direction are drawn from
    ``numpy.random.default_rng(seed)``. Returns ``Path(out_dir)``.
    """
    if num_videos < 1 or num_frames < 1:
        raise ValueError(f"num_videos and num_frames must be positive, got {num_videos}, {num_frames}")
    rng = np.random.default_rng(seed)
    names = sorted(COLORS)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        lines = []
        for i in range(num_videos):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = names[int(rng.integers(len(names)))]
            others = [c for c in names if c != color]
            background = others[int(rng.integers(len(others)))]
            direction = sorted(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
            h, w = sizes[i % len(sizes)]
            frames = render_video(shape, color, background, direction, num_frames=num_frames, height=h, width=w)
            name = f"video_{i:03d}.mp4"
            write_video(tmp / name, frames, fps)
            lines.append({"file": name, "caption": caption(shape, color, background, direction)})
        with open(tmp / "captions.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    return out
