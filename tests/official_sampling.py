"""The official ContentV sampling logic in PyTorch, as a test and benchmark reference.

Follows ``ContentVPipeline.__call__`` of github bytedance/ContentV (``contentv_pipeline.py``): diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=np.linspace(1, 0, N + 1)[:-1])``, the conditional and
unconditional transformer passes one after the other, ``scheduler.step``, then ``latents / (1 / std) + mean``,
``AutoencoderKLWan.decode`` and diffusers' video post-processing. Layout is the official one: (B, C, T, H, W).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def official_denoise(transformer, scheduler, latents, prompt_embeds, pooled, neg_embeds, neg_pooled, num_steps, guidance_scale,
                     on_step=None):
    """Official Euler loop with sequential CFG. latents (B, C, T, H, W) -> final latents (B, C, T, H, W).

    ``on_step(i, t, latents)`` is called after each step, where the official pipeline calls ``callback_on_step_end``."""
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device="cpu")
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(latents.shape[0])
        noise_pred = transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        if guidance_scale > 1.0:
            noise_pred_uncond = transformer(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=neg_embeds,
                pooled_projections=neg_pooled, return_dict=False,
            )[0]
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, float(t), latents)
    return latents


@torch.no_grad()
def official_decode(vae, latents):
    """Official decode: (B, 16, T, h, w) normalised latents -> frames (B, F, H, W, 3) float32 NumPy in [0, 1]."""
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
    video = (video / 2 + 0.5).clamp(0, 1)
    return video.permute(0, 2, 3, 4, 1).float().numpy()
