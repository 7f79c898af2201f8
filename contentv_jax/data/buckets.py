"""Aspect-ratio x duration buckets (ContentV report section 5; reference doc section 5).

Every bucket is a pixel shape ``(frames, height, width)`` with its own maximum global batch size:

- aspect ratios (width:height) ``16:9, 3:2, 4:3, 1:1, 3:4, 2:3, 9:16``; each keeps the pixel area of
  the configured maximum shape (e.g. 432x768 for Stage 3, 64x64 for the tiny default), with height and
  width rounded to multiples of ``spatial_multiple`` (16 = VAE 8x times patch 2);
- durations of whole seconds at ``fps``: ``d`` seconds is the largest ``4k + 1 <= d * fps + 1``
  frames, up to ``max_frames`` (itself always a bucket); ``frames = 1`` is the image bucket;
- batch size: ``video_batch_size`` at the largest video bucket's token count, scaled so that tokens
  per batch stay about constant (``floor(video_batch_size * max_tokens / tokens)``), rounded down to a
  multiple of ``batch_multiple`` (data-parallel size), at least ``batch_multiple``; image buckets
  scale ``image_batch_size`` the same way.

``assign_bucket(buckets, height, width, num_frames, fps)`` picks the bucket of a source video (closest
aspect ratio in log space, then the longest duration that fits); ``bucket_for_step(seed, step,
available)`` draws the bucket of a training step from the shared seed and the step only, so every
host draws the same one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "ASPECT_RATIOS",
    "Bucket",
    "make_buckets",
    "assign_bucket",
    "bucket_for_step",
    "latent_shape",
    "num_tokens",
]

ASPECT_RATIOS: tuple[tuple[str, int, int], ...] = (
    ("16:9", 16, 9),
    ("3:2", 3, 2),
    ("4:3", 4, 3),
    ("1:1", 1, 1),
    ("3:4", 3, 4),
    ("2:3", 2, 3),
    ("9:16", 9, 16),
)


def latent_shape(frames: int, height: int, width: int, *, temporal: int = 4, spatial: int = 8) -> tuple[int, int, int]:
    """Wan VAE latent shape ``(T', h, w)`` of a ``(frames, height, width)`` clip: ``(1 + (frames - 1) // 4, H / 8, W / 8)``."""
    return 1 + (frames - 1) // temporal, height // spatial, width // spatial


def num_tokens(frames: int, height: int, width: int, *, patch: int = 2) -> int:
    """Transformer video tokens of a clip: latent frames x (h / 2) x (w / 2) (patch 1x2x2)."""
    t, h, w = latent_shape(frames, height, width)
    return t * (h // patch) * (w // patch)


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One bucket: pixel ``frames`` (4k+1; 1 for images), ``height``, ``width``, global ``batch_size``."""

    frames: int
    height: int
    width: int
    batch_size: int = 1
    aspect: str = ""

    @property
    def key(self) -> str:
        """Stable string key, e.g. ``"f9_h48_w80"`` (record files and batches carry it)."""
        return f"f{self.frames}_h{self.height}_w{self.width}"

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    @property
    def tokens(self) -> int:
        return num_tokens(self.frames, self.height, self.width)

    def latent_shape(self, channels: int = 16) -> tuple[int, int, int, int]:
        """Normalised-latent shape of one sample ``(T', h, w, C)``."""
        return (*latent_shape(self.frames, self.height, self.width), channels)

    @classmethod
    def from_key(cls, key: str, batch_size: int = 1) -> "Bucket":
        try:
            f, h, w = key.split("_")
            return cls(int(f[1:]), int(h[1:]), int(w[1:]), batch_size)
        except (ValueError, IndexError) as e:
            raise ValueError(f"bucket key {key!r} is not of the form f<frames>_h<height>_w<width>") from e


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def duration_frames(max_frames: int, fps: float) -> list[int]:
    """Frame counts of the duration buckets: one per whole second below ``max_frames``, and ``max_frames``."""
    if max_frames < 1 or (max_frames - 1) % 4:
        raise ValueError(f"max_frames must be 4k+1, got {max_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    out = set()
    d = 1
    while True:
        f = int(d * fps) // 4 * 4 + 1
        if f >= max_frames:
            break
        if f > 1:
            out.add(f)
        d += 1
    if max_frames > 1:
        out.add(max_frames)
    return sorted(out)


def make_buckets(
    max_frames: int,
    max_height: int,
    max_width: int,
    *,
    fps: float,
    video_batch_size: int = 1,
    image_batch_size: int | None = None,
    images: bool = False,
    videos: bool = True,
    batch_multiple: int = 1,
    spatial_multiple: int = 16,
    aspect_ratios: Sequence[str] | None = None,
    max_batch_scale: int = 64,
) -> list[Bucket]:
    """All buckets of a stage, sorted by key order (frames, height, width).

    Args:
      max_frames, max_height, max_width: the stage's maximum shape (Table 2, e.g. 125, 432, 768);
        the area ``max_height * max_width`` is shared by all aspect ratios.
      fps: frames per second of the clips (duration buckets are whole seconds at this rate).
      video_batch_size: global batch at the largest video bucket's token count.
      image_batch_size: global batch at the largest image bucket (defaults to ``video_batch_size``).
      images, videos: which kinds of bucket to make (VAE adaptation: images only; stage 1+: both).
      batch_multiple: every batch size is a positive multiple of it (e.g. the data-parallel size).
      aspect_ratios: subset of ``ASPECT_RATIOS`` names (default all seven).
      max_batch_scale: cap on the batch growth of short / small buckets relative to the base size.

    Raises ValueError for non-positive sizes, a max height/width not divisible by ``spatial_multiple``,
    an unknown aspect ratio or ``max_frames`` not 4k+1.
    """
    if min(max_height, max_width, video_batch_size, batch_multiple) < 1:
        raise ValueError("max_height, max_width, video_batch_size and batch_multiple must be positive")
    if max_height % spatial_multiple or max_width % spatial_multiple:
        raise ValueError(
            f"max shape {max_height}x{max_width} must be divisible by {spatial_multiple} (VAE 8 x patch 2)"
        )
    if not (images or videos):
        raise ValueError("make_buckets: at least one of images / videos must be True")
    names = [a[0] for a in ASPECT_RATIOS]
    chosen = names if aspect_ratios is None else list(aspect_ratios)
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ValueError(f"unknown aspect ratio(s) {unknown}; known: {names}")
    area = max_height * max_width
    sizes = []
    for name, rw, rh in ASPECT_RATIOS:
        if name not in chosen:
            continue
        h = math.sqrt(area * rh / rw)
        sizes.append((name, _round_to(h, spatial_multiple), _round_to(h * rw / rh, spatial_multiple)))
    frame_counts = ([1] if images else []) + (duration_frames(max_frames, fps) if videos else [])
    image_batch_size = video_batch_size if image_batch_size is None else image_batch_size
    max_video_tokens = max((num_tokens(f, h, w) for f in frame_counts if f > 1 for _, h, w in sizes), default=1)
    max_image_tokens = max(num_tokens(1, h, w) for _, h, w in sizes)
    buckets: dict[tuple[int, int, int], Bucket] = {}  # aspect ratios that round to one shape share it
    for f in frame_counts:
        base, ref = (image_batch_size, max_image_tokens) if f == 1 else (video_batch_size, max_video_tokens)
        for name, h, w in sizes:
            b = min(int(base * ref // num_tokens(f, h, w)), base * max_batch_scale)
            b = max(batch_multiple, b // batch_multiple * batch_multiple)
            buckets.setdefault((f, h, w), Bucket(f, h, w, b, name))
    return [buckets[k] for k in sorted(buckets)]


def assign_bucket(
    buckets: Sequence[Bucket], height: int, width: int, num_frames: int, fps: float, target_fps: float | None = None
) -> Bucket | None:
    """The bucket of a source of ``num_frames`` frames of ``height x width`` at ``fps``.

    Aspect ratio: the bucket shape whose ``log(width / height)`` is closest. Duration: the bucket with
    the most frames such that one clip at ``target_fps`` (default ``fps``) fits in the source
    (``(frames - 1) * fps / target_fps <= num_frames - 1``). A single frame (images) goes to the
    ``frames = 1`` bucket. Returns None when no bucket fits (video shorter than the shortest clip).
    """
    if height < 1 or width < 1:
        raise ValueError(f"assign_bucket: bad size {height}x{width}")
    target_fps = fps if target_fps is None else target_fps
    r = math.log(width / height)
    shapes = sorted({(b.height, b.width) for b in buckets}, key=lambda s: (abs(math.log(s[1] / s[0]) - r), s))
    if not shapes:
        return None
    h, w = shapes[0]
    same = [b for b in buckets if (b.height, b.width) == (h, w)]
    if num_frames == 1:
        fits = [b for b in same if b.frames == 1]
    else:
        fits = [b for b in same if b.frames > 1 and (b.frames - 1) * fps / target_fps <= num_frames - 1 + 1e-6]
    return max(fits, key=lambda b: b.frames) if fits else None


def bucket_for_step(
    seed: int, step: int, available_buckets: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None = None
) -> str:
    """The bucket key of training ``step``: a draw from ``numpy.random.default_rng([seed, step])``.

    Depends only on ``(seed, step)`` and the *set* of ``available_buckets`` (keys are sorted first), so
    every host draws the same bucket without communicating. ``weights`` (per key, default uniform)
    need not sum to 1; zero-weight keys are never drawn.

    Raises ValueError for an empty bucket list, a negative step or weights that are all zero.
    """
    keys = sorted(available_buckets)
    if not keys:
        raise ValueError("bucket_for_step: no bucket available")
    if step < 0 or seed < 0:
        raise ValueError(f"bucket_for_step: seed and step must be >= 0, got seed={seed} step={step}")
    if weights is None:
        p = np.ones(len(keys))
    elif isinstance(weights, Mapping):
        p = np.array([float(weights.get(k, 0.0)) for k in keys])
    else:
        order = np.argsort(np.array(list(available_buckets), dtype=object), kind="stable")
        p = np.asarray(weights, dtype=np.float64)[order]
    if p.shape != (len(keys),) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"bucket_for_step: bad weights {weights!r} for buckets {keys}")
    return keys[draw_index(seed, step, np.cumsum(p / p.sum()))]


def draw_index(seed: int, step: int, cdf: np.ndarray) -> int:
    """The index drawn at ``step`` from a cumulative distribution ``cdf`` (the core of :func:`bucket_for_step`)."""
    u = np.random.default_rng([seed, step]).random()
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
