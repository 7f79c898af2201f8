"""Buckets, the synthetic dataset and the grain pipeline: shapes, determinism, host sharding, exact resume."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from contentv_jax.data import video
from contentv_jax.data.encode import encode_dataset
from contentv_jax.text import TextEncoders, build_tiny_text_encoders
from contentv_jax.data import buckets as bk
from contentv_jax.data.loader import TrainBatches
from contentv_jax.data.synthetic import COLORS, make_synthetic_dataset

from _standins import PoolingVAE  # noqa: E402


# ----------------------------------------------------------------------------------------------
# buckets

def test_stage3_buckets_match_table2():
    bs = bk.make_buckets(125, 432, 768, fps=24, video_batch_size=256, image_batch_size=2048, images=True,
                         batch_multiple=8)
    by = {b.key: b for b in bs}
    top = by["f125_h432_w768"]
    assert top.tokens == 32 * 27 * 48 == 41472 and top.batch_size == 256 and top.aspect == "16:9"
    assert {b.aspect for b in bs} == {"16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16"}
    assert sorted({b.frames for b in bs}) == [1, 25, 49, 73, 97, 121, 125]  # images, 1..5 s at 24 fps, max
    max_img = max(x.tokens for x in bs if x.is_image)
    max_vid = max(x.tokens for x in bs if not x.is_image)  # 496x672 (4:3) rounds to 41,664 tokens
    for b in bs:
        assert b.height % 16 == 0 and b.width % 16 == 0 and b.batch_size % 8 == 0
        # every aspect keeps the area of 432x768 within rounding; aspect ratio within 6 %
        assert abs(b.height * b.width / (432 * 768) - 1) < 0.1
        num, den = map(int, b.aspect.split(":"))
        assert abs(math.log(b.width / b.height) - math.log(num / den)) < 0.06
        # tokens per batch about constant: within one sample (rounded down to a multiple of 8)
        base, ref = (2048, max_img) if b.is_image else (256, max_vid)
        assert base * ref - 8 * b.tokens < b.batch_size * b.tokens <= base * ref * 1.0001
    assert by["f25_h432_w768"].batch_size == 256 * 41664 // (7 * 27 * 48) // 8 * 8


def test_tiny_buckets_and_assignment():
    bs = bk.make_buckets(9, 64, 64, fps=8, video_batch_size=4)
    assert [b.key for b in bs] == ["f9_h48_w80", "f9_h64_w64", "f9_h80_w48"]
    assert bk.assign_bucket(bs, 432, 768, 80, 10.0, 8.0).key == "f9_h48_w80"
    assert bk.assign_bucket(bs, 1080, 1080, 80, 10.0, 8.0).key == "f9_h64_w64"
    assert bk.assign_bucket(bs, 1920, 1080, 80, 10.0, 8.0).key == "f9_h80_w48"
    # 9 frames at 8 fps span 1 s: a 10 fps source needs 11 frames
    assert bk.assign_bucket(bs, 64, 64, 11, 10.0, 8.0) is not None
    assert bk.assign_bucket(bs, 64, 64, 10, 10.0, 8.0) is None
    with pytest.raises(ValueError, match="divisible by 16"):
        bk.make_buckets(9, 60, 64, fps=8)
    with pytest.raises(ValueError, match="4k\\+1"):
        bk.make_buckets(10, 64, 64, fps=8)
    assert bk.Bucket.from_key("f9_h48_w80").latent_shape() == (3, 6, 10, 16)


def test_bucket_for_step_shared_and_weighted():
    keys = ["b", "a", "c"]
    draws = [bk.bucket_for_step(7, s, keys) for s in range(3000)]
    assert draws == [bk.bucket_for_step(7, s, list(reversed(keys))) for s in range(3000)]  # order-free
    assert draws != [bk.bucket_for_step(8, s, keys) for s in range(3000)]
    c = Counter(bk.bucket_for_step(1, s, keys, {"a": 1, "b": 2, "c": 0}) for s in range(3000))
    assert c["c"] == 0 and abs(c["b"] / 3000 - 2 / 3) < 0.04  # 4 sigma of a binomial(3000, 2/3)
    c = Counter(draws)
    assert all(abs(c[k] / 3000 - 1 / 3) < 0.04 for k in keys)
    with pytest.raises(ValueError):
        bk.bucket_for_step(0, 0, [])


# ----------------------------------------------------------------------------------------------
# synthetic dataset

def test_synthetic_dataset(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_videos=4, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", num_videos=4, seed=3)
    lines = [json.loads(x) for x in (a / "captions.jsonl").read_text().splitlines()]
    assert lines == [json.loads(x) for x in (b / "captions.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == [f"video_{i:03d}.mp4" for i in range(4)]
    for line in lines:
        words = line["caption"].split()
        color, shape, direction, bg = words[1], words[2], words[4], words[-2]
        frames, fps = video.read_video(a / line["file"])
        assert fps == 8 and frames.shape[0] == 24
        # the background colour fills the corners of the first frame; the shape's colour is present
        np.testing.assert_allclose(frames[0, 1, 1], COLORS[bg], atol=12)
        dist = np.abs(frames.astype(int) - np.array(COLORS[color])).sum(-1)
        ys, xs = np.nonzero(dist[0] < 40)
        ye, xe = np.nonzero(dist[-1] < 40)
        assert len(ys) > 20 and len(ye) > 20
        move = {"left": xe.mean() < xs.mean() - 5, "right": xe.mean() > xs.mean() + 5,
                "up": ye.mean() < ys.mean() - 5, "down": ye.mean() > ys.mean() + 5}
        assert move[direction], (line, xs.mean(), xe.mean(), ys.mean(), ye.mean())


# ----------------------------------------------------------------------------------------------
# the grain pipeline

@pytest.fixture(scope="module")
def records(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipe")
    data = make_synthetic_dataset(root / "data", num_videos=8, seed=0, num_frames=24)
    text = TextEncoders.from_pretrained(build_tiny_text_encoders(root / "te"))
    encode_dataset(data, root / "records", PoolingVAE(), text, fps=8, max_frames=9, max_height=64, max_width=64,
                   max_sequence_length=8, progress=False)
    return root / "records"


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert [x["bucket"] for x in a] == [x["bucket"] for x in b]
    for x, y in zip(a, b):
        for k in ("latents", "prompt_embeds", "pooled"):
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_shapes(records):
    it = TrainBatches(records, seed=0, video_batch_size=2, process_index=0, process_count=1)
    assert {k: b.batch_size for k, b in it.buckets.items()} == {"f9_h48_w80": 2, "f9_h64_w64": 2}
    for x in _take(it, 4):
        b = bk.Bucket.from_key(x["bucket"])
        assert x["latents"].shape == (2, *b.latent_shape()) and x["latents"].dtype == np.float32
        assert x["prompt_embeds"].shape == (2, 77 + 8, 64) and x["pooled"].shape == (2, 32)
    ne, npool = it.null_text()
    assert ne.shape == (1, 85, 64) and npool.shape == (1, 32)


def test_resume_is_exact(records):
    kw = dict(seed=5, video_batch_size=3, process_index=0, process_count=1)
    straight = _take(TrainBatches(records, **kw), 20)
    first = TrainBatches(records, **kw)
    _take(first, 10)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON round trip (orbax JsonSave)
    assert state["grain"]["next_index"] == 10
    del first
    resumed = TrainBatches(records, **kw)
    resumed.set_state(state)
    _same(straight[10:], _take(resumed, 10))
    # random access agrees with iteration; another seed gives another order
    _same(straight[13:14], [resumed.batch(13)])
    other = _take(TrainBatches(records, **{**kw, "seed": 6}), 20)
    assert any(not np.array_equal(a["latents"], b["latents"]) for a, b in zip(straight, other))
    with pytest.raises(ValueError, match="seed"):
        TrainBatches(records, **{**kw, "seed": 6}).set_state(state)


def test_epochs_visit_every_record_once(records):
    it = TrainBatches(records, seed=1, video_batch_size=2, process_index=0, process_count=1)
    p = it.planner
    for key in p.available:
        n = p.num_records[key]
        steps = [s for s in range(200) if p.bucket(s) == key]
        seq = [i for s in steps for i in p.plan(s)[1]]
        assert len(seq) >= 2 * n
        assert sorted(seq[:n]) == list(range(n)) and sorted(seq[n : 2 * n]) == list(range(n))
        assert seq[:n] != seq[n : 2 * n]  # reshuffled each epoch


def test_host_sharding(records):
    """Hosts plan the single-host batch of every step and each loads only its rows: the hosts' rows
    together are exactly the single-host batch, no row is loaded twice, and the iterator state is the
    same for any host count (a checkpoint written by process 0 resumes every host)."""
    kw = dict(seed=2, video_batch_size=4, batch_multiple=2, process_count=2)
    single = TrainBatches(records, seed=2, video_batch_size=4, batch_multiple=2, process_index=0, process_count=1)
    h0 = TrainBatches(records, process_index=0, **kw)
    h1 = TrainBatches(records, process_index=1, **kw)
    # rows as a mesh may lay them out (host 1's devices hold the first half), and four hosts
    r0 = TrainBatches(records, process_index=0, host_rows=lambda b: slice(b // 2, b), **kw)
    r1 = TrainBatches(records, process_index=1, host_rows=lambda b: slice(0, b // 2), **kw)
    quads = [TrainBatches(records, seed=2, video_batch_size=4, batch_multiple=4, process_index=i, process_count=4)
             for i in range(4)]
    assert h0.rows == {k: slice(0, 2) for k in h0.planner.available}
    assert h1.rows == {k: slice(2, 4) for k in h1.planner.available}
    for s in range(12):
        one = single.batch(s)
        # every host draws the same bucket, the one bucket_for_step gives, and plans the same records
        key = single.planner.bucket(s)
        assert key == bk.bucket_for_step(2, s, list(single.planner.weights), single.planner.weights)
        assert h0.planner.plan(s) == h1.planner.plan(s) == single.planner.plan(s)
        for hosts in ((h0, h1), (r1, r0), quads):
            parts = [h.batch(s) for h in hosts]
            assert all(x["bucket"] == key and x["global_batch_size"] == 4 for x in parts)
            assert [x["latents"].shape[0] for x in parts] == [4 // len(hosts)] * len(hosts)
            for k in ("latents", "prompt_embeds", "pooled"):
                np.testing.assert_array_equal(np.concatenate([x[k] for x in parts]), one[k])
            # disjoint, covering row blocks
            rows = sorted((h.rows[key].start, h.rows[key].stop) for h in hosts)
            assert rows[0][0] == 0 and rows[-1][1] == 4 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    # the iterator state does not depend on the host layout: host 1 resumes from host 0's state
    _take(h0, 3)
    h1.set_state(json.loads(json.dumps(h0.get_state())))
    np.testing.assert_array_equal(
        np.concatenate([next(h0)["latents"], next(h1)["latents"]]), single.batch(3)["latents"]
    )
    with pytest.raises(ValueError, match="multiple of process_count"):
        TrainBatches(records, seed=0, process_index=0, process_count=2, batch_multiple=1)
    with pytest.raises(ValueError, match="host_rows"):
        TrainBatches(records, seed=0, video_batch_size=4, process_index=0, process_count=1,
                     host_rows=lambda b: slice(2, b + 1))
    with pytest.raises(ValueError, match="host_rows"):
        TrainBatches(records, seed=0, video_batch_size=4, process_index=0, process_count=1, host_rows=lambda b: [0, 1])


def test_sharded_encode_reads_as_one(records, tmp_path):
    """Two encode jobs (shards) into one directory: the merged index covers the same clips, and the
    pipeline reads the shards' files as one sequence."""
    from contentv_jax.data.encode import decode_record, read_index

    text = TextEncoders.from_pretrained(records.parent / "te")
    data = records.parent / "data"
    kw = dict(fps=8, max_frames=9, max_height=64, max_width=64, max_sequence_length=8, progress=False, num_shards=3)
    out = tmp_path / "sharded"
    with pytest.raises(ValueError, match="run_id"):
        encode_dataset(data, out, PoolingVAE(), text, shard_index=0, **kw)
    # shard 0's index left by an earlier run: never merged into this one, refused when merging explicitly
    encode_dataset(data, out, PoolingVAE(), text, shard_index=0, run_id="earlier", **kw)
    kw["run_id"] = "now"
    for i in (2, 1):
        encode_dataset(data, out, PoolingVAE(), text, shard_index=i, **kw)
    from contentv_jax.data.encode import merge_shards

    with pytest.raises(ValueError, match=r"index.shard-00000-of-00003.json: shard index of encode run 'earlier'"):
        merge_shards(out, 3, run_id="now")
    with pytest.raises(FileNotFoundError, match="index.shard-00001-of-00003.json"):
        read_index(out)  # shard 0 has not finished: no merged index yet
    encode_dataset(data, out, PoolingVAE(), text, shard_index=0, **kw)
    merged, single = read_index(out), read_index(records)
    for k, e in single["buckets"].items():
        assert merged["buckets"][k]["num_records"] == e["num_records"]
        # 8 videos of alternating sizes, round robin over 3 shards: every shard holds both buckets
        assert merged["buckets"][k]["files"] == [f"{k}.shard-0000{i}-of-00003.array_record" for i in range(3)]
    assert merged["stats"]["records"] == single["stats"]["records"]
    a = TrainBatches(records, seed=0, video_batch_size=2, process_index=0, process_count=1)
    b = TrainBatches(out, seed=0, video_batch_size=2, process_index=0, process_count=1)

    def clips(it):
        return sorted(
            (json.dumps(r["meta"], sort_keys=True), r["latents"].tobytes())
            for src in it._sources.values() for r in map(decode_record, src)
        )

    assert clips(a) == clips(b)
    x = next(b)
    assert x["latents"].shape[0] == 2
