"""Video I/O: PyAV round trips, bad files, clip cutting, resize + crop."""

import os

import av
import numpy as np
import pytest

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
