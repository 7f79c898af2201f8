"""Training and sampling conventions agree.

The trainer (``contentv_jax.train``) overfits a tiny MM-DiT (4 heads x 32; cosine LR decay) on one real clip of the shared data; sampling
that model through the pipeline with the clip's caption (without guidance and at guidance 6; the negative prompt is the empty prompt,
which is what the trainer's caption dropout taught as the unconditional branch) must land on the clip's latents
(cosine similarity >= 0.9; the initial noise alone gives ~0.06). A sign, sigma/timestep scale, CFG-order or
noise/data-endpoint mismatch between the trainer and the sampler sends the samples elsewhere.
(With the official negative prompt, never seen in training, guidance 6 extrapolates away: ~0.6.)
"""

import json

import grain
import jax
import numpy as np
import pytest
import yaml

from contentv_jax import pipeline as pl

pytestmark = pytest.mark.slow  # overfits a model, then samples


CLIP = "intel_bottle_hand_6s.mp4"


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_overfit_clip_is_sampled_back(shared_data, tmp_path):
    from contentv_jax.data.encode import decode_record, read_index
    from contentv_jax.train.config import load_train_config
    from contentv_jax.models.transformer import get_config
    from contentv_jax.train.trainer import Trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / CLIP).symlink_to(shared_data / "videos" / CLIP)
    caption = next(
        row["caption"] for row in map(json.loads, (shared_data / "videos" / "captions.jsonl").read_text().splitlines())
        if row["file"] == CLIP
    )
    (data / "captions.jsonl").write_text(json.dumps({"file": CLIP, "caption": caption}) + "\n")
    # 9 frames at 1.5 fps: the 6 s clip gives exactly one training clip
    # the tiny transformer, twice as wide (4 heads x 32): enough capacity to memorise one clip quickly
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(get_config("tiny", attention_head_dim=32, caption_projection_dim=128).to_dict()))
    cfg = load_train_config(None, [f"model.name={model_yaml}",
        f"run_dir={tmp_path / 'run'}", f"data.dir={data}", "data.fps=1.5", "steps=300", "optimizer.lr=2e-3", "optimizer.schedule=cosine", "optimizer.decay_steps=300",
        "buckets.max_height=32", "buckets.max_width=32", "buckets.batch_video=4", "model.dtype=float32",
        "checkpoint.every=100000", "checkpoint.async_save=false", "logging.tensorboard=false",
        "logging.progress_bar=false", "logging.sample_every=0", "mesh.fsdp=1",
    ])
    summary = Trainer(cfg, devices=jax.devices()[:1]).setup().run()
    assert summary["records"] == 1, summary
    losses = summary["losses"]
    print(f"overfit loss: first {np.mean(losses[:10]):.3f}, last {np.mean(losses[-10:]):.3f}")

    run = tmp_path / "run"
    index = read_index(run / "encoded")
    (entry,) = index["buckets"].values()
    files = entry["files"] if "files" in entry else [entry["file"]]  # record format 2 / 1
    (record,) = grain.sources.ArrayRecordDataSource([str(run / "encoded" / f) for f in files])
    clip_latents = decode_record(record)["latents"]  # (T, h, w, C), normalised

    # A model directory of what the run wrote: the exported transformer (our checkpoint format) and the text
    # encoders; loaded as any ContentV directory (no VAE needed for latents).
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "transformer").symlink_to(run / "transformer")
    for sub in pl.TEXT_SUBFOLDERS:
        (model_dir / sub).symlink_to(run / "assets" / "text" / sub)
    pipe = pl.ContentVPipeline.from_pretrained(model_dir, shift=3.0, dtype="float32", load_vae=False)
    t, h, w, _ = clip_latents.shape
    for g in (1.0, 6.0):  # without guidance, and at the official guidance scale
        sampled = pipe(
            prompt=caption, negative_prompt="", num_frames=4 * (t - 1) + 1, height=8 * h, width=8 * w,
            num_inference_steps=20, guidance_scale=g, num_videos_per_prompt=2, seed=0, output_type="latent",
            max_sequence_length=cfg.text.max_length,
        ).frames
        sims = [_cosine(s, clip_latents) for s in sampled]
        noise_sim = _cosine(pl.initial_noise(0, sampled.shape)[0], clip_latents)
        print(f"g={g} cosine(sampled, clip latents) = {sims}; noise alone: {noise_sim:.3f}")
        assert min(sims) >= 0.9, (g, sims)  # measured after 300 steps: 0.94 / 0.97 (g=1), 0.92 / 0.95 (g=6)
