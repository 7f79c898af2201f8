"""Feature extraction: videos + captions -> bucketed latent records (the report's separate encode stage).

``python -m contentv_jax.encode --data DIR --out DIR --vae PATH --text-encoders PATH [--fps 24
--max-frames 125 --max-height 432 --max-width 768 ...]`` and the library call::

    stats = encode_dataset(data_dir, out_dir, vae, text_encoders, fps=24, max_frames=125,
                           max_height=432, max_width=768)

Input: ``DIR/captions.jsonl`` of ``{"file": ..., "caption": ...}`` lines (the format of
``../shared/data/videos/captions.jsonl``); files are videos (anything PyAV decodes) or images
(``.png .jpg .jpeg .webp .bmp``: T=1 records).

Per file: probe; pick its bucket (:func:`contentv_jax.train.buckets.assign_bucket`: closest aspect
ratio, longest whole-second duration that fits, at most ``max_frames``); cut back-to-back clips of
the bucket's ``4k + 1`` frames at ``fps`` (:func:`contentv_jax.video.clip_frame_indices`); resize +
center-crop to the bucket; scale to ``[-1, 1]``; ``vae.encode(x (B, T, H, W, 3))`` then
``vae.normalize(z.mode())`` (or ``.sample(key)``) -> normalised latents ``(T', h, w, 16)``; the caption
through :class:`contentv_jax.text.TextEncoders` -> ``prompt_embeds (77 + L, Dctx)``, ``pooled (Dpool,)``.

Output ``OUT/``:
- ``<bucket key>.array_record``: one record per clip, bytes of an ``.npz`` (no pickle) holding
  ``latents`` float32 (T', h, w, C), ``prompt_embeds`` (77 + L, Dctx), ``pooled`` (Dpool,) (float32, or
  float16 with ``embeds_dtype="float16"``) and ``meta`` (JSON: file, caption, clip, frame indices,
  bucket); read with :func:`decode_record`;
- ``null_text.npz``: the empty prompt's ``prompt_embeds (1, 77 + L, Dctx)``, ``pooled (1, Dpool)``
  (caption dropout for CFG);
- ``index.json`` (written last): buckets (key, frames, height, width, latent shape, record count,
  file), text widths, fps, the config and the stats. :func:`read_index` loads it.

Every file goes through a temporary sibling and ``os.replace``. Bad input never ends a run: an
unreadable, truncated or zero-byte video, a video shorter than one clip, a file without a caption, a
caption whose file is missing, a malformed ``captions.jsonl`` line: each is skipped with a warning
naming the file, counted in :class:`EncodeStats` (``skipped[reason] = [files]``) and printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contentv_jax.train.buckets import Bucket, assign_bucket, make_buckets
from contentv_jax.video import (
    VideoReadError,
    clip_frame_indices,
    probe_video,
    read_frames,
    resize_center_crop,
)

__all__ = [
    "EncodeStats",
    "encode_dataset",
    "encode_record",
    "decode_record",
    "read_index",
    "load_null_text",
    "INDEX_NAME",
    "NULL_TEXT_NAME",
    "main",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_TEXT_NAME = "null_text.npz"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")

SKIP_REASONS = ("unreadable", "too_short", "no_caption", "missing_file", "bad_caption_line")


@dataclasses.dataclass
class EncodeStats:
    """Counts of an encode run. ``skipped`` maps a reason (``unreadable``: corrupt, truncated or
    zero-byte; ``too_short``: shorter than one clip; ``no_caption``: a media file in the data dir with no
    caption line; ``missing_file``: a caption whose file does not exist; ``bad_caption_line``) to the
    files (or ``captions.jsonl:<line>``) skipped for it."""

    files_seen: int = 0
    files_encoded: int = 0
    records: int = 0
    records_per_bucket: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    seconds: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        lines = [
            f"encoded {self.files_encoded}/{self.files_seen} files into {self.records} records "
            f"in {len(self.records_per_bucket)} buckets ({self.seconds:.1f} s); skipped {self.num_skipped}"
        ]
        for k in sorted(self.records_per_bucket):
            lines.append(f"  bucket {k}: {self.records_per_bucket[k]} records")
        for reason, files in self.skipped.items():
            if files:
                lines.append(f"  skipped ({reason}): {len(files)}: {', '.join(files)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# record format

def encode_record(latents: np.ndarray, prompt_embeds: np.ndarray, pooled: np.ndarray, meta: dict) -> bytes:
    """One record's bytes: an uncompressed ``.npz`` of the three arrays and ``meta`` as JSON (no pickle)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        latents=np.ascontiguousarray(latents),
        prompt_embeds=np.ascontiguousarray(prompt_embeds),
        pooled=np.ascontiguousarray(pooled),
        meta=np.array(json.dumps(meta)),
    )
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`: ``{"latents", "prompt_embeds", "pooled"}`` as float32 arrays, ``"meta"`` dict."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {
            "latents": z["latents"].astype(np.float32, copy=False),
            "prompt_embeds": z["prompt_embeds"].astype(np.float32, copy=False),
            "pooled": z["pooled"].astype(np.float32, copy=False),
            "meta": json.loads(str(z["meta"])),
        }


def read_index(records_dir: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of an encoded directory. Raises FileNotFoundError (naming the path) or ValueError
    for an unknown format version."""
    p = Path(records_dir) / INDEX_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no index; encode the data first (python -m contentv_jax.encode)")
    index = json.loads(p.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: format_version {index.get('format_version')!r}, expected {FORMAT_VERSION}")
    return index


def load_null_text(records_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's ``(prompt_embeds float32 (1, L, Dctx), pooled float32 (1, Dpool))`` of an encoded dir."""
    with np.load(Path(records_dir) / NULL_TEXT_NAME, allow_pickle=False) as z:
        return z["prompt_embeds"].astype(np.float32), z["pooled"].astype(np.float32)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# inputs

def _read_captions(data_dir: Path, stats: EncodeStats) -> list[tuple[str, str]]:
    path = data_dir / "captions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no captions.jsonl in the data directory (lines of {{\"file\", \"caption\"}})")
    items, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            file, caption = obj["file"], obj["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise TypeError("file and caption must be strings")
        except (ValueError, KeyError, TypeError) as e:
            _skip(stats, "bad_caption_line", f"{path.name}:{n}", f"malformed line ({e})")
            continue
        if file in seen:
            log.warning("%s:%d: %s already captioned; the first caption is kept", path.name, n, file)
            continue
        seen.add(file)
        items.append((file, caption))
    media = {
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    }
    for file in sorted(media - seen):
        _skip(stats, "no_caption", file, "no caption in captions.jsonl")
    return items


def _skip(stats: EncodeStats, reason: str, file: str, why: str) -> None:
    stats.skipped[reason].append(file)
    log.warning("skipping %s: %s", file, why)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))[None]
    except Exception as e:
        raise VideoReadError(f"image {str(path)!r}: cannot decode ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------
# VAE

def _make_vae_fn(vae, latent_mode: str):
    """``fn(x (B, T, H, W, 3) float32 in [-1, 1], key) -> normalised latents (B, T', h, w, C)``.

    Calls the VAE's own ``encode`` (the Wan VAE compiles it once per input shape) and ``normalize``.
    """
    import jax.numpy as jnp

    def run(x, key):
        dist = vae.encode(jnp.asarray(x))
        z = dist.sample(key) if latent_mode == "sample" else dist.mode()
        return vae.normalize(z)

    return run


def _resolve_vae(vae):
    if isinstance(vae, (str, os.PathLike)):
        from contentv_jax.models import load_vae

        return load_vae(vae)
    return vae


def _resolve_text(text_encoders):
    if isinstance(text_encoders, (str, os.PathLike)):
        from contentv_jax.text import TextEncoders

        return TextEncoders.from_pretrained(text_encoders)
    return text_encoders


# ------------------------------------------------------------------------------------------------
# the encode loop

def encode_dataset(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vae,
    text_encoders,
    *,
    fps: float = 24.0,
    max_frames: int = 125,
    max_height: int = 432,
    max_width: int = 768,
    max_clips_per_video: int | None = None,
    max_sequence_length: int = 256,
    latent_mode: str = "mode",
    embeds_dtype: str = "float32",
    vae_batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> EncodeStats:
    """Encode ``data_dir`` (videos/images + ``captions.jsonl``) into bucketed records under ``out_dir``.

    Args:
      vae: a VAE object (``encode(x) -> dist`` with ``.mode()``/``.sample(key)``, ``normalize(z)``;
        :func:`contentv_jax.models.load_vae`) or a path for ``load_vae``.
      text_encoders: a :class:`contentv_jax.text.TextEncoders` or a model directory for it.
      fps: clip frame rate (clips are resampled by frame index to it).
      max_frames, max_height, max_width: the stage's maximum shape (buckets: :func:`make_buckets`).
      max_clips_per_video: clips cut per video (default: every back-to-back clip that fits).
      max_sequence_length: T5 tokens (256 for ContentV).
      latent_mode: ``"mode"`` (the posterior mean) or ``"sample"`` (key from ``seed`` and the record number).
      embeds_dtype: storage of text embeddings, ``"float32"`` or ``"float16"`` (read back as float32).
      vae_batch_size: clips per VAE call (same bucket only).

    Returns :class:`EncodeStats`; the summary is also printed. Raises FileNotFoundError when
    ``captions.jsonl`` is missing, ValueError for a bad option; bad files are skipped, never raised.
    """
    import jax

    from array_record.python.array_record_module import ArrayRecordWriter

    if latent_mode not in ("mode", "sample"):
        raise ValueError(f"latent_mode must be 'mode' or 'sample', got {latent_mode!r}")
    if embeds_dtype not in ("float32", "float16"):
        raise ValueError(f"embeds_dtype must be 'float32' or 'float16', got {embeds_dtype!r}")
    t0 = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    buckets = make_buckets(max_frames, max_height, max_width, fps=fps, images=True, videos=max_frames > 1)
    stats = EncodeStats()
    items = _read_captions(data_dir, stats)
    vae = _resolve_vae(vae)
    text = _resolve_text(text_encoders)
    vae_fn = _make_vae_fn(vae, latent_mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    edtype = np.float16 if embeds_dtype == "float16" else np.float32

    writers: dict[str, tuple[Any, Path, Path]] = {}
    bucket_of: dict[str, Bucket] = {}
    latent_channels = None

    def writer_for(b: Bucket):
        if b.key not in writers:
            final = out_dir / f"{b.key}.array_record"
            tmp = out_dir / f".{b.key}.array_record.tmp"
            writers[b.key] = (ArrayRecordWriter(str(tmp), "group_size:1"), tmp, final)
            bucket_of[b.key] = b
        return writers[b.key][0]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="encode", unit="file")
    try:
        for file, caption in items:
            stats.files_seen += 1
            if bar is not None:
                bar.update(1)
            path = data_dir / file
            if not path.is_file():
                _skip(stats, "missing_file", file, f"captioned but not found at {path}")
                continue
            try:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    img = _read_image(path)
                    bucket = assign_bucket(buckets, img.shape[1], img.shape[2], 1, 1.0)
                    clips = [resize_center_crop(img, bucket.height, bucket.width)]
                    starts = [[0]]
                else:
                    info = probe_video(path, exact=True)  # demux only; detects truncation
                    bucket = assign_bucket(
                        [b for b in buckets if not b.is_image], info.height, info.width, info.num_frames, info.fps, fps
                    )
                    if bucket is None:
                        _skip(stats, "too_short", file, f"{info.num_frames} frames at {info.fps:g} fps is shorter "
                              f"than the shortest clip at {fps:g} fps")
                        continue
                    index_lists = clip_frame_indices(
                        info.num_frames, info.fps, bucket.frames, fps, max_clips=max_clips_per_video
                    )
                    if not index_lists:
                        _skip(stats, "too_short", file, f"no {bucket.frames}-frame clip fits")
                        continue
                    frames = read_frames(path, np.concatenate(index_lists))
                    frames = resize_center_crop(frames, bucket.height, bucket.width)
                    clips = np.split(frames, len(index_lists))
                    starts = [ix.tolist() for ix in index_lists]
            except VideoReadError as e:
                _skip(stats, "unreadable", file, str(e))
                continue

            embeds, pooled = text.encode([caption], max_sequence_length=max_sequence_length)
            w = writer_for(bucket)
            for c0 in range(0, len(clips), vae_batch_size):
                chunk = np.stack(clips[c0 : c0 + vae_batch_size]).astype(np.float32) / 127.5 - 1.0
                key = jax.random.fold_in(jax.random.key(seed), stats.records)
                lat = np.asarray(jax.device_get(vae_fn(chunk, key)), dtype=np.float32)
                if lat.ndim != 5:
                    raise ValueError(f"VAE returned latents of shape {lat.shape}; expected (B, T', h, w, C)")
                latent_channels = lat.shape[-1]
                for j, z in enumerate(lat):
                    meta = {
                        "file": file,
                        "caption": caption,
                        "clip": c0 + j,
                        "frame_indices": starts[c0 + j],
                        "bucket": bucket.key,
                    }
                    w.write(encode_record(z, embeds[0].astype(edtype), pooled[0].astype(edtype), meta))
                    stats.records += 1
                    stats.records_per_bucket[bucket.key] = stats.records_per_bucket.get(bucket.key, 0) + 1
            stats.files_encoded += 1
    finally:
        if bar is not None:
            bar.close()
        for w, _, _ in writers.values():
            w.close()

    # everything written: move files into place, then the index last
    for w, tmp, final in writers.values():
        os.replace(tmp, final)
    null_embeds, null_pooled = text.encode([""], max_sequence_length=max_sequence_length)
    buf = io.BytesIO()
    np.savez(buf, prompt_embeds=null_embeds.astype(np.float32), pooled=null_pooled.astype(np.float32))
    _atomic_write_bytes(out_dir / NULL_TEXT_NAME, buf.getvalue())
    stats.seconds = time.time() - t0
    index = {
        "format_version": FORMAT_VERSION,
        "fps": fps,
        "max_shape": [max_frames, max_height, max_width],
        "latent_mode": latent_mode,
        "text": {
            "max_sequence_length": max_sequence_length,
            "context_dim": int(null_embeds.shape[-1]),
            "context_tokens": int(null_embeds.shape[1]),
            "pooled_dim": int(null_pooled.shape[-1]),
        },
        "latent_channels": latent_channels,
        "buckets": {
            k: {
                "frames": b.frames,
                "height": b.height,
                "width": b.width,
                "aspect": b.aspect,
                "latent_shape": list(b.latent_shape(latent_channels or 16)),
                "num_records": stats.records_per_bucket[k],
                "file": f"{k}.array_record",
            }
            for k, b in sorted(bucket_of.items())
        },
        "stats": dataclasses.asdict(stats),
    }
    _atomic_write_bytes(out_dir / INDEX_NAME, json.dumps(index, indent=1).encode())
    print(stats.summary())
    return stats


def main(argv: Sequence[str] | None = None) -> EncodeStats:
    p = argparse.ArgumentParser(prog="python -m contentv_jax.encode", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="directory of videos/images and captions.jsonl")
    p.add_argument("--out", required=True, help="output directory of records (index.json, *.array_record)")
    p.add_argument("--vae", required=True, help="VAE checkpoint (diffusers format or ours; load_vae)")
    p.add_argument("--text-encoders", required=True, help="model dir with tokenizer{,_2,_3}/ text_encoder{,_2,_3}/")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--max-frames", type=int, default=125)
    p.add_argument("--max-height", type=int, default=432)
    p.add_argument("--max-width", type=int, default=768)
    p.add_argument("--max-clips-per-video", type=int, default=None)
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--latent-mode", choices=("mode", "sample"), default="mode")
    p.add_argument("--embeds-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--vae-batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("data", "vae", "text_encoders"):
        if not Path(getattr(a, name)).exists():
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: no such file or directory")
    return encode_dataset(
        a.data, a.out, a.vae, a.text_encoders, fps=a.fps, max_frames=a.max_frames, max_height=a.max_height,
        max_width=a.max_width, max_clips_per_video=a.max_clips_per_video,
        max_sequence_length=a.max_sequence_length, latent_mode=a.latent_mode, embeds_dtype=a.embeds_dtype,
        vae_batch_size=a.vae_batch_size, seed=a.seed,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
