"""Video I/O (PyAV) and the clip helpers of the encode stage.

Arrays are channels-last uint8 RGB frames ``(T, H, W, 3)`` unless said otherwise, as displayed: converted
with each frame's own colour matrix and range (BT.709 / BT.601, limited or full range, as ffmpeg converts
them), turned by the container's display rotation (as ffmpeg's autorotate) and resampled to square pixels
(width x the sample aspect ratio), so that buckets are chosen by the aspect ratio a viewer sees.

- :func:`probe_video` -> :class:`VideoInfo` (frame count, fps, size) without decoding every frame.
- :func:`read_video` -> ``(frames uint8 (T, H, W, 3), fps float)``; :func:`iter_video_frames` streams.
- :func:`write_video` writes uint8 or float ``[0, 1]`` frames to an H.264 yuv420p mp4, atomically.
- :func:`clip_frame_indices` cuts clips of ``4k + 1`` frames at a target fps (nearest-earlier source frame).
- :func:`resize_center_crop` scales a clip to cover ``(height, width)`` and crops the centre.

Unreadable, truncated or zero-byte files raise :class:`VideoReadError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from contentv_jax.atomic import atomic_file

__all__ = [
    "VideoReadError",
    "VideoInfo",
    "probe_video",
    "read_video",
    "read_frames",
    "iter_video_frames",
    "write_video",
    "clip_frame_indices",
    "resize_center_crop",
    "round_to_4k_plus_1",
]


class VideoReadError(ValueError):
    """A video file that cannot be decoded (missing, zero bytes, corrupt, truncated, no video stream)."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Container facts of a video: ``num_frames`` (decoded count when ``exact``), ``fps`` (frames per second)."""

    path: str
    num_frames: int
    fps: float
    height: int  # as displayed: after the rotation and the pixel aspect ratio
    width: int
    rotation: int = 0  # the display rotation, counter-clockwise degrees (0, 90, 180, 270)
    pixel_aspect: float = 1.0  # the sample aspect ratio of the stored frames (width / height of a pixel)

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def _open(path):
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoReadError(f"video {path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"video {path!r}: zero-byte file")
    try:
        container = av.open(path)
    except Exception as e:  # av.error.* are many classes; all mean "cannot open"
        raise VideoReadError(f"video {path!r}: cannot open ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"video {path!r}: no video stream")
    return container


def _stream_fps(stream, path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise VideoReadError(f"video {path!r}: no frame rate in the container")
    return float(rate)


def _pixel_aspect(stream) -> float:
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return float(sar) if sar and float(sar) > 0 else 1.0


def _rotation(frame) -> int:
    """The frame's display rotation (PyAV: counter-clockwise degrees from its display matrix) to 0/90/180/270."""
    return int(round(float(frame.rotation or 0) / 90.0)) % 4 * 90


def _as_displayed(frame, pixel_aspect: float) -> np.ndarray:
    """A decoded frame as uint8 ``(H, W, 3)`` RGB as displayed. PyAV's conversion uses the frame's colour matrix
    and range (checked against ffmpeg's ``-pix_fmt rgb24`` in the tests); non-square pixels are resampled to
    square ones (``width * pixel_aspect``, bicubic, in the same conversion); the display rotation is applied
    last (``np.rot90``: exact)."""
    size = {}
    if abs(pixel_aspect - 1.0) > 1e-6:
        size = dict(width=max(1, round(frame.width * pixel_aspect)), height=frame.height, interpolation="BICUBIC")
    rgb = frame.to_ndarray(format="rgb24", **size)
    k = _rotation(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield the frames of ``path`` one by one as uint8 ``(H, W, 3)`` RGB arrays as displayed (colour matrix and
    range of each frame, display rotation, square pixels; see the module docstring), in constant memory.

    Raises:
      VideoReadError: the file is missing, empty, corrupt, truncated (decode error mid-stream) or has
        no video stream. Frames decoded before a mid-stream error have already been yielded.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pixel_aspect = _pixel_aspect(stream)
        try:
            for frame in container.decode(stream):
                yield _as_displayed(frame, pixel_aspect)
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(f"video {os.fspath(path)!r}: decode failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def _first_frame_rotation(path) -> int:
    """The display rotation of the first frame (PyAV exposes the display matrix on decoded frames)."""
    container = _open(path)
    try:
        for frame in container.decode(container.streams.video[0]):
            return _rotation(frame)
        return 0
    except Exception as e:
        raise VideoReadError(f"video {os.fspath(path)!r}: decode failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def probe_video(path: str | os.PathLike, *, exact: bool = False) -> VideoInfo:
    """Frame count, fps and displayed size of ``path`` (``height`` / ``width`` after the display rotation and
    the pixel aspect ratio, which ``rotation`` / ``pixel_aspect`` give; the frames of :func:`iter_video_frames`
    have that size). The rotation is read from the first decoded frame.

    With ``exact=False`` the frame count is the container's (or duration x fps when absent). With
    ``exact=True`` every packet is demuxed (cheap: no decoding) and counted, which also detects a
    truncated file: fewer packets than the container declares.

    Raises:
      VideoReadError: as :func:`iter_video_frames`; when the container reports no frames; with
        ``exact=True``, when packets are missing (truncated file).
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        height, width = stream.codec_context.height, stream.codec_context.width
        declared = int(stream.frames or 0)
        n = declared
        if exact:
            try:
                n = sum(1 for p in container.demux(stream) if p.size)
            except Exception as e:
                raise VideoReadError(f"video {os.fspath(path)!r}: demux failed ({e})") from e
            if declared and n < declared:
                raise VideoReadError(
                    f"video {os.fspath(path)!r}: truncated (the container declares {declared} frames, "
                    f"only {n} are present)"
                )
        elif not n and stream.duration and stream.time_base:
            n = int(round(float(stream.duration * stream.time_base) * fps))
        if n <= 0 or height <= 0 or width <= 0:
            raise VideoReadError(f"video {os.fspath(path)!r}: no frames (size {width}x{height})")
        pixel_aspect = _pixel_aspect(stream)
    finally:
        container.close()
    if abs(pixel_aspect - 1.0) > 1e-6:
        width = max(1, round(width * pixel_aspect))
    rotation = _first_frame_rotation(path)
    if rotation in (90, 270):
        height, width = width, height
    return VideoInfo(os.fspath(path), int(n), fps, int(height), int(width), rotation, pixel_aspect)


def read_video(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode ``path`` to ``(frames uint8 (T, H, W, 3) RGB, fps float)``.

    ``max_frames`` stops decoding after that many frames.

    Raises:
      VideoReadError: missing, zero-byte, corrupt or truncated file (a decode error anywhere, or fewer
        frames than the container declares), no video stream, or no decodable frame.
    """
    container = _open(path)
    try:
        fps = _stream_fps(container.streams.video[0], path)
        declared = int(container.streams.video[0].frames or 0)
    finally:
        container.close()
    frames = []
    for frame in iter_video_frames(path):
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    if not frames:
        raise VideoReadError(f"video {os.fspath(path)!r}: no decodable frame")
    if max_frames is None and declared and len(frames) < declared:
        raise VideoReadError(
            f"video {os.fspath(path)!r}: truncated (the container declares {declared} frames, {len(frames)} decode)"
        )
    return np.stack(frames), fps


def read_frames(path: str | os.PathLike, indices) -> np.ndarray:
    """Decode only the frames ``indices`` (any order, repeats allowed) of ``path``, streaming.

    Returns uint8 ``(len(indices), H, W, 3)`` in the order of ``indices``; memory holds only the
    distinct requested frames.

    Raises:
      VideoReadError: as :func:`read_video`, or when an index is past the last decodable frame
        (a truncated file whose container promises more frames than it holds).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("read_frames: indices is empty")
    if indices.min() < 0:
        raise ValueError(f"read_frames: negative frame index {int(indices.min())}")
    wanted = set(indices.tolist())
    last = int(indices.max())
    kept: dict[int, np.ndarray] = {}
    n = 0
    for i, frame in enumerate(iter_video_frames(path)):
        n = i + 1
        if i in wanted:
            kept[i] = frame
        if i >= last:
            break
    if last not in kept:
        raise VideoReadError(
            f"video {os.fspath(path)!r}: frame {last} requested but only {n} frames decode (truncated?)"
        )
    return np.stack([kept[i] for i in indices.tolist()])


def _to_uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: frames must be (T, H, W, 3), got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("write_video: frames must hold at least one frame, got T=0")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        if not np.all(np.isfinite(frames)):
            raise ValueError("write_video: float frames contain NaN or inf")
        return np.clip(np.round(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"write_video: frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")


def write_video(
    path: str | os.PathLike,
    frames,
    fps: float,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Write ``frames`` (T, H, W, 3), uint8 or float in ``[0, 1]`` (clipped), to an H.264 yuv420p mp4.

    H and W must be even (yuv420p). The same frames always give the same bytes: x264's macroblock-tree
    rate control is off (``mbtree=0``), since with it libx264 read memory it had not written on small
    frames (64x64: about one write in five differed in its first frames, depending on what the process
    had allocated before). The file is written to a temporary sibling, then moved onto
    ``path`` (``contentv_jax.atomic.atomic_file``), so a reader never sees a half-written video.

    Returns the written path. Raises ValueError for a bad shape, dtype, odd size or non-positive fps.
    """
    import av

    frames = _to_uint8(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video: H.264 yuv420p needs even height and width, got {h}x{w}")
    if not fps or fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"write_video: fps must be positive, got {fps}")
    path = Path(path)
    with atomic_file(path, suffix=".mp4") as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            rate = Fraction(fps).limit_denominator(1001)
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}  # deterministic
            for img in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def round_to_4k_plus_1(num_frames: int) -> int:
    """The largest ``4k + 1 <= num_frames`` (the Wan VAE's frame counts); ValueError if ``num_frames < 1``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return (num_frames - 1) // 4 * 4 + 1


def clip_frame_indices(
    num_frames: int,
    src_fps: float,
    clip_frames: int,
    target_fps: float | None = None,
    *,
    max_clips: int | None = None,
) -> list[np.ndarray]:
    """Source frame indices of non-overlapping clips of ``clip_frames`` frames at ``target_fps``.

    Output frame ``j`` of a clip starting at source time ``t0`` shows source frame
    ``floor((t0 + j / target_fps) * src_fps)`` (nearest earlier frame; frames repeat when
    ``target_fps > src_fps``). Clips follow each other back to back from time 0; a clip that would
    need a frame past ``num_frames - 1`` is not cut. ``target_fps=None`` keeps the source rate.

    Returns a list (possibly empty: the video is shorter than one clip) of int64 arrays of length
    ``clip_frames``. Raises ValueError if ``clip_frames`` is not ``4k + 1`` or a rate is not positive.
    """
    if clip_frames < 1 or (clip_frames - 1) % 4:
        raise ValueError(f"clip_frames must be 4k+1, got {clip_frames}")
    if src_fps <= 0 or (target_fps is not None and target_fps <= 0):
        raise ValueError(f"frame rates must be positive, got src_fps={src_fps}, target_fps={target_fps}")
    target_fps = src_fps if target_fps is None else target_fps
    step = src_fps / target_fps  # source frames per output frame
    clips = []
    k = 0
    while max_clips is None or len(clips) < max_clips:
        # integer arithmetic on the output-frame grid keeps clips back to back without drift
        j = np.arange(k * clip_frames, (k + 1) * clip_frames, dtype=np.float64)
        idx = np.floor(j * step + 1e-6).astype(np.int64)
        if idx[-1] >= num_frames:
            break
        clips.append(idx)
        k += 1
    return clips


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``frames`` (T, H, W, 3) uint8 so it covers ``(height, width)``, then crop the centre.

    The scale factor is ``max(height / H, width / W)`` (aspect ratio kept); resampling is PIL's
    antialiased bicubic. Returns uint8 ``(T, height, width, 3)``.
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"resize_center_crop: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"resize_center_crop: target size must be positive, got {height}x{width}")
    _, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    rh, rw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    top, left = (rh - height) // 2, (rw - width) // 2
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for i, img in enumerate(frames):
        pil = Image.fromarray(img)
        if (rh, rw) != (h, w):
            pil = pil.resize((rw, rh), Image.BICUBIC, reducing_gap=None)
        out[i] = np.asarray(pil)[top : top + height, left : left + width]
    return out
