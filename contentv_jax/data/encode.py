"""Feature extraction: videos + captions -> bucketed latent records (the report's separate encode stage).

``python -m contentv_jax.encode --data DIR --out DIR --vae PATH --text-encoders PATH [--fps 24
--max-frames 125 --max-height 432 --max-width 768 ...]`` and the library call::

    stats = encode_dataset(data_dir, out_dir, vae, text_encoders, fps=24, max_frames=125,
                           max_height=432, max_width=768)

Input: ``DIR/captions.jsonl`` of ``{"file": ..., "caption": ...}`` lines (the format of
``../shared/data/videos/captions.jsonl``); files are videos (anything PyAV decodes) or images
(``.png .jpg .jpeg .webp .bmp``: T=1 records). A line may carry several captions (``"captions": [...]``,
``"short_caption"``, ``"long_caption"`` besides ``"caption"``; the report's SFT data has a short and a
long caption per clip, ContentV report section 6.1): every caption is encoded and stored with the clip,
with its kind, and the trainer draws one per sample per step. Numeric fields of a line (e.g.
``aesthetic``, ``motion``) are kept with its records for ``data.filter`` (curated subsets).

Per file: probe; pick its bucket (:func:`contentv_jax.data.buckets.assign_bucket`: closest aspect
ratio, longest whole-second duration that fits, at most ``max_frames``); cut back-to-back clips of
the bucket's ``4k + 1`` frames at ``fps`` (:func:`contentv_jax.data.video.clip_frame_indices`); resize +
center-crop to the bucket; scale to ``[-1, 1]``; ``vae.encode(x (B, T, H, W, 3))`` then
``vae.normalize(z.mode())`` (or ``.sample(key)``) -> normalised latents ``(T', h, w, 16)``; the caption
through :class:`contentv_jax.text.TextEncoders` -> ``prompt_embeds (77 + L, Dctx)``, ``pooled (Dpool,)``.

Output ``OUT/``:
- ``<bucket key>.array_record`` (``<bucket key>.shard-SSSSS-of-NNNNN.array_record`` when sharded over
  several encode jobs): one record per clip, bytes of a safetensors file holding
  ``latents`` float32 (T', h, w, C), ``prompt_embeds`` (77 + L, Dctx), ``pooled`` (Dpool,) (float32, or
  float16 with ``embeds_dtype="float16"``; with K > 1 captions ``(K, 77 + L, Dctx)`` and ``(K, Dpool)``) and
  ``meta`` (JSON in the header's ``__metadata__``: file, caption, clip, frame indices, bucket; with
  K > 1 ``captions`` and ``caption_kinds``; ``fields``, the line's numeric fields); read with
  :func:`decode_record`. (Not ``.npz``: numpy parses each array header with ``ast.literal_eval``, and
  CPython 3.11's parser is not thread-safe, so grain's read threads decoding two records at once could
  fail with ``SystemError: AST constructor recursion depth mismatch``.);
- ``null_text.npz``: the empty prompt's ``prompt_embeds (1, 77 + L, Dctx)``, ``pooled (1, Dpool)``
  (caption dropout for CFG);
- ``index.json`` (written last): buckets (key, frames, height, width, latent shape, record count,
  record files in order, ``fields``: each numeric field's value per record, None where absent), text widths, fps, the config and the stats. :func:`read_index` loads it.
  Sharded encodes (``--num-shards N --shard-index I``, e.g. one per machine) each write
  ``index.shard-I-of-N.json``; the last to finish merges them (:func:`merge_shards`).

Every file goes through a temporary sibling and ``os.replace``. Bad input never ends a run: an
unreadable, truncated or zero-byte video, a video shorter than one clip, a file without a caption, a
caption whose file is missing, a malformed ``captions.jsonl`` line: each is skipped with a warning
naming the file, counted in :class:`EncodeStats` (``skipped[reason] = [files]``) and printed at the end.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from contentv_jax.atomic import atomic_file

from contentv_jax.data.buckets import Bucket, assign_bucket, make_buckets
from contentv_jax.data.video import (
    VideoReadError,
    clip_frame_indices,
    probe_video,
    resize_center_crop,
)

__all__ = [
    "EncodeStats",
    "encode_dataset",
    "encode_record",
    "decode_record",
    "read_index",
    "load_null_text",
    "merge_shards",
    "INDEX_NAME",
    "NULL_TEXT_NAME",
    "main",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_TEXT_NAME = "null_text.npz"
FORMAT_VERSION = 3  # 2: bucket entries list "files" (encode shards); 3: records are safetensors, not .npz
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")

SKIP_REASONS = ("unreadable", "too_short", "no_caption", "missing_file", "bad_caption_line")
STAGES = ("decode", "vae", "text", "write")


@dataclasses.dataclass
class EncodeStats:
    """Counts of an encode run. ``skipped`` maps a reason (``unreadable``: corrupt, truncated or
    zero-byte; ``too_short``: shorter than one clip; ``no_caption``: a media file in the data dir with no
    caption line; ``missing_file``: a caption whose file does not exist; ``bad_caption_line``) to the
    files (or ``captions.jsonl:<line>``) skipped for it.

    ``seconds`` is the run's wall time; ``stage_seconds`` the time spent in each stage (``decode``:
    probe, decode, resize and crop, summed over the decode threads; ``vae``: VAE calls, device to host
    included; ``text``: text-encoder calls; ``write``: record bytes and array_record writes). Serially the
    wall time is about their sum; overlapped, it approaches the largest (``bench/encode.py``)."""

    files_seen: int = 0
    files_encoded: int = 0
    records: int = 0
    records_per_bucket: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    seconds: float = 0.0
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

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
    """One record's bytes: a safetensors file of the three arrays (dtypes kept) with ``meta`` as JSON in
    the header's metadata (no pickle, no Python parser on read)."""
    return safetensors.numpy.save(
        {
            "latents": np.ascontiguousarray(latents),
            "prompt_embeds": np.ascontiguousarray(prompt_embeds),
            "pooled": np.ascontiguousarray(pooled),
        },
        metadata={"meta": json.dumps(meta)},
    )


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`: ``{"latents", "prompt_embeds", "pooled"}`` as float32 arrays, ``"meta"`` dict.

    Safe to call from several threads at once. Raises ValueError for bytes that are not a record."""
    arrays = safetensors.numpy.load(bytes(data))
    # The safetensors layout: an 8-byte little-endian header length, then the JSON header.
    n = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(json.loads(bytes(data[8:8 + n]))["__metadata__"]["meta"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"record has no 'meta' in its safetensors metadata: {e}") from None
    return {
        "latents": arrays["latents"].astype(np.float32, copy=False),
        "prompt_embeds": arrays["prompt_embeds"].astype(np.float32, copy=False),
        "pooled": arrays["pooled"].astype(np.float32, copy=False),
        "meta": meta,
    }


def read_index(records_dir: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of an encoded directory. Raises FileNotFoundError (naming the path) or ValueError
    for an unknown format version."""
    p = Path(records_dir) / INDEX_NAME
    if not p.is_file():
        shards = sorted(x.name for x in Path(records_dir).glob("index.shard-*.json"))
        hint = f" (shard indexes present: {', '.join(shards)}; some shards have not finished)" if shards else ""
        raise FileNotFoundError(f"{p}: no index; encode the data first (python -m contentv_jax.encode){hint}")
    index = json.loads(p.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{p}: format_version {index.get('format_version')!r}, expected {FORMAT_VERSION}: "
            "re-encode the data (python -m contentv_jax.encode)"
        )
    return index


def load_null_text(records_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's ``(prompt_embeds float32 (1, L, Dctx), pooled float32 (1, Dpool))`` of an encoded dir."""
    with np.load(Path(records_dir) / NULL_TEXT_NAME, allow_pickle=False) as z:
        return z["prompt_embeds"].astype(np.float32), z["pooled"].astype(np.float32)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# inputs

def parse_caption_line(obj: Any) -> tuple[str, list[tuple[str, str]], dict[str, float]]:
    """One ``captions.jsonl`` object -> ``(file, [(kind, caption), ...], numeric fields)``.

    Captions come from ``"caption"`` (kind ``caption``), every entry of ``"captions": [...]`` (kind
    ``caption``), ``"short_caption"`` (kind ``short``) and ``"long_caption"`` (kind ``long``); at least one
    is required, each a non-empty string. Every other field holding a number (e.g. ``aesthetic``,
    ``motion``) is kept as a float for ``data.filter``. Raises KeyError / TypeError / ValueError naming
    what is wrong.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    file = obj["file"]
    if not isinstance(file, str):
        raise TypeError("file must be a string")
    captions: list[tuple[str, str]] = []
    if "caption" in obj:
        captions.append(("caption", obj["caption"]))
    if "captions" in obj:
        lst = obj["captions"]
        if not isinstance(lst, list) or not lst:
            raise ValueError("captions must be a non-empty list of strings")
        captions += [("caption", c) for c in lst]
    for field, kind in (("short_caption", "short"), ("long_caption", "long")):
        if field in obj:
            captions.append((kind, obj[field]))
    if not captions:
        raise KeyError("no caption (expected caption, captions, short_caption or long_caption)")
    for _, c in captions:
        if not isinstance(c, str) or not c.strip():
            raise TypeError(f"every caption must be a non-empty string, got {c!r}")
    fields = {
        k: float(v) for k, v in obj.items()
        if k not in ("file", "caption", "captions", "short_caption", "long_caption")
        and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return file, captions, fields


def _read_captions(data_dir: Path, stats: EncodeStats, report_uncaptioned: bool = True) -> list[tuple[str, list, dict]]:
    path = data_dir / "captions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no captions.jsonl in the data directory (lines of {{\"file\", \"caption\"}})")
    items, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            file, captions, fields = parse_caption_line(json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            if report_uncaptioned:
                _skip(stats, "bad_caption_line", f"{path.name}:{n}", f"malformed line ({e})")
            continue
        if file in seen:
            log.warning("%s:%d: %s already captioned; the first caption is kept", path.name, n, file)
            continue
        seen.add(file)
        items.append((file, captions, fields))
    media = {
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    }
    if report_uncaptioned:
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


def _iter_clips(path: Path, index_lists: list[np.ndarray], height: int, width: int):
    """Yield each clip of ``index_lists`` resized + cropped to ``(height, width)``, decoding ``path`` once.

    Only the clips in progress are held (as resized frames), never the whole decoded video.
    Raises VideoReadError when the file ends before the last requested frame.
    """
    from contentv_jax.data.video import iter_video_frames

    where: dict[int, list[tuple[int, int]]] = {}
    for c, idx in enumerate(index_lists):
        for j, i in enumerate(idx.tolist()):
            where.setdefault(i, []).append((c, j))
    pending: dict[int, np.ndarray] = {}
    last = [int(idx.max()) for idx in index_lists]
    nxt = 0
    n = 0
    for i, frame in enumerate(iter_video_frames(path)):
        n = i + 1
        if i in where:
            small = resize_center_crop(frame[None], height, width)[0]
            for c, j in where[i]:
                if c not in pending:
                    pending[c] = np.empty((len(index_lists[c]), height, width, 3), np.uint8)
                pending[c][j] = small
        while nxt < len(index_lists) and last[nxt] <= i:
            yield pending.pop(nxt)
            nxt += 1
        if nxt == len(index_lists):
            return
    raise VideoReadError(f"video {str(path)!r}: frame {last[nxt]} requested but only {n} frames decode (truncated?)")


@dataclasses.dataclass(eq=False)
class _File:
    """One caption line on its way through the stages: its clips (uint8 (T, H, W, 3) at the bucket's
    size) after decoding, then its latents and its text batch's future; ``skip`` = (reason, why)."""

    file: str
    captions: list
    fields: dict
    bucket: Bucket | None = None
    index_lists: list = dataclasses.field(default_factory=list)
    clips: list = dataclasses.field(default_factory=list)
    latents: list = dataclasses.field(default_factory=list)
    text: Any = None
    text_rows: tuple = (0, 0)
    skip: tuple | None = None
    seconds: float = 0.0


def _prepare_file(item, *, data_dir: Path, image_buckets, video_buckets, fps, max_clips_per_video,
                  images_per_video) -> _File:
    """Stage 1 (run on the decode threads): probe one file, pick its bucket, cut its clips, decode and
    resize + crop them. Never raises for bad input: a missing, unreadable or too short file comes back
    with ``skip`` set."""
    file, captions, fields = item
    t = time.perf_counter()
    f = _File(file, captions, fields)
    path = data_dir / file
    if not path.is_file():
        f.skip = ("missing_file", f"captioned but not found at {path}")
        return f
    try:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            img = _read_image(path)
            f.bucket = assign_bucket(image_buckets, img.shape[1], img.shape[2], 1, 1.0)
            f.index_lists = [np.zeros(1, np.int64)]
            f.clips = [resize_center_crop(img, f.bucket.height, f.bucket.width)]
        else:
            info = probe_video(path, exact=True)  # demux only; detects truncation
            if video_buckets:
                f.bucket = assign_bucket(video_buckets, info.height, info.width, info.num_frames, info.fps, fps)
            else:  # an image-only stage (max_frames = 1): frames of videos are images
                f.bucket = assign_bucket(image_buckets, info.height, info.width, 1, 1.0)
            if f.bucket is None:
                f.index_lists = []
            elif not video_buckets:  # images_per_video frames, spread out over the video
                n = min(images_per_video, info.num_frames)
                f.index_lists = [np.array([int((k + 0.5) * info.num_frames / n)], np.int64) for k in range(n)]
            else:
                f.index_lists = clip_frame_indices(info.num_frames, info.fps, f.bucket.frames, fps,
                                                   max_clips=max_clips_per_video)
            if not f.index_lists:
                need = f.bucket.frames if f.bucket else min(b.frames for b in video_buckets)
                f.skip = ("too_short", f"{info.num_frames} frames at {info.fps:g} fps hold no clip of {need} frames "
                          f"at {fps:g} fps")
            else:  # all of a file's clips, so a file truncated after its first clips writes no record
                f.clips = list(_iter_clips(path, f.index_lists, f.bucket.height, f.bucket.width))
    except VideoReadError as e:
        f.skip, f.clips = ("unreadable", str(e)), []
    f.latents = [None] * len(f.clips)
    f.seconds = time.perf_counter() - t
    return f


class _Inline:
    """``submit`` runs the call at once (the serial encode's stand-in for a thread pool)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


# ------------------------------------------------------------------------------------------------
# VAE

def _make_vae_fn(vae, latent_mode: str):
    """``fn(x (B, T, H, W, 3) float32 in [-1, 1], keys (B PRNG keys)) -> normalised latents (B, T', h, w, C)``.

    Calls the VAE's own ``encode`` (the Wan VAE compiles it once per input shape) and ``normalize``.
    With ``latent_mode="sample"`` clip ``b`` gets ``mean + std * eps_b``, ``eps_b ~ N(0, 1)`` drawn from
    ``keys[b]`` alone (``DiagonalGaussian.sample`` of that clip), so a clip's latents do not depend on
    which clips share its VAE batch.
    """
    import jax
    import jax.numpy as jnp

    def run(x, keys):
        dist = vae.encode(jnp.asarray(x))
        z = dist.mode()
        if latent_mode == "sample":
            eps = jnp.stack([jax.random.normal(k, z.shape[1:], jnp.float32) for k in keys]).astype(z.dtype)
            z = z + dist.std * eps
        return vae.normalize(z)

    return run


def _resolve_vae(vae):
    if isinstance(vae, (str, os.PathLike)):
        from contentv_jax.checkpoints import load_vae

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
    images_per_video: int = 1,
    max_sequence_length: int = 256,
    latent_mode: str = "mode",
    embeds_dtype: str = "float32",
    vae_batch_size: int = 1,
    text_batch_size: int = 16,
    decode_workers: int = 2,
    prefetch: int = 4,
    seed: int = 0,
    progress: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
    run_id: str = "",
) -> EncodeStats:
    """Encode ``data_dir`` (videos/images + ``captions.jsonl``) into bucketed records under ``out_dir``.

    Args:
      vae: a VAE object (``encode(x) -> dist`` with ``.mode()``/``.sample(key)``, ``normalize(z)``;
        :func:`contentv_jax.models.load_vae`) or a path for ``load_vae``.
      text_encoders: a :class:`contentv_jax.text.TextEncoders` or a model directory for it.
      fps: clip frame rate (clips are resampled by frame index to it).
      max_frames, max_height, max_width: the stage's maximum shape (buckets: :func:`make_buckets`).
      max_clips_per_video: clips cut per video (default: every back-to-back clip that fits).
      images_per_video: an image-only stage (``max_frames`` 1) takes this many frames of each video,
        spread out evenly (the middle frames of equal segments), not one per frame at ``fps`` (which
        would give about ``fps`` near-duplicates per second of video). Default 1: the middle frame.
      max_sequence_length: T5 tokens (256 for ContentV).
      latent_mode: ``"mode"`` (the posterior mean) or ``"sample"`` (key from ``seed``, the file name and
        the clip number: the same with any sharding).
      embeds_dtype: storage of text embeddings, ``"float32"`` or ``"float16"`` (read back as float32).
      vae_batch_size: clips per VAE call, of one bucket, gathered across files (a clip's latents do not
        depend on it).
      text_batch_size: captions per text-encoder call, gathered across files.
      decode_workers: threads that probe, decode, resize and crop files ahead of the VAE (grain's read
        threads, in input order); the text encoder and the record writer then run on a thread each, so
        the four stages overlap. 0: every stage in the calling thread, one after another (the serial
        bound; the records are the same). Memory: about ``prefetch + decode_workers`` files' clips
        (uint8 at the bucket's size) are held at a time.
      prefetch: files decoded ahead of the VAE.
      num_shards, shard_index: encode only the caption lines ``i`` with ``i % num_shards ==
        shard_index`` (one process or machine per shard, same ``out_dir``); each shard writes its own
        record files and ``index.shard-SSSSS-of-NNNNN.json``; the shard that finds all shard indexes
        present writes the merged ``index.json`` (:func:`merge_shards` does it explicitly).
      run_id: the encode run every shard of one sharded encode shares (required when ``num_shards``
        > 1); each index records it, and only the shard indexes of this run are merged, so an index
        left in ``out_dir`` by an earlier run is never merged into this one.

    Returns :class:`EncodeStats`; the summary is also printed. Raises FileNotFoundError when
    ``captions.jsonl`` is missing, ValueError for a bad option; bad files are skipped, never raised.
    """
    import jax

    from array_record.python.array_record_module import ArrayRecordWriter

    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, num_shards={num_shards})")
    if num_shards > 1 and not run_id:
        raise ValueError("a sharded encode needs a run_id shared by all its shards (--run-id), so that shard "
                         "indexes left by an earlier run are never merged into this one")
    for name, v, lo in (("vae_batch_size", vae_batch_size, 1), ("text_batch_size", text_batch_size, 1),
                        ("decode_workers", decode_workers, 0), ("prefetch", prefetch, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if images_per_video < 1:
        raise ValueError(f"images_per_video must be >= 1, got {images_per_video}")
    if latent_mode not in ("mode", "sample"):
        raise ValueError(f"latent_mode must be 'mode' or 'sample', got {latent_mode!r}")
    if embeds_dtype not in ("float32", "float16"):
        raise ValueError(f"embeds_dtype must be 'float32' or 'float16', got {embeds_dtype!r}")
    t0 = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    buckets = make_buckets(max_frames, max_height, max_width, fps=fps, images=True, videos=max_frames > 1)
    image_buckets = [b for b in buckets if b.is_image]
    video_buckets = [b for b in buckets if not b.is_image]
    stats = EncodeStats()
    items = _read_captions(data_dir, stats, report_uncaptioned=shard_index == 0)
    items = items[shard_index::num_shards]
    suffix = "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"
    vae = _resolve_vae(vae)
    text = _resolve_text(text_encoders)
    vae_fn = _make_vae_fn(vae, latent_mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a directory being (re-)encoded has no index: readers never pair old files with new ones
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    (out_dir / f"index{suffix}.json").unlink(missing_ok=True)
    edtype = np.float16 if embeds_dtype == "float16" else np.float32

    writers: dict[str, tuple[Any, Path, Path]] = {}
    bucket_of: dict[str, Bucket] = {}
    latent_channels = None
    rec_fields: dict[str, list[dict]] = {}  # per bucket, each record's numeric caption-line fields

    def writer_for(b: Bucket):
        if b.key not in writers:
            final = out_dir / f"{b.key}{suffix}.array_record"
            tmp = out_dir / f".{b.key}{suffix}.array_record.tmp"
            writers[b.key] = (ArrayRecordWriter(str(tmp), "group_size:1"), tmp, final)
            bucket_of[b.key] = b
        return writers[b.key][0]

    prepare = functools.partial(
        _prepare_file, data_dir=data_dir, image_buckets=image_buckets, video_buckets=video_buckets, fps=fps,
        max_clips_per_video=max_clips_per_video, images_per_video=images_per_video,
    )
    if decode_workers > 0:  # stage 1 on grain's read threads, in order, up to ``prefetch`` files ahead
        import grain

        prepared = iter(grain.MapDataset.source(items).map(prepare).to_iter_dataset(
            grain.ReadOptions(num_threads=decode_workers, prefetch_buffer_size=max(prefetch, 1))))
        text_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode-text")
        write_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode-write")
    else:  # serial: every stage in this thread, one after another
        prepared = map(prepare, items)
        text_pool = write_pool = _Inline()
    seconds = stats.stage_seconds

    def encode_text(captions):  # stage 3: the captions of several files, one call
        t = time.perf_counter()
        out = text.encode(captions, max_sequence_length=max_sequence_length)
        seconds["text"] += time.perf_counter() - t
        return out

    def write(w, records):  # stage 4: record bytes, appended in submission order (one writer thread)
        t = time.perf_counter()
        for z, embeds, pooled, meta in records:
            w.write(encode_record(z, embeds.astype(edtype), pooled.astype(edtype), meta))
        seconds["write"] += time.perf_counter() - t

    text_wait: list[_File] = []  # files whose captions wait for a text batch
    vae_wait: dict[str, list[tuple[_File, int]]] = {}  # per bucket: clips waiting for a full VAE batch
    queued: dict[str, collections.deque] = {}  # per bucket, files in input order, not yet written
    writes: list[concurrent.futures.Future] = []

    def flush_text():
        if text_wait:
            future = text_pool.submit(encode_text, [c for f in text_wait for _, c in f.captions])
            o = 0
            for f in text_wait:
                f.text, f.text_rows, o = future, (o, o + len(f.captions)), o + len(f.captions)
            text_wait.clear()

    def flush_vae(key):  # stage 2: one VAE call on up to vae_batch_size clips of one bucket
        batch = vae_wait.pop(key, [])
        if not batch:
            return
        t = time.perf_counter()
        x = np.stack([f.clips[j] for f, j in batch]).astype(np.float32) / 127.5 - 1.0
        keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(f.file.encode())), j)
                for f, j in batch]
        lat = np.asarray(jax.device_get(vae_fn(x, keys)), dtype=np.float32)
        seconds["vae"] += time.perf_counter() - t
        if lat.ndim != 5 or lat.shape[0] != len(batch):
            raise ValueError(f"VAE returned latents of shape {lat.shape}; expected ({len(batch)}, T', h, w, C)")
        for (f, j), z in zip(batch, lat):
            f.latents[j] = z
            f.clips[j] = None  # the pixels are no longer needed

    def emit(key, final=False):
        """Hand the finished files at the head of bucket ``key``'s queue to the writer, in input order."""
        nonlocal latent_channels
        q = queued.get(key, ())
        while q and (final or (all(z is not None for z in q[0].latents) and q[0].text is not None and q[0].text.done())):
            f = q.popleft()
            embeds, pooled = f.text.result()
            embeds, pooled = embeds[slice(*f.text_rows)], pooled[slice(*f.text_rows)]
            if len(f.captions) == 1:  # one caption keeps the (L, Dctx) / (Dpool,) layout
                embeds, pooled = embeds[0], pooled[0]
            latent_channels = f.latents[0].shape[-1]
            records = []
            for j, z in enumerate(f.latents):
                meta = {"file": f.file, "caption": f.captions[0][1], "clip": j,
                        "frame_indices": f.index_lists[j].tolist(), "bucket": key}
                if len(f.captions) > 1:
                    meta["captions"] = [c for _, c in f.captions]
                    meta["caption_kinds"] = [k for k, _ in f.captions]
                if f.fields:
                    meta["fields"] = f.fields
                records.append((z, embeds, pooled, meta))
                rec_fields.setdefault(key, []).append(f.fields)
            writes.append(write_pool.submit(write, writer_for(f.bucket), records))
            stats.records += len(records)
            stats.records_per_bucket[key] = stats.records_per_bucket.get(key, 0) + len(records)
            stats.files_encoded += 1

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="encode", unit="file")
    try:
        for f in prepared:
            stats.files_seen += 1
            seconds["decode"] += f.seconds
            if bar is not None:
                bar.update(1)
            if f.skip is not None:
                _skip(stats, f.skip[0], f.file, f.skip[1])
                continue
            key = f.bucket.key
            queued.setdefault(key, collections.deque()).append(f)
            text_wait.append(f)
            if sum(len(g.captions) for g in text_wait) >= text_batch_size:
                flush_text()
            for j in range(len(f.clips)):
                vae_wait.setdefault(key, []).append((f, j))
                if len(vae_wait[key]) >= vae_batch_size:
                    flush_vae(key)
            for k in list(queued):  # any bucket whose head file's text batch has finished meanwhile
                emit(k)
            for w in [w for w in writes if w.done()]:  # surface a failed write now, not at the end
                w.result()
                writes.remove(w)
        flush_text()
        for key in list(vae_wait):
            flush_vae(key)
        for key in list(queued):
            emit(key, final=True)
        for w in writes:
            w.result()
    except BaseException:
        text_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True, cancel_futures=True)
        for w, tmp, _ in writers.values():
            w.close()
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    text_pool.shutdown(wait=True)
    write_pool.shutdown(wait=True)
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
        "images_per_video": images_per_video,
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
                "files": [f"{k}{suffix}.array_record"],
                "file_records": [stats.records_per_bucket[k]],
                "fields": _columns(rec_fields.get(k, [])),
            }
            for k, b in sorted(bucket_of.items())
        },
        "shard": [shard_index, num_shards],
        "run_id": run_id,
        "stats": dataclasses.asdict(stats),
    }
    if num_shards == 1:
        _atomic_write_bytes(out_dir / INDEX_NAME, json.dumps(index, indent=1).encode())
    else:
        _atomic_write_bytes(out_dir / f"index{suffix}.json", json.dumps(index, indent=1).encode())
        def ours(i):  # this run's index of shard i is present (not one left by an earlier run)
            f = out_dir / f"index.shard-{i:05d}-of-{num_shards:05d}.json"
            try:
                return json.loads(f.read_text()).get("run_id") == run_id
            except (OSError, ValueError):
                return False

        if all(ours(i) for i in range(num_shards)):
            merge_shards(out_dir, num_shards, run_id=run_id)
    print(stats.summary())
    return stats


def _columns(rows: list[dict]) -> dict[str, list]:
    """Per-record field dicts -> columns ``{field: [value or None per record]}`` (the index's ``fields``)."""
    names = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in names}


def _concat_columns(a: dict, na: int, b: dict, nb: int) -> dict:
    out = {}
    for k in sorted(set(a) | set(b)):
        out[k] = list(a.get(k, [None] * na)) + list(b.get(k, [None] * nb))
    return out


def merge_shards(out_dir: str | os.PathLike, num_shards: int, *, run_id: str | None = None) -> dict[str, Any]:
    """Merge the ``num_shards`` shard indexes of ``out_dir`` into ``index.json`` (idempotent).

    Every shard index must carry ``run_id`` (default: the run id of shard 0's index): a foreign one,
    left by an earlier run, raises ValueError naming its file and both run ids.

    Bucket entries list the shards' record files in shard order; counts and skip lists are summed.
    Raises FileNotFoundError naming the missing shard indexes, ValueError when shards disagree on
    fps, max shape, text widths or latent mode.
    """
    out_dir = Path(out_dir)
    paths = [out_dir / f"index.shard-{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shard indexes missing: {', '.join(missing)} (those shards did not finish)")
    shards = [json.loads(p.read_text()) for p in paths]
    want = shards[0].get("run_id", "") if run_id is None else run_id
    for path, sh in zip(paths, shards):
        if sh.get("run_id", "") != want:
            raise ValueError(
                f"{path}: shard index of encode run {sh.get('run_id', '')!r}, not of run {want!r} "
                "(left by an earlier run? re-encode that shard with this run's --run-id)"
            )
    same = ("format_version", "fps", "max_shape", "latent_mode", "text")
    for k in same:
        if any(sh[k] != shards[0][k] for sh in shards):
            raise ValueError(f"{out_dir}: shard indexes disagree on {k!r}: {[sh[k] for sh in shards]}")
    merged = {k: shards[0][k] for k in same}
    merged["latent_channels"] = next((sh["latent_channels"] for sh in shards if sh["latent_channels"]), None)
    buckets: dict[str, dict] = {}
    for sh in shards:
        for k, e in sh["buckets"].items():
            if k not in buckets:
                buckets[k] = {**e, "files": [], "file_records": [], "num_records": 0, "fields": {}}
            n_before = buckets[k]["num_records"]
            buckets[k]["files"] += e["files"]
            buckets[k]["file_records"] += e["file_records"]
            buckets[k]["num_records"] += e["num_records"]
            buckets[k]["fields"] = _concat_columns(buckets[k].get("fields", {}), n_before, e.get("fields", {}), e["num_records"])
    merged["buckets"] = dict(sorted(buckets.items()))
    merged["shard"] = [0, 1]
    merged["run_id"] = want
    stats = EncodeStats()
    for sh in shards:
        st = sh["stats"]
        for f in ("files_seen", "files_encoded", "records"):
            setattr(stats, f, getattr(stats, f) + st[f])
        stats.seconds = max(stats.seconds, st["seconds"])
        for k, n in st["records_per_bucket"].items():
            stats.records_per_bucket[k] = stats.records_per_bucket.get(k, 0) + n
        for reason, files in st["skipped"].items():
            stats.skipped.setdefault(reason, []).extend(files)
    merged["stats"] = dataclasses.asdict(stats)
    _atomic_write_bytes(out_dir / INDEX_NAME, json.dumps(merged, indent=1).encode())
    return merged


def main(argv: Sequence[str] | None = None) -> EncodeStats:
    """CLI entry point of ``python -m contentv_jax.encode``; returns the process exit status (0 ok, 2 bad arguments)."""
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
    p.add_argument("--images-per-video", type=int, default=1,
                   help="image-only stage (--max-frames 1): frames taken per video, spread out evenly")
    p.add_argument("--latent-mode", choices=("mode", "sample"), default="mode")
    p.add_argument("--embeds-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--vae-batch-size", type=int, default=1, help="clips per VAE call (one bucket, across files)")
    p.add_argument("--text-batch-size", type=int, default=16, help="captions per text-encoder call")
    p.add_argument("--decode-workers", type=int, default=2,
                   help="threads decoding ahead of the VAE; 0: the stages one after another")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1, help="split the caption lines over this many encode jobs")
    p.add_argument("--shard-index", type=int, default=0, help="this job's shard (0-based)")
    p.add_argument("--run-id", default="", help="an id every shard of one sharded encode shares (required "
                   "with --num-shards > 1): only this run's shard indexes are merged")
    a = p.parse_args(argv)
    for name, lo in (("vae_batch_size", 1), ("text_batch_size", 1), ("decode_workers", 0)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: expected an integer >= {lo}")
    for name in ("data", "vae", "text_encoders"):
        if not Path(getattr(a, name)).exists():
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: no such file or directory")
    return encode_dataset(
        a.data, a.out, a.vae, a.text_encoders, fps=a.fps, max_frames=a.max_frames, max_height=a.max_height,
        max_width=a.max_width, max_clips_per_video=a.max_clips_per_video, images_per_video=a.images_per_video,
        max_sequence_length=a.max_sequence_length, latent_mode=a.latent_mode, embeds_dtype=a.embeds_dtype,
        vae_batch_size=a.vae_batch_size, text_batch_size=a.text_batch_size, decode_workers=a.decode_workers,
        seed=a.seed, num_shards=a.num_shards, shard_index=a.shard_index,
        run_id=a.run_id,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
