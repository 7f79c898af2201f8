"""Video I/O: PyAV round trips, bad files, clip cutting, resize + crop."""

import os
import subprocess
from fractions import Fraction

import av
import imageio_ffmpeg
import numpy as np
import pytest
from av.video.reformatter import ColorRange, Colorspace

from contentv_jax.data import video


def _pattern(t=9, h=32, w=48):
    """Smooth frames (H.264 keeps them close): a moving gradient."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        r = (x / w + i / t) % 1.0
        g = y / h
        b = np.full_like(r, i / max(t - 1, 1))
        frames.append(np.stack([r, g, b], -1))
    return np.stack(frames)


def test_write_read_roundtrip_float_and_uint8(tmp_path):
    frames = _pattern()
    p = video.write_video(tmp_path / "a.mp4", frames, 12.0)
    out, fps = video.read_video(p)
    assert out.dtype == np.uint8 and out.shape == (9, 32, 48, 3)
    assert fps == pytest.approx(12.0)
    err = np.abs(out.astype(np.float32) / 255 - frames).mean()
    assert err < 0.02, err
    # the container is H.264 yuv420p, readable by PyAV directly
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p" and s.frames == 9
    data = p.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # faststart: playable while streaming
    u8 = (frames * 255).round().astype(np.uint8)
    video.write_video(tmp_path / "b.mp4", u8, 24)
    info = video.probe_video(tmp_path / "b.mp4", exact=True)
    assert (info.num_frames, info.height, info.width) == (9, 32, 48) and info.fps == pytest.approx(24)
    # no temp files left behind
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]


def test_write_is_deterministic(tmp_path):
    """The same frames give the same file, whatever the process allocated before (as in the web UI's server,
    where "same seed, same video" rests on it). With x264's macroblock tree on, about one write in five of
    these 64x64 frames differed in its first frames, depending on the heap's leftovers."""
    frames = (_pattern(9, 64, 64) * 255).round().astype(np.uint8)
    first = video.write_video(tmp_path / "0.mp4", frames, 8).read_bytes()
    rng = np.random.default_rng(0)
    for i in range(1, 25):
        junk = [rng.bytes(100_000) for _ in range(20)]  # freed before the write: leftovers on the heap
        del junk
        again = video.write_video(tmp_path / f"{i}.mp4", frames, 8).read_bytes()
        assert again == first, f"write {i} of the same frames differs from write 0"


def _colourful(t=5, h=64, w=96):
    """Smooth, saturated frames: a wrong colour matrix moves them by ~30/255."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    return np.stack([np.stack([20 + 215 * xx, 20 + 215 * yy, 20 + 215 * np.abs(np.sin(3 * (xx - yy) + 0.3 * i))], -1)
                     for i in range(t)]).round().astype(np.uint8)


def write_tagged(path, frames, *, colorspace=Colorspace.ITU601, color_range=ColorRange.MPEG, rotation=None,
                 pixel_aspect=None):
    """An H.264 clip made with PyAV: RGB converted with ``colorspace`` / ``color_range`` and tagged so, with an
    optional display rotation (counter-clockwise degrees) and sample aspect ratio."""
    _, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.colorspace, s.codec_context.color_range = colorspace, color_range
        if pixel_aspect is not None:
            s.codec_context.sample_aspect_ratio = Fraction(pixel_aspect)
        if rotation is not None:
            s.set_display_rotation(rotation)
        s.options = {"crf": "8", "x264-params": "mbtree=0"}
        for img in frames:
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def ffmpeg_rgb(path, h, w, vf=None) -> np.ndarray:
    """ffmpeg's own RGB conversion of every frame (``-pix_fmt rgb24``; autorotate on, as by default), (T, h, w, 3)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(path), *(["-vf", vf] if vf else []),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.uint8).reshape(-1, h, w, 3)


@pytest.mark.parametrize("colorspace,color_range", [
    (Colorspace.ITU709, ColorRange.MPEG),  # BT.709, limited range (HD video)
    (Colorspace.ITU709, ColorRange.JPEG),  # BT.709, full range
    (Colorspace.ITU601, ColorRange.JPEG),  # BT.601, full range (pc / JPEG levels)
], ids=["bt709-tv", "bt709-pc", "bt601-pc"])
def test_colour_matrix_and_range_decode_as_ffmpeg(tmp_path, colorspace, color_range):
    frames = _colourful()
    path = write_tagged(tmp_path / "c.mp4", frames, colorspace=colorspace, color_range=color_range)
    ours, _ = video.read_video(path)
    ref = ffmpeg_rgb(path, 64, 96)
    err = int(np.abs(ours.astype(int) - ref).max())
    assert err <= 2, f"max |ours - ffmpeg| = {err}/255"
    assert np.abs(ref.astype(int) - frames).mean() < 4  # and both are the source frames (H.264 at crf 8)
    if colorspace == Colorspace.ITU709:  # the check can fail: BT.601's matrix on these frames is far off
        with av.open(str(path)) as c:
            wrong = []
            for f in c.decode(video=0):
                f.colorspace = Colorspace.ITU601
                wrong.append(f.to_ndarray(format="rgb24"))
        assert np.abs(np.stack(wrong).astype(int) - ref).max() > 20


@pytest.mark.parametrize("rotation,k", [(90, 1), (-90, 3), (180, 2)])
def test_rotation_is_applied_as_ffmpeg_autorotates(tmp_path, rotation, k):
    frames = _colourful()  # stored 96 wide, 64 high
    path = write_tagged(tmp_path / "r.mp4", frames, rotation=rotation)
    info = video.probe_video(path, exact=True)
    shape = (96, 64) if k % 2 else (64, 96)
    assert (info.height, info.width, info.rotation, info.pixel_aspect) == (*shape, rotation % 360, 1.0)
    ours, _ = video.read_video(path)
    ref = ffmpeg_rgb(path, *shape)
    assert ours.shape == (5, *shape, 3) and int(np.abs(ours.astype(int) - ref).max()) <= 2
    # the literal turn: PyAV's stored frames rotated counter-clockwise k quarter turns
    with av.open(str(path)) as c:
        stored = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(ours, np.rot90(stored, k, axes=(1, 2)))
    np.testing.assert_array_equal(video.read_frames(path, [3, 0]), ours[[3, 0]])


def test_non_square_pixels_are_resampled_to_the_displayed_size(tmp_path):
    frames = _colourful(h=64, w=64)  # stored 64 x 64 with 2:1 pixels: displayed 128 wide
    path = write_tagged(tmp_path / "s.mp4", frames, pixel_aspect=2)
    info = video.probe_video(path)
    assert (info.height, info.width, info.pixel_aspect) == (64, 128, 2.0)
    ours, _ = video.read_video(path)
    ref = ffmpeg_rgb(path, 64, 128, vf="scale=iw*sar:ih:flags=bicubic")
    assert ours.shape == (5, 64, 128, 3)
    # ffmpeg scales the YUV planes, PyAV scales within its RGB conversion: measured mean 1.5, max 7 (of 255)
    assert np.abs(ours.astype(int) - ref).mean() < 2.0 and np.abs(ours.astype(int) - ref).max() <= 8


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        video.write_video(tmp_path / "x.mp4", np.zeros((2, 31, 32, 3), np.uint8), 8)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        video.write_video(tmp_path / "x.mp4", np.zeros((2, 32, 32), np.uint8), 8)
    with pytest.raises(ValueError, match="fps"):
        video.write_video(tmp_path / "x.mp4", np.zeros((2, 32, 32, 3), np.uint8), 0)
    assert not os.listdir(tmp_path)


def test_bad_files_raise_naming_the_file(tmp_path, shared_data):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    src = (shared_data / "videos" / "intel_bottle_hand_6s.mp4").read_bytes()
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes(src[: len(src) // 3])
    for p, what in [(empty, "zero-byte"), (junk, "cannot open"), (tmp_path / "missing.mp4", "no such file")]:
        with pytest.raises(video.VideoReadError, match=what) as e:
            video.read_video(p)
        assert str(p) in str(e.value)
    # a truncated mp4 (moov box first, as in the shared clips: the head still decodes) is an error,
    # from the demuxer's packet count and from a full decode alike
    for frac in (0.3, 0.95):
        trunc.write_bytes(src[: int(len(src) * frac)])
        with pytest.raises(video.VideoReadError, match="truncated") as e:
            video.probe_video(trunc, exact=True)
        assert str(trunc) in str(e.value)
        with pytest.raises(video.VideoReadError, match="truncated"):
            video.read_video(trunc)
    # the intact file passes both checks
    assert video.probe_video(shared_data / "videos" / "intel_bottle_hand_6s.mp4", exact=True).num_frames == 179


def test_read_real_clip_and_read_frames(shared_data):
    p = shared_data / "videos" / "intel_person_walking_8s.mp4"
    info = video.probe_video(p)
    assert (info.num_frames, info.fps, info.height, info.width) == (80, 10.0, 432, 768)
    frames, fps = video.read_video(p, max_frames=12)
    assert frames.shape == (12, 432, 768, 3) and fps == 10.0
    sub = video.read_frames(p, [11, 0, 3, 3])
    np.testing.assert_array_equal(sub, frames[[11, 0, 3, 3]])
    with pytest.raises(video.VideoReadError, match="frame 500"):
        video.read_frames(p, [500])


def test_clip_frame_indices():
    # 30 fps source, 10 fps target: every third frame; 9-frame clips back to back
    clips = video.clip_frame_indices(100, 30.0, 9, 10.0)
    assert len(clips) == 3  # clip k needs frame 3*(9k+8) <= 99  -> k <= 2
    np.testing.assert_array_equal(clips[0], np.arange(0, 27, 3))
    np.testing.assert_array_equal(clips[1], np.arange(27, 54, 3))
    # same rate: stride 1
    clips = video.clip_frame_indices(20, 24.0, 5)
    assert [c.tolist() for c in clips] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    # 29.97 -> 24: indices increase, never skip more than 2, never repeat
    clips = video.clip_frame_indices(300, 30000 / 1001, 25, 24.0)
    d = np.diff(np.concatenate(clips))
    assert d.min() >= 1 and d.max() <= 2
    # upsampling repeats frames; too short gives no clip
    assert video.clip_frame_indices(5, 10.0, 9, 20.0)[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert video.clip_frame_indices(8, 10.0, 9) == []
    assert len(video.clip_frame_indices(1000, 10.0, 9, max_clips=2)) == 2
    with pytest.raises(ValueError, match="4k\\+1"):
        video.clip_frame_indices(100, 10.0, 8)
    assert video.round_to_4k_plus_1(125) == 125 and video.round_to_4k_plus_1(124) == 121


def test_resize_center_crop():
    # a 2:1 frame with a left half 0 and right half 255, cropped to a square: centre keeps both halves
    f = np.zeros((1, 40, 80, 3), np.uint8)
    f[:, :, 40:] = 255
    out = video.resize_center_crop(f, 20, 20)
    assert out.shape == (1, 20, 20, 3) and out.dtype == np.uint8
    assert out[0, :, :8].max() == 0 and out[0, :, 12:].min() == 255
    # portrait target from landscape: scale by height, crop width
    g = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(1, 4, 6, 3)
    np.testing.assert_array_equal(video.resize_center_crop(g, 4, 2), g[:, :, 2:4])
