"""The encode stage on real clips: records equal an independent recomputation; bad files are skipped and named."""

import ast
import concurrent.futures
import io
import json
import logging
import shutil

import av
import numpy as np
import pytest
import safetensors.numpy
import torch
from PIL import Image

from contentv_jax.data import encode as enc
from contentv_jax.data import video
from contentv_jax.text import TextEncoders, build_tiny_text_encoders
from contentv_jax.data.buckets import Bucket

from _standins import PoolingVAE  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

SHAPE = dict(fps=8.0, max_frames=9, max_height=64, max_width=64)


def _pyav_frames(path) -> np.ndarray:
    """Every frame of the first video stream, decoded by PyAV to uint8 RGB (T, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _pil_resize_crop(frames: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """PIL: each frame resized to ``size`` (width, height), bicubic, then cropped to ``box`` (left, top, right, bottom)."""
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC).crop(box)) for f in frames])


@pytest.mark.parametrize("shape,target,size,box", [
    ((2, 30, 50), (16, 24), (27, 16), (1, 0, 25, 16)),  # wide: scale 16/30, width 26.7 -> 27, crop 1 px left
    ((2, 50, 30), (24, 16), (16, 27), (0, 1, 16, 25)),  # tall: scale 16/30, height 27, crop 1 px top
    ((1, 10, 7), (32, 48), (48, 69), (0, 18, 48, 50)),  # upscale: scale 48/7, height 68.6 -> 69, crop 18 px top
    ((1, 432, 768), (48, 80), (85, 48), (2, 0, 82, 48)),  # the real clips' 16:9 to the 48x80 bucket
])
def test_resize_center_crop_matches_pil(shape, target, size, box):
    frames = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = video.resize_center_crop(frames, *target)
    assert got.shape == (shape[0], *target, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _pil_resize_crop(frames, size, box))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    torch.set_num_threads(1)  # tiny encoders: threads only contend on a shared 2-core machine
    d = build_tiny_text_encoders(tmp_path_factory.mktemp("te") / "tiny", clip_dims=(16, 16), t5_dim=64)
    return TextEncoders.from_pretrained(d)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, shared_data, text):
    """A data dir with 2 real clips, an image, and every kind of bad input; encoded once."""
    src = shared_data / "videos"
    data = tmp_path_factory.mktemp("data")
    captions = {json.loads(line)["file"]: json.loads(line)["caption"] for line in (src / "captions.jsonl").open()}
    real = ["intel_person_walking_8s.mp4", "intel_cars_parking_lot_8s.mp4"]
    for f in real:
        shutil.copy(src / f, data / f)
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (data / "empty.mp4").write_bytes(b"")
    whole = (src / "intel_bottle_hand_6s.mp4").read_bytes()
    (data / "truncated.mp4").write_bytes(whole[: len(whole) * 9 // 10])  # the head decodes; the tail is gone
    video.write_video(data / "short.mp4", np.zeros((5, 32, 32, 3), np.uint8), 8)  # 5 frames < one 9-frame clip
    video.write_video(data / "uncaptioned.mp4", np.zeros((9, 32, 32, 3), np.uint8), 8)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(data / "square.png")
    lines = [{"file": f, "caption": captions[f]} for f in real] + [
        {"file": "corrupt.mp4", "caption": "corrupt"},
        {"file": "empty.mp4", "caption": "empty"},
        {"file": "truncated.mp4", "caption": "truncated"},
        {"file": "short.mp4", "caption": "too short"},
        {"file": "gone.mp4", "caption": "missing file"},
        {"file": "square.png", "caption": "random noise image"},
    ]
    with open(data / "captions.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.write("{not json\n")
    out = tmp_path_factory.mktemp("records")
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("contentv_jax.data.encode").addHandler(handler)
    try:
        stats = enc.encode_dataset(data, out, PoolingVAE(), text, max_sequence_length=16, progress=False, **SHAPE)
    finally:
        logging.getLogger("contentv_jax.data.encode").removeHandler(handler)
    stats.warnings = warnings
    return data, out, stats, captions


def test_bad_inputs_skipped_and_named(encoded, capsys):
    _, out, stats, _ = encoded
    assert stats.skipped["unreadable"] == ["corrupt.mp4", "empty.mp4", "truncated.mp4"]
    assert stats.skipped["too_short"] == ["short.mp4"]
    assert stats.skipped["no_caption"] == ["uncaptioned.mp4"]
    assert stats.skipped["missing_file"] == ["gone.mp4"]
    assert stats.skipped["bad_caption_line"] == ["captions.jsonl:9"]
    assert stats.num_skipped == 7 and stats.files_encoded == 3 and stats.files_seen == 8
    summary = stats.summary()
    assert len(stats.warnings) == 7  # one warning per skipped input, naming it
    for files in stats.skipped.values():
        for name in files:
            assert sum(name in w for w in stats.warnings) == 1, (name, stats.warnings)
    for name in ("corrupt.mp4", "empty.mp4", "truncated.mp4", "short.mp4", "uncaptioned.mp4", "gone.mp4"):
        assert name in summary
    # nothing half-written left in the output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "null_text.npz", "f1_h64_w64.array_record", "f9_h48_w80.array_record"]
    )


def test_records_match_independent_recomputation(encoded, text):
    data, out, stats, captions = encoded
    index = enc.read_index(out)
    # expected clips: 8 fps clips of 9 frames, back to back: 80 frames at 10 fps and 100 at 12.5 fps (PyAV's count)
    # both give 7 clips (the last needs output frame 62: source frame 77 and 96)
    expected = {"intel_person_walking_8s.mp4": 7, "intel_cars_parking_lot_8s.mp4": 7}
    assert [len(_pyav_frames(data / f)) for f in expected] == [80, 100]
    n_video = 14
    assert index["buckets"]["f9_h48_w80"]["num_records"] == n_video == stats.records_per_bucket["f9_h48_w80"]
    assert index["buckets"]["f1_h64_w64"]["num_records"] == 1
    assert index["buckets"]["f9_h48_w80"]["latent_shape"] == [3, 6, 10, 16]
    assert index["text"] == {"max_sequence_length": 16, "context_dim": 64, "context_tokens": 93, "pooled_dim": 32}

    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(out / "f9_h48_w80.array_record"))
    recs = [enc.decode_record(b) for b in reader.read_all()]
    reader.close()
    assert [(r["meta"]["file"], r["meta"]["clip"]) for r in recs] == [
        (f, i) for f in expected for i in range(expected[f])
    ]
    vae = PoolingVAE()
    # literal references: frame floor(j * src_fps / 8) for output frames j of clip k (j = 9k .. 9k + 8), decoded by
    # PyAV; 768x432 scaled by 48/432 to 85x48 (PIL bicubic), crop box (left 2, top 0, right 82, bottom 48)
    literal = {
        (0, "intel_person_walking_8s.mp4", 0): [0, 1, 2, 3, 5, 6, 7, 8, 10],  # 10 fps
        (5, "intel_person_walking_8s.mp4", 5): [56, 57, 58, 60, 61, 62, 63, 65, 66],
        (-1, "intel_cars_parking_lot_8s.mp4", 6): [84, 85, 87, 89, 90, 92, 93, 95, 96],  # 12.5 fps
    }
    for (i, f, clip), idx in literal.items():
        r = recs[i]
        assert (r["meta"]["file"], r["meta"]["clip"], r["meta"]["frame_indices"]) == (f, clip, idx)
        x = _pil_resize_crop(_pyav_frames(data / f)[idx], (85, 48), (2, 0, 82, 48)).astype(np.float32) / 127.5 - 1
        ref = np.asarray(vae.normalize(vae.encode(x[None]).mode()))[0]
        assert r["latents"].shape == (3, 6, 10, 16) and r["latents"].dtype == np.float32
        np.testing.assert_allclose(r["latents"], ref, rtol=1e-5, atol=1e-5)
        e, p = text.encode([captions[f]], max_sequence_length=16)
        np.testing.assert_allclose(r["prompt_embeds"], e[0], atol=1e-6)
        np.testing.assert_allclose(r["pooled"], p[0], atol=1e-6)
    # the null text is the empty prompt's encoding (caption dropout)
    ne, npool = enc.load_null_text(out)
    e, p = text.encode([""], max_sequence_length=16)
    np.testing.assert_allclose(ne, e, atol=1e-6)
    np.testing.assert_allclose(npool, p, atol=1e-6)


def test_buckets_follow_the_displayed_aspect_ratio(tmp_path, text):
    """A landscape clip turned 90 degrees by its display matrix goes to the portrait bucket, a square clip of
    2:1 pixels to the landscape one (by stored size they would go to the landscape and the square buckets),
    and the rotated clip's record is the encoding of ffmpeg's autorotated frames."""
    from test_video import _colourful, ffmpeg_rgb, write_tagged

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_tagged(data / "rotated.mp4", _colourful(t=9, h=64, w=96), rotation=90)  # displayed 64 wide, 96 high
    write_tagged(data / "wide_pixels.mp4", _colourful(t=9, h=64, w=64), pixel_aspect=2)  # displayed 128 x 64
    (data / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": f}) + "\n"
                                                 for f in ("rotated.mp4", "wide_pixels.mp4")))
    stats = enc.encode_dataset(data, out, PoolingVAE(), text, max_sequence_length=16, progress=False, **SHAPE)
    assert stats.records == 2 and stats.num_skipped == 0
    from array_record.python.array_record_module import ArrayRecordReader

    where = {}
    for key in enc.read_index(out)["buckets"]:
        reader = ArrayRecordReader(str(out / f"{key}.array_record"))
        for rec in map(enc.decode_record, reader.read_all()):
            where[rec["meta"]["file"]] = (key, rec)
        reader.close()
    assert {f: k for f, (k, _) in where.items()} == {"rotated.mp4": "f9_h80_w48", "wide_pixels.mp4": "f9_h48_w80"}
    # ffmpeg's autorotated frames (96 high, 64 wide), scaled by 80/96 to 53x80 (PIL bicubic), centre crop 48 wide
    _, rec = where["rotated.mp4"]
    ref_frames = ffmpeg_rgb(data / "rotated.mp4", 96, 64)[rec["meta"]["frame_indices"]]
    x = _pil_resize_crop(ref_frames, (53, 80), (2, 0, 50, 80)).astype(np.float32) / 127.5 - 1
    vae = PoolingVAE()
    ref = np.asarray(vae.normalize(vae.encode(x[None]).mode()))[0]
    assert rec["latents"].shape == ref.shape == (3, 10, 6, 16)
    np.testing.assert_allclose(rec["latents"], ref, rtol=1e-5, atol=1e-5)  # measured: equal


def test_image_record_is_t1(encoded):
    data, out, _, _ = encoded
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(out / "f1_h64_w64.array_record"))
    (rec,) = [enc.decode_record(b) for b in reader.read_all()]
    reader.close()
    assert rec["meta"]["file"] == "square.png" and rec["latents"].shape == (1, 8, 8, 16)
    img = np.asarray(Image.open(data / "square.png").convert("RGB"))[None]
    x = _pil_resize_crop(img, (64, 64), (0, 0, 64, 64)).astype(np.float32) / 127.5 - 1  # 60x60 scaled by 64/60
    vae = PoolingVAE()
    np.testing.assert_allclose(rec["latents"], np.asarray(vae.normalize(vae.encode(x[None]).mode()))[0], atol=1e-5)
    assert Bucket.from_key("f1_h64_w64").is_image


def test_cli(tmp_path, shared_data, text, monkeypatch):
    """The CLI parses its flags into encode_dataset (the VAE path is resolved by load_vae: stubbed here)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shared_data / "videos" / "intel_person_walking_8s.mp4", data)
    (data / "captions.jsonl").write_text(json.dumps({"file": "intel_person_walking_8s.mp4", "caption": "walk"}) + "\n")
    (tmp_path / "vae").mkdir()
    monkeypatch.setattr(enc, "_resolve_vae", lambda v: PoolingVAE())
    monkeypatch.setattr(enc, "_resolve_text", lambda t: text)
    stats = enc.main([
        "--data", str(data), "--out", str(tmp_path / "out"), "--vae", str(tmp_path / "vae"),
        "--text-encoders", str(tmp_path / "vae"), "--fps", "8", "--max-frames", "9", "--max-height", "64",
        "--max-width", "64", "--max-clips-per-video", "2", "--max-sequence-length", "8", "--embeds-dtype", "float16",
    ])
    assert stats.records == 2 and stats.num_skipped == 0
    index = enc.read_index(tmp_path / "out")
    assert index["buckets"]["f9_h48_w80"]["num_records"] == 2 and index["text"]["context_tokens"] == 85
    # --embeds-dtype float16 took effect: the stored text embeddings are float16 (the latents stay float32)
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(tmp_path / "out" / "f9_h48_w80.array_record"))
    raw = reader.read_all()[0]
    reader.close()
    stored = safetensors.numpy.load(raw)  # the stored arrays, not decode_record's float32 view
    assert stored["prompt_embeds"].dtype == stored["pooled"].dtype == np.float16
    assert stored["latents"].dtype == np.float32
    e, p = text.encode(["walk"], max_sequence_length=8)
    np.testing.assert_array_equal(stored["prompt_embeds"], e[0].astype(np.float16))
    np.testing.assert_array_equal(stored["pooled"], p[0].astype(np.float16))
    with pytest.raises(SystemExit):
        enc.main(["--data", str(tmp_path / "nope"), "--out", "x", "--vae", "v", "--text-encoders", "t"])
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        enc.encode_dataset(tmp_path / "vae", tmp_path / "o2", PoolingVAE(), text, progress=False)


def test_image_stage_batching_and_reencode(tmp_path, text):
    """max_frames=1 (VAE adaptation): a bounded number of evenly spread video frames become T=1 records
    (default 1 per video, not one per frame at fps); vae_batch_size does not change records;
    re-encoding a directory replaces it."""
    from contentv_jax.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_videos=2, num_frames=24, fps=8, sizes=((64, 64),))
    kw = dict(max_height=64, max_width=64, max_sequence_length=8, progress=False)
    s0 = enc.encode_dataset(data, tmp_path / "img1", PoolingVAE(), text, fps=8, max_frames=1, **kw)
    assert s0.records_per_bucket == {"f1_h64_w64": 2} and s0.num_skipped == 0  # default: 1 per video (not 24)
    s1 = enc.encode_dataset(data, tmp_path / "img", PoolingVAE(), text, fps=2, max_frames=1, images_per_video=3, **kw)
    assert s1.records_per_bucket == {"f1_h64_w64": 6} and s1.num_skipped == 0
    from array_record.python.array_record_module import ArrayRecordReader

    def read(d, key):
        r = ArrayRecordReader(str(d / f"{key}.array_record"))
        out = [enc.decode_record(b) for b in r.read_all()]
        r.close()
        return out

    recs = read(tmp_path / "img", "f1_h64_w64")
    assert [r["meta"]["frame_indices"] for r in recs[:3]] == [[4], [12], [20]]  # middles of 3 equal thirds of 24
    assert [r["meta"]["frame_indices"] for r in read(tmp_path / "img1", "f1_h64_w64")] == [[12], [12]]
    frames = _pyav_frames(data / "video_000.mp4")
    vae = PoolingVAE()
    x = frames[[12]].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(recs[1]["latents"], np.asarray(vae.normalize(vae.encode(x[None]).mode()))[0], atol=1e-5)

    a = enc.encode_dataset(data, tmp_path / "v", PoolingVAE(), text, fps=8, max_frames=9, vae_batch_size=1, **kw)
    b = enc.encode_dataset(data, tmp_path / "v2", PoolingVAE(), text, fps=8, max_frames=9, vae_batch_size=2, **kw)
    assert a.records == b.records == 4
    for ra, rb in zip(read(tmp_path / "v", "f9_h64_w64"), read(tmp_path / "v2", "f9_h64_w64")):
        np.testing.assert_allclose(ra["latents"], rb["latents"], atol=1e-6)
        assert ra["meta"] == rb["meta"]
    # re-encode into an existing directory with another shape: the index describes the new records only
    enc.encode_dataset(data, tmp_path / "v", PoolingVAE(), text, fps=8, max_frames=1, max_clips_per_video=1, **kw)
    index = enc.read_index(tmp_path / "v")
    assert list(index["buckets"]) == ["f1_h64_w64"] and index["max_shape"] == [1, 64, 64]


@pytest.mark.slow
def test_wan_vae_records_match_diffusers(tmp_path, shared_data, text):
    """Our Wan VAE through load_vae (a diffusers-format directory): the records' latents equal diffusers'
    AutoencoderKLWan ``encode(x).latent_dist.mode()``, normalised with the config's mean/std."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    ref.save_pretrained(tmp_path / "vae")
    data = tmp_path / "data"
    data.mkdir()
    f = "intel_person_walking_8s.mp4"
    shutil.copy(shared_data / "videos" / f, data / f)
    (data / "captions.jsonl").write_text(json.dumps({"file": f, "caption": "a walk"}) + "\n")
    stats = enc.encode_dataset(data, tmp_path / "out", str(tmp_path / "vae"), text, max_clips_per_video=1,
                               max_sequence_length=8, progress=False, **SHAPE)
    assert stats.records == 1
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(tmp_path / "out" / "f9_h48_w80.array_record"))
    (rec,) = [enc.decode_record(b) for b in reader.read_all()]
    reader.close()
    assert rec["meta"]["frame_indices"] == [0, 1, 2, 3, 5, 6, 7, 8, 10]  # 10 fps sampled at 8 fps
    x = _pil_resize_crop(_pyav_frames(data / f)[[0, 1, 2, 3, 5, 6, 7, 8, 10]], (85, 48), (2, 0, 82, 48))
    x = x.astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        z = ref.encode(torch.from_numpy(x).permute(3, 0, 1, 2)[None]).latent_dist.mode()
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    want = ((z - mean) / std)[0].permute(1, 2, 3, 0).numpy()
    assert rec["latents"].shape == want.shape == (3, 6, 10, 16)
    np.testing.assert_allclose(rec["latents"], want, rtol=0, atol=1e-5 * np.abs(want).max())


def _records(d):
    from array_record.python.array_record_module import ArrayRecordReader

    out = {}
    for f in sorted(d.glob("*.array_record")):
        r = ArrayRecordReader(str(f))
        out[f.name] = [enc.decode_record(b) for b in r.read_all()]
        r.close()
    return out


def test_overlapped_encode_writes_the_serial_records(tmp_path, text):
    """decode_workers=2 (grain threads decode ahead, text and writes on their own threads), VAE batches
    and text batches across files: byte-for-byte the records of the serial encode (decode_workers=0,
    one clip per VAE call, one file's captions per text call), in the same order. With
    latent_mode="sample" a clip's noise comes from its own key whatever its batch: the latents of a
    batched encode equal mean + std * N(0, 1) drawn from fold_in(fold_in(key(seed), crc32(file)), clip)."""
    import re
    import zlib

    import jax

    from contentv_jax.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_videos=5, num_frames=30, fps=8,
                                  sizes=((64, 64), (48, 80)))
    kw = dict(fps=8, max_frames=9, max_height=64, max_width=80, max_sequence_length=8, progress=False)
    serial = enc.encode_dataset(data, tmp_path / "s", PoolingVAE(), text, decode_workers=0, vae_batch_size=1,
                                text_batch_size=1, **kw)
    over = enc.encode_dataset(data, tmp_path / "o", PoolingVAE(), text, decode_workers=2, prefetch=2,
                              vae_batch_size=2, text_batch_size=3, **kw)
    assert serial.records == over.records == 15 and len(serial.records_per_bucket) == 2
    assert serial.records_per_bucket == over.records_per_bucket
    assert all(over.stage_seconds[k] > 0 for k in enc.STAGES), over.stage_seconds
    a, b = _records(tmp_path / "s"), _records(tmp_path / "o")
    assert list(a) == list(b)
    for name in a:
        assert [r["meta"] for r in a[name]] == [r["meta"] for r in b[name]]
        for ra, rb in zip(a[name], b[name]):
            for k in ("latents", "prompt_embeds", "pooled"):
                np.testing.assert_allclose(rb[k], ra[k], rtol=0, atol=1e-6)

    sampled = enc.encode_dataset(data, tmp_path / "r", PoolingVAE(), text, decode_workers=2, vae_batch_size=3,
                                 latent_mode="sample", seed=7, **kw)
    assert sampled.records == 15
    vae = PoolingVAE()
    for name, recs in _records(tmp_path / "r").items():
        for r in recs:
            m = r["meta"]
            frames = _pyav_frames(data / m["file"])[m["frame_indices"]]
            h, w = (int(v) for v in re.fullmatch(r"f9_h(\d+)_w(\d+)\.array_record", name).groups())
            x = video.resize_center_crop(frames, h, w).astype(np.float32) / 127.5 - 1
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), zlib.crc32(m["file"].encode())), m["clip"])
            want = np.asarray(vae.normalize(vae.encode(x[None]).sample(key)))[0]
            np.testing.assert_allclose(r["latents"], want, rtol=0, atol=1e-5)
            assert not np.allclose(r["latents"], np.asarray(vae.normalize(vae.encode(x[None]).mode()))[0], atol=1e-3)


def test_decode_runs_ahead_of_the_vae(tmp_path, text, monkeypatch):
    """Overlap, shown by events rather than timing: while the VAE encodes the first file's clip, the
    decode of a later file has started (overlapped), and has not (serial)."""
    import threading

    from contentv_jax.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_videos=3, num_frames=10, fps=8, sizes=((64, 64),))
    started = []
    later_started = threading.Event()
    iter_clips = enc._iter_clips

    def traced_iter_clips(path, *a):
        started.append(path.name)
        if len(started) >= 2:
            later_started.set()
        return iter_clips(path, *a)

    class WaitingVAE(PoolingVAE):
        def __init__(self, wait):
            super().__init__()
            self.wait, self.seen = wait, []

        def encode(self, x):
            if not self.seen:  # first VAE call: is another file being decoded meanwhile?
                self.seen.append(later_started.wait(timeout=300) if self.wait else later_started.is_set())
            return super().encode(x)

    monkeypatch.setattr(enc, "_iter_clips", traced_iter_clips)
    kw = dict(fps=8, max_frames=9, max_height=64, max_width=64, max_sequence_length=8, progress=False)
    vae = WaitingVAE(wait=True)
    assert enc.encode_dataset(data, tmp_path / "o", vae, text, decode_workers=2, **kw).records == 3
    assert vae.seen == [True]
    started.clear()
    later_started.clear()
    vae = WaitingVAE(wait=False)
    assert enc.encode_dataset(data, tmp_path / "s", vae, text, decode_workers=0, **kw).records == 3
    assert vae.seen == [False]


@pytest.mark.parametrize("flag,value", [("--decode-workers", "-1"), ("--text-batch-size", "0"), ("--vae-batch-size", "0")])
def test_cli_rejects_bad_stage_options(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        enc.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--vae", "v", "--text-encoders", "t", flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_records_decode_in_threads_without_pythons_parser(monkeypatch):
    """grain's read threads decode records concurrently; CPython 3.11's parser is not thread-safe (two
    threads in ``ast.literal_eval`` at once, as ``np.load`` does for each ``.npz`` header, can raise
    ``SystemError: AST constructor recursion depth mismatch``). A record therefore never goes through
    Python's parser, and round-trips exactly, float16 embeddings and unicode metadata included."""
    rng = np.random.default_rng(0)
    recs = [(rng.standard_normal((2, 4, 4, 16)).astype(np.float32),
             rng.standard_normal((3, 9, 8)).astype(np.float16), rng.standard_normal((3, 6)).astype(np.float16),
             {"file": f"clip{i}.mp4", "captions": ["a cat \u00e9t\u00e9", "x"], "fields": {"aesthetic": 5.5 + i}})
            for i in range(16)]
    raw = [enc.encode_record(*r) for r in recs]

    def no_parser(*a, **k):
        raise AssertionError("decode_record ran Python's parser")

    monkeypatch.setattr(ast, "parse", no_parser)
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3))
    with pytest.raises(AssertionError, match="parser"):  # the patch is live: np.load's header read trips it
        np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)["a"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        out = list(pool.map(enc.decode_record, raw * 4))
    for (z, e, p, meta), got in zip(recs * 4, out):
        np.testing.assert_array_equal(got["latents"], z)
        np.testing.assert_array_equal(got["prompt_embeds"], e.astype(np.float32))
        np.testing.assert_array_equal(got["pooled"], p.astype(np.float32))
        assert got["prompt_embeds"].dtype == np.float32 and got["meta"] == meta
    with pytest.raises(ValueError, match="meta"):
        enc.decode_record(safetensors.numpy.save({"latents": recs[0][0]}))

