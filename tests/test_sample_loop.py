"""The sampler against diffusers: sigmas, the compiled Euler/CFG loop (toy velocity model), input checks."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from flax import nnx

from contentv_jax import pipeline as pl
from contentv_jax.scheduler import sampling_sigmas, scheduler_shift
from tests.official_sampling import official_denoise


@pytest.mark.parametrize("steps,shift", [(50, 17.0), (4, 3.0), (7, 1.0)])
def test_sigmas_match_diffusers_as_the_official_pipeline_drives_it(steps, shift):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device="cpu")
    ours = sampling_sigmas(steps, shift)
    np.testing.assert_array_equal(ours, sch.sigmas.numpy())
    # the timestep the transformer sees: sigma * 1000 in float32
    np.testing.assert_array_equal(ours[:-1] * np.float32(1000), sch.timesteps.numpy())


def test_scheduler_shift_from_config(tmp_path):
    cfg = tmp_path / "scheduler_config.json"
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_config(tmp_path)
    assert scheduler_shift(cfg) == 5.0
    assert scheduler_shift(tmp_path / "absent.json") == 17.0
    cfg.write_text(json.dumps({"shift": 3.0, "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        scheduler_shift(cfg)


# A toy velocity model with the MM-DiT's signature, in JAX (channels-last) and torch (B, C, T, H, W).
C, DCTX, DPOOL = 4, 6, 5


class ToyJax(nnx.Module):
    def __init__(self, w, a, u, p):
        self.w, self.a, self.u, self.p = (nnx.Param(jnp.asarray(x)) for x in (w, a, u, p))

    def __call__(self, latents, timestep, context, pooled):
        cond = context.mean(1) @ self.u[...] + pooled @ self.p[...]  # (B, C)
        h = latents @ self.w[...] + (timestep / 1000)[:, None, None, None, None] * self.a[...]
        return jnp.tanh(h + cond[:, None, None, None, :])


class ToyTorch(torch.nn.Module):
    def __init__(self, w, a, u, p):
        super().__init__()
        self.w, self.a, self.u, self.p = (torch.tensor(x) for x in (w, a, u, p))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        x = hidden_states.permute(0, 2, 3, 4, 1)
        cond = encoder_hidden_states.mean(1) @ self.u + pooled_projections @ self.p
        h = x @ self.w + (timestep / 1000)[:, None, None, None, None] * self.a
        return (torch.tanh(h + cond[:, None, None, None, :]).permute(0, 4, 1, 2, 3),)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s).astype(np.float32) for s in [(C, C), (C,), (DCTX, C), (DPOOL, C)]]
    b = 2
    embeds = pl.PromptEmbeds(
        *(rng.normal(size=s).astype(np.float32) for s in [(b, 7, DCTX), (b, DPOOL), (b, 7, DCTX), (b, DPOOL)])
    )
    noise = rng.normal(size=(b, 3, 4, 6, C)).astype(np.float32)
    return ToyJax(*params), ToyTorch(*params), embeds, noise


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_euler_cfg_loop_matches_official_logic(toy, guidance_scale):
    jmodel, tmodel, e, noise = toy
    steps, shift = 4, 17.0
    ours = pl.denoise(jmodel, noise, e, sampling_sigmas(steps, shift), guidance_scale, progress=True)
    ref = official_denoise(
        tmodel, FlowMatchEulerDiscreteScheduler(shift=shift), torch.tensor(noise).permute(0, 4, 1, 2, 3),
        *(torch.tensor(a) for a in (e.prompt_embeds, e.pooled_prompt_embeds, e.negative_prompt_embeds,
                                     e.negative_pooled_prompt_embeds)), steps, guidance_scale,
    ).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(ref - noise).max() > 0.1  # the loop moved the latents
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_initial_noise_is_the_official_demo_noise():
    shape = (2, 3, 4, 6, 16)
    ref = randn_tensor((2, 16, 3, 4, 6), generator=torch.Generator().manual_seed(42), dtype=torch.float32)
    np.testing.assert_array_equal(pl.initial_noise(42, shape), ref.permute(0, 2, 3, 4, 1).numpy())


def test_frame_rounding_and_sizes(caplog):
    assert pl.round_num_frames(125) == 125
    with caplog.at_level("WARNING"):
        assert pl.round_num_frames(24) == 25
    assert "rounding 24 to 25" in caplog.text
    assert pl.round_num_frames(3) == 1
    assert pl.latent_shape(2, 125, 432, 768) == (2, 32, 54, 96, 16)
    pl.check_video_size(432, 768)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        pl.check_video_size(440, 768)
    with pytest.raises(ValueError, match="width"):
        pl.check_video_size(432, 770)


def test_prompt_embeds_shapes_are_checked(tmp_path):
    z = np.zeros
    e = pl.PromptEmbeds(z((2, 9, 64)), z((2, 32)), z((2, 9, 64)), z((2, 32)))
    e.validate(64, 32, guidance=True)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(B, L, 128\)"):
        e.validate(128, 32, guidance=True)
    with pytest.raises(ValueError, match="pooled_prompt_embeds must have shape"):
        e.validate(64, 16, guidance=True)
    bad = pl.PromptEmbeds(z((2, 9, 64)), z((2, 32)), z((2, 8, 64)), z((2, 32)))
    with pytest.raises(ValueError, match="negative_prompt_embeds must have the shape"):
        bad.validate(64, 32, guidance=True)
    bad.validate(64, 32, guidance=False)  # the negative pair is unused without guidance
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        pl.PromptEmbeds(z((2, 9, 64)), z((2, 32))).validate(64, 32, guidance=True)
    np.savez(tmp_path / "e.npz", prompt_embeds=z((1, 3, 4)))
    with pytest.raises(ValueError, match="missing keys"):
        pl.PromptEmbeds.load(tmp_path / "e.npz")
    assert e.repeat(3).prompt_embeds.shape == (6, 9, 64)
