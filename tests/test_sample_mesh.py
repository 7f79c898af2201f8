"""Acceptance 4 of issue 6: sampling on the (data, fsdp, sequence) = (1, 1, 4) simulated mesh (Ulysses
sequence parallelism) equals single-device sampling."""

import jax
import numpy as np

from contentv_jax import pipeline as pl
from contentv_jax.sharding.mesh import MeshConfig, create_mesh
from tests.sample_fixtures import build_tiny_model_dir


def test_sequence_parallel_sampling_equals_single_device(tmp_path, monkeypatch):
    from contentv_jax.sharding import ulysses

    calls = []
    real = ulysses.ulysses_joint_attention
    monkeypatch.setattr(ulysses, "ulysses_joint_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert len(jax.devices()) >= 4, "needs 4 (simulated) devices: conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    model_dir = build_tiny_model_dir(tmp_path / "tiny", text_encoders=False)
    rng = np.random.default_rng(1)
    embeds = pl.PromptEmbeds(*(rng.normal(size=s).astype(np.float32) for s in [(1, 10, 64), (1, 32), (1, 10, 64), (1, 32)]))
    opts = dict(num_frames=9, height=32, width=64, num_inference_steps=3, guidance_scale=6.0, output_type="latent")
    latents = pl.initial_noise(3, pl.latent_shape(1, 9, 32, 64))  # 3 x 2 x 4 = 24 video tokens, 6 per device
    single = pl.ContentVPipeline.from_pretrained(model_dir, load_text_encoders=False, load_vae=False)
    single.set_progress_bar_config(disable=True)
    ref = single(**embeds.as_kwargs(), latents=latents, **opts).frames
    mesh = create_mesh(MeshConfig(data=1, fsdp=1, sequence=4), devices=jax.devices()[:4])
    sharded = pl.ContentVPipeline.from_pretrained(model_dir, load_text_encoders=False, load_vae=False, mesh=mesh)
    ours = sharded(**embeds.as_kwargs(), latents=latents, **opts).frames  # with the progress bar (default)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"(1,1,4) mesh vs single device: max abs err / max abs = {err:.2e}")
    assert np.abs(ref - latents).max() > 0.5
    assert calls, "Ulysses attention never ran on the sequence mesh"
    assert err < 1e-5
